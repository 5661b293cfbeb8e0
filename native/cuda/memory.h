// Device memory: a caching allocator per device, pinned host staging buffers, and CUDA IPC
// export/import. No Node-API here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>
#include <string>

#include "cuda/driver.h"

namespace trellis::cuda {

// A span of device memory. `owner` keeps what backs it alive: an allocator block (which goes back
// to the cache when the last owner drops it) or an IPC mapping (closed when the last view drops
// it). Copies of a DeviceBuffer share the owner, so work in flight holds its memory.
struct DeviceBuffer {
  int device = 0;
  CUdeviceptr ptr = 0;
  size_t size = 0;
  bool imported = false;
  std::shared_ptr<void> owner;
};

struct AllocatorStats {
  uint64_t allocated_bytes = 0;  // rounded bytes of live blocks
  uint64_t cached_bytes = 0;     // rounded bytes of freed blocks kept for reuse
  uint64_t allocations = 0;      // Allocate calls
  uint64_t reuses = 0;           // of which served from the cache
};

// Sizes round up to a class: to 512 B up to 1 MiB, to 2 MiB above. Each class keeps its own list of
// freed blocks; every block is its own cuMemAlloc, so it is the base of its allocation (IPC).
size_t RoundSize(size_t bytes);

// Allocates from `device`'s cache (or cuMemAlloc_v2; on out-of-memory the cache is emptied and the
// allocation retried once).
DeviceBuffer Allocate(int device, size_t bytes);
AllocatorStats Stats(int device);
// Frees cached device blocks of `device` (every device when -1) and all cached pinned buffers.
void EmptyCache(int device);

// A pinned (page-locked, portable) host buffer from the staging cache; back to it when dropped.
struct PinnedBuffer {
  void* data = nullptr;
  size_t size = 0;
};
std::shared_ptr<PinnedBuffer> AllocatePinned(int device, size_t bytes);

// Synchronous copies between host memory and `device`. Where the host side lies in a shared host
// mapping (the object store's), the 64 MiB chunks of it the copy touches are page-locked first,
// once per process, so that the copy runs by DMA at full speed rather than through the driver's
// staging; the copy then goes chunk by chunk, as one DMA may not span two registrations. A chunk
// the driver refuses stays pageable (and is not tried again). Chunks are unlocked when their
// mapping is removed.
void CopyHostToDevice(int device, CUdeviceptr target, const void* source, size_t length);
void CopyDeviceToHost(int device, void* target, CUdeviceptr source, size_t length);

struct PageLockStats {
  uint64_t locked_bytes = 0;  // page-locked now
  uint64_t chunks_locked = 0; // cuMemHostRegister calls that succeeded
  uint64_t chunks_failed = 0;
  uint64_t lock_ns = 0;       // time spent locking
};
PageLockStats PageLockStatistics();

struct IpcExport {
  CUipcMemHandle handle;
  uint64_t offset;  // of the buffer within the exported allocation
};
IpcExport ExportIpc(const DeviceBuffer& buffer);

// Opens `handle` in `device`'s context (once per process per allocation: later imports share the
// mapping) and returns the view [base + offset, + size). A mapping whose last view is dropped stays
// open, idle, for the handle's next import (the 64 most recently used, or
// TRELLIS_IPC_IDLE_MAPPINGS; EmptyCache closes them).
// `exporter` is the exporting process's pid (0: unknown), for CloseMappingsOfExporter.
DeviceBuffer ImportIpc(int device, const CUipcMemHandle& handle, uint64_t offset, size_t size, uint32_t exporter);

// The exporting process `exporter` is gone: closes the idle mappings of its memory now, and those
// in use when their last view goes (rather than keeping them idle). What it exported can no longer
// be read by anyone, and a mapping kept open could pin its memory. Returns how many it affected.
size_t CloseMappingsOfExporter(uint32_t exporter);

// How many idle mappings to keep (0: close each with its last view); closes the surplus now.
void SetIdleMappings(size_t limit);

// Reclaiming exported blocks (a round through every process that may map them):
// the producer lists its free exported blocks; every reader closes its idle mappings of their
// handles and names those it still uses; the producer then gives back to the driver the blocks
// that no reader uses and that stayed free meanwhile (by id: a block freed again has a new one).
struct ExportedBlock {
  uint64_t id;
  size_t bytes;
  CUipcMemHandle handle;
  double idle_ms;  // since it was freed (idle blocks go back on their own: lib/gpu/ipc-reclaim.ts)
};
std::vector<ExportedBlock> ExportedFreeBlocks(int device);
uint64_t FreeExportedBlocks(int device, const std::vector<uint64_t>& ids);
std::vector<CUipcMemHandle> CloseIdleMappingsOf(const std::vector<CUipcMemHandle>& handles);

struct IpcStats {
  uint64_t in_use = 0;  // mappings with live views
  uint64_t idle = 0;    // mappings kept open without views
  uint64_t opens = 0;   // cuIpcOpenMemHandle calls
  uint64_t reuses = 0;  // imports served by an idle mapping
  uint64_t closes = 0;  // cuIpcCloseMemHandle calls
  uint64_t open_ns = 0; // time spent opening
};
IpcStats IpcStatistics();

}  // namespace trellis::cuda
