#include "collective/shm_communicator.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>

#include "common/error.h"

namespace trellis::collective {
namespace {

constexpr uint64_t kMagic = 0x4d4d4f434c4c5254ull;  // "TRLLCOMM"
constexpr int kMaxRanks = 64;
constexpr int64_t kWaitSliceMs = 50;

int FutexWait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ms) {
  struct timespec ts{timeout_ms / 1000, (timeout_ms % 1000) * 1000000};
  return static_cast<int>(syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0));
}

void FutexWake(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

uint64_t AlignUp(uint64_t value, uint64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

NativeError CommunicatorError(const char* code, const std::string& message) { return NativeError(code, message); }

// Half-precision values are reduced in float.
float HalfToFloat(uint16_t bits) {
  uint32_t sign = (bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1f;
  uint32_t mantissa = bits & 0x3ff;
  uint32_t out;
  if (exponent == 0) {
    if (mantissa == 0) {
      out = sign;
    } else {
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400)) {
        mantissa <<= 1;
        exponent--;
      }
      mantissa &= 0x3ff;
      out = sign | (exponent << 23) | (mantissa << 13);
    }
  } else if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);
  } else {
    out = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &out, 4);
  return value;
}

uint16_t FloatToHalf(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int32_t exponent = static_cast<int32_t>((x >> 23) & 0xff);
  uint32_t mantissa = x & 0x7fffff;
  if (exponent == 0xff) return static_cast<uint16_t>(sign | 0x7c00 | (mantissa ? 0x200 : 0));
  int32_t e = exponent - 127 + 15;
  if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    mantissa = (mantissa | 0x800000) >> (1 - e);
    if (mantissa & 0x1000) mantissa += 0x2000;
    return static_cast<uint16_t>(sign | (mantissa >> 13));
  }
  if (mantissa & 0x1000) {
    mantissa += 0x2000;
    if (mantissa & 0x800000) {
      mantissa = 0;
      e += 1;
      if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00);
    }
  }
  return static_cast<uint16_t>(sign | (static_cast<uint32_t>(e) << 10) | (mantissa >> 13));
}

float Bf16ToFloat(uint16_t bits) {
  uint32_t x = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &x, 4);
  return value;
}

uint16_t FloatToBf16(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x7fffff)) return 0x7fc0;
  return static_cast<uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

template <typename T>
T Combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kAvg: return static_cast<T>(a + b);
    case ReduceOp::kProd: return static_cast<T>(a * b);
    case ReduceOp::kMin: return std::min(a, b);
    case ReduceOp::kMax: return std::max(a, b);
  }
  return a;
}

// out[i] = op over sources[k][i], for `count` elements of type T.
template <typename T>
void ReduceTyped(const std::vector<const uint8_t*>& sources, uint8_t* out, uint64_t count, ReduceOp op) {
  auto* result = reinterpret_cast<T*>(out);
  const T* first = reinterpret_cast<const T*>(sources[0]);
  for (uint64_t i = 0; i < count; ++i) result[i] = first[i];
  for (size_t k = 1; k < sources.size(); ++k) {
    const T* source = reinterpret_cast<const T*>(sources[k]);
    for (uint64_t i = 0; i < count; ++i) result[i] = Combine(result[i], source[i], op);
  }
  if (op == ReduceOp::kAvg) {
    T n = static_cast<T>(sources.size());
    for (uint64_t i = 0; i < count; ++i) result[i] = static_cast<T>(result[i] / n);
  }
}

template <float (*ToFloat)(uint16_t), uint16_t (*FromFloat)(float)>
void ReduceHalf(const std::vector<const uint8_t*>& sources, uint8_t* out, uint64_t count, ReduceOp op) {
  auto* result = reinterpret_cast<uint16_t*>(out);
  for (uint64_t i = 0; i < count; ++i) {
    float acc = ToFloat(reinterpret_cast<const uint16_t*>(sources[0])[i]);
    for (size_t k = 1; k < sources.size(); ++k) acc = Combine(acc, ToFloat(reinterpret_cast<const uint16_t*>(sources[k])[i]), op);
    if (op == ReduceOp::kAvg) acc /= static_cast<float>(sources.size());
    result[i] = FromFloat(acc);
  }
}

void Reduce(const std::vector<const uint8_t*>& sources, uint8_t* out, uint64_t count, DataType type, ReduceOp op) {
  switch (type) {
    case DataType::kF32: return ReduceTyped<float>(sources, out, count, op);
    case DataType::kF16: return ReduceHalf<HalfToFloat, FloatToHalf>(sources, out, count, op);
    case DataType::kBF16: return ReduceHalf<Bf16ToFloat, FloatToBf16>(sources, out, count, op);
    case DataType::kI8: return ReduceTyped<int8_t>(sources, out, count, op);
    case DataType::kU8: return ReduceTyped<uint8_t>(sources, out, count, op);
    case DataType::kI32: return ReduceTyped<int32_t>(sources, out, count, op);
    case DataType::kI64: return ReduceTyped<int64_t>(sources, out, count, op);
  }
}

}  // namespace

size_t ElementSize(DataType type) {
  switch (type) {
    case DataType::kF32:
    case DataType::kI32: return 4;
    case DataType::kF16:
    case DataType::kBF16: return 2;
    case DataType::kI8:
    case DataType::kU8: return 1;
    case DataType::kI64: return 8;
  }
  return 1;
}

struct ShmCommunicator::Header {
  uint64_t magic;
  uint32_t size;
  uint32_t reserved;
  uint64_t slot_bytes;
  uint64_t segment_bytes;
  std::atomic<uint32_t> aborted;
  std::atomic<uint32_t> arrived;
  std::atomic<uint32_t> generation;  // futex: bumped when the last rank reaches a barrier
  uint32_t reserved2;
  std::atomic<int32_t> pids[kMaxRanks];
  std::atomic<uint32_t> doorbells[kMaxRanks];  // futex per rank: a mailbox touching it changed
  char abort_reason[512];
};

struct ShmCommunicator::Mailbox {
  std::atomic<uint32_t> written;  // chunks written by the sender
  std::atomic<uint32_t> read;     // chunks taken by the receiver
  uint64_t length;                // bytes of the chunk waiting
  uint64_t reserved[6];
};

namespace {

struct Layout {
  uint64_t slots, scratch, mailboxes, mailbox_data, total;
};

Layout LayoutFor(int size, uint64_t slot_bytes) {
  Layout layout;
  layout.slots = 4096 * 2;
  layout.scratch = layout.slots + slot_bytes * size;
  layout.mailboxes = layout.scratch + slot_bytes;
  layout.mailbox_data = AlignUp(layout.mailboxes + 64ull * size * size, 4096);
  layout.total = layout.mailbox_data + slot_bytes * size * size;
  return layout;
}

}  // namespace

void ShmCommunicator::CreateSegment(const std::string& name, int size, uint64_t slot_bytes) {
  if (size < 1 || size > kMaxRanks) throw CommunicatorError("ERR_INVALID_ARGUMENT", "a communicator needs 1 to 64 ranks, got " + std::to_string(size));
  if (slot_bytes < 4096 || slot_bytes % 64 != 0) throw CommunicatorError("ERR_INVALID_ARGUMENT", "slot bytes must be a multiple of 64, at least 4096");
  Layout layout = LayoutFor(size, slot_bytes);
  std::string path = "/" + name;
  int fd = shm_open(path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) throw SystemError("shm_open", path, errno);
  if (ftruncate(fd, static_cast<off_t>(layout.total)) != 0) {
    int error = errno;
    close(fd);
    shm_unlink(path.c_str());
    throw SystemError("ftruncate", path, error);
  }
  void* address = mmap(nullptr, sizeof(Header), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int error = errno;
  close(fd);
  if (address == MAP_FAILED) {
    shm_unlink(path.c_str());
    throw SystemError("mmap", path, error);
  }
  auto* header = static_cast<Header*>(address);
  header->size = static_cast<uint32_t>(size);
  header->slot_bytes = slot_bytes;
  header->segment_bytes = layout.total;
  std::atomic_thread_fence(std::memory_order_release);
  header->magic = kMagic;
  munmap(address, sizeof(Header));
}

void ShmCommunicator::UnlinkSegment(const std::string& name) { shm_unlink(("/" + name).c_str()); }

ShmCommunicator::ShmCommunicator(const std::string& name, int rank, int size, int64_t timeout_ms)
    : name_(name), rank_(rank), size_(size), timeout_ms_(timeout_ms) {
  std::string path = "/" + name;
  int fd = shm_open(path.c_str(), O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    if (errno == ENOENT) throw CommunicatorError("ERR_COMMUNICATOR_NOT_FOUND", "no communicator segment named '" + name + "'");
    throw SystemError("shm_open", path, errno);
  }
  struct stat info;
  if (fstat(fd, &info) != 0) {
    int error = errno;
    close(fd);
    throw SystemError("fstat", path, error);
  }
  void* address = mmap(nullptr, static_cast<size_t>(info.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int error = errno;
  close(fd);
  if (address == MAP_FAILED) throw SystemError("mmap", path, error);
  base_ = static_cast<uint8_t*>(address);
  mapped_ = static_cast<uint64_t>(info.st_size);
  header_ = reinterpret_cast<Header*>(base_);
  if (header_->magic != kMagic || header_->segment_bytes != mapped_) {
    munmap(base_, mapped_);
    base_ = nullptr;
    throw CommunicatorError("ERR_COMMUNICATOR_NOT_FOUND", "segment '" + name + "' is not a trellis communicator");
  }
  if (static_cast<int>(header_->size) != size || rank < 0 || rank >= size) {
    munmap(base_, mapped_);
    base_ = nullptr;
    throw CommunicatorError("ERR_INVALID_ARGUMENT", "rank " + std::to_string(rank) + " of " + std::to_string(size) +
                                                        " does not fit communicator '" + name + "' of " + std::to_string(header_->size) + " ranks");
  }
  header_->pids[rank].store(getpid());
  barrier_generation_ = header_->generation.load();
}

ShmCommunicator::~ShmCommunicator() {
  if (base_ != nullptr) munmap(base_, mapped_);
}

uint8_t* ShmCommunicator::Slot(int rank) const { return base_ + LayoutFor(size_, header_->slot_bytes).slots + header_->slot_bytes * rank; }
uint8_t* ShmCommunicator::Scratch() const { return base_ + LayoutFor(size_, header_->slot_bytes).scratch; }
ShmCommunicator::Mailbox* ShmCommunicator::MailboxFor(int from, int to) const {
  return reinterpret_cast<Mailbox*>(base_ + LayoutFor(size_, header_->slot_bytes).mailboxes + 64ull * (from * size_ + to));
}
uint8_t* ShmCommunicator::MailboxData(int from, int to) const {
  return base_ + LayoutFor(size_, header_->slot_bytes).mailbox_data + header_->slot_bytes * (from * size_ + to);
}

bool ShmCommunicator::aborted() const { return header_->aborted.load() != 0; }

void ShmCommunicator::Abort(const std::string& reason) {
  uint32_t expected = 0;
  if (header_->aborted.compare_exchange_strong(expected, 1)) {
    std::snprintf(header_->abort_reason, sizeof(header_->abort_reason), "%s", reason.c_str());
  }
  // Wake everyone wherever they wait.
  header_->generation.fetch_add(1);
  FutexWake(&header_->generation);
  for (int i = 0; i < size_; ++i) {
    header_->doorbells[i].fetch_add(1);
    FutexWake(&header_->doorbells[i]);
  }
}

void ShmCommunicator::CheckHealthy(const char* what) {
  if (header_->aborted.load()) {
    throw CommunicatorError("ERR_COMMUNICATOR_ABORTED", std::string(what) + " on communicator '" + name_ + "' failed: aborted (" +
                                                           header_->abort_reason + ")");
  }
  for (int i = 0; i < size_; ++i) {
    int32_t pid = header_->pids[i].load();
    if (pid == 0 || i == rank_) continue;
    if (kill(pid, 0) != 0 && errno == ESRCH) {
      std::string reason = "rank " + std::to_string(i) + " (pid " + std::to_string(pid) + ") died";
      Abort(reason);
      throw CommunicatorError("ERR_PEER_DIED", std::string(what) + " on communicator '" + name_ + "' failed: " + reason);
    }
  }
}

void ShmCommunicator::Wait(std::atomic<uint32_t>* word, uint32_t seen, const char* what) {
  auto start = std::chrono::steady_clock::now();
  // A short spin first: peers on other cores usually arrive within microseconds.
  for (int i = 0; i < 2000; ++i) {
    if (word->load(std::memory_order_acquire) != seen) return;
    __builtin_ia32_pause();
  }
  while (word->load(std::memory_order_acquire) == seen) {
    CheckHealthy(what);
    auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start).count();
    if (timeout_ms_ >= 0 && waited >= timeout_ms_) {
      std::string reason = std::string(what) + " timed out after " + std::to_string(timeout_ms_) + " ms on rank " + std::to_string(rank_);
      Abort(reason);
      throw CommunicatorError("ERR_COMMUNICATOR_TIMEOUT", reason + " (communicator '" + name_ + "'); the group is aborted");
    }
    FutexWait(word, seen, kWaitSliceMs);
  }
  CheckHealthy(what);
}

void ShmCommunicator::Barrier() {
  CheckHealthy("barrier");
  uint32_t generation = header_->generation.load(std::memory_order_acquire);
  if (header_->arrived.fetch_add(1) + 1 == static_cast<uint32_t>(size_)) {
    header_->arrived.store(0);
    header_->generation.fetch_add(1, std::memory_order_release);
    FutexWake(&header_->generation);
    return;
  }
  Wait(&header_->generation, generation, "barrier");
}

void ShmCommunicator::AllReduce(uint8_t* data, uint64_t count, DataType type, ReduceOp op) {
  const uint64_t element = ElementSize(type);
  const uint64_t chunk_elements = header_->slot_bytes / element;
  for (uint64_t first = 0; first < count; first += chunk_elements) {
    uint64_t n = std::min(chunk_elements, count - first);
    std::memcpy(Slot(rank_), data + first * element, n * element);
    Barrier();
    // Each rank reduces its share of the chunk into the scratch area.
    uint64_t share = (n + size_ - 1) / size_;
    uint64_t begin = std::min(n, share * rank_);
    uint64_t end = std::min(n, begin + share);
    if (end > begin) {
      std::vector<const uint8_t*> sources;
      for (int k = 0; k < size_; ++k) sources.push_back(Slot(k) + begin * element);
      Reduce(sources, Scratch() + begin * element, end - begin, type, op);
    }
    Barrier();
    std::memcpy(data + first * element, Scratch(), n * element);
    Barrier();
  }
}

void ShmCommunicator::AllGather(const uint8_t* input, uint8_t* output, uint64_t input_bytes) {
  const uint64_t chunk = header_->slot_bytes;
  for (uint64_t offset = 0; offset < input_bytes || (offset == 0 && input_bytes == 0); offset += chunk) {
    uint64_t n = std::min(chunk, input_bytes - offset);
    if (n > 0) std::memcpy(Slot(rank_), input + offset, n);
    Barrier();
    for (int k = 0; k < size_; ++k) {
      if (n > 0) std::memcpy(output + k * input_bytes + offset, Slot(k), n);
    }
    Barrier();
    if (input_bytes == 0) break;
  }
}

void ShmCommunicator::ReduceScatter(const uint8_t* input, uint8_t* output, uint64_t output_count, DataType type, ReduceOp op) {
  const uint64_t element = ElementSize(type);
  // Each rank publishes, per chunk, the same slice of every destination's segment.
  const uint64_t chunk_elements = std::max<uint64_t>(1, header_->slot_bytes / element / size_);
  for (uint64_t first = 0; first < output_count; first += chunk_elements) {
    uint64_t n = std::min(chunk_elements, output_count - first);
    for (int destination = 0; destination < size_; ++destination) {
      std::memcpy(Slot(rank_) + destination * n * element, input + (destination * output_count + first) * element, n * element);
    }
    Barrier();
    std::vector<const uint8_t*> sources;
    for (int k = 0; k < size_; ++k) sources.push_back(Slot(k) + rank_ * n * element);
    Reduce(sources, output + first * element, n, type, op);
    Barrier();
  }
}

void ShmCommunicator::Broadcast(uint8_t* data, uint64_t bytes, int root) {
  if (root < 0 || root >= size_) throw CommunicatorError("ERR_INVALID_ARGUMENT", "broadcast root " + std::to_string(root) + " is not a rank");
  const uint64_t chunk = header_->slot_bytes;
  for (uint64_t offset = 0; offset < bytes; offset += chunk) {
    uint64_t n = std::min(chunk, bytes - offset);
    if (rank_ == root) std::memcpy(Slot(root), data + offset, n);
    Barrier();
    if (rank_ != root) std::memcpy(data + offset, Slot(root), n);
    Barrier();
  }
}

void ShmCommunicator::Transfer(std::vector<PeerTransfer>& transfers) {
  for (auto& transfer : transfers) {
    if (transfer.peer < 0 || transfer.peer >= size_ || transfer.peer == rank_) {
      throw CommunicatorError("ERR_INVALID_ARGUMENT", "peer " + std::to_string(transfer.peer) + " is not another rank of " + std::to_string(size_));
    }
  }
  const uint64_t chunk = header_->slot_bytes;
  // A zero-byte message still travels, as one empty chunk, so that sends and receives pair up.
  std::vector<bool> complete(transfers.size(), false);
  // One mailbox per ordered pair of ranks: messages between two ranks in one direction go whole,
  // in the order they were posted (as NCCL pairs them), or a later one's chunks would land in an
  // earlier one's buffer. Each transfer waits for the one before it with the same peer and direction.
  constexpr size_t kNone = static_cast<size_t>(-1);
  std::vector<size_t> successor(transfers.size(), kNone);
  std::vector<bool> turn(transfers.size(), true);
  for (size_t i = 0; i < transfers.size(); ++i) {
    for (size_t j = i + 1; j < transfers.size(); ++j) {
      if (transfers[j].peer == transfers[i].peer && transfers[j].send == transfers[i].send) {
        successor[i] = j;
        turn[j] = false;
        break;
      }
    }
  }
  size_t remaining = transfers.size();
  while (remaining > 0) {
    uint32_t bell = header_->doorbells[rank_].load(std::memory_order_acquire);
    bool progressed = false;
    for (size_t i = 0; i < transfers.size(); ++i) {
      if (complete[i] || !turn[i]) continue;
      PeerTransfer& t = transfers[i];
      if (t.send) {
        Mailbox* box = MailboxFor(rank_, t.peer);
        if (box->written.load(std::memory_order_acquire) != box->read.load(std::memory_order_acquire)) continue;
        uint64_t n = std::min(chunk, t.bytes - t.done);
        std::memcpy(MailboxData(rank_, t.peer), t.data + t.done, n);
        box->length = n;
        box->written.fetch_add(1, std::memory_order_release);
        header_->doorbells[t.peer].fetch_add(1, std::memory_order_release);
        FutexWake(&header_->doorbells[t.peer]);
        t.done += n;
      } else {
        Mailbox* box = MailboxFor(t.peer, rank_);
        if (box->written.load(std::memory_order_acquire) == box->read.load(std::memory_order_acquire)) continue;
        uint64_t n = box->length;
        if (n > t.bytes - t.done) {
          Abort("message size mismatch between ranks " + std::to_string(t.peer) + " and " + std::to_string(rank_));
          throw CommunicatorError("ERR_INVALID_ARGUMENT", "recv from rank " + std::to_string(t.peer) + " got more bytes than its tensor holds (" +
                                                              std::to_string(t.bytes) + ")");
        }
        std::memcpy(t.data + t.done, MailboxData(t.peer, rank_), n);
        box->read.fetch_add(1, std::memory_order_release);
        header_->doorbells[t.peer].fetch_add(1, std::memory_order_release);
        FutexWake(&header_->doorbells[t.peer]);
        t.done += n;
      }
      progressed = true;
      if (t.done >= t.bytes) {
        complete[i] = true;
        remaining--;
        if (successor[i] != kNone) turn[successor[i]] = true;
      }
    }
    if (!progressed && remaining > 0) Wait(&header_->doorbells[rank_], bell, "send/recv");
  }
}

}  // namespace trellis::collective
