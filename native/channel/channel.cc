#include "channel/channel.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>

#include "common/error.h"

namespace trellis::channel {
namespace {

constexpr uint64_t kMagic = 0x4c454e4e41484354ull;  // "TCHANNEL"
constexpr int64_t kSliceMs = 100;
// A sched_yield longer than this ran another task for a while (see WaitOn).
constexpr uint64_t kLongYieldUs = 50;

void FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ms) {
  struct timespec ts{timeout_ms / 1000, (timeout_ms % 1000) * 1000000};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}

void FutexWake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

uint64_t AlignUp(uint64_t value, uint64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

uint64_t NowUs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// POSIX shared-memory names start with '/'. (Built by append: GCC 12 warns falsely on "/" + name.)
std::string ShmPath(const std::string& name) {
  std::string path("/");
  path += name;
  return path;
}

std::pair<uint8_t*, uint64_t> MapSegment(const std::string& name, bool create, uint64_t size) {
  std::string path = ShmPath(name);
  int fd = shm_open(path.c_str(), create ? (O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC) : (O_RDWR | O_CLOEXEC), 0600);
  if (fd < 0) {
    if (!create && errno == ENOENT) throw NativeError("ERR_CHANNEL_NOT_FOUND", "no channel segment named '" + name + "'");
    throw SystemError("shm_open", path, errno);
  }
  if (create && ftruncate(fd, static_cast<off_t>(size)) != 0) {
    int error = errno;
    close(fd);
    shm_unlink(path.c_str());
    throw SystemError("ftruncate", path, error);
  }
  if (!create) {
    struct stat info;
    if (fstat(fd, &info) != 0) {
      int error = errno;
      close(fd);
      throw SystemError("fstat", path, error);
    }
    size = static_cast<uint64_t>(info.st_size);
  }
  void* address = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int error = errno;
  close(fd);  // the mapping keeps the memory: no descriptor stays open
  if (address == MAP_FAILED) {
    if (create) shm_unlink(path.c_str());
    throw SystemError("mmap", path, error);
  }
  return {static_cast<uint8_t*>(address), size};
}

}  // namespace

struct Channel::Slot {
  uint64_t length;
  uint32_t overflow_generation;  // 0: the message is in the ring itself
  uint32_t reserved;
  uint64_t overflow_size;
  uint64_t padding[5];
};

struct Channel::Header {
  uint64_t magic;
  uint32_t slots;
  uint32_t readers;
  uint64_t slot_bytes;
  uint64_t data_offset;
  std::atomic<uint32_t> closed;
  std::atomic<uint32_t> write_bell;  // futex: bumped after each write (and on close)
  std::atomic<uint32_t> read_bell;   // futex: bumped after each read (and on close)
  std::atomic<uint32_t> write_waiters;  // readers asleep on write_bell: only then is a wake needed
  std::atomic<uint32_t> read_waiters;   // writers asleep on read_bell
  uint32_t reserved[3];
  std::atomic<uint64_t> write_seq;
  std::atomic<uint64_t> read_seq[kMaxReaders];
  std::atomic<uint64_t> finish_seq[kMaxReaders];  // see Finish
  uint32_t overflow_generation[1];  // per slot, grows with slots (see Create)
};

void Channel::Create(const std::string& name, uint32_t slots, uint32_t readers, uint64_t slot_bytes) {
  if (slots == 0 || slots > 1024) throw NativeError("ERR_INVALID_ARGUMENT", "a channel needs 1 to 1024 slots, got " + std::to_string(slots));
  if (readers == 0 || readers > kMaxReaders) throw NativeError("ERR_INVALID_ARGUMENT", "a channel needs 1 to 64 readers, got " + std::to_string(readers));
  uint64_t slots_offset = AlignUp(sizeof(Header) + sizeof(uint32_t) * slots, 64);
  uint64_t data_offset = AlignUp(slots_offset + sizeof(Slot) * slots, 4096);
  slot_bytes = AlignUp(std::max<uint64_t>(slot_bytes, 64), 64);
  auto [base, size] = MapSegment(name, true, data_offset + slot_bytes * slots);
  auto* header = reinterpret_cast<Header*>(base);
  header->slots = slots;
  header->readers = readers;
  header->slot_bytes = slot_bytes;
  header->data_offset = data_offset;
  std::atomic_thread_fence(std::memory_order_release);
  header->magic = kMagic;
  munmap(base, size);
}

void Channel::Destroy(const std::string& name) {
  // Overflow segments are named after the channel: unlink every generation this channel made.
  try {
    auto [base, size] = MapSegment(name, false, 0);
    auto* header = reinterpret_cast<Header*>(base);
    for (uint32_t slot = 0; slot < header->slots; ++slot) {
      uint32_t generation = header->overflow_generation[slot];
      if (generation != 0) shm_unlink(ShmPath(name + "-s" + std::to_string(slot) + "-g" + std::to_string(generation)).c_str());
    }
    munmap(base, size);
  } catch (const NativeError&) {
  }
  shm_unlink(ShmPath(name).c_str());
}

Channel::Channel(const std::string& name, int reader) : name_(name), reader_(reader) {
  auto [base, size] = MapSegment(name, false, 0);
  base_ = base;
  mapped_ = size;
  header_ = reinterpret_cast<Header*>(base_);
  if (header_->magic != kMagic) {
    munmap(base_, mapped_);
    throw NativeError("ERR_CHANNEL_NOT_FOUND", "segment '" + name + "' is not a trellis channel");
  }
  if (reader >= static_cast<int>(header_->readers)) {
    munmap(base_, mapped_);
    throw NativeError("ERR_INVALID_ARGUMENT", "reader " + std::to_string(reader) + " of a channel with " + std::to_string(header_->readers) + " readers");
  }
  overflow_.resize(header_->slots);
}

Channel::~Channel() {
  for (auto& mapping : overflow_) Unmap(mapping);
  if (base_ != nullptr) munmap(base_, mapped_);
}

void Channel::Unmap(Mapping& mapping) {
  if (mapping.base != nullptr) munmap(mapping.base, mapping.size);
  mapping = Mapping{};
}

std::string Channel::OverflowName(uint32_t slot, uint32_t generation) const {
  return name_ + "-s" + std::to_string(slot) + "-g" + std::to_string(generation);
}

bool Channel::closed() const { return header_->closed.load(std::memory_order_acquire) != 0; }
uint64_t Channel::written() const { return header_->write_seq.load(std::memory_order_acquire); }
uint64_t Channel::read() const { return reader_ >= 0 ? header_->read_seq[reader_].load(std::memory_order_acquire) : SlowestReader(); }

uint64_t Channel::SlowestReader() const {
  uint64_t slowest = UINT64_MAX;
  for (uint32_t r = 0; r < header_->readers; ++r) slowest = std::min(slowest, header_->read_seq[r].load(std::memory_order_acquire));
  return slowest;
}

void Channel::Finish(uint64_t count) {
  if (reader_ < 0) throw NativeError("ERR_INVALID_ARGUMENT", "finish is for a channel's readers");
  std::atomic<uint64_t>& seq = header_->finish_seq[reader_];
  uint64_t seen = seq.load(std::memory_order_relaxed);
  while (seen < count && !seq.compare_exchange_weak(seen, count, std::memory_order_release, std::memory_order_relaxed)) {
  }
}

uint64_t Channel::finished() const {
  uint64_t slowest = UINT64_MAX;
  for (uint32_t r = 0; r < header_->readers; ++r) slowest = std::min(slowest, header_->finish_seq[r].load(std::memory_order_acquire));
  return slowest;
}

void Channel::Close() {
  header_->closed.store(1, std::memory_order_release);
  header_->write_bell.fetch_add(1);
  header_->read_bell.fetch_add(1);
  FutexWake(&header_->write_bell);
  FutexWake(&header_->read_bell);
}

template <typename Ready>
static WaitResult WaitOn(std::atomic<uint32_t>* bell, std::atomic<uint32_t>* waiters, const std::atomic<uint32_t>* closed, Ready ready,
                         int64_t timeout_ms, int64_t spin_us) {
  if (ready()) return WaitResult::kReady;
  if (closed->load(std::memory_order_acquire)) return WaitResult::kClosed;
  if (timeout_ms == 0 && spin_us <= 0) return WaitResult::kTimeout;
  uint64_t start = NowUs();
  // The spin yields the CPU between looks: when the peer that will write shares this CPU (the
  // scheduler often puts a woken process next to its waker), a pure spin would keep it from
  // running for the whole spin. With nothing else runnable here, sched_yield returns at once. A
  // yield that took long handed the CPU to something else for its time slice: a busy CPU, where
  // further yields would cost as much again, so the wait goes to sleep instead (a woken sleeper
  // gets the CPU back sooner than a yielder).
  while (NowUs() - start < static_cast<uint64_t>(std::max<int64_t>(spin_us, 0))) {
    for (int i = 0; i < 16; ++i) {
      if (ready()) return WaitResult::kReady;
      __builtin_ia32_pause();
    }
    uint64_t before = NowUs();
    sched_yield();
    if (NowUs() - before > kLongYieldUs) break;
  }
  for (;;) {
    uint32_t seen = bell->load(std::memory_order_acquire);
    if (ready()) return WaitResult::kReady;
    if (closed->load(std::memory_order_acquire)) return WaitResult::kClosed;
    int64_t waited_ms = static_cast<int64_t>((NowUs() - start) / 1000);
    if (timeout_ms >= 0 && waited_ms >= timeout_ms) return WaitResult::kTimeout;
    int64_t slice = timeout_ms < 0 ? kSliceMs : std::min<int64_t>(kSliceMs, timeout_ms - waited_ms);
    waiters->fetch_add(1, std::memory_order_seq_cst);
    // Re-check after announcing ourselves: a writer that saw no waiters did not wake anyone.
    if (!ready() && !closed->load(std::memory_order_acquire)) FutexWait(bell, seen, std::max<int64_t>(slice, 1));
    waiters->fetch_sub(1, std::memory_order_seq_cst);
  }
}

WaitResult Channel::WaitWritable(int64_t timeout_ms, int64_t spin_us) {
  auto room = [this] { return header_->write_seq.load(std::memory_order_acquire) - SlowestReader() < header_->slots; };
  if (closed()) return WaitResult::kClosed;
  return WaitOn(&header_->read_bell, &header_->read_waiters, &header_->closed, room, timeout_ms, spin_us);
}

WaitResult Channel::WaitReadable(int64_t timeout_ms, int64_t spin_us) {
  auto next = [this] { return header_->write_seq.load(std::memory_order_acquire) > header_->read_seq[reader_].load(std::memory_order_relaxed); };
  WaitResult result = WaitOn(&header_->write_bell, &header_->write_waiters, &header_->closed, next, timeout_ms, spin_us);
  // Messages written before a close are still delivered.
  return result == WaitResult::kClosed && next() ? WaitResult::kReady : result;
}

uint8_t* Channel::SlotData(uint32_t slot, uint64_t need) {
  Slot* slots = reinterpret_cast<Slot*>(base_ + AlignUp(sizeof(Header) + sizeof(uint32_t) * header_->slots, 64));
  if (need <= header_->slot_bytes) {
    slots[slot].overflow_generation = 0;
    return base_ + header_->data_offset + header_->slot_bytes * slot;
  }
  Mapping& mapping = overflow_[slot];
  uint32_t generation = header_->overflow_generation[slot];
  if (mapping.base == nullptr || mapping.generation != generation || mapping.size < need) {
    if (generation == 0 || slots[slot].overflow_size < need) {
      // Grow: a new segment for this slot, at least twice the old, and the old one unlinked.
      uint64_t size = AlignUp(std::max(need, slots[slot].overflow_size * 2), 4096);
      uint32_t next = generation + 1;
      Unmap(mapping);
      auto [base, mapped] = MapSegment(OverflowName(slot, next), true, size);
      if (generation != 0) shm_unlink(ShmPath(OverflowName(slot, generation)).c_str());
      header_->overflow_generation[slot] = next;
      slots[slot].overflow_size = size;
      mapping = Mapping{base, mapped, next};
    } else {
      Unmap(mapping);
      auto [base, mapped] = MapSegment(OverflowName(slot, generation), false, 0);
      mapping = Mapping{base, mapped, generation};
    }
  }
  slots[slot].overflow_generation = mapping.generation;
  return mapping.base;
}

const uint8_t* Channel::SlotDataForRead(uint32_t slot) {
  Slot* slots = reinterpret_cast<Slot*>(base_ + AlignUp(sizeof(Header) + sizeof(uint32_t) * header_->slots, 64));
  uint32_t generation = slots[slot].overflow_generation;
  if (generation == 0) return base_ + header_->data_offset + header_->slot_bytes * slot;
  Mapping& mapping = overflow_[slot];
  if (mapping.base == nullptr || mapping.generation != generation) {
    Unmap(mapping);
    auto [base, mapped] = MapSegment(OverflowName(slot, generation), false, 0);
    mapping = Mapping{base, mapped, generation};
  }
  return mapping.base;
}

void Channel::Write(const uint8_t* bytes, uint64_t length) {
  if (closed()) throw NativeError("ERR_CHANNEL_CLOSED", "channel '" + name_ + "' is closed");
  uint64_t sequence = header_->write_seq.load(std::memory_order_relaxed);
  if (sequence - SlowestReader() >= header_->slots) throw NativeError("ERR_CHANNEL_FULL", "channel '" + name_ + "' has no free slot");
  uint32_t slot = static_cast<uint32_t>(sequence % header_->slots);
  uint8_t* destination = SlotData(slot, length);
  if (length > 0) std::memcpy(destination, bytes, length);
  Slot* slots = reinterpret_cast<Slot*>(base_ + AlignUp(sizeof(Header) + sizeof(uint32_t) * header_->slots, 64));
  slots[slot].length = length;
  header_->write_seq.store(sequence + 1, std::memory_order_seq_cst);
  header_->write_bell.fetch_add(1, std::memory_order_seq_cst);
  if (header_->write_waiters.load(std::memory_order_seq_cst) > 0) FutexWake(&header_->write_bell);
}

const uint8_t* Channel::Peek(uint64_t* length) {
  uint64_t sequence = header_->read_seq[reader_].load(std::memory_order_relaxed);
  if (header_->write_seq.load(std::memory_order_acquire) <= sequence) throw NativeError("ERR_CHANNEL_EMPTY", "channel '" + name_ + "' has no message to read");
  uint32_t slot = static_cast<uint32_t>(sequence % header_->slots);
  Slot* slots = reinterpret_cast<Slot*>(base_ + AlignUp(sizeof(Header) + sizeof(uint32_t) * header_->slots, 64));
  *length = slots[slot].length;
  return SlotDataForRead(slot);
}

void Channel::Advance() {
  header_->read_seq[reader_].fetch_add(1, std::memory_order_seq_cst);
  header_->read_bell.fetch_add(1, std::memory_order_seq_cst);
  if (header_->read_waiters.load(std::memory_order_seq_cst) > 0) FutexWake(&header_->read_bell);
}

}  // namespace trellis::channel
