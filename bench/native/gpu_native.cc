// gpu_native: the GPU floor under trellis, measured with the same dlopen'd driver and NCCL tables
// the addon uses (native/cuda/driver.cc, native/nccl/library.cc; nothing from CUDA is linked).
//
//   device-to-device copy GB/s; host-to-device and device-to-host, pinned and pageable; CUDA IPC
//   handoff to a second process (export, import, copy from the peer's buffer); NCCL allreduce over
//   every visible GPU (one thread per rank).
//
// Usage: gpu_native [--json] [--bytes N] [--iters N]. Prints a table, or with --json one object
// {"suite": "gpu_native", "results": {"<metric>": {"value": <number>, "unit": "..."}}}.
// Exits 2 with the reason when there is no usable GPU.
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cuda/driver.h"
#include "nccl/library.h"

extern char** environ;

namespace {

using namespace trellis;
using Clock = std::chrono::steady_clock;
using cuda::Check;
using cuda::CUdeviceptr;

struct Result {
  std::string metric;
  double value;
  std::string unit;
};
std::vector<Result> results;

double Seconds(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }
double GBps(double bytes, double seconds) { return bytes / seconds / 1e9; }

// RAII over what the benchmark allocates.
struct DeviceBuffer {
  CUdeviceptr ptr = 0;
  explicit DeviceBuffer(size_t bytes) { Check(cuda::Driver().cuMemAlloc(&ptr, bytes), "cuMemAlloc_v2"); }
  ~DeviceBuffer() { cuda::Driver().cuMemFree(ptr); }
};
struct PinnedBuffer {
  void* data = nullptr;
  explicit PinnedBuffer(size_t bytes) { Check(cuda::Driver().cuMemHostAlloc(&data, bytes, cuda::CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc"); }
  ~PinnedBuffer() { cuda::Driver().cuMemFreeHost(data); }
};

// Best of `iters` timed runs of `body` (each followed by a stream synchronize).
template <typename Body>
double Best(int iters, cuda::CUstream stream, Body&& body) {
  body();  // warm-up
  Check(cuda::Driver().cuStreamSynchronize(stream), "cuStreamSynchronize");
  double best = 1e30;
  for (int i = 0; i < iters; ++i) {
    auto start = Clock::now();
    body();
    Check(cuda::Driver().cuStreamSynchronize(stream), "cuStreamSynchronize");
    best = std::min(best, Seconds(start));
  }
  return best;
}

void Copies(size_t bytes, int iters) {
  const auto& cu = cuda::Driver();
  cuda::MakeCurrent(0);
  cuda::Stream stream(0);
  DeviceBuffer a(bytes), b(bytes);
  Check(cu.cuMemsetD8(a.ptr, 1, bytes), "cuMemsetD8_v2");
  double t = Best(iters, stream.get(), [&] { Check(cu.cuMemcpyDtoDAsync(b.ptr, a.ptr, bytes, stream.get()), "cuMemcpyDtoDAsync_v2"); });
  results.push_back({"d2d_copy", GBps(static_cast<double>(bytes), t), "GB/s"});

  PinnedBuffer pinned(bytes);
  std::vector<char> pageable(bytes, 1);
  t = Best(iters, stream.get(), [&] { Check(cu.cuMemcpyHtoDAsync(a.ptr, pinned.data, bytes, stream.get()), "cuMemcpyHtoDAsync_v2"); });
  results.push_back({"h2d_pinned", GBps(static_cast<double>(bytes), t), "GB/s"});
  t = Best(iters, stream.get(), [&] { Check(cu.cuMemcpyDtoHAsync(pinned.data, a.ptr, bytes, stream.get()), "cuMemcpyDtoHAsync_v2"); });
  results.push_back({"d2h_pinned", GBps(static_cast<double>(bytes), t), "GB/s"});
  t = Best(iters, nullptr, [&] { Check(cu.cuMemcpyHtoD(a.ptr, pageable.data(), bytes), "cuMemcpyHtoD_v2"); });
  results.push_back({"h2d_pageable", GBps(static_cast<double>(bytes), t), "GB/s"});
  t = Best(iters, nullptr, [&] { Check(cu.cuMemcpyDtoH(pageable.data(), a.ptr, bytes), "cuMemcpyDtoH_v2"); });
  results.push_back({"d2h_pageable", GBps(static_cast<double>(bytes), t), "GB/s"});
}

std::string Hex(const void* data, size_t size) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < size; ++i) {
    unsigned char byte = static_cast<const unsigned char*>(data)[i];
    out += digits[byte >> 4];
    out += digits[byte & 15];
  }
  return out;
}

void Unhex(const std::string& text, void* out, size_t size) {
  if (text.size() != size * 2) throw NativeError("ERR_INVALID_ARGUMENT", "bad IPC handle text");
  for (size_t i = 0; i < size; ++i) static_cast<unsigned char*>(out)[i] = static_cast<unsigned char>(std::stoi(text.substr(i * 2, 2), nullptr, 16));
}

// The importing side: opens the peer's allocation, copies it into its own buffer, checks a byte,
// and prints "<open seconds> <copy seconds> <close seconds>".
int IpcChild(const std::string& handle_text, size_t bytes, int iters) {
  const auto& cu = cuda::Driver("ipc child");
  cuda::MakeCurrent(0);
  cuda::CUipcMemHandle handle;
  Unhex(handle_text, handle.reserved, sizeof handle.reserved);
  auto start = Clock::now();
  CUdeviceptr peer = 0;
  Check(cu.cuIpcOpenMemHandle(&peer, handle, cuda::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle_v2");
  double open = Seconds(start);
  cuda::Stream stream(0);
  DeviceBuffer local(bytes);
  double copy = Best(iters, stream.get(), [&] { Check(cu.cuMemcpyDtoDAsync(local.ptr, peer, bytes, stream.get()), "cuMemcpyDtoDAsync_v2"); });
  unsigned char first = 0;
  Check(cu.cuMemcpyDtoH(&first, local.ptr, 1), "cuMemcpyDtoH_v2");
  if (first != 0x5a) throw NativeError("ERR_CUDA", "IPC child read the wrong content from the peer");
  start = Clock::now();
  Check(cu.cuIpcCloseMemHandle(peer), "cuIpcCloseMemHandle");
  double close = Seconds(start);
  std::printf("%.9f %.9f %.9f\n", open, copy, close);
  return 0;
}

void Ipc(const char* self, size_t bytes, int iters) {
  const auto& cu = cuda::Driver();
  cuda::MakeCurrent(0);
  DeviceBuffer buffer(bytes);
  Check(cu.cuMemsetD8(buffer.ptr, 0x5a, bytes), "cuMemsetD8_v2");
  Check(cu.cuStreamSynchronize(nullptr), "cuStreamSynchronize");
  auto start = Clock::now();
  CUdeviceptr base = 0;
  size_t size = 0;
  Check(cu.cuMemGetAddressRange(&base, &size, buffer.ptr), "cuMemGetAddressRange_v2");
  cuda::CUipcMemHandle handle;
  Check(cu.cuIpcGetMemHandle(&handle, base), "cuIpcGetMemHandle");
  double exported = Seconds(start);

  int fds[2];
  if (pipe(fds) != 0) throw SystemError("pipe", "ipc", errno);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  std::string hex = Hex(handle.reserved, sizeof handle.reserved), size_text = std::to_string(bytes), iters_text = std::to_string(iters);
  std::vector<char*> argv = {const_cast<char*>(self), const_cast<char*>("--ipc-child"), hex.data(), size_text.data(), iters_text.data(), nullptr};
  pid_t pid = 0;
  auto spawned = Clock::now();
  int error = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (error != 0) throw SystemError("posix_spawn", "/proc/self/exe", error);
  std::string out;
  char chunk[256];
  for (ssize_t n; (n = read(fds[0], chunk, sizeof chunk)) > 0;) out.append(chunk, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  double round_trip = Seconds(spawned);
  double open = 0, copy = 0, closed = 0;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || std::sscanf(out.c_str(), "%lf %lf %lf", &open, &copy, &closed) != 3) {
    throw NativeError("ERR_CUDA", "the IPC child failed (status " + std::to_string(status) + ")");
  }
  results.push_back({"ipc_export", exported * 1e6, "us"});
  results.push_back({"ipc_import", open * 1e6, "us"});
  results.push_back({"ipc_close", closed * 1e6, "us"});
  results.push_back({"ipc_copy_from_peer", GBps(static_cast<double>(bytes), copy), "GB/s"});
  results.push_back({"ipc_child_process_total", round_trip * 1e3, "ms"});
}

// Allreduce (sum, f32, in place) over every visible GPU, one thread per rank.
void AllReduce(size_t bytes, int iters) {
  const auto& nc = nccl::Library("allreduce");
  const auto& cu = cuda::Driver();
  int ranks = cuda::Status().device_count;
  nccl::ncclUniqueId id;
  nccl::Check(nc.ncclGetUniqueId(&id), "ncclGetUniqueId");
  std::vector<double> times(static_cast<size_t>(ranks));
  std::vector<std::string> errors(static_cast<size_t>(ranks));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < ranks; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        cuda::MakeCurrent(rank);
        nccl::ncclComm_t comm = nullptr;
        nccl::Check(nc.ncclCommInitRank(&comm, ranks, id, rank), "ncclCommInitRank");
        {
          cuda::Stream stream(rank);
          DeviceBuffer buffer(bytes);
          Check(cu.cuMemsetD8(buffer.ptr, 0, bytes), "cuMemsetD8_v2");
          void* data = reinterpret_cast<void*>(static_cast<uintptr_t>(buffer.ptr));
          times[static_cast<size_t>(rank)] = Best(iters, stream.get(), [&] {
            nccl::Check(nc.ncclAllReduce(data, data, bytes / 4, nccl::ncclFloat32, nccl::ncclSum, comm, stream.get()), "ncclAllReduce");
          });
        }
        nccl::Check(nc.ncclCommDestroy(comm), "ncclCommDestroy");
      } catch (const NativeError& error) {
        errors[static_cast<size_t>(rank)] = error.what();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (const auto& error : errors) {
    if (!error.empty()) throw NativeError("ERR_NCCL", error);
  }
  double t = 0;
  for (double rank_time : times) t = std::max(t, rank_time);
  double algbw = GBps(static_cast<double>(bytes), t);
  results.push_back({"nccl_allreduce_ranks", static_cast<double>(ranks), "ranks"});
  results.push_back({"nccl_allreduce_time", t * 1e6, "us"});
  results.push_back({"nccl_allreduce_algbw", algbw, "GB/s"});
  // NCCL's bus bandwidth: algbw × 2(n-1)/n (0 on one rank, where nothing crosses a link).
  results.push_back({"nccl_allreduce_busbw", algbw * 2.0 * (ranks - 1) / ranks, "GB/s"});
}

void Print(bool json) {
  if (json) {
    std::printf("{\"suite\": \"gpu_native\", \"results\": {");
    for (size_t i = 0; i < results.size(); ++i) {
      std::printf("%s\"%s\": {\"value\": %.6g, \"unit\": \"%s\"}", i ? ", " : "", results[i].metric.c_str(), results[i].value, results[i].unit.c_str());
    }
    std::printf("}}\n");
    return;
  }
  std::printf("\ngpu_native\n");
  for (const auto& result : results) std::printf("  %-26s %14.3f %s\n", result.metric.c_str(), result.value, result.unit.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  bool json = false;
  size_t bytes = 256u << 20;
  int iters = 10;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg == "--ipc-child" && i + 3 < argc) return IpcChild(argv[i + 1], std::stoull(argv[i + 2]), std::stoi(argv[i + 3]));
      if (arg == "--json") json = true;
      else if (arg == "--bytes" && i + 1 < argc) bytes = std::stoull(argv[++i]);
      else if (arg == "--iters" && i + 1 < argc) iters = std::stoi(argv[++i]);
      else {
        std::fprintf(stderr, "usage: gpu_native [--json] [--bytes N] [--iters N]\n");
        return 64;
      }
    }
    const cuda::DriverStatus& status = cuda::Status();
    if (!status.available) {
      std::fprintf(stderr, "gpu_native: no usable GPU: %s\n", status.reason.c_str());
      return 2;
    }
    results.push_back({"driver_version", static_cast<double>(status.driver_version), "cuDriverGetVersion"});
    results.push_back({"devices", static_cast<double>(status.device_count), "devices"});
    Copies(bytes, iters);
    Ipc(argv[0], bytes, iters);
    if (nccl::Status().available) {
      results.push_back({"nccl_version", static_cast<double>(nccl::Status().version), "ncclGetVersion"});
      AllReduce(bytes, iters);
    } else {
      std::fprintf(stderr, "gpu_native: skipping NCCL: %s\n", nccl::Status().reason.c_str());
    }
    Print(json);
    return 0;
  } catch (const NativeError& error) {
    std::fprintf(stderr, "gpu_native: %s (%s)\n", error.what(), error.code().c_str());
    return 1;
  }
}
