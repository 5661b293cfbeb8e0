#include "store/store.h"
#include "common/host_mappings.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "common/bulk_copy.h"
#include "common/error.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace trellis::store {
namespace {

constexpr uint64_t kIndexEmpty = 0;
constexpr uint64_t kIndexTombstone = 1;
constexpr uint64_t kPage = 4096;
// Small enough that the kernel's hold on the address space while it fills a chunk stays short
// even for a thread at the lowest priority.
constexpr uint64_t kPrefaultChunk = 1ull << 20;
// The prefaulter's nice value: it works ahead of need, so it takes CPU time nothing else wants.
constexpr int kPrefaultNice = 19;

NativeError StoreError(const char* code, const std::string& message) { return NativeError(code, message); }

int FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ms) {
  struct timespec ts;
  struct timespec* tsp = nullptr;
  if (timeout_ms >= 0) {
    ts.tv_sec = timeout_ms / 1000;
    ts.tv_nsec = (timeout_ms % 1000) * 1000000;
    tsp = &ts;
  }
  return static_cast<int>(syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, tsp, nullptr, 0));
}

void FutexWakeAll(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Reads the start time and state of a process, so that a recycled pid or a zombie is not taken
// for a live owner of pins.
bool ReadProcessStat(int32_t pid, uint64_t* start_time, char* state) {
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buffer[1024];
  ssize_t n = read(fd, buffer, sizeof(buffer) - 1);
  close(fd);
  if (n <= 0) return false;
  buffer[n] = 0;
  // The command name may hold spaces and parentheses: fields resume after the last ')'.
  char* p = std::strrchr(buffer, ')');
  if (p == nullptr) return false;
  p += 2;
  *state = *p;
  // Field 3 is the state; field 22 is the start time.
  for (int field = 3; field < 22 && *p; ++field) {
    p = std::strchr(p, ' ');
    if (p == nullptr) return false;
    ++p;
  }
  *start_time = std::strtoull(p, nullptr, 10);
  return true;
}

bool ProcessAlive(const ProcessSlot& slot) {
  uint64_t start_time = 0;
  char state = 0;
  if (!ReadProcessStat(slot.pid, &start_time, &state)) return false;
  if (state == 'Z' || state == 'X') return false;
  return start_time == slot.start_time;
}

uint32_t BinFor(uint64_t size) {
  uint32_t bin = 63 - static_cast<uint32_t>(__builtin_clzll(size));
  return bin < kBinCount ? bin : kBinCount - 1;
}

uint64_t RoundUpPow2(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Ids are lowercase hex only (as isObjectId in lib/store/object-id.ts says): accepting 'A'-'F'
// too would let two different strings name one object, and a view's id differ from its object's.
int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

void WriteAll(int fd, const uint8_t* bytes, uint64_t length, const std::string& path) {
  while (length > 0) {
    ssize_t n = write(fd, bytes, std::min<uint64_t>(length, 1ull << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw SystemError("write", path, errno);
    }
    bytes += n;
    length -= static_cast<uint64_t>(n);
  }
}

void ReadAll(int fd, uint8_t* bytes, uint64_t length, const std::string& path) {
  while (length > 0) {
    ssize_t n = read(fd, bytes, std::min<uint64_t>(length, 1ull << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw SystemError("read", path, errno);
    }
    if (n == 0) throw StoreError("ERR_SPILL_CORRUPT", "spill file " + path + " is shorter than its object");
    bytes += n;
    length -= static_cast<uint64_t>(n);
  }
}

class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;

 private:
  int fd_;
};

std::string ShmPath(const std::string& name) { return "/" + name; }

void ValidateName(const std::string& name) {
  if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos) {
    throw StoreError("ERR_INVALID_ARGUMENT", "segment name '" + name + "' must be 1 to 200 characters without '/'");
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Object ids

ObjectId ObjectId::FromHex(const std::string& hex) {
  ObjectId id;
  if (hex.size() != kObjectIdBytes * 2) {
    throw StoreError("ERR_INVALID_OBJECT_ID", "object id must be 40 hex characters, got " +
                                                  std::to_string(hex.size()) + " characters");
  }
  for (size_t i = 0; i < kObjectIdBytes; ++i) {
    int hi = HexValue(hex[2 * i]);
    int lo = HexValue(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      throw StoreError("ERR_INVALID_OBJECT_ID", "object id '" + hex + "' holds a character that is not lowercase hex");
    }
    id.bytes[i] = static_cast<uint8_t>(hi << 4 | lo);
  }
  return id;
}

std::string ObjectId::ToHex() const {
  static const char* digits = "0123456789abcdef";
  std::string out(kObjectIdBytes * 2, '0');
  for (size_t i = 0; i < kObjectIdBytes; ++i) {
    out[2 * i] = digits[bytes[i] >> 4];
    out[2 * i + 1] = digits[bytes[i] & 15];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Lock

Lock::Lock(Store& store) : store_(store) { Acquire(); }

Lock::~Lock() {
  if (held_) pthread_mutex_unlock(&store_.header_->mutex);
}

void Lock::Acquire() {
  int rc = pthread_mutex_lock(&store_.header_->mutex);
  if (rc == EOWNERDEAD) {
    // The holder died inside the lock: derived structures may be half-updated.
    held_ = true;
    store_.RecoverLocked();
    pthread_mutex_consistent(&store_.header_->mutex);
  } else if (rc != 0) {
    throw SystemError("pthread_mutex_lock", store_.name_, rc);
  }
  held_ = true;
  if (store_.closed_.load()) {
    pthread_mutex_unlock(&store_.header_->mutex);
    held_ = false;
    throw StoreError("ERR_STORE_CLOSED", "object store '" + store_.name_ + "' is closed in this process");
  }
}

void Lock::ReleaseEarly() {
  if (held_) {
    pthread_mutex_unlock(&store_.header_->mutex);
    held_ = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Creation and attachment

uint64_t DefaultCapacity() {
  struct sysinfo info;
  uint64_t ram = 0;
  if (sysinfo(&info) == 0) ram = static_cast<uint64_t>(info.totalram) * info.mem_unit;
  uint64_t capacity = ram / 10 * 3;
  struct statvfs shm;
  if (statvfs("/dev/shm", &shm) == 0) {
    uint64_t free_bytes = static_cast<uint64_t>(shm.f_bavail) * shm.f_frsize;
    capacity = std::min(capacity, free_bytes);
  }
  return capacity;
}

std::shared_ptr<Store> Store::Create(const CreateOptions& options) {
  ValidateName(options.name);
  uint64_t capacity = options.capacity == 0 ? DefaultCapacity() : options.capacity;
  if (capacity < (4ull << 20)) {
    throw StoreError("ERR_INVALID_ARGUMENT", "object store capacity must be at least 4 MiB, got " + std::to_string(capacity));
  }
  if (options.spill_directory.size() >= kSpillDirectoryBytes) {
    throw StoreError("ERR_INVALID_ARGUMENT", "spill directory path is longer than 511 bytes");
  }
  uint64_t max_objects = options.max_objects;
  if (max_objects == 0) max_objects = std::clamp<uint64_t>(capacity / 16384, 4096, 1u << 20);
  max_objects = std::clamp<uint64_t>(max_objects, 64, 1u << 24);
  uint64_t max_pins = std::max<uint64_t>(max_objects * 2, 8192);
  uint64_t index_size = RoundUpPow2(max_objects * 2);

  uint64_t processes_offset = AlignUp(sizeof(SegmentHeader), kPage);
  uint64_t entries_offset = AlignUp(processes_offset + sizeof(ProcessSlot) * kMaxProcesses, kPage);
  uint64_t pins_offset = AlignUp(entries_offset + sizeof(ObjectEntry) * max_objects, kPage);
  uint64_t index_offset = AlignUp(pins_offset + sizeof(PinRecord) * max_pins, kPage);
  uint64_t data_offset = AlignUp(index_offset + sizeof(uint32_t) * index_size, 1ull << 16);
  uint64_t segment_size = AlignUp(data_offset + capacity, kPage);

  std::shared_ptr<Store> store(new Store());
  store->name_ = options.name;
  store->is_creator_ = true;
  std::string path = ShmPath(options.name);
  int fd = shm_open(path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == EEXIST) {
      throw StoreError("ERR_SEGMENT_EXISTS", "shared-memory segment '" + options.name + "' already exists");
    }
    throw SystemError("shm_open", path, errno);
  }
  FileDescriptor guard(fd);
  if (ftruncate(fd, static_cast<off_t>(segment_size)) != 0) {
    int error = errno;
    shm_unlink(path.c_str());
    throw SystemError("ftruncate", path, error);
  }
  try {
    store->MapSegment(fd, segment_size, true);
  } catch (...) {
    shm_unlink(path.c_str());
    throw;
  }

  SegmentHeader* h = store->header_;
  h->version = kLayoutVersion;
  h->creator_pid = static_cast<uint32_t>(getpid());
  h->segment_size = segment_size;
  h->data_offset = data_offset;
  h->data_size = segment_size - data_offset;
  h->entries_offset = entries_offset;
  h->pins_offset = pins_offset;
  h->index_offset = index_offset;
  h->processes_offset = processes_offset;
  h->max_objects = static_cast<uint32_t>(max_objects);
  h->max_pins = static_cast<uint32_t>(max_pins);
  h->index_size = static_cast<uint32_t>(index_size);
  std::memcpy(h->spill_directory, options.spill_directory.data(), options.spill_directory.size());
  uint64_t window = options.prefault_window;
  if (window == UINT64_MAX) window = std::clamp<uint64_t>(capacity / 16, 32ull << 20, 512ull << 20);
  h->prefault_window = std::min(window, h->data_size);

  pthread_mutexattr_t attributes;
  pthread_mutexattr_init(&attributes);
  pthread_mutexattr_setpshared(&attributes, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attributes, PTHREAD_MUTEX_ROBUST);
  int rc = pthread_mutex_init(&h->mutex, &attributes);
  pthread_mutexattr_destroy(&attributes);
  if (rc != 0) {
    shm_unlink(path.c_str());
    throw SystemError("pthread_mutex_init", path, rc);
  }
  store->entries_ = reinterpret_cast<ObjectEntry*>(store->base_ + entries_offset);
  store->pins_ = reinterpret_cast<PinRecord*>(store->base_ + pins_offset);
  store->index_ = reinterpret_cast<uint32_t*>(store->base_ + index_offset);
  store->processes_ = reinterpret_cast<ProcessSlot*>(store->base_ + processes_offset);
  store->data_ = store->base_ + data_offset;
  {
    // Fresh memory is zero: free lists still need threading.
    Lock lock(*store);
    store->RecoverLocked();
    h->recoveries = 0;
    std::atomic_thread_fence(std::memory_order_release);
    h->magic = kSegmentMagic;  // written last: attachers check it
  }
  store->RegisterProcess();
  store->StartPrefaulter();
  return store;
}

std::shared_ptr<Store> Store::Attach(const std::string& name) {
  ValidateName(name);
  std::string path = ShmPath(name);
  int fd = shm_open(path.c_str(), O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == ENOENT) {
      throw StoreError("ERR_SEGMENT_NOT_FOUND", "no object store segment named '" + name + "'");
    }
    throw SystemError("shm_open", path, errno);
  }
  FileDescriptor guard(fd);
  struct stat info;
  if (fstat(fd, &info) != 0) throw SystemError("fstat", path, errno);
  if (static_cast<uint64_t>(info.st_size) < sizeof(SegmentHeader)) {
    throw StoreError("ERR_SEGMENT_INVALID", "segment '" + name + "' is too small to be an object store");
  }
  std::shared_ptr<Store> store(new Store());
  store->name_ = name;
  store->MapSegment(fd, static_cast<uint64_t>(info.st_size), false);
  SegmentHeader* h = store->header_;
  if (h->magic != kSegmentMagic || h->version != kLayoutVersion || h->segment_size != static_cast<uint64_t>(info.st_size)) {
    throw StoreError("ERR_SEGMENT_INVALID", "segment '" + name + "' is not a trellis object store of layout version " +
                                                std::to_string(kLayoutVersion));
  }
  store->entries_ = reinterpret_cast<ObjectEntry*>(store->base_ + h->entries_offset);
  store->pins_ = reinterpret_cast<PinRecord*>(store->base_ + h->pins_offset);
  store->index_ = reinterpret_cast<uint32_t*>(store->base_ + h->index_offset);
  store->processes_ = reinterpret_cast<ProcessSlot*>(store->base_ + h->processes_offset);
  store->data_ = store->base_ + h->data_offset;
  store->RegisterProcess();
  return store;
}

void Store::MapSegment(int fd, uint64_t size, bool create) {
  void* address = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (address == MAP_FAILED) throw SystemError("mmap", name_, errno);
  base_ = static_cast<uint8_t*>(address);
  mapped_size_ = size;
  header_ = reinterpret_cast<SegmentHeader*>(base_);
  host_mappings::Add(base_, mapped_size_);
  (void)create;
}

void Store::RegisterProcess() {
  Lock lock(*this);
  ReapDeadProcessesLocked();
  pid_t pid = getpid();
  uint64_t start_time = 0;
  char state = 0;
  ReadProcessStat(pid, &start_time, &state);
  for (uint32_t i = 0; i < kMaxProcesses; ++i) {
    if (processes_[i].pid == 0) {
      processes_[i].start_time = start_time;
      processes_[i].pid = pid;
      header_->attached_processes++;
      slot_ = i;
      return;
    }
  }
  throw StoreError("ERR_STORE_PROCESS_LIMIT", "object store '" + name_ + "' already has " +
                                                   std::to_string(kMaxProcesses) + " attached processes");
}

Store::~Store() {
  StopPrefaulter();
  if (base_ != nullptr) {
    host_mappings::Remove(base_, mapped_size_);  // unlocks what GPU copies page-locked
    munmap(base_, mapped_size_);
  }
}

void Store::Close() {
  std::lock_guard<std::mutex> guard(close_mutex_);
  if (closed_.load()) return;
  StopPrefaulter();
  {
    Lock lock(*this);
    if (slot_ != kNil) {
      ReleaseProcessLocked(slot_);
      processes_[slot_].pid = 0;
      header_->attached_processes--;
      slot_ = kNil;
    }
    closed_.store(true);
  }
  header_->seal_sequence.fetch_add(1);
  FutexWakeAll(&header_->seal_sequence);
  // Views may keep the mapping a while, but what GPU copies page-locked is let go now.
  host_mappings::Remove(base_, mapped_size_);
  if (is_creator_) {
    shm_unlink(ShmPath(name_).c_str());
    if (header_->spill_directory[0] != 0) {
      // Spill files are named after their objects: remove every file this segment spilled.
      for (uint32_t i = 0; i < header_->entries_high_water; ++i) {
        ObjectEntry& entry = entries_[i];
        auto state = static_cast<ObjectState>(entry.state.load());
        if (state == ObjectState::kSpilled || state == ObjectState::kSpilling || state == ObjectState::kRestoring) {
          unlink(SpillPath(entry).c_str());
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Prefaulting: fresh shared memory costs a page fault per 4 KiB on first touch (slow on virtual
// machines), so a thread in the creating process keeps a window above the allocation frontier
// faulted in. Never the whole segment: several nodes' segments share one machine's memory.

void Store::StartPrefaulter() {
  if (header_->prefault_window == 0) return;
  prefaulter_ = std::thread([this] { PrefaultLoop(); });
}

void Store::StopPrefaulter() {
  if (!prefaulter_.joinable()) return;
  prefaulter_stop_.store(true);
  header_->prefault_sequence.fetch_add(1);
  FutexWakeAll(&header_->prefault_sequence);
  prefaulter_.join();
}

void Store::PrefaultLoop() {
  // Lowest priority for this thread alone: at start-up it competed with the workers' start for
  // the CPUs (and doubled the time to a ready cluster on two cores), later with tasks. Failing to
  // lower it is not an error: the thread then runs at normal priority, as it did before.
  if (setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), kPrefaultNice) != 0) {
    std::fprintf(stderr, "trellis: the store's prefault thread keeps normal priority: setpriority: %s\n", std::strerror(errno));
  }
  bool populate_supported = true;
  while (!prefaulter_stop_.load()) {
    uint32_t sequence = header_->prefault_sequence.load();
    uint64_t top = header_->top.load(std::memory_order_relaxed);
    uint64_t target = std::min(header_->data_size, AlignUp(top + header_->prefault_window, kPage));
    uint64_t done = header_->prefaulted.load();
    if (done >= target) {
      FutexWait(&header_->prefault_sequence, sequence, 500);
      continue;
    }
    uint64_t length = std::min(target - done, kPrefaultChunk);
    uint8_t* start = data_ + done;
    if (populate_supported && madvise(start, length, MADV_POPULATE_WRITE) != 0) populate_supported = false;
    if (!populate_supported) {
      // Older kernels: touch each page with an atomic add of zero, which cannot disturb data that
      // a writer may already be putting there.
      for (uint64_t offset = 0; offset < length; offset += kPage) {
        __atomic_fetch_add(reinterpret_cast<uint32_t*>(start + offset), 0u, __ATOMIC_RELAXED);
      }
    }
    header_->prefaulted.store(done + length);
  }
}

// ---------------------------------------------------------------------------------------------
// Index: open addressing over entry numbers; derived, rebuilt after a crash.

uint32_t Store::FindLocked(const ObjectId& id) const {
  uint64_t hash;
  std::memcpy(&hash, id.bytes, sizeof(hash));
  uint32_t mask = header_->index_size - 1;
  for (uint32_t probe = 0; probe < header_->index_size; ++probe) {
    uint32_t slot = static_cast<uint32_t>((hash + probe) & mask);
    uint32_t value = index_[slot];
    if (value == kIndexEmpty) return kNil;
    if (value == kIndexTombstone) continue;
    uint32_t entry = value - 2;
    if (std::memcmp(entries_[entry].id, id.bytes, kObjectIdBytes) == 0) return entry;
  }
  return kNil;
}

uint32_t Store::FindOrThrowLocked(const ObjectId& id) const {
  uint32_t index = FindLocked(id);
  if (index == kNil) throw StoreError("ERR_OBJECT_NOT_FOUND", "object " + id.ToHex() + " is not in store '" + name_ + "'");
  return index;
}

void Store::IndexInsertLocked(uint32_t entry) {
  if (header_->index_tombstones > header_->index_size / 4) RebuildIndexLocked();
  uint64_t hash;
  std::memcpy(&hash, entries_[entry].id, sizeof(hash));
  uint32_t mask = header_->index_size - 1;
  for (uint32_t probe = 0; probe < header_->index_size; ++probe) {
    uint32_t slot = static_cast<uint32_t>((hash + probe) & mask);
    uint32_t value = index_[slot];
    if (value == kIndexEmpty || value == kIndexTombstone) {
      if (value == kIndexTombstone) header_->index_tombstones--;
      index_[slot] = entry + 2;
      header_->index_used++;
      return;
    }
  }
}

void Store::IndexRemoveLocked(uint32_t entry) {
  uint64_t hash;
  std::memcpy(&hash, entries_[entry].id, sizeof(hash));
  uint32_t mask = header_->index_size - 1;
  for (uint32_t probe = 0; probe < header_->index_size; ++probe) {
    uint32_t slot = static_cast<uint32_t>((hash + probe) & mask);
    uint32_t value = index_[slot];
    if (value == kIndexEmpty) return;
    if (value == entry + 2) {
      index_[slot] = kIndexTombstone;
      header_->index_used--;
      header_->index_tombstones++;
      return;
    }
  }
}

void Store::RebuildIndexLocked() {
  std::memset(index_, 0, sizeof(uint32_t) * header_->index_size);
  header_->index_used = 0;
  header_->index_tombstones = 0;
  for (uint32_t i = 0; i < header_->max_objects; ++i) {
    const ObjectEntry& entry = entries_[i];
    if (entry.state.load() != static_cast<uint32_t>(ObjectState::kFree) && !(entry.flags & kFlagDeleted)) {
      IndexInsertLocked(i);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entries and pins

uint32_t Store::PopFreeEntryLocked() {
  uint32_t entry = header_->free_entry_head;
  if (entry == kNil) {
    throw StoreError("ERR_OBJECT_STORE_FULL", "object store '" + name_ + "' holds its maximum of " +
                                                  std::to_string(header_->max_objects) + " objects")
        .with("maxObjects", static_cast<double>(header_->max_objects))
        .with("capacity", static_cast<double>(header_->data_size))
        .with("used", static_cast<double>(header_->bytes_in_use))
        .with("requested", 0.0);
  }
  header_->free_entry_head = entries_[entry].next_free;
  if (entry >= header_->entries_high_water) header_->entries_high_water = entry + 1;
  return entry;
}

void Store::FreeEntryLocked(uint32_t index) {
  ObjectEntry& entry = entries_[index];
  auto state = static_cast<ObjectState>(entry.state.load());
  if (state == ObjectState::kFree) return;
  if (!(entry.flags & kFlagDeleted)) IndexRemoveLocked(index);
  if (state == ObjectState::kSpilled) {
    unlink(SpillPath(entry).c_str());
    header_->spilled_objects--;
    header_->spilled_bytes -= entry.data_size + entry.metadata_size;
  } else if (entry.block_size != 0) {
    FreeBlockLocked(entry.block);
    header_->bytes_in_use -= entry.block_size;
  }
  if (!(entry.flags & kFlagDeleted)) header_->object_count--;
  if (entry.pin_count > 0) header_->pinned_objects--;
  entry.state.store(static_cast<uint32_t>(ObjectState::kFree));
  entry.flags = 0;
  entry.block = 0;
  entry.block_size = 0;
  entry.pin_head = kNil;
  entry.pin_count = 0;
  entry.next_free = header_->free_entry_head;
  header_->free_entry_head = index;
  header_->seal_sequence.fetch_add(1);
}

void Store::PinLocked(uint32_t index, uint32_t process) {
  ObjectEntry& entry = entries_[index];
  for (uint32_t r = entry.pin_head; r != kNil; r = pins_[r].next) {
    if (pins_[r].process == process) {
      pins_[r].count.fetch_add(1);
      entry.pin_count++;  // already counted as pinned: this record held a pin
      return;
    }
  }
  uint32_t record = header_->free_pin_head;
  if (record == kNil) {
    throw StoreError("ERR_OBJECT_STORE_FULL", "object store '" + name_ + "' has no pin records left (" +
                                                  std::to_string(header_->max_pins) + " in use)")
        .with("capacity", static_cast<double>(header_->data_size))
        .with("used", static_cast<double>(header_->bytes_in_use))
        .with("requested", 0.0);
  }
  header_->free_pin_head = pins_[record].next;
  if (record >= header_->pins_high_water) header_->pins_high_water = record + 1;
  pins_[record].entry = index;
  pins_[record].process = process;
  pins_[record].count.store(1);
  pins_[record].next = entry.pin_head;
  entry.pin_head = record;
  if (entry.pin_count++ == 0) {
    MaybeCrash("pin:before-count");
    header_->pinned_objects++;
  }
}

bool Store::UnpinLocked(uint32_t index, uint32_t process) {
  ObjectEntry& entry = entries_[index];
  uint32_t previous = kNil;
  for (uint32_t r = entry.pin_head; r != kNil; previous = r, r = pins_[r].next) {
    if (pins_[r].process != process) continue;
    if (--entry.pin_count == 0) header_->pinned_objects--;
    if (pins_[r].count.fetch_sub(1) == 1) {
      if (previous == kNil) entry.pin_head = pins_[r].next;
      else pins_[previous].next = pins_[r].next;
      pins_[r].next = header_->free_pin_head;
      header_->free_pin_head = r;
    }
    return true;
  }
  return false;
}

void Store::MaybeFreeLocked(uint32_t index) {
  ObjectEntry& entry = entries_[index];
  auto state = static_cast<ObjectState>(entry.state.load());
  bool busy = state == ObjectState::kSpilling || state == ObjectState::kRestoring;
  if ((entry.flags & kFlagDeleted) && entry.pin_count == 0 && !busy) FreeEntryLocked(index);
}

// ---------------------------------------------------------------------------------------------
// Allocator: boundary-tagged blocks in the data region, segregated free lists by power of two,
// coalescing on free; fresh space comes from the wilderness above `top` only when no freed block
// fits, so memory already faulted in is reused first.

void Store::BinInsertLocked(uint64_t offset) {
  BlockHeader* block = BlockAt(offset);
  uint32_t bin = BinFor(block->size);
  block->is_free = 1;
  block->entry = kNil;
  block->prev_free = 0;
  block->next_free = header_->bins[bin];
  if (block->next_free != 0) BlockAt(block->next_free - 1)->prev_free = offset + 1;
  header_->bins[bin] = offset + 1;
}

void Store::BinRemoveLocked(uint64_t offset) {
  BlockHeader* block = BlockAt(offset);
  uint32_t bin = BinFor(block->size);
  if (block->prev_free != 0) BlockAt(block->prev_free - 1)->next_free = block->next_free;
  else header_->bins[bin] = block->next_free;
  if (block->next_free != 0) BlockAt(block->next_free - 1)->prev_free = block->prev_free;
  block->is_free = 0;
  block->next_free = block->prev_free = 0;
}

std::optional<uint64_t> Store::AllocateBlockLocked(uint64_t size) {
  uint64_t top = header_->top.load(std::memory_order_relaxed);
  for (uint32_t bin = BinFor(size); bin < kBinCount; ++bin) {
    // Within the first bin, sizes vary by up to 2x: take the tightest fit among a few candidates.
    uint64_t best = 0;
    uint64_t best_size = UINT64_MAX;
    int looked = 0;
    for (uint64_t link = header_->bins[bin]; link != 0 && looked < 32; link = BlockAt(link - 1)->next_free, ++looked) {
      uint64_t candidate_size = BlockAt(link - 1)->size;
      if (candidate_size >= size && candidate_size < best_size) {
        best = link;
        best_size = candidate_size;
        if (candidate_size == size) break;
      }
    }
    if (best == 0) continue;
    uint64_t offset = best - 1;
    BinRemoveLocked(offset);
    BlockHeader* block = BlockAt(offset);
    uint64_t remainder = block->size - size;
    if (remainder >= kMinSplitRemainder) {
      block->size = size;
      uint64_t rest = offset + size;
      BlockHeader* rest_block = BlockAt(rest);
      rest_block->size = remainder;
      rest_block->prev_size = size;
      rest_block->magic = kBlockMagic;
      uint64_t after = rest + remainder;
      if (after < top) BlockAt(after)->prev_size = remainder;
      BinInsertLocked(rest);
    }
    return offset;
  }
  if (top + size > header_->data_size) return std::nullopt;
  BlockHeader* block = BlockAt(top);
  block->size = size;
  block->prev_size = header_->top_previous_size;
  header_->top_previous_size = size;
  block->magic = kBlockMagic;
  block->is_free = 0;
  block->next_free = block->prev_free = 0;
  header_->top.store(top + size, std::memory_order_relaxed);
  if (header_->prefault_window != 0 && top + size + header_->prefault_window / 2 > header_->prefaulted.load()) {
    header_->prefault_sequence.fetch_add(1);
    FutexWakeAll(&header_->prefault_sequence);
  }
  return top;
}

void Store::FreeBlockLocked(uint64_t offset) {
  BlockHeader* block = BlockAt(offset);
  uint64_t top = header_->top.load(std::memory_order_relaxed);
  uint64_t size = block->size;
  // Merge with the next block.
  uint64_t next = offset + size;
  if (next < top) {
    BlockHeader* next_block = BlockAt(next);
    if (next_block->is_free) {
      BinRemoveLocked(next);
      size += next_block->size;
    }
  }
  // Merge with the previous block.
  if (block->prev_size != 0) {
    uint64_t previous = offset - block->prev_size;
    BlockHeader* previous_block = BlockAt(previous);
    if (previous_block->is_free) {
      BinRemoveLocked(previous);
      size += previous_block->size;
      offset = previous;
      block = previous_block;
    }
  }
  block->size = size;
  block->magic = kBlockMagic;
  if (offset + size >= top) {
    // Back to the wilderness.
    header_->top.store(offset, std::memory_order_relaxed);
    header_->top_previous_size = block->prev_size;
    block->is_free = 0;
    return;
  }
  BlockAt(offset + size)->prev_size = size;
  BinInsertLocked(offset);
}

// ---------------------------------------------------------------------------------------------
// Recovery

void Store::RecoverLocked() {
  header_->recoveries++;
  uint32_t max_objects = header_->max_objects;
  header_->free_pin_head = kNil;
  // Entries: anything not committed is free; rebuild the free list and pin lists.
  header_->free_entry_head = kNil;
  header_->object_count = 0;
  header_->bytes_in_use = 0;
  header_->spilled_objects = 0;
  header_->spilled_bytes = 0;
  header_->pinned_objects = 0;
  header_->attached_processes = 0;
  header_->entries_high_water = 0;
  header_->pins_high_water = 0;
  std::vector<std::pair<uint64_t, uint32_t>> resident;
  for (uint32_t i = max_objects; i-- > 0;) {
    ObjectEntry& entry = entries_[i];
    entry.pin_count = 0;
    entry.pin_head = kNil;
    auto state = static_cast<ObjectState>(entry.state.load());
    if (state == ObjectState::kFree) {
      entry.next_free = header_->free_entry_head;
      header_->free_entry_head = i;
      continue;
    }
    if (header_->entries_high_water == 0) header_->entries_high_water = i + 1;
    if (!(entry.flags & kFlagDeleted)) header_->object_count++;
    if (state == ObjectState::kSpilled) {
      entry.block_size = 0;
      header_->spilled_objects++;
      header_->spilled_bytes += entry.data_size + entry.metadata_size;
    } else {
      resident.emplace_back(entry.block, i);
    }
  }
  for (uint32_t r = header_->max_pins; r-- > 0;) {
    PinRecord& record = pins_[r];
    bool valid = record.count.load() > 0 && record.entry < max_objects &&
                 entries_[record.entry].state.load() != static_cast<uint32_t>(ObjectState::kFree);
    if (!valid) {
      record.count.store(0);
      record.next = header_->free_pin_head;
      header_->free_pin_head = r;
      continue;
    }
    if (header_->pins_high_water == 0) header_->pins_high_water = r + 1;
    ObjectEntry& entry = entries_[record.entry];
    record.next = entry.pin_head;
    entry.pin_head = r;
    entry.pin_count += record.count.load();
  }
  // Allocator: the committed entries' blocks tile the data region; gaps become free blocks.
  std::sort(resident.begin(), resident.end());
  for (auto& bin : header_->bins) bin = 0;
  uint64_t cursor = 0;
  uint64_t previous_size = 0;
  for (auto& [offset, index] : resident) {
    ObjectEntry& entry = entries_[index];
    if (offset < cursor || offset + entry.block_size > header_->data_size) {
      // Overlapping or out of range: cannot be trusted; drop the object.
      entry.state.store(static_cast<uint32_t>(ObjectState::kFree));
      entry.next_free = header_->free_entry_head;
      header_->free_entry_head = index;
      if (!(entry.flags & kFlagDeleted)) header_->object_count--;
      continue;
    }
    if (offset > cursor) {
      BlockHeader* gap = BlockAt(cursor);
      gap->size = offset - cursor;
      gap->prev_size = previous_size;
      gap->magic = kBlockMagic;
      BinInsertLocked(cursor);
      previous_size = gap->size;
    }
    BlockHeader* block = BlockAt(offset);
    block->size = entry.block_size;
    block->prev_size = previous_size;
    block->magic = kBlockMagic;
    block->is_free = 0;
    block->entry = index;
    block->next_free = block->prev_free = 0;
    header_->bytes_in_use += entry.block_size;
    previous_size = entry.block_size;
    cursor = offset + entry.block_size;
  }
  header_->top.store(cursor);
  header_->top_previous_size = previous_size;
  RebuildIndexLocked();
  for (uint32_t i = 0; i < max_objects; ++i) {
    if (entries_[i].state.load() != static_cast<uint32_t>(ObjectState::kFree) && entries_[i].pin_count > 0) {
      header_->pinned_objects++;
    }
  }
  for (uint32_t i = 0; i < kMaxProcesses; ++i) {
    if (processes_[i].pid != 0) header_->attached_processes++;
  }
}

// ---------------------------------------------------------------------------------------------
// Processes

uint32_t Store::ReapDeadProcessesLocked() {
  uint32_t reaped = 0;
  for (uint32_t i = 0; i < kMaxProcesses; ++i) {
    if (processes_[i].pid == 0 || i == slot_) continue;
    if (ProcessAlive(processes_[i])) continue;
    ReleaseProcessLocked(i);
    processes_[i].pid = 0;
    header_->attached_processes--;
    ++reaped;
  }
  return reaped;
}

void Store::ReleaseProcessLocked(uint32_t slot) {
  for (uint32_t r = 0; r < header_->pins_high_water; ++r) {
    PinRecord& record = pins_[r];
    if (record.count.load() == 0 || record.process != slot) continue;
    uint32_t entry = record.entry;
    while (record.count.load() > 0 && UnpinLocked(entry, slot)) {
    }
  }
  for (uint32_t i = 0; i < header_->entries_high_water; ++i) {
    ObjectEntry& entry = entries_[i];
    auto state = static_cast<ObjectState>(entry.state.load());
    if (state == ObjectState::kCreated && entry.creator == slot) {
      FreeEntryLocked(i);
    } else if (state == ObjectState::kSpilling && entry.busy_slot == slot) {
      unlink(SpillPath(entry).c_str());
      entry.state.store(static_cast<uint32_t>(ObjectState::kSealed));
      MaybeFreeLocked(i);
    } else if (state == ObjectState::kRestoring && entry.busy_slot == slot) {
      FreeBlockLocked(entry.block);
      header_->bytes_in_use -= entry.block_size;
      entry.block_size = 0;
      entry.state.store(static_cast<uint32_t>(ObjectState::kSpilled));
      header_->spilled_objects++;
      header_->spilled_bytes += entry.data_size + entry.metadata_size;
      MaybeFreeLocked(i);
    } else {
      MaybeFreeLocked(i);
    }
  }
  header_->seal_sequence.fetch_add(1);
  if (header_->seal_waiters.load() > 0) FutexWakeAll(&header_->seal_sequence);
}

uint32_t Store::ReapDeadProcesses() {
  Lock lock(*this);
  return ReapDeadProcessesLocked();
}

void Store::MaybeCrash(const char* point) {
  if (!crash_point_.empty() && crash_point_ == point) kill(getpid(), SIGKILL);
}

void Store::HoldLockForever() {
  Lock lock(*this);
  MaybeCrash("hold");
  for (;;) pause();
}

// ---------------------------------------------------------------------------------------------
// Spilling

std::string Store::SpillPath(const ObjectEntry& entry) const {
  ObjectId id;
  std::memcpy(id.bytes, entry.id, kObjectIdBytes);
  return std::string(header_->spill_directory) + "/" + name_ + "-" + id.ToHex() + "-" + std::to_string(entry.generation);
}

bool Store::SpillOneLocked(Lock& lock) {
  if (header_->spill_directory[0] == 0) return false;
  uint32_t victim = kNil;
  uint64_t oldest = UINT64_MAX;
  for (uint32_t i = 0; i < header_->entries_high_water; ++i) {
    const ObjectEntry& entry = entries_[i];
    if (entry.state.load() != static_cast<uint32_t>(ObjectState::kSealed)) continue;
    if (entry.pin_count != 0 || (entry.flags & kFlagDeleted)) continue;
    if (entry.last_access < oldest) {
      oldest = entry.last_access;
      victim = i;
    }
  }
  if (victim == kNil) return false;
  ObjectEntry& entry = entries_[victim];
  entry.state.store(static_cast<uint32_t>(ObjectState::kSpilling));
  entry.busy_slot = slot_;
  std::string path = SpillPath(entry);
  const uint8_t* payload = data_ + entry.block + kBlockHeaderSize;
  uint64_t length = AlignUp(entry.data_size, kAlignment) + entry.metadata_size;
  lock.ReleaseEarly();
  // The block stays resident and readable while it is written out: gets may still pin it.
  std::string failure;
  int error_number = 0;
  {
    int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
    if (fd < 0) {
      error_number = errno;
      failure = "open";
    } else {
      FileDescriptor guard(fd);
      try {
        WriteAll(fd, payload, length, path);
      } catch (const NativeError&) {
        error_number = errno;
        failure = "write";
      }
    }
  }
  MaybeCrash("spill:after-write");
  lock.Acquire();
  if (!failure.empty()) {
    unlink(path.c_str());
    entry.state.store(static_cast<uint32_t>(ObjectState::kSealed));
    MaybeFreeLocked(victim);
    throw SystemError(failure, path, error_number);
  }
  if (entry.pin_count != 0) {
    // Somebody read it meanwhile: keep it resident.
    unlink(path.c_str());
    entry.state.store(static_cast<uint32_t>(ObjectState::kSealed));
    return true;
  }
  FreeBlockLocked(entry.block);
  header_->bytes_in_use -= entry.block_size;
  entry.block = 0;
  entry.block_size = 0;
  entry.state.store(static_cast<uint32_t>(ObjectState::kSpilled));
  header_->spilled_objects++;
  header_->spilled_bytes += entry.data_size + entry.metadata_size;
  header_->total_spilled_objects++;
  header_->total_spilled_bytes += entry.data_size + entry.metadata_size;
  MaybeFreeLocked(victim);
  return true;
}

uint64_t Store::AllocateMakingRoomLocked(Lock& lock, uint64_t block_size, uint64_t requested) {
  if (block_size > header_->data_size) {
    throw StoreError("ERR_OBJECT_TOO_LARGE", "object of " + std::to_string(requested) + " bytes exceeds the capacity of object store '" +
                                                 name_ + "' (" + std::to_string(header_->data_size) + " bytes)")
        .with("requested", static_cast<double>(requested))
        .with("capacity", static_cast<double>(header_->data_size))
        .with("used", static_cast<double>(header_->bytes_in_use));
  }
  bool reaped = false;
  for (;;) {
    if (auto block = AllocateBlockLocked(block_size)) return *block;
    if (!reaped) {
      reaped = true;
      if (ReapDeadProcessesLocked() > 0) continue;
    }
    if (SpillOneLocked(lock)) continue;
    throw StoreError("ERR_OBJECT_STORE_FULL",
                     "object store '" + name_ + "' is full: requested " + std::to_string(requested) + " bytes, capacity " +
                         std::to_string(header_->data_size) + " bytes, " + std::to_string(header_->bytes_in_use) +
                         " bytes in use by " + std::to_string(header_->object_count) +
                         " objects, and nothing can be spilled or freed (" + std::to_string(header_->pinned_objects) +
                         " objects are pinned by readers: a value read zero-copy pins its object until it is "
                         "released, or collected after the reader's next turn of the event loop)")
        .with("requested", static_cast<double>(requested))
        .with("capacity", static_cast<double>(header_->data_size))
        .with("used", static_cast<double>(header_->bytes_in_use));
  }
}

void Store::RestoreLocked(Lock& lock, uint32_t index) {
  ObjectEntry& entry = entries_[index];
  uint32_t generation = entry.generation;
  uint64_t length = AlignUp(entry.data_size, kAlignment) + entry.metadata_size;
  uint64_t block_size = AlignUp(kBlockHeaderSize + length, kAlignment);
  // Making room may drop the lock; pin the entry meanwhile so nobody frees it under us.
  PinLocked(index, slot_);
  uint64_t block;
  try {
    block = AllocateMakingRoomLocked(lock, block_size, entry.data_size + entry.metadata_size);
  } catch (...) {
    UnpinLocked(index, slot_);
    MaybeFreeLocked(index);
    throw;
  }
  UnpinLocked(index, slot_);
  if (entry.generation != generation || entry.state.load() != static_cast<uint32_t>(ObjectState::kSpilled) ||
      (entry.flags & kFlagDeleted)) {
    // Deleted, or restored by someone else while we made room.
    FreeBlockLocked(block);
    MaybeFreeLocked(index);
    return;
  }
  BlockAt(block)->entry = index;
  entry.block = block;
  entry.block_size = block_size;
  header_->bytes_in_use += block_size;
  header_->spilled_objects--;
  header_->spilled_bytes -= entry.data_size + entry.metadata_size;
  entry.busy_slot = slot_;
  entry.state.store(static_cast<uint32_t>(ObjectState::kRestoring));
  std::string path = SpillPath(entry);
  uint8_t* payload = data_ + block + kBlockHeaderSize;
  lock.ReleaseEarly();
  std::string failure;
  int error_number = 0;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    error_number = errno;
    failure = "open";
  } else {
    FileDescriptor guard(fd);
    try {
      ReadAll(fd, payload, length, path);
    } catch (const NativeError&) {
      error_number = errno ? errno : EIO;
      failure = "read";
    }
  }
  lock.Acquire();
  if (!failure.empty()) {
    FreeBlockLocked(block);
    header_->bytes_in_use -= block_size;
    entry.block = 0;
    entry.block_size = 0;
    entry.state.store(static_cast<uint32_t>(ObjectState::kSpilled));
    header_->spilled_objects++;
    header_->spilled_bytes += entry.data_size + entry.metadata_size;
    MaybeFreeLocked(index);
    throw SystemError(failure, path, error_number);
  }
  unlink(path.c_str());
  entry.state.store(static_cast<uint32_t>(ObjectState::kSealed));
  header_->total_restored_objects++;
  header_->total_restored_bytes += entry.data_size + entry.metadata_size;
  header_->seal_sequence.fetch_add(1);
  if (header_->seal_waiters.load() > 0) FutexWakeAll(&header_->seal_sequence);
  MaybeFreeLocked(index);
}

// ---------------------------------------------------------------------------------------------
// Object operations

PinnedObject Store::Create(const ObjectId& id, uint64_t data_size, const uint8_t* metadata, uint64_t metadata_size) {
  uint64_t payload = AlignUp(data_size, kAlignment) + metadata_size;
  uint64_t block_size = AlignUp(kBlockHeaderSize + payload, kAlignment);
  Lock lock(*this);
  if (FindLocked(id) != kNil) {
    throw StoreError("ERR_OBJECT_EXISTS", "object " + id.ToHex() + " already exists in store '" + name_ + "'");
  }
  uint64_t block = AllocateMakingRoomLocked(lock, block_size, data_size + metadata_size);
  MaybeCrash("create:after-allocate");
  if (FindLocked(id) != kNil) {
    FreeBlockLocked(block);
    throw StoreError("ERR_OBJECT_EXISTS", "object " + id.ToHex() + " already exists in store '" + name_ + "'");
  }
  uint32_t index;
  try {
    index = PopFreeEntryLocked();
  } catch (...) {
    FreeBlockLocked(block);
    throw;
  }
  ObjectEntry& entry = entries_[index];
  std::memcpy(entry.id, id.bytes, kObjectIdBytes);
  entry.flags = 0;
  entry.creator = slot_;
  entry.busy_slot = kNil;
  entry.generation++;
  entry.pin_count = 0;
  entry.pin_head = kNil;
  entry.block = block;
  entry.block_size = block_size;
  entry.data_size = data_size;
  entry.metadata_size = metadata_size;
  entry.last_access = ++header_->clock;
  BlockAt(block)->entry = index;
  uint8_t* data = data_ + block + kBlockHeaderSize;
  uint8_t* metadata_copy = data + AlignUp(data_size, kAlignment);
  if (metadata_size > 0) std::memcpy(metadata_copy, metadata, metadata_size);
  MaybeCrash("create:before-commit");
  entry.state.store(static_cast<uint32_t>(ObjectState::kCreated), std::memory_order_release);
  header_->bytes_in_use += block_size;
  header_->object_count++;
  IndexInsertLocked(index);
  PinLocked(index, slot_);
  MaybeCrash("create:after-commit");
  return PinnedObject{index, entry.generation, data, data_size, metadata_copy, metadata_size};
}

void Store::Write(const ObjectId& id, uint64_t offset, const uint8_t* bytes, uint64_t length) {
  uint8_t* destination;
  {
    Lock lock(*this);
    uint32_t index = FindOrThrowLocked(id);
    ObjectEntry& entry = entries_[index];
    if (entry.state.load() != static_cast<uint32_t>(ObjectState::kCreated)) {
      throw StoreError("ERR_OBJECT_SEALED", "object " + id.ToHex() + " is sealed and can no longer be written");
    }
    if (entry.creator != slot_) {
      throw StoreError("ERR_OBJECT_STATE", "object " + id.ToHex() + " is being written by another process");
    }
    if (offset > entry.data_size || length > entry.data_size - offset) {
      throw StoreError("ERR_OUT_OF_RANGE", "write of " + std::to_string(length) + " bytes at offset " + std::to_string(offset) +
                                               " overruns object " + id.ToHex() + " of " + std::to_string(entry.data_size) + " bytes");
    }
    destination = data_ + entry.block + kBlockHeaderSize + offset;
  }
  // The creator's pin keeps the block alive: copy outside the lock.
  BulkCopy(destination, bytes, length);
}

void Store::Seal(const ObjectId& id) {
  Lock lock(*this);
  uint32_t index = FindOrThrowLocked(id);
  ObjectEntry& entry = entries_[index];
  if (entry.state.load() != static_cast<uint32_t>(ObjectState::kCreated)) {
    throw StoreError("ERR_OBJECT_SEALED", "object " + id.ToHex() + " is already sealed");
  }
  if (entry.creator != slot_) {
    throw StoreError("ERR_OBJECT_STATE", "object " + id.ToHex() + " was created by another process, which must seal it");
  }
  entry.state.store(static_cast<uint32_t>(ObjectState::kSealed), std::memory_order_release);
  entry.creator = kNil;
  UnpinLocked(index, slot_);
  header_->seal_sequence.fetch_add(1);
  if (header_->seal_waiters.load() > 0) FutexWakeAll(&header_->seal_sequence);
}

void Store::Abort(const ObjectId& id) {
  Lock lock(*this);
  uint32_t index = FindOrThrowLocked(id);
  ObjectEntry& entry = entries_[index];
  if (entry.state.load() != static_cast<uint32_t>(ObjectState::kCreated) || entry.creator != slot_) {
    throw StoreError("ERR_OBJECT_SEALED", "object " + id.ToHex() + " is not an unsealed object of this process");
  }
  UnpinLocked(index, slot_);
  FreeEntryLocked(index);
}

void Store::Put(const ObjectId& id, const uint8_t* data, uint64_t data_size, const uint8_t* metadata, uint64_t metadata_size) {
  PinnedObject object = Create(id, data_size, metadata, metadata_size);
  BulkCopy(object.data, data, data_size);
  try {
    Seal(id);
  } catch (const NativeError&) {
    // Deleted by another process while we copied: our creator pin is all that keeps it.
    Release(object.entry, object.generation);
    throw;
  }
}

GetStatus Store::TryGet(const ObjectId& id, PinnedObject* out) {
  Lock lock(*this);
  for (int attempt = 0; attempt < 4; ++attempt) {
    uint32_t index = FindLocked(id);
    if (index == kNil) return GetStatus::kAbsent;
    ObjectEntry& entry = entries_[index];
    auto state = static_cast<ObjectState>(entry.state.load());
    if (state == ObjectState::kCreated || state == ObjectState::kRestoring) return GetStatus::kNotReady;
    if (state == ObjectState::kSpilled) {
      RestoreLocked(lock, index);
      continue;
    }
    PinLocked(index, slot_);
    entry.last_access = ++header_->clock;
    uint8_t* data = data_ + entry.block + kBlockHeaderSize;
    *out = PinnedObject{index, entry.generation, data, entry.data_size, data + AlignUp(entry.data_size, kAlignment), entry.metadata_size};
    return GetStatus::kReady;
  }
  return GetStatus::kNotReady;
}

void Store::WakeSealWaiters() { FutexWakeAll(&header_->seal_sequence); }

bool Store::WaitForSeal(uint32_t seen_sequence, int64_t timeout_ms) {
  if (closed_.load()) return false;
  header_->seal_waiters.fetch_add(1);
  int rc = 0;
  if (header_->seal_sequence.load() == seen_sequence) rc = FutexWait(&header_->seal_sequence, seen_sequence, timeout_ms);
  header_->seal_waiters.fetch_sub(1);
  return !(rc != 0 && errno == ETIMEDOUT);
}

void Store::Release(uint32_t index, uint32_t generation) {
  if (closed_.load()) return;  // Close dropped every pin of this process
  Lock lock(*this);
  if (index >= header_->max_objects || entries_[index].generation != generation) return;
  if (UnpinLocked(index, slot_)) MaybeFreeLocked(index);
}

void Store::Delete(const ObjectId& id) {
  Lock lock(*this);
  uint32_t index = FindOrThrowLocked(id);
  ObjectEntry& entry = entries_[index];
  auto state = static_cast<ObjectState>(entry.state.load());
  bool busy = state == ObjectState::kSpilling || state == ObjectState::kRestoring;
  if (entry.pin_count == 0 && !busy) {
    FreeEntryLocked(index);
  } else {
    // Invisible from now on; freed when the last pin goes or the spill/restore finishes.
    IndexRemoveLocked(index);
    entry.flags |= kFlagDeleted;
    header_->object_count--;
  }
  if (header_->seal_waiters.load() > 0) FutexWakeAll(&header_->seal_sequence);
}

namespace {
const char* StateName(ObjectState state) {
  switch (state) {
    case ObjectState::kCreated: return "created";
    case ObjectState::kSealed:
    case ObjectState::kSpilling: return "sealed";
    case ObjectState::kSpilled:
    case ObjectState::kRestoring: return "spilled";
    default: return "absent";
  }
}
}  // namespace

std::string Store::StateOf(const ObjectId& id) {
  Lock lock(*this);
  uint32_t index = FindLocked(id);
  if (index == kNil) return "absent";
  return StateName(static_cast<ObjectState>(entries_[index].state.load()));
}

std::vector<PinnedEntry> Store::Pinned() {
  Lock lock(*this);
  std::vector<PinnedEntry> pinned;
  for (uint32_t index = 0; index < header_->entries_high_water; index++) {
    const ObjectEntry& entry = entries_[index];
    auto state = static_cast<ObjectState>(entry.state.load());
    if (state == ObjectState::kFree || entry.pin_count == 0) continue;
    PinnedEntry out;
    std::memcpy(out.id.bytes, entry.id, kObjectIdBytes);
    out.state = StateName(state);
    out.deleted = (entry.flags & kFlagDeleted) != 0;
    out.size = entry.data_size + entry.metadata_size;
    for (uint32_t record = entry.pin_head; record != kNil; record = pins_[record].next) {
      uint32_t process = pins_[record].process;
      out.holders.push_back({process < kMaxProcesses ? processes_[process].pid : 0, pins_[record].count.load()});
    }
    pinned.push_back(std::move(out));
  }
  return pinned;
}

StoreStats Store::Stats() {
  Lock lock(*this);
  StoreStats stats{};
  stats.capacity = header_->segment_size;
  stats.data_capacity = header_->data_size;
  stats.bytes_in_use = header_->bytes_in_use;
  stats.object_count = header_->object_count;
  stats.max_objects = header_->max_objects;
  stats.spilled_objects = header_->spilled_objects;
  stats.spilled_bytes = header_->spilled_bytes;
  stats.total_spilled_bytes = header_->total_spilled_bytes;
  stats.total_restored_bytes = header_->total_restored_bytes;
  stats.total_spilled_objects = header_->total_spilled_objects;
  stats.total_restored_objects = header_->total_restored_objects;
  stats.recoveries = header_->recoveries;
  stats.prefaulted_bytes = header_->prefaulted.load();
  stats.pinned_objects = header_->pinned_objects;
  stats.attached_processes = header_->attached_processes;
  return stats;
}

}  // namespace trellis::store
