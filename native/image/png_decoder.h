// PNG pixels from a PNG's inflated image data: the five filters, Adam7 interlacing, every bit
// depth and colour type, palettes and tRNS transparency, brought to 8-bit interleaved pixels in
// the channel count asked for. Chunk parsing and inflating happen in lib/image (zlib is Node's);
// this is the per-byte part.
#pragma once

#include <cstddef>
#include <cstdint>

#include "image/jpeg_decoder.h"

namespace trellis::image {

struct PngHeader {
  uint32_t width = 0;
  uint32_t height = 0;
  uint32_t bit_depth = 0;
  uint32_t color_type = 0;
  uint32_t interlace = 0;
};

struct Bytes {
  const uint8_t* data = nullptr;
  size_t size = 0;
};

// The bytes the inflated data must hold for `header` (filter bytes included); throws
// ERR_IMAGE_DECODE for a header PNG does not allow.
size_t PngDataSize(const PngHeader& header);

DecodedImage ReconstructPng(Bytes inflated, const PngHeader& header, Bytes palette, Bytes transparency, uint32_t channels);

}  // namespace trellis::image
