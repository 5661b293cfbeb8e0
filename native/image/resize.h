// Image resizing for model inputs: bilinear interpolation that widens its triangle filter by the
// reduction factor when shrinking, so a large photograph brought down to 224x224 is averaged over
// every source pixel instead of sampled (aliasing), as PIL's BILINEAR filter does.
#pragma once

#include <cstdint>
#include <vector>

namespace trellis::image {

// Into `out`, out_height x out_width x channels bytes.
void ResizeBilinearInto(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels, uint32_t out_height, uint32_t out_width,
                        uint8_t* out);

std::vector<uint8_t> ResizeBilinear(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels, uint32_t out_height,
                                    uint32_t out_width);

}  // namespace trellis::image
