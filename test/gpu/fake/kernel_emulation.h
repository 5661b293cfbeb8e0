// Runs CUDA kernels written in the subset native/kernels/cuda uses on the host, for the fake
// driver (fake_kernels.cc): each block's threads are fibers (ucontext) on the launching thread,
// switched at barriers. __syncthreads is a barrier of the block, a warp shuffle a barrier of the
// warp (every lane writes its value, then reads its partner's). A block whose threads wait on a
// barrier that can never fill is reported and aborts: a synchronisation bug the GPU would hang on.
// Blocks run one after another, so `__shared__` variables can be function statics.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define TRELLIS_KERNEL_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define TRELLIS_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(trellis_emulation::DynamicShared())

struct EmulatedDim {
  unsigned x = 1, y = 1, z = 1;
};

// Set by the scheduler before it switches into a fiber.
inline thread_local EmulatedDim threadIdx, blockIdx, blockDim, gridDim;

namespace trellis_emulation {

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
  bool waiting = false;
};

struct Barrier {
  unsigned expected = 0;
  unsigned arrived = 0;
  std::vector<unsigned> waiting;  // fibers parked on it
};

struct Launch {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned current = 0;
  std::vector<Barrier> barriers;  // 0: the block; 1 + w: warp w
  std::vector<float> exchange;    // one slot per thread, for shuffles
  std::vector<unsigned char> shared;
  std::function<void()> body;
};

inline thread_local Launch* active = nullptr;

inline unsigned char* DynamicShared() { return active->shared.data(); }

inline void Arrive(unsigned id) {
  Launch& launch = *active;
  Barrier& barrier = launch.barriers[id];
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    for (unsigned fiber : barrier.waiting) launch.fibers[fiber].waiting = false;
    barrier.waiting.clear();
    return;
  }
  Fiber& fiber = launch.fibers[launch.current];
  fiber.waiting = true;
  barrier.waiting.push_back(launch.current);
  swapcontext(&fiber.context, &launch.scheduler);
}

inline void Entry() {
  active->body();
  active->fibers[active->current].done = true;
  // Returning resumes uc_link: the scheduler.
}

// Runs `body` once per thread of every block of the grid.
inline void Run(EmulatedDim grid, EmulatedDim block, size_t shared_bytes, const std::function<void()>& body) {
  const unsigned threads = block.x;
  Launch launch;
  launch.fibers.resize(threads);
  launch.barriers.resize(1 + (threads + 31) / 32);
  launch.barriers[0].expected = threads;
  for (unsigned warp = 0; warp + 1 < launch.barriers.size(); warp++) launch.barriers[1 + warp].expected = std::min(32u, threads - warp * 32);
  launch.exchange.assign(threads, 0.f);
  launch.shared.assign(std::max<size_t>(shared_bytes, 16), 0);
  launch.body = body;
  for (Fiber& fiber : launch.fibers) fiber.stack.resize(256 * 1024);
  Launch* previous = active;
  active = &launch;
  const EmulatedDim saved_thread = threadIdx, saved_block = blockIdx, saved_block_dim = blockDim, saved_grid = gridDim;
  blockDim = block;
  gridDim = grid;
  for (unsigned y = 0; y < grid.y; y++) {
    for (unsigned x = 0; x < grid.x; x++) {
      for (unsigned index = 0; index < threads; index++) {
        Fiber& fiber = launch.fibers[index];
        fiber.done = false;
        fiber.waiting = false;
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = fiber.stack.data();
        fiber.context.uc_stack.ss_size = fiber.stack.size();
        fiber.context.uc_link = &launch.scheduler;
        makecontext(&fiber.context, Entry, 0);
      }
      unsigned finished = 0;
      while (finished < threads) {
        bool progressed = false;
        finished = 0;
        for (unsigned index = 0; index < threads; index++) {
          Fiber& fiber = launch.fibers[index];
          if (fiber.done) {
            finished++;
            continue;
          }
          if (fiber.waiting) continue;
          launch.current = index;
          threadIdx = EmulatedDim{index, 0, 0};
          blockIdx = EmulatedDim{x, y, 0};
          swapcontext(&launch.scheduler, &fiber.context);
          progressed = true;
        }
        if (!progressed && finished < threads) {
          std::fprintf(stderr, "kernel emulation: block (%u, %u) deadlocked: %u of %u threads wait on barriers no other thread will reach\n", x, y,
                       threads - finished, threads);
          std::abort();
        }
      }
      for (Barrier& barrier : launch.barriers) {
        if (barrier.arrived != 0) {
          std::fprintf(stderr, "kernel emulation: block (%u, %u) ended with threads still inside a barrier\n", x, y);
          std::abort();
        }
      }
    }
  }
  threadIdx = saved_thread;
  blockIdx = saved_block;
  blockDim = saved_block_dim;
  gridDim = saved_grid;
  active = previous;
}

}  // namespace trellis_emulation

inline void __syncthreads() { trellis_emulation::Arrive(0); }

inline void __syncwarp(unsigned) { trellis_emulation::Arrive(1 + threadIdx.x / 32); }

inline float __shfl_xor_sync(unsigned, float value, int offset) {
  trellis_emulation::Launch& launch = *trellis_emulation::active;
  const unsigned thread = threadIdx.x;
  const unsigned warp = thread / 32;
  launch.exchange[thread] = value;
  trellis_emulation::Arrive(1 + warp);
  const unsigned partner = warp * 32 + ((thread % 32) ^ static_cast<unsigned>(offset));
  const float result = launch.exchange[partner];
  trellis_emulation::Arrive(1 + warp);
  return result;
}

inline float __expf(float value) { return std::exp(value); }
inline float rsqrtf(float value) { return 1.f / std::sqrt(value); }
using std::max;

inline float __uint_as_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};

inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline unsigned short __half_as_ushort(__half value) { return value.x; }
inline float __half2float(__half value) {
  _Float16 half;
  std::memcpy(&half, &value.x, 2);
  return static_cast<float>(half);
}
inline __half __float2half_rn(float value) {
  const _Float16 half = static_cast<_Float16>(value);
  __half result;
  std::memcpy(&result.x, &half, 2);
  return result;
}
inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (std::isnan(value)) return {0x7fc0};
  bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest, ties to even
  return {static_cast<unsigned short>(bits >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 value) { return value.x; }
