#include "cuda/memory.h"

#include <mutex>
#include <unordered_map>
#include <vector>

namespace trellis::cuda {
namespace {

constexpr size_t kSmallLimit = 1u << 20;
constexpr size_t kSmallRound = 512;
constexpr size_t kLargeRound = 2u << 20;

// Freed blocks by rounded size. Guarded by its owner's mutex.
using FreeLists = std::unordered_map<size_t, std::vector<void*>>;

struct DeviceCache {
  std::mutex mutex;
  FreeLists free;  // CUdeviceptr values stored as void*
  AllocatorStats stats;
};

struct Block {
  int device;
  CUdeviceptr ptr;
  size_t rounded;
};

// Caches live for the process (leaked on purpose: blocks may come back from any thread, late).
std::vector<DeviceCache>& Caches() {
  static auto* caches = new std::vector<DeviceCache>(static_cast<size_t>(Status().device_count));
  return *caches;
}

DeviceCache& CacheOf(int device) {
  MakeCurrent(device);  // validates the index
  return Caches()[static_cast<size_t>(device)];
}

struct PinnedCache {
  std::mutex mutex;
  FreeLists free;
};
PinnedCache& Pinned() {
  static auto* cache = new PinnedCache();
  return *cache;
}

struct Mapping {
  int device;
  CUdeviceptr base;
  size_t size;
  std::string key;
};
std::mutex ipc_mutex;
std::unordered_map<std::string, std::weak_ptr<Mapping>>& Mappings() {
  static auto* mappings = new std::unordered_map<std::string, std::weak_ptr<Mapping>>();
  return *mappings;
}

std::string KeyOf(int device, const CUipcMemHandle& handle) {
  return std::to_string(device) + ":" + std::string(handle.reserved, sizeof handle.reserved);
}

void CloseMapping(Mapping* mapping) {
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    auto it = Mappings().find(mapping->key);
    if (it != Mappings().end() && it->second.expired()) Mappings().erase(it);
  }
  // An importer that raced us opened the handle again before this close: the driver counts opens
  // of one handle per context, so its mapping stays valid.
  try {
    MakeCurrent(mapping->device);
    Driver("cuIpcCloseMemHandle").cuIpcCloseMemHandle(mapping->base);  // a drop cannot throw
  } catch (const NativeError&) {
  }
  delete mapping;
}

}  // namespace

size_t RoundSize(size_t bytes) {
  if (bytes == 0) return kSmallRound;
  size_t unit = bytes <= kSmallLimit ? kSmallRound : kLargeRound;
  return (bytes + unit - 1) / unit * unit;
}

DeviceBuffer Allocate(int device, size_t bytes) {
  const DriverTable& cu = Driver("allocate");
  DeviceCache& cache = CacheOf(device);
  size_t rounded = RoundSize(bytes);
  CUdeviceptr ptr = 0;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.stats.allocations += 1;
    auto it = cache.free.find(rounded);
    if (it != cache.free.end() && !it->second.empty()) {
      ptr = reinterpret_cast<CUdeviceptr>(it->second.back());
      it->second.pop_back();
      cache.stats.reuses += 1;
      cache.stats.cached_bytes -= rounded;
    }
  }
  if (ptr == 0) {
    CUresult result = cu.cuMemAlloc(&ptr, rounded);
    if (result == CUDA_ERROR_OUT_OF_MEMORY) {
      EmptyCache(device);
      MakeCurrent(device);
      result = cu.cuMemAlloc(&ptr, rounded);
    }
    if (result != CUDA_SUCCESS) {
      throw NativeError("ERR_CUDA", "cuMemAlloc_v2 failed: " + ErrorText(result) + " allocating " + std::to_string(rounded) +
                                        " bytes on device " + std::to_string(device))
          .with("call", "cuMemAlloc_v2")
          .with("result", static_cast<double>(result))
          .with("bytes", static_cast<double>(rounded));
    }
  }
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.stats.allocated_bytes += rounded;
  }
  std::shared_ptr<void> owner(new Block{device, ptr, rounded}, [](Block* block) {
    DeviceCache& home = Caches()[static_cast<size_t>(block->device)];
    {
      std::lock_guard<std::mutex> lock(home.mutex);
      home.free[block->rounded].push_back(reinterpret_cast<void*>(block->ptr));
      home.stats.allocated_bytes -= block->rounded;
      home.stats.cached_bytes += block->rounded;
    }
    delete block;
  });
  return DeviceBuffer{device, ptr, bytes, false, std::move(owner)};
}

AllocatorStats Stats(int device) {
  Driver("allocatorStats");
  DeviceCache& cache = CacheOf(device);
  std::lock_guard<std::mutex> lock(cache.mutex);
  return cache.stats;
}

void EmptyCache(int device) {
  const DriverTable& cu = Driver("emptyCache");
  int count = Status().device_count;
  for (int d = 0; d < count; ++d) {
    if (device != -1 && d != device) continue;
    DeviceCache& cache = CacheOf(d);
    FreeLists taken;
    {
      std::lock_guard<std::mutex> lock(cache.mutex);
      taken.swap(cache.free);
      cache.stats.cached_bytes = 0;
    }
    for (auto& [size, blocks] : taken) {
      for (void* block : blocks) Check(cu.cuMemFree(reinterpret_cast<CUdeviceptr>(block)), "cuMemFree_v2");
    }
  }
  FreeLists pinned;
  {
    std::lock_guard<std::mutex> lock(Pinned().mutex);
    pinned.swap(Pinned().free);
  }
  for (auto& [size, buffers] : pinned) {
    for (void* buffer : buffers) Check(cu.cuMemFreeHost(buffer), "cuMemFreeHost");
  }
}

std::shared_ptr<PinnedBuffer> AllocatePinned(int device, size_t bytes) {
  const DriverTable& cu = Driver("allocatePinned");
  size_t rounded = RoundSize(bytes);
  void* data = nullptr;
  {
    std::lock_guard<std::mutex> lock(Pinned().mutex);
    auto it = Pinned().free.find(rounded);
    if (it != Pinned().free.end() && !it->second.empty()) {
      data = it->second.back();
      it->second.pop_back();
    }
  }
  if (data == nullptr) {
    MakeCurrent(device);
    Check(cu.cuMemHostAlloc(&data, rounded, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc");
  }
  return std::shared_ptr<PinnedBuffer>(new PinnedBuffer{data, rounded}, [](PinnedBuffer* buffer) {
    {
      std::lock_guard<std::mutex> lock(Pinned().mutex);
      Pinned().free[buffer->size].push_back(buffer->data);
    }
    delete buffer;
  });
}

IpcExport ExportIpc(const DeviceBuffer& buffer) {
  const DriverTable& cu = Driver("exportIpc");
  if (buffer.imported) {
    throw NativeError("ERR_CUDA", "exportIpc: memory imported over CUDA IPC cannot be exported again; export the original")
        .with("call", "cuIpcGetMemHandle");
  }
  MakeCurrent(buffer.device);
  CUdeviceptr base = 0;
  size_t size = 0;
  Check(cu.cuMemGetAddressRange(&base, &size, buffer.ptr), "cuMemGetAddressRange_v2");
  IpcExport out{};
  Check(cu.cuIpcGetMemHandle(&out.handle, base), "cuIpcGetMemHandle");
  out.offset = buffer.ptr - base;
  return out;
}

DeviceBuffer ImportIpc(int device, const CUipcMemHandle& handle, uint64_t offset, size_t size) {
  const DriverTable& cu = Driver("importIpc");
  std::string key = KeyOf(device, handle);
  std::shared_ptr<Mapping> mapping;
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    auto it = Mappings().find(key);
    if (it != Mappings().end()) mapping = it->second.lock();
    if (!mapping) {
      MakeCurrent(device);
      CUdeviceptr base = 0;
      Check(cu.cuIpcOpenMemHandle(&base, handle, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle_v2");
      CUdeviceptr range_base = 0;
      size_t range_size = 0;
      CUresult result = cu.cuMemGetAddressRange(&range_base, &range_size, base);
      if (result != CUDA_SUCCESS) {
        cu.cuIpcCloseMemHandle(base);
        Check(result, "cuMemGetAddressRange_v2");
      }
      mapping = std::shared_ptr<Mapping>(new Mapping{device, base, range_size, key}, CloseMapping);
      Mappings()[key] = mapping;
    }
  }
  // Thrown outside the lock: dropping the last reference to `mapping` takes it.
  if (offset > mapping->size || size > mapping->size - offset) {
    throw NativeError("ERR_OUT_OF_RANGE", "IPC view [" + std::to_string(offset) + ", +" + std::to_string(size) +
                                              ") is outside the exported allocation of " + std::to_string(mapping->size) + " bytes");
  }
  CUdeviceptr ptr = mapping->base + offset;
  return DeviceBuffer{device, ptr, size, true, std::move(mapping)};
}

size_t OpenIpcMappings() {
  std::lock_guard<std::mutex> lock(ipc_mutex);
  size_t open = 0;
  for (auto& [key, mapping] : Mappings()) open += mapping.expired() ? 0 : 1;
  return open;
}

}  // namespace trellis::cuda
