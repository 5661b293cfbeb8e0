#include "image/resize.h"

#include <algorithm>
#include <cmath>
#include <cstddef>

namespace trellis::image {
namespace {

// For each output position along one axis: the first input position it reads and the weights of
// the inputs from there on (they sum to 1).
struct Taps {
  std::vector<uint32_t> first;
  std::vector<uint32_t> count;
  std::vector<float> weights;
  uint32_t width = 0;  // weights per output position
};

Taps MakeTaps(uint32_t in, uint32_t out) {
  Taps taps;
  double scale = static_cast<double>(in) / out;
  double filter_scale = std::max(scale, 1.0);
  double support = filter_scale;  // the triangle's half-width
  taps.width = static_cast<uint32_t>(std::ceil(support)) * 2 + 1;
  taps.first.resize(out);
  taps.count.resize(out);
  taps.weights.assign(static_cast<size_t>(out) * taps.width, 0.0f);
  for (uint32_t o = 0; o < out; ++o) {
    double center = (o + 0.5) * scale;
    auto low = static_cast<int64_t>(std::floor(center - support));
    auto high = static_cast<int64_t>(std::ceil(center + support));
    low = std::max<int64_t>(low, 0);
    high = std::min<int64_t>(high, in);
    double total = 0;
    uint32_t n = 0;
    float* weights = &taps.weights[static_cast<size_t>(o) * taps.width];
    for (int64_t i = low; i < high && n < taps.width; ++i, ++n) {
      double weight = std::max(0.0, 1.0 - std::fabs((i + 0.5 - center) / filter_scale));
      weights[n] = static_cast<float>(weight);
      total += weight;
    }
    if (total <= 0) {  // cannot happen for in, out >= 1; kept so a weight is never divided by 0
      weights[0] = 1;
      total = 1;
      n = 1;
    }
    for (uint32_t k = 0; k < n; ++k) weights[k] = static_cast<float>(weights[k] / total);
    taps.first[o] = static_cast<uint32_t>(low);
    taps.count[o] = n;
  }
  return taps;
}

// The horizontal pass. kChannels is the channel count when known at compile time (1, 3, 4: the
// inner loops unroll), 0 for any other count, read from `channels`.
template <uint32_t kChannels>
void HorizontalPass(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels, const Taps& taps, uint32_t out_width, float* rows) {
  const uint32_t count = kChannels != 0 ? kChannels : channels;
  for (uint32_t y = 0; y < height; ++y) {
    const uint8_t* source = pixels + static_cast<size_t>(y) * width * count;
    float* target = rows + static_cast<size_t>(y) * out_width * count;
    for (uint32_t x = 0; x < out_width; ++x) {
      const float* weights = &taps.weights[static_cast<size_t>(x) * taps.width];
      const uint8_t* first = source + static_cast<size_t>(taps.first[x]) * count;
      float sums[kChannels != 0 ? kChannels : 64] = {};
      for (uint32_t k = 0; k < taps.count[x]; ++k) {
        const float weight = weights[k];
        for (uint32_t c = 0; c < count; ++c) sums[c] += weight * first[k * count + c];
      }
      for (uint32_t c = 0; c < count; ++c) target[x * count + c] = sums[c];
    }
  }
}

}  // namespace

void ResizeBilinearInto(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels, uint32_t out_height, uint32_t out_width,
                        uint8_t* out) {
  Taps horizontal = MakeTaps(width, out_width);
  Taps vertical = MakeTaps(height, out_height);
  // Horizontal pass into floats (a buffer kept per thread: a fresh one is pages to fault in every
  // image), then the vertical pass rounds once.
  thread_local std::vector<float> rows;
  rows.resize(static_cast<size_t>(height) * out_width * channels);
  if (channels == 1) HorizontalPass<1>(pixels, height, width, channels, horizontal, out_width, rows.data());
  else if (channels == 3) HorizontalPass<3>(pixels, height, width, channels, horizontal, out_width, rows.data());
  else if (channels == 4) HorizontalPass<4>(pixels, height, width, channels, horizontal, out_width, rows.data());
  else HorizontalPass<0>(pixels, height, width, channels, horizontal, out_width, rows.data());  // at most 64 (the binding's limit)
  size_t row_length = static_cast<size_t>(out_width) * channels;
  std::vector<float> sums(row_length);
  for (uint32_t y = 0; y < out_height; ++y) {
    std::fill(sums.begin(), sums.end(), 0.0f);
    const float* weights = &vertical.weights[static_cast<size_t>(y) * vertical.width];
    for (uint32_t k = 0; k < vertical.count[y]; ++k) {
      const float* source = &rows[static_cast<size_t>(vertical.first[y] + k) * row_length];
      float weight = weights[k];
      for (size_t i = 0; i < row_length; ++i) sums[i] += weight * source[i];
    }
    uint8_t* target = out + static_cast<size_t>(y) * row_length;
    for (size_t i = 0; i < row_length; ++i) target[i] = static_cast<uint8_t>(std::clamp(static_cast<int>(sums[i] + 0.5f), 0, 255));
  }
  if (rows.capacity() * sizeof(float) > (64u << 20)) std::vector<float>().swap(rows);
}

std::vector<uint8_t> ResizeBilinear(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels, uint32_t out_height,
                                    uint32_t out_width) {
  std::vector<uint8_t> out(static_cast<size_t>(out_height) * out_width * channels);
  ResizeBilinearInto(pixels, height, width, channels, out_height, out_width, out.data());
  return out;
}

}  // namespace trellis::image
