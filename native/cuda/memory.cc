#include "cuda/memory.h"

#include "common/host_mappings.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
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
  FreeLists free;  // CUdeviceptr values stored as void*; never an exported block
  // Blocks ever exported over CUDA IPC, each with its handle. cuMemFree on memory another process
  // still maps is undefined behaviour, and readers keep mappings open past their last view
  // (below), so these stay cached for reuse: neither EmptyCache nor the out-of-memory retry gives
  // them back, only FreeExportedBlocks, once every reader has closed its mappings.
  std::unordered_map<CUdeviceptr, CUipcMemHandle> exported;
  // Exported blocks now free, by rounded size. A request takes the smallest of them up to twice
  // its size: exact size classes alone would keep one block per size ever exported (a tensor
  // of every sequence length, say) and grow without bound; with the factor of two the blocks
  // kept are bounded by about twice the largest, per tensor alive at once. Each entry has an id
  // of its own (a block freed again gets a new one), so a block can be given back to the driver
  // only if it stayed free since its readers were asked to close their mappings.
  struct ExportedFree {
    void* block;
    uint64_t id;
    std::chrono::steady_clock::time_point freed_at;
  };
  std::multimap<size_t, ExportedFree> exported_free;
  uint64_t next_free_id = 1;
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
  uint32_t exporter;     // the exporting process's pid (0: not known)
  bool closing = false;  // its exporter is gone: close with the last view instead of idling
};

// Mappings without views stay open, up to this many (least recently used closed first): a
// producer's caching allocator hands out the same blocks again, so the same handles come back, and
// opening one costs about 125 µs on an H100 (closing as much again) against a few µs of a copy.
// TRELLIS_IPC_IDLE_MAPPINGS sets it per process (0: a mapping closes with its last view).
constexpr size_t kIdleMappings = 64;

size_t IdleMappingsFromEnvironment() {
  const char* text = std::getenv("TRELLIS_IPC_IDLE_MAPPINGS");
  if (text == nullptr || *text == '\0') return kIdleMappings;
  char* end = nullptr;
  long long value = std::strtoll(text, &end, 10);
  return (end != nullptr && *end == '\0' && value >= 0) ? static_cast<size_t>(value) : kIdleMappings;
}

struct IpcState {
  std::unordered_map<std::string, std::weak_ptr<Mapping>> in_use;
  std::list<Mapping*> idle;  // most recently used first
  std::unordered_map<std::string, std::list<Mapping*>::iterator> idle_by_key;
  size_t idle_limit = IdleMappingsFromEnvironment();
  IpcStats stats;
};
std::mutex ipc_mutex;
IpcState& Ipc() {
  static auto* state = new IpcState();
  return *state;
}

std::string KeyOf(int device, const CUipcMemHandle& handle) {
  return std::to_string(device) + ":" + std::string(handle.reserved, sizeof handle.reserved);
}

void CloseNow(Mapping* mapping) {
  // An importer that raced us opened the handle again before this close: the driver counts opens
  // of one handle per context, so its mapping stays valid.
  try {
    MakeCurrent(mapping->device);
    Driver("cuIpcCloseMemHandle").cuIpcCloseMemHandle(mapping->base);  // a drop cannot throw
  } catch (const NativeError&) {
  }
  delete mapping;
}

// The last view of `mapping` is gone: keep it open for the next import of its handle.
void RetireMapping(Mapping* mapping) {
  Mapping* evicted = nullptr;
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    IpcState& ipc = Ipc();
    auto it = ipc.in_use.find(mapping->key);
    if (it != ipc.in_use.end() && it->second.expired()) ipc.in_use.erase(it);
    if (ipc.idle_limit > 0 && !mapping->closing && ipc.idle_by_key.count(mapping->key) == 0) {
      ipc.idle.push_front(mapping);
      ipc.idle_by_key[mapping->key] = ipc.idle.begin();
      mapping = nullptr;
      if (ipc.idle.size() > ipc.idle_limit) {
        evicted = ipc.idle.back();
        ipc.idle_by_key.erase(evicted->key);
        ipc.idle.pop_back();
      }
    }
    ipc.stats.closes += (mapping != nullptr ? 1 : 0) + (evicted != nullptr ? 1 : 0);
  }
  if (mapping != nullptr) CloseNow(mapping);
  if (evicted != nullptr) CloseNow(evicted);
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Page-locked chunks of shared host mappings, by mapping base: one state per chunk.
constexpr size_t kLockChunk = size_t{64} << 20;
enum class ChunkState : int8_t { kPageable, kLocked, kRefused };
struct LockedMapping {
  int device;
  size_t size;
  std::vector<ChunkState> chunks;
};
std::mutex lock_mutex;
std::map<uintptr_t, LockedMapping>& LockedMappings() {
  static auto* mappings = new std::map<uintptr_t, LockedMapping>();
  return *mappings;
}
PageLockStats lock_stats;  // guarded by lock_mutex

// The store's mapping is going away: unlock its chunks first (munmap leaves them locked).
void UnlockMapping(void* base, size_t) {
  std::lock_guard<std::mutex> lock(lock_mutex);
  auto it = LockedMappings().find(reinterpret_cast<uintptr_t>(base));
  if (it == LockedMappings().end()) return;
  try {
    const DriverTable& cu = Driver("cuMemHostUnregister");
    MakeCurrent(it->second.device);
    for (size_t i = 0; i < it->second.chunks.size(); ++i) {
      if (it->second.chunks[i] != ChunkState::kLocked) continue;
      cu.cuMemHostUnregister(static_cast<uint8_t*>(base) + i * kLockChunk);  // best effort: the mapping goes either way
      lock_stats.locked_bytes -= std::min(kLockChunk, it->second.size - i * kLockChunk);
    }
  } catch (const NativeError&) {
  }
  LockedMappings().erase(it);
}

// Page-locks the chunks of the shared host mapping that [data, data + length) touches. Returns
// the mapping's base (0 where the memory is in none), whose chunk boundaries split the copy.
uintptr_t PageLockForCopy(int device, const void* data, size_t length) {
  void* base = nullptr;
  size_t size = 0;
  if (length == 0 || !host_mappings::Find(data, length, &base, &size)) return 0;
  const DriverTable& cu = Driver("pageLock");
  auto key = reinterpret_cast<uintptr_t>(base);
  size_t first = (reinterpret_cast<uintptr_t>(data) - key) / kLockChunk;
  size_t last = (reinterpret_cast<uintptr_t>(data) + length - 1 - key) / kLockChunk;
  std::lock_guard<std::mutex> lock(lock_mutex);
  auto [it, added] = LockedMappings().try_emplace(key, LockedMapping{device, size, {}});
  if (added) {
    it->second.chunks.assign((size + kLockChunk - 1) / kLockChunk, ChunkState::kPageable);
    host_mappings::SetRemovalHook(UnlockMapping);
  }
  for (size_t i = first; i <= last; ++i) {
    ChunkState& state = it->second.chunks[i];
    if (state == ChunkState::kPageable) {
      int64_t started = NowNs();
      MakeCurrent(it->second.device);
      size_t bytes = std::min(kLockChunk, size - i * kLockChunk);
      CUresult result = cu.cuMemHostRegister(static_cast<uint8_t*>(base) + i * kLockChunk, bytes, CU_MEMHOSTREGISTER_PORTABLE);
      state = result == CUDA_SUCCESS ? ChunkState::kLocked : ChunkState::kRefused;
      lock_stats.lock_ns += static_cast<uint64_t>(NowNs() - started);
      if (result == CUDA_SUCCESS) {
        lock_stats.locked_bytes += bytes;
        lock_stats.chunks_locked += 1;
      } else {
        lock_stats.chunks_failed += 1;
      }
    }
  }
  return key;
}

// Calls copy(offset, length) once per chunk of the mapping at `base` that the host span touches.
template <typename Copy>
void ByChunk(uintptr_t base, const void* host, size_t length, Copy copy) {
  if (base == 0) return copy(0, length);
  auto start = reinterpret_cast<uintptr_t>(host);
  size_t done = 0;
  while (done < length) {
    uintptr_t at = start + done;
    size_t to_boundary = kLockChunk - (at - base) % kLockChunk;
    size_t piece = std::min(length - done, to_boundary);
    copy(done, piece);
    done += piece;
  }
}

}  // namespace

void CopyHostToDevice(int device, CUdeviceptr target, const void* source, size_t length) {
  const DriverTable& cu = Driver("copyFromHost");
  uintptr_t base = PageLockForCopy(device, source, length);
  MakeCurrent(device);
  ByChunk(base, source, length, [&](size_t offset, size_t piece) {
    Check(cu.cuMemcpyHtoD(target + offset, static_cast<const uint8_t*>(source) + offset, piece), "cuMemcpyHtoD_v2");
  });
}

void CopyDeviceToHost(int device, void* target, CUdeviceptr source, size_t length) {
  const DriverTable& cu = Driver("copyToHost");
  uintptr_t base = PageLockForCopy(device, target, length);
  MakeCurrent(device);
  ByChunk(base, target, length, [&](size_t offset, size_t piece) {
    Check(cu.cuMemcpyDtoH(static_cast<uint8_t*>(target) + offset, source + offset, piece), "cuMemcpyDtoH_v2");
  });
}

PageLockStats PageLockStatistics() {
  std::lock_guard<std::mutex> lock(lock_mutex);
  return lock_stats;
}

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
    } else if (auto fit = cache.exported_free.lower_bound(rounded); fit != cache.exported_free.end() && fit->first / 2 <= rounded) {
      ptr = reinterpret_cast<CUdeviceptr>(fit->second.block);
      rounded = fit->first;  // the block's own size goes back to the cache with it
      cache.exported_free.erase(fit);
    }
    if (ptr != 0) {
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
      // What emptying the cache could not give back: blocks exported over IPC (see DeviceCache).
      std::string kept;
      if (result == CUDA_ERROR_OUT_OF_MEMORY) {
        std::lock_guard<std::mutex> lock(cache.mutex);
        if (cache.stats.cached_bytes > 0) {
          kept = "; " + std::to_string(cache.stats.cached_bytes) +
                 " bytes stay cached in blocks this process exported over CUDA IPC (another process may still map them; "
                 "they go back to the driver once no process maps them, and reclaimIpcMemory() waits for that)";
        }
      }
      throw NativeError("ERR_CUDA", "cuMemAlloc_v2 failed: " + ErrorText(result) + " allocating " + std::to_string(rounded) +
                                        " bytes on device " + std::to_string(device) + kept)
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
      if (home.exported.count(block->ptr) != 0) {
        home.exported_free.emplace(block->rounded, DeviceCache::ExportedFree{reinterpret_cast<void*>(block->ptr), home.next_free_id++,
                                                                              std::chrono::steady_clock::now()});
      } else {
        home.free[block->rounded].push_back(reinterpret_cast<void*>(block->ptr));
      }
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
    // Exported blocks stay (see DeviceCache): they are not on these lists.
    FreeLists taken;
    {
      std::lock_guard<std::mutex> lock(cache.mutex);
      taken.swap(cache.free);
      for (auto& [size, blocks] : taken) cache.stats.cached_bytes -= size * blocks.size();
    }
    for (auto& [size, blocks] : taken) {
      for (void* block : blocks) Check(cu.cuMemFree(reinterpret_cast<CUdeviceptr>(block)), "cuMemFree_v2");
    }
  }
  // This process's idle IPC mappings are closed too: emptying caches gives everything back.
  std::vector<Mapping*> idle;
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    idle.assign(Ipc().idle.begin(), Ipc().idle.end());
    Ipc().idle.clear();
    Ipc().idle_by_key.clear();
    Ipc().stats.closes += idle.size();
  }
  for (Mapping* mapping : idle) CloseNow(mapping);
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
  // Every allocator block is its own allocation, so `base` names the block.
  DeviceCache& cache = Caches()[static_cast<size_t>(buffer.device)];
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.exported.emplace(base, out.handle);
  return out;
}

std::vector<ExportedBlock> ExportedFreeBlocks(int device) {
  Driver("exportedFreeBlocks");
  DeviceCache& cache = CacheOf(device);
  std::lock_guard<std::mutex> lock(cache.mutex);
  std::vector<ExportedBlock> blocks;
  const auto now = std::chrono::steady_clock::now();
  for (const auto& [size, entry] : cache.exported_free) {
    const double idle_ms = std::chrono::duration<double, std::milli>(now - entry.freed_at).count();
    blocks.push_back(ExportedBlock{entry.id, size, cache.exported.at(reinterpret_cast<CUdeviceptr>(entry.block)), idle_ms});
  }
  return blocks;
}

uint64_t FreeExportedBlocks(int device, const std::vector<uint64_t>& ids) {
  const DriverTable& cu = Driver("freeExportedBlocks");
  DeviceCache& cache = CacheOf(device);
  std::unordered_set<uint64_t> wanted(ids.begin(), ids.end());
  std::vector<CUdeviceptr> taken;
  uint64_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    for (auto it = cache.exported_free.begin(); it != cache.exported_free.end();) {
      if (wanted.count(it->second.id) == 0) {
        ++it;
        continue;
      }
      auto ptr = reinterpret_cast<CUdeviceptr>(it->second.block);
      taken.push_back(ptr);
      cache.exported.erase(ptr);
      cache.stats.cached_bytes -= it->first;
      bytes += it->first;
      it = cache.exported_free.erase(it);
    }
  }
  for (CUdeviceptr ptr : taken) Check(cu.cuMemFree(ptr), "cuMemFree_v2");
  return bytes;
}

DeviceBuffer ImportIpc(int device, const CUipcMemHandle& handle, uint64_t offset, size_t size, uint32_t exporter) {
  const DriverTable& cu = Driver("importIpc");
  std::string key = KeyOf(device, handle);
  std::shared_ptr<Mapping> mapping;
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    IpcState& ipc = Ipc();
    auto it = ipc.in_use.find(key);
    if (it != ipc.in_use.end()) mapping = it->second.lock();
    if (!mapping) {
      auto idle = ipc.idle_by_key.find(key);
      if (idle != ipc.idle_by_key.end()) {
        mapping = std::shared_ptr<Mapping>(*idle->second, RetireMapping);
        ipc.idle.erase(idle->second);
        ipc.idle_by_key.erase(idle);
        ipc.stats.reuses += 1;
      }
    }
    if (!mapping) {
      int64_t started = NowNs();
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
      mapping = std::shared_ptr<Mapping>(new Mapping{device, base, range_size, key, exporter}, RetireMapping);
      ipc.stats.opens += 1;
      ipc.stats.open_ns += static_cast<uint64_t>(NowNs() - started);
    }
    ipc.in_use[key] = mapping;
  }
  // Thrown outside the lock: dropping the last reference to `mapping` takes it.
  if (offset > mapping->size || size > mapping->size - offset) {
    throw NativeError("ERR_OUT_OF_RANGE", "IPC view [" + std::to_string(offset) + ", +" + std::to_string(size) +
                                              ") is outside the exported allocation of " + std::to_string(mapping->size) + " bytes");
  }
  CUdeviceptr ptr = mapping->base + offset;
  return DeviceBuffer{device, ptr, size, true, std::move(mapping)};
}

std::vector<CUipcMemHandle> CloseIdleMappingsOf(const std::vector<CUipcMemHandle>& handles) {
  std::unordered_set<std::string> wanted;
  for (const CUipcMemHandle& handle : handles) wanted.insert(std::string(handle.reserved, sizeof handle.reserved));
  // Keys are "<device>:<handle bytes>" (KeyOf): match on the handle, whatever device maps it.
  auto handle_of = [](const std::string& key) { return key.substr(key.find(':') + 1); };
  std::vector<Mapping*> closing;
  std::vector<CUipcMemHandle> in_use;
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    IpcState& ipc = Ipc();
    for (auto it = ipc.idle.begin(); it != ipc.idle.end();) {
      if (wanted.count(handle_of((*it)->key)) == 0) {
        ++it;
        continue;
      }
      closing.push_back(*it);
      ipc.idle_by_key.erase((*it)->key);
      it = ipc.idle.erase(it);
    }
    for (const auto& [key, mapping] : ipc.in_use) {
      std::string bytes = handle_of(key);
      if (mapping.expired() || wanted.count(bytes) == 0) continue;
      CUipcMemHandle handle{};
      std::memcpy(handle.reserved, bytes.data(), sizeof handle.reserved);
      in_use.push_back(handle);
    }
    ipc.stats.closes += closing.size();
  }
  for (Mapping* mapping : closing) CloseNow(mapping);
  return in_use;
}

size_t CloseMappingsOfExporter(uint32_t exporter) {
  if (exporter == 0) return 0;
  std::vector<Mapping*> closing;
  // Mappings in use, marked; released after the lock, as the last reference retires its mapping.
  std::vector<std::shared_ptr<Mapping>> marked;
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    IpcState& ipc = Ipc();
    for (auto it = ipc.idle.begin(); it != ipc.idle.end();) {
      if ((*it)->exporter != exporter) {
        ++it;
        continue;
      }
      closing.push_back(*it);
      ipc.idle_by_key.erase((*it)->key);
      it = ipc.idle.erase(it);
    }
    for (auto& [key, weak] : ipc.in_use) {
      std::shared_ptr<Mapping> mapping = weak.lock();
      if (!mapping || mapping->exporter != exporter) continue;
      mapping->closing = true;
      marked.push_back(std::move(mapping));
    }
    ipc.stats.closes += closing.size();
  }
  for (Mapping* mapping : closing) CloseNow(mapping);
  return closing.size() + marked.size();
}

void SetIdleMappings(size_t limit) {
  std::vector<Mapping*> evicted;
  {
    std::lock_guard<std::mutex> lock(ipc_mutex);
    IpcState& ipc = Ipc();
    ipc.idle_limit = limit;
    while (ipc.idle.size() > limit) {
      evicted.push_back(ipc.idle.back());
      ipc.idle_by_key.erase(ipc.idle.back()->key);
      ipc.idle.pop_back();
    }
    ipc.stats.closes += evicted.size();
  }
  for (Mapping* mapping : evicted) CloseNow(mapping);
}

IpcStats IpcStatistics() {
  std::lock_guard<std::mutex> lock(ipc_mutex);
  IpcStats stats = Ipc().stats;
  for (auto& [key, mapping] : Ipc().in_use) stats.in_use += mapping.expired() ? 0 : 1;
  stats.idle = Ipc().idle.size();
  return stats;
}

}  // namespace trellis::cuda
