// A baseline JPEG encoder (JFIF): 8-bit gray or YCbCr with 4:2:0 or 4:4:4 chroma, quality scaled
// quantization tables (the IJG convention, 1-100), and Huffman tables made for each image from its
// own symbol counts (two passes: smaller files than the standard tables, and no table to carry).
// For writing images a model made or cropped; RGBA's alpha is dropped, as JPEG has none.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace trellis::image {

struct JpegEncodeOptions {
  uint32_t quality = 90;
  bool subsample_chroma = true;  // 4:2:0; false keeps chroma at full size (4:4:4)
};

// `pixels`: height x width x channels bytes, channels 1 (gray), 3 (RGB) or 4 (RGBA).
std::vector<uint8_t> EncodeJpeg(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels, const JpegEncodeOptions& options);

}  // namespace trellis::image
