// A JPEG decoder (ITU T.81 with JFIF and Adobe conventions): baseline and extended sequential
// Huffman, and progressive, 8-bit samples, any sampling factors, restart intervals; grayscale,
// YCbCr, RGB, CMYK and YCCK. Images feed models, so the output is always 8-bit interleaved pixels
// in the channel count the caller asks for (1 gray, 3 RGB, 4 RGBA). Arithmetic coding, lossless
// and hierarchical JPEG and 12-bit samples are refused with ERR_IMAGE_UNSUPPORTED; damaged data is
// ERR_IMAGE_DECODE, never a read outside the input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace trellis::image {

struct ImageSize {
  uint32_t width = 0;
  uint32_t height = 0;
  // Channels as stored: 1 gray, 3 colour, 4 CMYK.
  uint32_t channels = 0;
};

struct DecodedImage {
  uint32_t width = 0;
  uint32_t height = 0;
  uint32_t channels = 0;
  std::vector<uint8_t> pixels;
};

// The frame header's size, without decoding the image.
ImageSize ProbeJpeg(const uint8_t* data, size_t size);

// Where decoded pixels go: given their byte count once the header is read, returns the memory to
// fill (a JavaScript ArrayBuffer's, so pixels are written once, where they will stay).
using PixelAllocator = std::function<uint8_t*(size_t bytes)>;

// Decodes into `channels` (1, 3 or 4) 8-bit channels per pixel, in memory from `allocate`. With
// min_width and min_height, decodes reduced (1/2, 1/4 or 1/8 in the DCT domain: far less work) to
// the smallest size that is still at least that large; the size returned is what was decoded.
ImageSize DecodeJpegInto(const uint8_t* data, size_t size, uint32_t channels, uint64_t max_pixels, const PixelAllocator& allocate,
                         uint32_t min_width = 0, uint32_t min_height = 0);

// Decodes into `channels` (1, 3 or 4) 8-bit channels per pixel. An image of more than
// `max_pixels` pixels is ERR_IMAGE_TOO_LARGE before anything is allocated for it.
DecodedImage DecodeJpeg(const uint8_t* data, size_t size, uint32_t channels, uint64_t max_pixels);

}  // namespace trellis::image
