// What PNG's decoder and encoder share: the Paeth predictor (filter type 4).
#pragma once

#include <cstdlib>

namespace trellis::image {

// The one of left, up and up-left nearest to left + up - up_left (ties in that order).
inline int Paeth(int left, int up, int up_left) {
  int estimate = left + up - up_left;
  int to_left = std::abs(estimate - left);
  int to_up = std::abs(estimate - up);
  int to_up_left = std::abs(estimate - up_left);
  if (to_left <= to_up && to_left <= to_up_left) return left;
  if (to_up <= to_up_left) return up;
  return up_left;
}

}  // namespace trellis::image
