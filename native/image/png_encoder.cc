#include "image/png_encoder.h"
#include "image/png_filter.h"

#include <array>
#include <cstdlib>
#include <cstring>

namespace trellis::image {

std::vector<uint8_t> FilterPngRows(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels) {
  const size_t row_bytes = static_cast<size_t>(width) * channels;
  std::vector<uint8_t> out((row_bytes + 1) * height);
  std::vector<uint8_t> zeros(row_bytes, 0);
  std::array<std::vector<uint8_t>, 5> candidates;
  for (auto& candidate : candidates) candidate.resize(row_bytes);
  for (uint32_t y = 0; y < height; ++y) {
    const uint8_t* row = pixels + y * row_bytes;
    const uint8_t* up = y > 0 ? row - row_bytes : zeros.data();
    size_t best = 0;
    uint64_t best_cost = UINT64_MAX;
    for (size_t filter = 0; filter < 5; ++filter) {
      uint8_t* target = candidates[filter].data();
      uint64_t cost = 0;
      for (size_t i = 0; i < row_bytes; ++i) {
        int left = i >= channels ? row[i - channels] : 0;
        int up_left = i >= channels ? up[i - channels] : 0;
        int predicted = 0;
        switch (filter) {
          case 1: predicted = left; break;
          case 2: predicted = up[i]; break;
          case 3: predicted = (left + up[i]) >> 1; break;
          case 4: predicted = Paeth(left, up[i], up_left); break;
          default: break;
        }
        auto residual = static_cast<uint8_t>(row[i] - predicted);
        target[i] = residual;
        // Residuals read as signed bytes: small either way is cheap to deflate.
        cost += static_cast<uint64_t>(std::abs(static_cast<int8_t>(residual)));
      }
      if (cost < best_cost) {
        best_cost = cost;
        best = filter;
      }
    }
    uint8_t* line = &out[y * (row_bytes + 1)];
    line[0] = static_cast<uint8_t>(best);
    std::memcpy(line + 1, candidates[best].data(), row_bytes);
  }
  return out;
}

}  // namespace trellis::image
