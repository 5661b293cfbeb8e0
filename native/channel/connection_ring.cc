#include "channel/connection_ring.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "common/error.h"

namespace trellis::channel {
namespace {

constexpr uint64_t kMagic = 0x676e6952736c6c74ULL;  // "tllsRing"
constexpr uint64_t kPage = 4096;
constexpr uint32_t kAwake = 0;
constexpr uint32_t kSleeping = 1;
constexpr uint32_t kRung = 2;

uint64_t RoundUp(uint64_t value, uint64_t to) { return (value + to - 1) / to * to; }

}  // namespace

// Counters only grow (a byte's place is its count modulo the capacity); each side's fields sit on
// a cache line of their own so the two processes do not take turns owning one line.
struct ConnectionRing::Direction {
  alignas(64) std::atomic<uint64_t> tail;  // bytes written
  alignas(64) std::atomic<uint64_t> head;  // bytes taken
  alignas(64) std::atomic<uint32_t> reader_state;
};

struct ConnectionRing::Layout {
  uint64_t magic;
  uint64_t capacity;
  alignas(64) Direction directions[2];
};

uint64_t ConnectionRing::DataOffset() { return RoundUp(sizeof(Layout), kPage); }

ConnectionRing::ConnectionRing(int fd, uint8_t* base, uint64_t mapped, uint64_t capacity, Side side)
    : fd_(fd), base_(base), mapped_(mapped), capacity_(capacity), side_(side) {}

ConnectionRing::ConnectionRing(ConnectionRing&& other) noexcept
    : fd_(other.fd_), base_(other.base_), mapped_(other.mapped_), capacity_(other.capacity_), side_(other.side_) {
  other.fd_ = -1;
  other.base_ = nullptr;
  other.mapped_ = 0;
}

ConnectionRing::~ConnectionRing() {
  if (base_ != nullptr) munmap(base_, mapped_);
  CloseFd();
}

void ConnectionRing::CloseFd() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

ConnectionRing ConnectionRing::Create(uint64_t capacity) {
  if (capacity < kPage || (capacity & (capacity - 1)) != 0) {
    throw NativeError("ERR_INVALID_ARGUMENT", "a connection ring's capacity must be a power of two of at least 4096 bytes, not " + std::to_string(capacity));
  }
  int fd = memfd_create("trellis-connection", MFD_CLOEXEC);
  if (fd < 0) throw SystemError("memfd_create", "trellis-connection", errno);
  uint64_t size = DataOffset() + 2 * capacity;
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    int error = errno;
    close(fd);
    throw SystemError("ftruncate", "trellis-connection", error);
  }
  void* mapped = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mapped == MAP_FAILED) {
    int error = errno;
    close(fd);
    throw SystemError("mmap", "trellis-connection", error);
  }
  // A fresh file reads as zeros: counters at 0. Readers start marked sleeping, so that what is
  // written before the reader first looks rings it.
  auto* layout = static_cast<Layout*>(mapped);
  layout->capacity = capacity;
  for (Direction& direction : layout->directions) direction.reader_state.store(kSleeping);
  std::atomic_thread_fence(std::memory_order_release);
  layout->magic = kMagic;
  return ConnectionRing(fd, static_cast<uint8_t*>(mapped), size, capacity, Side::kCreator);
}

ConnectionRing ConnectionRing::Open(int fd) {
  struct stat info {};
  if (fstat(fd, &info) != 0) throw SystemError("fstat", "connection ring descriptor " + std::to_string(fd), errno);
  auto size = static_cast<uint64_t>(info.st_size);
  if (size < DataOffset()) {
    throw NativeError("ERR_INVALID_ARGUMENT", "descriptor " + std::to_string(fd) + " is not a connection ring (" + std::to_string(size) + " bytes)");
  }
  void* mapped = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (mapped == MAP_FAILED) throw SystemError("mmap", "connection ring descriptor " + std::to_string(fd), errno);
  auto* layout = static_cast<Layout*>(mapped);
  if (layout->magic != kMagic || DataOffset() + 2 * layout->capacity != size) {
    munmap(mapped, size);
    throw NativeError("ERR_INVALID_ARGUMENT", "descriptor " + std::to_string(fd) + " is not a connection ring");
  }
  return ConnectionRing(-1, static_cast<uint8_t*>(mapped), size, layout->capacity, Side::kPeer);
}

ConnectionRing::Direction& ConnectionRing::outgoing() const {
  return reinterpret_cast<Layout*>(base_)->directions[side_ == Side::kCreator ? 0 : 1];
}
ConnectionRing::Direction& ConnectionRing::incoming() const {
  return reinterpret_cast<Layout*>(base_)->directions[side_ == Side::kCreator ? 1 : 0];
}
uint8_t* ConnectionRing::outgoing_data() const { return base_ + DataOffset() + (side_ == Side::kCreator ? 0 : capacity_); }
uint8_t* ConnectionRing::incoming_data() const { return base_ + DataOffset() + (side_ == Side::kCreator ? capacity_ : 0); }

ConnectionRing::WriteResult ConnectionRing::Write(const uint8_t* bytes, uint64_t length) {
  Direction& direction = outgoing();
  uint64_t tail = direction.tail.load(std::memory_order_relaxed);
  uint64_t head = direction.head.load(std::memory_order_acquire);
  if (length > capacity_ - (tail - head)) return WriteResult::kFull;
  uint8_t* data = outgoing_data();
  uint64_t at = tail & (capacity_ - 1);
  uint64_t first = std::min(length, capacity_ - at);
  std::memcpy(data + at, bytes, first);
  std::memcpy(data, bytes + first, length - first);
  // Store, then load (both sequentially consistent), against the reader's mark-then-look.
  direction.tail.store(tail + length, std::memory_order_seq_cst);
  uint32_t state = direction.reader_state.load(std::memory_order_seq_cst);
  if (state == kSleeping && direction.reader_state.compare_exchange_strong(state, kRung)) return WriteResult::kWrittenRing;
  return WriteResult::kWritten;
}

bool ConnectionRing::Readable() const {
  const Direction& direction = incoming();
  return direction.tail.load(std::memory_order_acquire) != direction.head.load(std::memory_order_relaxed);
}

uint64_t ConnectionRing::Available() const {
  const Direction& direction = incoming();
  return direction.tail.load(std::memory_order_acquire) - direction.head.load(std::memory_order_relaxed);
}

void ConnectionRing::Take(uint8_t* into, uint64_t length) {
  Direction& direction = incoming();
  uint64_t head = direction.head.load(std::memory_order_relaxed);
  if (length > direction.tail.load(std::memory_order_acquire) - head) {
    throw NativeError("ERR_INVALID_ARGUMENT", "a connection ring holds fewer than the " + std::to_string(length) + " bytes asked for");
  }
  if (length == 0) return;
  const uint8_t* data = incoming_data();
  uint64_t at = head & (capacity_ - 1);
  uint64_t first = std::min(length, capacity_ - at);
  std::memcpy(into, data + at, first);
  std::memcpy(into + first, data, length - first);
  direction.head.store(head + length, std::memory_order_release);
}

bool ConnectionRing::MarkSleeping() {
  Direction& direction = incoming();
  // Even if it reads "rung": that doorbell may have been read already (while this loop was busy
  // and never marked it), and a writer that sees "rung" does not ring. A doorbell still on its
  // way only wakes the loop once more for nothing.
  direction.reader_state.store(kSleeping, std::memory_order_seq_cst);
  if (direction.tail.load(std::memory_order_seq_cst) != direction.head.load(std::memory_order_relaxed)) {
    direction.reader_state.store(kAwake, std::memory_order_seq_cst);
    return false;
  }
  return true;
}

void ConnectionRing::MarkAwake() { incoming().reader_state.store(kAwake, std::memory_order_seq_cst); }

}  // namespace trellis::channel
