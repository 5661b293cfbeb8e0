#include "image/jpeg_encoder.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>

#include "common/error.h"

namespace trellis::image {
namespace {

// Zigzag position k holds the coefficient at natural index kZigzag[k] (as in the decoder).
constexpr std::array<uint8_t, 64> kZigzag = {0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,
                                             12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,  7,  14, 21, 28,
                                             35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
                                             58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63};

// The example tables of ITU T.81 Annex K (K.1 luminance, K.2 chrominance), natural order: what
// "quality 50" means to every JPEG library.
constexpr std::array<uint8_t, 64> kLuminanceBase = {16, 11, 10, 16, 24,  40,  51,  61,  12, 12, 14, 19, 26,  58,  60,  55,
                                                    14, 13, 16, 24, 40,  57,  69,  56,  14, 17, 22, 29, 51,  87,  80,  62,
                                                    18, 22, 37, 56, 68,  109, 103, 77,  24, 35, 55, 64, 81,  104, 113, 92,
                                                    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99};
constexpr std::array<uint8_t, 64> kChrominanceBase = {17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
                                                      24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
                                                      99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
                                                      99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99};

// Scaled as the IJG library does, so quality numbers mean what users know them to mean.
std::array<uint16_t, 64> ScaledTable(const std::array<uint8_t, 64>& base, uint32_t quality) {
  uint32_t scale = quality < 50 ? 5000 / quality : 200 - 2 * quality;
  std::array<uint16_t, 64> table{};
  for (int i = 0; i < 64; ++i) table[i] = static_cast<uint16_t>(std::clamp<uint32_t>((base[i] * scale + 50) / 100, 1, 255));
  return table;
}

// Bits needed for a coefficient's magnitude (its category).
int Category(int value) {
  auto magnitude = static_cast<uint32_t>(value < 0 ? -value : value);
  return magnitude == 0 ? 0 : 32 - __builtin_clz(magnitude);
}

struct HuffmanCode {
  std::array<uint8_t, 17> bits{};  // codes of each length 1..16
  std::vector<uint8_t> values;     // symbols in code order
  std::array<uint16_t, 256> code{};
  std::array<uint8_t, 256> length{};
};

// A length-limited Huffman code for these symbol counts (T.81 K.2): lengths from repeatedly
// merging the two rarest, a reserved symbol so no code is all ones, then lengths past 16 folded
// back by moving pairs of codes up the tree.
HuffmanCode BuildCode(const std::array<uint32_t, 256>& counts) {
  std::array<uint64_t, 257> frequency{};
  for (int i = 0; i < 256; ++i) frequency[i] = counts[i];
  frequency[256] = 1;
  std::array<int, 257> code_length{};
  std::array<int, 257> next{};
  next.fill(-1);
  while (true) {
    int first = -1;
    int second = -1;
    for (int i = 0; i <= 256; ++i) {
      if (frequency[i] != 0 && (first < 0 || frequency[i] <= frequency[first])) first = i;
    }
    for (int i = 0; i <= 256; ++i) {
      if (frequency[i] != 0 && i != first && (second < 0 || frequency[i] <= frequency[second])) second = i;
    }
    if (second < 0) break;
    frequency[first] += frequency[second];
    frequency[second] = 0;
    int k = first;
    ++code_length[k];
    while (next[k] >= 0) {
      k = next[k];
      ++code_length[k];
    }
    next[k] = second;
    k = second;
    ++code_length[k];
    while (next[k] >= 0) {
      k = next[k];
      ++code_length[k];
    }
  }
  std::array<int, 258> bits{};
  int longest = 0;
  for (int i = 0; i <= 256; ++i) {
    if (code_length[i] > 0) {
      ++bits[code_length[i]];
      longest = std::max(longest, code_length[i]);
    }
  }
  for (int i = longest; i > 16; --i) {
    while (bits[i] > 0) {
      int j = i - 2;
      while (bits[j] == 0) --j;
      bits[i] -= 2;
      bits[i - 1] += 1;
      bits[j + 1] += 2;
      bits[j] -= 1;
    }
  }
  int last = 16;
  while (last > 0 && bits[last] == 0) --last;
  bits[last] -= 1;  // the reserved symbol's code
  HuffmanCode result;
  for (int i = 1; i <= 16; ++i) result.bits[i] = static_cast<uint8_t>(bits[i]);
  for (int length = 1; length <= longest; ++length) {
    for (int symbol = 0; symbol < 256; ++symbol) {
      if (code_length[symbol] == length) result.values.push_back(static_cast<uint8_t>(symbol));
    }
  }
  // Canonical codes from the (limited) lengths, in symbol order.
  uint32_t code = 0;
  size_t index = 0;
  for (int length = 1; length <= 16; ++length) {
    for (int n = 0; n < result.bits[length]; ++n, ++index, ++code) {
      result.code[result.values[index]] = static_cast<uint16_t>(code);
      result.length[result.values[index]] = static_cast<uint8_t>(length);
    }
    code <<= 1;
  }
  result.values.resize(index);
  return result;
}

// Entropy-coded bytes: 0xFF followed by a stuffed 0x00, padding with one bits at the end.
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}

  void Write(uint32_t value, int count) {
    if (count == 0) return;
    accumulator_ = (accumulator_ << count) | (value & ((1u << count) - 1));
    filled_ += count;
    while (filled_ >= 8) {
      auto byte = static_cast<uint8_t>(accumulator_ >> (filled_ - 8));
      out_.push_back(byte);
      if (byte == 0xFF) out_.push_back(0x00);
      filled_ -= 8;
    }
  }

  void Flush() {
    if (filled_ > 0) Write(0x7F, 8 - filled_);
  }

 private:
  std::vector<uint8_t>& out_;
  uint64_t accumulator_ = 0;
  int filled_ = 0;
};

void Put16(std::vector<uint8_t>& out, uint32_t value) {
  out.push_back(static_cast<uint8_t>(value >> 8));
  out.push_back(static_cast<uint8_t>(value));
}

void Marker(std::vector<uint8_t>& out, uint8_t marker, size_t length) {
  out.push_back(0xFF);
  out.push_back(marker);
  Put16(out, static_cast<uint32_t>(length + 2));
}

// The forward DCT of an 8x8 block of samples (level-shifted), quantized, in zigzag order.
void ForwardTransform(const float* samples, const std::array<uint16_t, 64>& quant, int16_t* zigzag) {
  static const std::array<float, 64> basis = [] {
    std::array<float, 64> table{};
    for (int u = 0; u < 8; ++u) {
      for (int x = 0; x < 8; ++x) {
        double scale = u == 0 ? std::sqrt(0.125) : 0.5;
        table[u * 8 + x] = static_cast<float>(scale * std::cos((2 * x + 1) * u * M_PI / 16.0));
      }
    }
    return table;
  }();
  float rows[64];  // rows[y][u]: each row transformed
  for (int y = 0; y < 8; ++y) {
    for (int u = 0; u < 8; ++u) {
      float sum = 0;
      for (int x = 0; x < 8; ++x) sum += basis[u * 8 + x] * samples[y * 8 + x];
      rows[y * 8 + u] = sum;
    }
  }
  int16_t natural[64];
  for (int v = 0; v < 8; ++v) {
    for (int u = 0; u < 8; ++u) {
      float sum = 0;
      for (int y = 0; y < 8; ++y) sum += basis[v * 8 + y] * rows[y * 8 + u];
      natural[v * 8 + u] = static_cast<int16_t>(std::lround(sum / quant[v * 8 + u]));
    }
  }
  for (int k = 0; k < 64; ++k) zigzag[k] = natural[kZigzag[k]];
}

struct Plane {
  std::vector<float> samples;  // level-shifted (value - 128)
  uint32_t width = 0;          // padded to whole blocks of the MCU
  uint32_t height = 0;
};

}  // namespace

std::vector<uint8_t> EncodeJpeg(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels, const JpegEncodeOptions& options) {
  if (channels != 1 && channels != 3 && channels != 4) throw NativeError("ERR_INVALID_ARGUMENT", "JPEG encoding takes 1, 3 or 4 channels");
  if (width == 0 || height == 0 || width > 65535 || height > 65535) {
    throw NativeError("ERR_INVALID_ARGUMENT", "JPEG images are 1 to 65535 pixels a side, got " + std::to_string(width) + "x" + std::to_string(height));
  }
  if (options.quality < 1 || options.quality > 100) throw NativeError("ERR_INVALID_ARGUMENT", "JPEG quality is 1 to 100");
  const bool color = channels != 1;
  const bool subsample = color && options.subsample_chroma;
  const uint32_t mcu = subsample ? 16 : 8;
  const uint32_t padded_width = (width + mcu - 1) / mcu * mcu;
  const uint32_t padded_height = (height + mcu - 1) / mcu * mcu;

  // Planes padded by repeating the last row and column (edges that do not ring when decoded).
  std::array<Plane, 3> planes;
  const int component_count = color ? 3 : 1;
  for (int c = 0; c < component_count; ++c) {
    planes[c].width = padded_width;
    planes[c].height = padded_height;
    planes[c].samples.resize(static_cast<size_t>(padded_width) * padded_height);
  }
  for (uint32_t y = 0; y < padded_height; ++y) {
    const uint8_t* row = pixels + static_cast<size_t>(std::min(y, height - 1)) * width * channels;
    for (uint32_t x = 0; x < padded_width; ++x) {
      const uint8_t* pixel = row + static_cast<size_t>(std::min(x, width - 1)) * channels;
      size_t at = static_cast<size_t>(y) * padded_width + x;
      if (!color) {
        planes[0].samples[at] = pixel[0] - 128.0f;
        continue;
      }
      float r = pixel[0], g = pixel[1], b = pixel[2];
      planes[0].samples[at] = 0.299f * r + 0.587f * g + 0.114f * b - 128.0f;
      planes[1].samples[at] = -0.168736f * r - 0.331264f * g + 0.5f * b;
      planes[2].samples[at] = 0.5f * r - 0.418688f * g - 0.081312f * b;
    }
  }
  if (subsample) {
    // Chroma averaged over 2x2 pixels.
    for (int c = 1; c < 3; ++c) {
      Plane half;
      half.width = padded_width / 2;
      half.height = padded_height / 2;
      half.samples.resize(static_cast<size_t>(half.width) * half.height);
      const std::vector<float>& full = planes[c].samples;
      for (uint32_t y = 0; y < half.height; ++y) {
        for (uint32_t x = 0; x < half.width; ++x) {
          size_t at = static_cast<size_t>(2 * y) * padded_width + 2 * x;
          half.samples[static_cast<size_t>(y) * half.width + x] = 0.25f * (full[at] + full[at + 1] + full[at + padded_width] + full[at + padded_width + 1]);
        }
      }
      planes[c] = std::move(half);
    }
  }

  const std::array<uint16_t, 64> luminance = ScaledTable(kLuminanceBase, options.quality);
  const std::array<uint16_t, 64> chrominance = ScaledTable(kChrominanceBase, options.quality);

  // Quantized blocks in scan order (interleaved MCUs), each with its component.
  std::vector<int16_t> blocks;
  std::vector<uint8_t> owners;
  auto add_block = [&](int component, uint32_t block_x, uint32_t block_y) {
    const Plane& plane = planes[component];
    float samples[64];
    for (int y = 0; y < 8; ++y) {
      std::memcpy(&samples[y * 8], &plane.samples[static_cast<size_t>(block_y * 8 + y) * plane.width + block_x * 8], 8 * sizeof(float));
    }
    blocks.resize(blocks.size() + 64);
    ForwardTransform(samples, component == 0 ? luminance : chrominance, &blocks[blocks.size() - 64]);
    owners.push_back(static_cast<uint8_t>(component));
  };
  for (uint32_t mcu_y = 0; mcu_y < padded_height / mcu; ++mcu_y) {
    for (uint32_t mcu_x = 0; mcu_x < padded_width / mcu; ++mcu_x) {
      const uint32_t luma_blocks = subsample ? 2 : 1;
      for (uint32_t y = 0; y < luma_blocks; ++y) {
        for (uint32_t x = 0; x < luma_blocks; ++x) add_block(0, mcu_x * luma_blocks + x, mcu_y * luma_blocks + y);
      }
      if (color) {
        add_block(1, mcu_x, mcu_y);
        add_block(2, mcu_x, mcu_y);
      }
    }
  }

  // Pass one counts symbols (luma tables 0, chroma tables 1); pass two writes them.
  std::array<std::array<uint32_t, 256>, 2> dc_counts{};
  std::array<std::array<uint32_t, 256>, 2> ac_counts{};
  auto walk = [&](auto&& on_dc, auto&& on_ac) {
    std::array<int, 3> previous{};
    for (size_t index = 0; index < owners.size(); ++index) {
      const int16_t* block = &blocks[index * 64];
      int component = owners[index];
      int table = component == 0 ? 0 : 1;
      int difference = block[0] - previous[component];
      previous[component] = block[0];
      on_dc(table, difference);
      int run = 0;
      for (int k = 1; k < 64; ++k) {
        if (block[k] == 0) {
          ++run;
          continue;
        }
        while (run > 15) {
          on_ac(table, 0xF0, 0);  // sixteen zeros
          run -= 16;
        }
        on_ac(table, (run << 4) | Category(block[k]), block[k]);
        run = 0;
      }
      if (run > 0) on_ac(table, 0x00, 0);  // end of block
    }
  };
  walk([&](int table, int difference) { ++dc_counts[table][Category(difference)]; },
       [&](int table, int symbol, int) { ++ac_counts[table][symbol]; });
  const int tables = color ? 2 : 1;
  std::array<HuffmanCode, 2> dc_codes;
  std::array<HuffmanCode, 2> ac_codes;
  for (int t = 0; t < tables; ++t) {
    dc_codes[t] = BuildCode(dc_counts[t]);
    ac_codes[t] = BuildCode(ac_counts[t]);
  }

  std::vector<uint8_t> out;
  out.reserve(static_cast<size_t>(width) * height / 4 + 1024);
  out.push_back(0xFF);
  out.push_back(0xD8);
  const uint8_t jfif[] = {'J', 'F', 'I', 'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0};
  Marker(out, 0xE0, sizeof(jfif));
  out.insert(out.end(), jfif, jfif + sizeof(jfif));
  Marker(out, 0xDB, 65 * tables);
  for (int t = 0; t < tables; ++t) {
    out.push_back(static_cast<uint8_t>(t));
    const std::array<uint16_t, 64>& quant = t == 0 ? luminance : chrominance;
    for (int k = 0; k < 64; ++k) out.push_back(static_cast<uint8_t>(quant[kZigzag[k]]));
  }
  Marker(out, 0xC0, 6 + 3 * component_count);
  out.push_back(8);
  Put16(out, height);
  Put16(out, width);
  out.push_back(static_cast<uint8_t>(component_count));
  for (int c = 0; c < component_count; ++c) {
    out.push_back(static_cast<uint8_t>(c + 1));
    out.push_back(c == 0 && subsample ? 0x22 : 0x11);
    out.push_back(c == 0 ? 0 : 1);
  }
  size_t huffman_bytes = 0;
  for (int t = 0; t < tables; ++t) huffman_bytes += 17 + dc_codes[t].values.size() + 17 + ac_codes[t].values.size();
  Marker(out, 0xC4, huffman_bytes);
  for (int t = 0; t < tables; ++t) {
    for (int kind = 0; kind < 2; ++kind) {
      const HuffmanCode& code = kind == 0 ? dc_codes[t] : ac_codes[t];
      out.push_back(static_cast<uint8_t>((kind << 4) | t));
      out.insert(out.end(), code.bits.begin() + 1, code.bits.end());
      out.insert(out.end(), code.values.begin(), code.values.end());
    }
  }
  Marker(out, 0xDA, 4 + 2 * component_count);
  out.push_back(static_cast<uint8_t>(component_count));
  for (int c = 0; c < component_count; ++c) {
    out.push_back(static_cast<uint8_t>(c + 1));
    out.push_back(c == 0 ? 0x00 : 0x11);
  }
  out.push_back(0);
  out.push_back(63);
  out.push_back(0);
  BitWriter writer(out);
  auto magnitude_bits = [](int value, int category) {
    // Negative values are written as value - 1 in `category` bits (T.81 F.1.2.1).
    return static_cast<uint32_t>(value < 0 ? value - 1 : value) & ((1u << category) - 1);
  };
  walk(
      [&](int table, int difference) {
        int category = Category(difference);
        writer.Write(dc_codes[table].code[category], dc_codes[table].length[category]);
        writer.Write(magnitude_bits(difference, category), category);
      },
      [&](int table, int symbol, int value) {
        writer.Write(ac_codes[table].code[symbol], ac_codes[table].length[symbol]);
        int category = symbol & 15;
        writer.Write(magnitude_bits(value, category), category);
      });
  writer.Flush();
  out.push_back(0xFF);
  out.push_back(0xD9);
  return out;
}

}  // namespace trellis::image
