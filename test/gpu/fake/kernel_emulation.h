// Runs CUDA kernels written in the subset native/kernels/cuda uses on the host, for the fake
// driver (fake_kernels.cc): each block's threads are fibers on the launching thread, switched at
// barriers (on x86-64 by a six-register switch of our own: ucontext's swapcontext makes a system
// call a switch to save the signal mask, which cost most of the emulation's time). __syncthreads is a barrier of the block, a warp shuffle a barrier of the
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

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *save, and resumes
// the stack at `load` (saved the same way, or prepared by Prepare below).
extern "C" void trellis_emulation_switch(void** save, void* load);
asm(R"(
  .text
  .globl trellis_emulation_switch
  .type trellis_emulation_switch, @function
trellis_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size trellis_emulation_switch, .-trellis_emulation_switch
  .previous
)");
#endif

struct Fiber {
#if defined(__x86_64__)
  void* stack_pointer = nullptr;
#else
  ucontext_t context;
#endif
  char* stack = nullptr;
  size_t stack_size = 0;
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
#if defined(__x86_64__)
  void* scheduler_stack_pointer = nullptr;
#else
  ucontext_t scheduler;
#endif
  unsigned current = 0;
  std::vector<Barrier> barriers;  // 0: the block; 1 + w: warp w
  std::vector<float> exchange;    // one slot per thread, for shuffles
  std::vector<unsigned char> shared;
  std::function<void()> body;
};

inline thread_local Launch* active = nullptr;

inline unsigned char* DynamicShared() { return active->shared.data(); }

// From the running fiber back to the scheduler.
inline void Yield() {
  Launch& launch = *active;
  Fiber& fiber = launch.fibers[launch.current];
#if defined(__x86_64__)
  trellis_emulation_switch(&fiber.stack_pointer, launch.scheduler_stack_pointer);
#else
  swapcontext(&fiber.context, &launch.scheduler);
#endif
}

// From the scheduler into fiber `index`.
inline void Resume(unsigned index) {
  Launch& launch = *active;
#if defined(__x86_64__)
  trellis_emulation_switch(&launch.scheduler_stack_pointer, launch.fibers[index].stack_pointer);
#else
  swapcontext(&launch.scheduler, &launch.fibers[index].context);
#endif
}

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
  Yield();
}

inline void Entry() {
  active->body();
  active->fibers[active->current].done = true;
#if defined(__x86_64__)
  Yield();  // never resumed
  std::abort();
#endif
  // (ucontext) returning resumes uc_link: the scheduler.
}

// A fresh fiber's stack: a switch into it pops six zeroed registers and returns into Entry with
// the stack aligned as a call would leave it.
inline void Prepare(Fiber& fiber) {
#if defined(__x86_64__)
  auto top = reinterpret_cast<uintptr_t>(fiber.stack + fiber.stack_size) & ~static_cast<uintptr_t>(15);
  auto* slots = reinterpret_cast<void**>(top);
  slots[-1] = nullptr;                                   // where Entry's own return address would be
  slots[-2] = reinterpret_cast<void*>(&Entry);           // popped by the switch's ret
  for (int index = 3; index <= 8; index++) slots[-index] = nullptr;  // rbp, rbx, r12-r15
  fiber.stack_pointer = slots - 8;
#else
  getcontext(&fiber.context);
  fiber.context.uc_stack.ss_sp = fiber.stack;
  fiber.context.uc_stack.ss_size = fiber.stack_size;
  fiber.context.uc_link = &active->scheduler;
  makecontext(&fiber.context, Entry, 0);
#endif
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
  // Stacks are kept for the thread's later launches: fresh memory each launch cost page faults
  // by the thousand, most of the emulation's time.
  static thread_local std::vector<std::vector<char>> stacks;
  constexpr size_t kStackBytes = 64 * 1024;
  while (stacks.size() < threads) stacks.emplace_back(kStackBytes);
  for (unsigned index = 0; index < threads; index++) {
    launch.fibers[index].stack = stacks[index].data();
    launch.fibers[index].stack_size = kStackBytes;
  }
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
        Prepare(fiber);
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
          Resume(index);
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
inline uint32_t __float_as_uint(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
using std::rintf;

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
