// The threads a rank's kernels share. A rank is one process; with numCpusPerRank above 1 its
// matmuls and attention split their independent parts (column blocks, key/value heads) across
// this many threads, the calling JS thread included. Each output is still computed by one thread
// in the single-threaded order, so results do not depend on the thread count.
//
// Workers spin briefly after each job before they sleep: a decode step is a few hundred small
// kernel calls, and waking a sleeping thread for each would cost more than the work it takes.
#pragma once

#include <cstddef>
#include <functional>

namespace trellis::kernels {

// Threads the kernels use, the caller's included (1: no workers). Changing it joins the old
// workers and starts new ones; call it between kernel calls, from the JS thread.
void SetKernelThreads(size_t threads);
size_t KernelThreads();

// Runs task(index) for every index in [0, count), spread over the kernel threads, and returns
// when all have run. Tasks must not throw, and must not call ParallelFor themselves.
void ParallelFor(size_t count, const std::function<void(size_t)>& task);

// Joins the workers (at environment cleanup: the process is exiting).
void StopKernelThreads();

}  // namespace trellis::kernels
