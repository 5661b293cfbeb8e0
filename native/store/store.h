// The shared-memory object store of one node: create, write, seal, get (pins), release, delete,
// spilling to disk when full, and recovery from processes that die at any moment.
// Pure C++ (no Node-API), so native benchmarks and tests can use it directly.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "store/layout.h"

namespace trellis::store {

struct ObjectId {
  uint8_t bytes[kObjectIdBytes];
  static ObjectId FromHex(const std::string& hex);  // throws ERR_INVALID_OBJECT_ID
  std::string ToHex() const;
};

struct CreateOptions {
  std::string name;  // without the leading '/'
  uint64_t capacity = 0;
  uint32_t max_objects = 0;   // 0: derived from capacity
  std::string spill_directory;  // empty: spilling disabled
  uint64_t prefault_window = UINT64_MAX;  // UINT64_MAX: derived from capacity; 0: off
};

struct StoreStats {
  uint64_t capacity, data_capacity, bytes_in_use, object_count, max_objects;
  uint64_t spilled_objects, spilled_bytes, total_spilled_bytes, total_restored_bytes;
  uint64_t total_spilled_objects, total_restored_objects, recoveries, prefaulted_bytes;
  uint64_t pinned_objects, attached_processes;
};

// A sealed object pinned by this process. The pin lasts until Release(entry).
struct PinnedObject {
  uint32_t entry;
  uint32_t generation;
  uint8_t* data;
  uint64_t data_size;
  const uint8_t* metadata;
  uint64_t metadata_size;
};

// An object someone holds a pin on, and who: what keeps its bytes in the store.
struct PinHolder {
  int32_t pid;
  uint32_t count;
};
struct PinnedEntry {
  ObjectId id;
  std::string state;  // as StateOf names it
  bool deleted;       // deleted but pinned: invisible, freed when its last pin goes
  uint64_t size;      // data and metadata bytes
  std::vector<PinHolder> holders;
};

enum class GetStatus { kReady, kAbsent, kNotReady };

class Store : public std::enable_shared_from_this<Store> {
 public:
  static std::shared_ptr<Store> Create(const CreateOptions& options);
  static std::shared_ptr<Store> Attach(const std::string& name);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  const std::string& name() const { return name_; }
  uint64_t segment_size() const { return header_->segment_size; }
  bool is_creator() const { return is_creator_; }
  bool closed() const { return closed_.load(); }
  uint8_t* data_base() const { return data_; }
  uint64_t data_size() const { return header_->data_size; }

  // Allocates and pins an object for writing by this process.
  PinnedObject Create(const ObjectId& id, uint64_t data_size, const uint8_t* metadata, uint64_t metadata_size);
  void Write(const ObjectId& id, uint64_t offset, const uint8_t* bytes, uint64_t length);
  // Makes a created object immutable and visible; drops the creator's pin.
  void Seal(const ObjectId& id);
  // Throws away an unsealed object this process created.
  void Abort(const ObjectId& id);
  // create + copy + seal in one call, with no pin left behind.
  void Put(const ObjectId& id, const uint8_t* data, uint64_t data_size, const uint8_t* metadata, uint64_t metadata_size);

  // Pins a sealed object (restoring it from its spill file if needed).
  GetStatus TryGet(const ObjectId& id, PinnedObject* out);
  // Blocks up to timeout_ms for a seal anywhere in the store; returns false on timeout.
  bool WaitForSeal(uint32_t seen_sequence, int64_t timeout_ms);
  // Wakes every waiter (here and in other processes); they re-check and sleep again if nothing changed.
  void WakeSealWaiters();
  uint32_t seal_sequence() const { return header_->seal_sequence.load(std::memory_order_acquire); }
  void Release(uint32_t entry, uint32_t generation);

  // Requests deletion; an object pinned anywhere is freed when its last pin goes.
  void Delete(const ObjectId& id);
  // "absent", "created", "sealed", "spilled" (spilling and restoring count as sealed/spilled).
  std::string StateOf(const ObjectId& id);
  StoreStats Stats();
  // Every pinned object with the processes pinning it (deleted ones included).
  std::vector<PinnedEntry> Pinned();
  // Drops the pins, unsealed objects and unfinished spills of processes that have died.
  uint32_t ReapDeadProcesses();
  // Drops this process's pins and unsealed objects and detaches; views stay mapped until their
  // Store reference goes. The creator also unlinks the segment and its spill files.
  void Close();

  // Test hooks: die (SIGKILL) at a named point inside the lock, or hold the lock forever.
  void SetCrashPoint(const std::string& point) { crash_point_ = point; }
  [[noreturn]] void HoldLockForever();

 private:
  friend class Lock;
  Store() = default;
  void MapSegment(int fd, uint64_t size, bool create);
  void RegisterProcess();
  void StartPrefaulter();
  void StopPrefaulter();
  void PrefaultLoop();
  void MaybeCrash(const char* point);

  // Everything below runs with the lock held.
  ObjectEntry* EntryAt(uint32_t index) const { return entries_ + index; }
  uint32_t FindLocked(const ObjectId& id) const;
  // As FindLocked, but an absent id is ERR_OBJECT_NOT_FOUND.
  uint32_t FindOrThrowLocked(const ObjectId& id) const;
  void IndexInsertLocked(uint32_t entry);
  void IndexRemoveLocked(uint32_t entry);
  void RebuildIndexLocked();
  uint32_t PopFreeEntryLocked();
  void FreeEntryLocked(uint32_t entry);
  void PinLocked(uint32_t entry, uint32_t process);
  bool UnpinLocked(uint32_t entry, uint32_t process);
  void MaybeFreeLocked(uint32_t entry);

  // Allocator (data-region offsets of block headers).
  std::optional<uint64_t> AllocateBlockLocked(uint64_t block_size);
  void FreeBlockLocked(uint64_t block);
  BlockHeader* BlockAt(uint64_t offset) const { return reinterpret_cast<BlockHeader*>(data_ + offset); }
  void BinInsertLocked(uint64_t block);
  void BinRemoveLocked(uint64_t block);
  // Allocates, reaping dead processes and spilling when needed; may drop and retake the lock.
  uint64_t AllocateMakingRoomLocked(class Lock& lock, uint64_t block_size, uint64_t requested);
  bool SpillOneLocked(class Lock& lock);
  void RestoreLocked(class Lock& lock, uint32_t entry);

  uint32_t ReapDeadProcessesLocked();
  void ReleaseProcessLocked(uint32_t slot);
  void RecoverLocked();  // rebuild every derived structure from the entries
  std::string SpillPath(const ObjectEntry& entry) const;

  std::string name_;
  bool is_creator_ = false;
  std::atomic<bool> closed_{false};
  uint32_t slot_ = kNil;
  uint8_t* base_ = nullptr;
  uint64_t mapped_size_ = 0;
  SegmentHeader* header_ = nullptr;
  ObjectEntry* entries_ = nullptr;
  PinRecord* pins_ = nullptr;
  uint32_t* index_ = nullptr;
  ProcessSlot* processes_ = nullptr;
  uint8_t* data_ = nullptr;
  std::string crash_point_;

  std::thread prefaulter_;
  std::atomic<bool> prefaulter_stop_{false};
  std::mutex close_mutex_;
};

// RAII holder of the segment's process-shared robust mutex. Recovers the store when the previous
// holder died inside it.
class Lock {
 public:
  explicit Lock(Store& store);
  ~Lock();
  void Acquire();
  void ReleaseEarly();
  Lock(const Lock&) = delete;
  Lock& operator=(const Lock&) = delete;

 private:
  Store& store_;
  bool held_ = false;
};

uint64_t DefaultCapacity();  // 30% of RAM, capped at what /dev/shm has free

}  // namespace trellis::store
