#include "common/bulk_copy.h"

#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace trellis {
namespace {

constexpr uintptr_t kLine = 64;

// Non-temporal stores of whole destination lines; the ragged ends go through memcpy.
void StreamingCopy(uint8_t* destination, const uint8_t* source, size_t length) {
#if defined(__SSE2__)
  size_t head = (kLine - (reinterpret_cast<uintptr_t>(destination) & (kLine - 1))) & (kLine - 1);
  head = std::min(head, length);
  std::memcpy(destination, source, head);
  destination += head;
  source += head;
  length -= head;
  const size_t lines = length / kLine;
  for (size_t i = 0; i < lines; ++i) {
    // The source may sit at any address (a JS buffer's offset): unaligned loads.
    const __m128i* from = reinterpret_cast<const __m128i*>(source);
    __m128i a = _mm_loadu_si128(from);
    __m128i b = _mm_loadu_si128(from + 1);
    __m128i c = _mm_loadu_si128(from + 2);
    __m128i d = _mm_loadu_si128(from + 3);
    __m128i* to = reinterpret_cast<__m128i*>(destination);
    _mm_stream_si128(to, a);
    _mm_stream_si128(to + 1, b);
    _mm_stream_si128(to + 2, c);
    _mm_stream_si128(to + 3, d);
    source += kLine;
    destination += kLine;
  }
  // Streaming stores are weakly ordered: fence them before this thread reports the copy done
  // (a seal, in another process, must find every byte).
  _mm_sfence();
  std::memcpy(destination, source, length - lines * kLine);
#else
  std::memcpy(destination, source, length);
#endif
}

// CPUs this process may run on: a container or taskset may allow fewer than the machine has.
unsigned UsableCpus() {
  static const unsigned cpus = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<unsigned>(std::max(1, CPU_COUNT(&set)));
    return std::max(1u, std::thread::hardware_concurrency());
  }();
  return cpus;
}

}  // namespace

unsigned BulkCopyThreads(size_t length) {
  if (length < kThreadedCopyMinBytes) return 1;
  return std::min(kMaxCopyThreads, UsableCpus());
}

void BulkCopy(void* destination, const void* source, size_t length) {
  auto* to = static_cast<uint8_t*>(destination);
  const auto* from = static_cast<const uint8_t*>(source);
  if (length == 0) return;  // an empty buffer's address may be null, which memcpy must not see
  if (length < kStreamingCopyMinBytes) {
    std::memcpy(to, from, length);
    return;
  }
  const unsigned threads = BulkCopyThreads(length);
  if (threads == 1) {
    StreamingCopy(to, from, length);
    return;
  }
  // Parts end on destination line boundaries, so that no two threads write one cache line.
  const uintptr_t base = reinterpret_cast<uintptr_t>(to);
  auto boundary = [&](unsigned part) -> size_t {
    if (part == threads) return length;
    uintptr_t at = base + length / threads * part;
    return std::min<size_t>(length, ((at + kLine - 1) & ~(kLine - 1)) - base);
  };
  {
    // Declared before the helpers start: a jthread joins when it goes, so every part is written
    // (and fenced) before BulkCopy returns, whatever happens here.
    std::vector<std::jthread> helpers;
    helpers.reserve(threads - 1);
    for (unsigned part = 1; part < threads; ++part) {
      const size_t begin = boundary(part);
      const size_t end = boundary(part + 1);
      try {
        helpers.emplace_back(StreamingCopy, to + begin, from + begin, end - begin);
      } catch (const std::system_error&) {
        // No thread to be had (a limit on threads or memory): this part is copied here.
        StreamingCopy(to + begin, from + begin, end - begin);
      }
    }
    StreamingCopy(to, from, boundary(1));
  }
}

}  // namespace trellis
