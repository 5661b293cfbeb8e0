// Copies of large buffers into shared memory (object data into the store).
//
// A plain memcpy of 100 MB into a touched MAP_SHARED mapping runs at about 6 GB/s on the machines
// measured: each destination line is first read for ownership, and the copy evicts the cache for
// data no one reads soon. Non-temporal stores skip the read (8.4-9.9 GB/s), and two threads of them
// reach 11.5-12.6 GB/s, where one core's outstanding misses were the limit (as Ray's plasma copies
// large objects with several threads).
#pragma once

#include <cstddef>

namespace trellis {

// Below this, a plain memcpy: the data fits in cache, and streaming it out would only slow a
// reader that comes soon.
constexpr size_t kStreamingCopyMinBytes = size_t{1} << 20;
// From this size, the copy is split across threads: below it, starting them costs more than it saves.
constexpr size_t kThreadedCopyMinBytes = size_t{16} << 20;
// At most this many threads share one copy (the caller's included).
constexpr unsigned kMaxCopyThreads = 4;

// Copies `length` bytes from `source` to `destination`; the ranges must not overlap. Any sizes and
// addresses. When it returns, the bytes are visible to other threads and processes as a memcpy's
// would be.
void BulkCopy(void* destination, const void* source, size_t length);

// Threads BulkCopy would use for `length` bytes on this process's CPUs (for tests and benchmarks).
unsigned BulkCopyThreads(size_t length);

}  // namespace trellis
