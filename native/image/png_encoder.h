// PNG's per-row filtering for writing: each row prefixed with the filter (of the five) whose
// residuals are smallest in absolute sum, the usual heuristic. lib/image deflates the result with
// Node's zlib and wraps it in chunks.
#pragma once

#include <cstdint>
#include <vector>

namespace trellis::image {

// `pixels`: height x width x channels bytes (8-bit samples).
std::vector<uint8_t> FilterPngRows(const uint8_t* pixels, uint32_t height, uint32_t width, uint32_t channels);

}  // namespace trellis::image
