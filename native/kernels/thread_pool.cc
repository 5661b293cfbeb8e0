#include "kernels/thread_pool.h"

#include "common/error.h"

#include <atomic>
#include <string>
#include <system_error>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TRELLIS_PAUSE() _mm_pause()
#else
#define TRELLIS_PAUSE() std::this_thread::yield()
#endif

namespace trellis::kernels {
namespace {

// How long a worker keeps looking for the next job before it sleeps.
constexpr auto kSpin = std::chrono::microseconds(200);

class Pool {
 public:
  explicit Pool(size_t workers) {
    threads_.reserve(workers);
    try {
      for (size_t index = 0; index < workers; ++index) threads_.emplace_back([this] { Work(); });
    } catch (...) {
      // No thread to be had (a limit on threads or memory): the ones started are joined.
      Stop();
      throw;
    }
  }

  ~Pool() { Stop(); }

  size_t workers() const { return threads_.size(); }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
  }

  void Run(size_t count, const std::function<void(size_t)>& task) {
    task_ = &task;
    count_ = count;
    next_.store(0, std::memory_order_relaxed);
    busy_.store(threads_.size(), std::memory_order_relaxed);
    {
      // The lock orders the job's fields before any worker that sleeps sees the new generation.
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    Drain();
    // Every worker leaves the job before the task (a reference into the caller's frame) goes.
    while (busy_.load(std::memory_order_acquire) != 0) TRELLIS_PAUSE();
  }

 private:
  void Drain() {
    for (;;) {
      const size_t index = next_.fetch_add(1, std::memory_order_relaxed);
      if (index >= count_) return;
      (*task_)(index);
    }
  }

  void Work() {
    // Not the current generation: a worker that starts after the first job was handed out must still take part in it.
    uint64_t seen = 0;
    for (;;) {
      const auto deadline = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < deadline) TRELLIS_PAUSE();
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stopping_) return;
      Drain();
      busy_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<size_t> next_{0};
  std::atomic<size_t> busy_{0};
  const std::function<void(size_t)>* task_ = nullptr;
  size_t count_ = 0;
  bool stopping_ = false;
};

// One pool per process. Kernels may be called from several JS threads (worker_threads): one job
// runs on the pool at a time, and a call that finds it busy runs its tasks on its own thread.
std::mutex pool_mutex;
std::unique_ptr<Pool> pool;

}  // namespace

void SetKernelThreads(size_t threads) {
  const size_t workers = threads > 1 ? threads - 1 : 0;
  std::lock_guard<std::mutex> lock(pool_mutex);
  if ((pool ? pool->workers() : 0) == workers) return;
  pool.reset();
  if (workers == 0) return;
  try {
    pool = std::make_unique<Pool>(workers);
  } catch (const std::system_error& error) {
    throw NativeError("ERR_KERNEL_THREADS", "could not start " + std::to_string(workers) + " kernel threads: " + error.what());
  }
}

size_t KernelThreads() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  return pool ? pool->workers() + 1 : 1;
}

void ParallelFor(size_t count, const std::function<void(size_t)>& task) {
  std::unique_lock<std::mutex> lock(pool_mutex, std::try_to_lock);
  if (!lock.owns_lock() || !pool || count <= 1) {
    if (lock.owns_lock()) lock.unlock();
    for (size_t index = 0; index < count; ++index) task(index);
    return;
  }
  pool->Run(count, task);
}

void StopKernelThreads() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  pool.reset();
}

}  // namespace trellis::kernels
