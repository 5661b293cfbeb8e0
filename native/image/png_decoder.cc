#include "image/png_decoder.h"
#include "image/png_filter.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"

namespace trellis::image {
namespace {

[[noreturn]] void Corrupt(const std::string& what) { throw NativeError("ERR_IMAGE_DECODE", "PNG: " + what); }

uint32_t SamplesPerPixel(uint32_t color_type) {
  switch (color_type) {
    case 0: return 1;  // gray
    case 2: return 3;  // RGB
    case 3: return 1;  // palette index
    case 4: return 2;  // gray + alpha
    case 6: return 4;  // RGBA
    default: Corrupt("colour type " + std::to_string(color_type) + " is not a PNG colour type");
  }
}

void CheckHeader(const PngHeader& header) {
  if (header.width == 0 || header.height == 0) Corrupt("the image has no pixels");
  uint32_t depth = header.bit_depth;
  bool allowed = false;
  switch (header.color_type) {
    case 0: allowed = depth == 1 || depth == 2 || depth == 4 || depth == 8 || depth == 16; break;
    case 3: allowed = depth == 1 || depth == 2 || depth == 4 || depth == 8; break;
    case 2: case 4: case 6: allowed = depth == 8 || depth == 16; break;
    default: SamplesPerPixel(header.color_type);
  }
  if (!allowed) Corrupt("bit depth " + std::to_string(depth) + " is not allowed for colour type " + std::to_string(header.color_type));
  if (header.interlace > 1) Corrupt("unknown interlace method " + std::to_string(header.interlace));
}

// Adam7's passes: starting column and row, and the steps between them.
constexpr std::array<std::array<uint32_t, 4>, 7> kAdam7 = {{{0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4}, {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}}};

struct Pass {
  uint32_t x0, y0, dx, dy, width, height;
};

std::vector<Pass> Passes(const PngHeader& header) {
  if (header.interlace == 0) return {{0, 0, 1, 1, header.width, header.height}};
  std::vector<Pass> passes;
  for (const auto& [x0, y0, dx, dy] : kAdam7) {
    uint32_t width = header.width > x0 ? (header.width - x0 + dx - 1) / dx : 0;
    uint32_t height = header.height > y0 ? (header.height - y0 + dy - 1) / dy : 0;
    passes.push_back({x0, y0, dx, dy, width, height});
  }
  return passes;
}

size_t RowBytes(uint32_t width, uint32_t bits_per_pixel) { return (static_cast<size_t>(width) * bits_per_pixel + 7) / 8; }


// Undoes a row's filter in place; `previous` is the row above after its own unfiltering (zeros for
// a pass's first row), `stride` the bytes of one whole pixel (at least 1).
void Unfilter(uint8_t filter, uint8_t* row, const uint8_t* previous, size_t length, size_t stride) {
  switch (filter) {
    case 0: return;
    case 1:
      for (size_t i = stride; i < length; ++i) row[i] = static_cast<uint8_t>(row[i] + row[i - stride]);
      return;
    case 2:
      for (size_t i = 0; i < length; ++i) row[i] = static_cast<uint8_t>(row[i] + previous[i]);
      return;
    case 3:
      for (size_t i = 0; i < length; ++i) {
        int left = i >= stride ? row[i - stride] : 0;
        row[i] = static_cast<uint8_t>(row[i] + ((left + previous[i]) >> 1));
      }
      return;
    case 4:
      for (size_t i = 0; i < length; ++i) {
        int left = i >= stride ? row[i - stride] : 0;
        int up_left = i >= stride ? previous[i - stride] : 0;
        row[i] = static_cast<uint8_t>(row[i] + Paeth(left, previous[i], up_left));
      }
      return;
    default: Corrupt("unknown row filter " + std::to_string(filter));
  }
}

}  // namespace

size_t PngDataSize(const PngHeader& header) {
  CheckHeader(header);
  uint32_t bits_per_pixel = SamplesPerPixel(header.color_type) * header.bit_depth;
  size_t total = 0;
  for (const Pass& pass : Passes(header)) {
    if (pass.width == 0 || pass.height == 0) continue;
    total += (RowBytes(pass.width, bits_per_pixel) + 1) * pass.height;
  }
  return total;
}

DecodedImage ReconstructPng(Bytes inflated, const PngHeader& header, Bytes palette, Bytes transparency, uint32_t channels) {
  if (channels != 1 && channels != 3 && channels != 4) throw NativeError("ERR_INVALID_ARGUMENT", "channels must be 1, 3 or 4");
  size_t needed = PngDataSize(header);
  if (inflated.size < needed) Corrupt("the image data holds " + std::to_string(inflated.size) + " bytes, " + std::to_string(needed) + " needed (truncated?)");
  uint32_t samples = SamplesPerPixel(header.color_type);
  uint32_t depth = header.bit_depth;
  uint32_t bits_per_pixel = samples * depth;
  size_t stride = std::max<size_t>(1, bits_per_pixel / 8);
  if (header.color_type == 3 && (palette.size == 0 || palette.size % 3 != 0 || palette.size > 768)) Corrupt("a palette image without a valid PLTE chunk");

  // Every pixel first as RGBA8, the form every colour type reaches without loss that matters.
  size_t pixel_count = static_cast<size_t>(header.width) * header.height;
  std::vector<uint8_t> rgba(pixel_count * 4);
  uint32_t max_value = (1u << depth) - 1;
  auto sample = [&](const uint8_t* row, size_t x, uint32_t index) -> uint32_t {
    size_t position = x * samples + index;
    if (depth == 8) return row[position];
    if (depth == 16) return (static_cast<uint32_t>(row[position * 2]) << 8) | row[position * 2 + 1];
    size_t bit = position * depth;
    return (row[bit / 8] >> (8 - depth - bit % 8)) & max_value;
  };
  auto to8 = [&](uint32_t value) -> uint8_t {
    if (depth == 8) return static_cast<uint8_t>(value);
    if (depth == 16) return static_cast<uint8_t>(value >> 8);
    return static_cast<uint8_t>(value * 255 / max_value);
  };
  // tRNS: one colour that is transparent (gray, RGB; compared at full depth) or alpha per entry.
  bool keyed = false;
  std::array<uint32_t, 3> key{};
  if (transparency.size > 0) {
    if (header.color_type == 0 && transparency.size >= 2) {
      keyed = true;
      key[0] = (static_cast<uint32_t>(transparency.data[0]) << 8) | transparency.data[1];
    } else if (header.color_type == 2 && transparency.size >= 6) {
      keyed = true;
      for (int i = 0; i < 3; ++i) key[i] = (static_cast<uint32_t>(transparency.data[2 * i]) << 8) | transparency.data[2 * i + 1];
    }
  }
  size_t palette_entries = palette.size / 3;

  const uint8_t* input = inflated.data;
  for (const Pass& pass : Passes(header)) {
    if (pass.width == 0 || pass.height == 0) continue;
    size_t row_bytes = RowBytes(pass.width, bits_per_pixel);
    std::vector<uint8_t> previous(row_bytes, 0);
    std::vector<uint8_t> row(row_bytes);
    for (uint32_t y = 0; y < pass.height; ++y) {
      uint8_t filter = *input++;
      std::memcpy(row.data(), input, row_bytes);
      input += row_bytes;
      Unfilter(filter, row.data(), previous.data(), row_bytes, stride);
      uint8_t* target_row = &rgba[(static_cast<size_t>(pass.y0 + y * pass.dy) * header.width) * 4];
      for (uint32_t x = 0; x < pass.width; ++x) {
        uint8_t* pixel = target_row + static_cast<size_t>(pass.x0 + x * pass.dx) * 4;
        switch (header.color_type) {
          case 0: {
            uint32_t gray = sample(row.data(), x, 0);
            pixel[0] = pixel[1] = pixel[2] = to8(gray);
            pixel[3] = keyed && gray == key[0] ? 0 : 255;
            break;
          }
          case 2: {
            uint32_t r = sample(row.data(), x, 0), g = sample(row.data(), x, 1), b = sample(row.data(), x, 2);
            pixel[0] = to8(r);
            pixel[1] = to8(g);
            pixel[2] = to8(b);
            pixel[3] = keyed && r == key[0] && g == key[1] && b == key[2] ? 0 : 255;
            break;
          }
          case 3: {
            uint32_t index = sample(row.data(), x, 0);
            if (index >= palette_entries) Corrupt("a pixel's palette index " + std::to_string(index) + " is past the palette's " + std::to_string(palette_entries) + " entries");
            std::memcpy(pixel, palette.data + index * 3, 3);
            pixel[3] = index < transparency.size ? transparency.data[index] : 255;
            break;
          }
          case 4:
            pixel[0] = pixel[1] = pixel[2] = to8(sample(row.data(), x, 0));
            pixel[3] = to8(sample(row.data(), x, 1));
            break;
          default:
            for (uint32_t i = 0; i < 4; ++i) pixel[i] = to8(sample(row.data(), x, i));
            break;
        }
      }
      std::swap(previous, row);
    }
  }

  DecodedImage image;
  image.width = header.width;
  image.height = header.height;
  image.channels = channels;
  if (channels == 4) {
    image.pixels = std::move(rgba);
    return image;
  }
  image.pixels.resize(pixel_count * channels);
  for (size_t i = 0; i < pixel_count; ++i) {
    const uint8_t* pixel = &rgba[i * 4];
    if (channels == 3) {
      std::memcpy(&image.pixels[i * 3], pixel, 3);
    } else {
      image.pixels[i] = static_cast<uint8_t>((pixel[0] * 19595 + pixel[1] * 38470 + pixel[2] * 7471 + 32768) >> 16);
    }
  }
  return image;
}

}  // namespace trellis::image
