// A fake CUDA driver and NCCL in one shared library, for exercising trellis's native GPU layer on
// hosts without a GPU (TRELLIS_CUDA_DRIVER and TRELLIS_NCCL_LIBRARY point at it). "Device" memory
// is host memory from memfd (so CUDA IPC works between processes through /proc/<pid>/fd); copies
// run at once; an event reports completion FAKE_CUDA_EVENT_DELAY_US after it was recorded
// (default 2000), so promises wait on the completion thread's polling for real. NCCL ranks in
// several processes meet in a shared segment named after the unique id (up to 8 ranks; half
// precision is not reduced across ranks); a rank whose peers never come waits in init, as NCCL's
// blocking init does. FAKE_NCCL_HANG=1 makes
// collectives block until the communicator is aborted; FAKE_NCCL_ASYNC_ERROR=1 makes
// ncclCommGetAsyncError report ncclRemoteError once an operation was issued. Under a CUDA MPS
// pipe directory, cuInit records the process as a client (see mps-control beside this file).
// Test scaffolding only: it is not the CUDA API's behaviour in any detail beyond what trellis uses.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

using CUresult = int;
using CUdeviceptr = unsigned long long;
struct Handle {
  uint64_t magic;
  int64_t pid;
  int64_t fd;
  uint64_t size;
  char pad[32];
};
static_assert(sizeof(Handle) == 64);

constexpr CUresult kSuccess = 0, kInvalidValue = 1, kOutOfMemory = 2, kNoDevice = 100, kInvalidDevice = 101,
                   kInvalidContext = 201, kMapFailed = 205, kInvalidHandle = 400, kNotReady = 600;
constexpr uint64_t kMagic = 0x66616b6567707521ull;

std::mutex mutex;
struct Allocation {
  int fd;
  size_t size;
  bool imported;
  int refs;
  std::string key;
  void* context = nullptr;  // the context current when it was made or mapped
};
std::map<CUdeviceptr, Allocation> allocations;        // by base address
std::map<std::string, CUdeviceptr> imports;           // handle bytes -> base
thread_local void* current = nullptr;
uint64_t total_allocated = 0;

int DeviceCount() {
  const char* env = std::getenv("FAKE_CUDA_DEVICES");
  return env ? std::atoi(env) : 1;
}

bool Find(CUdeviceptr ptr, CUdeviceptr* base, Allocation** out) {
  auto it = allocations.upper_bound(ptr);
  if (it == allocations.begin()) return false;
  --it;
  if (ptr >= it->first + it->second.size) return false;
  *base = it->first;
  *out = &it->second;
  return true;
}

struct Event {
  std::chrono::steady_clock::time_point done{};
  bool recorded = false;
  bool timing = false;
};

long EventDelayUs() {
  const char* env = std::getenv("FAKE_CUDA_EVENT_DELAY_US");
  return env ? std::atol(env) : 2000;
}

}  // namespace

extern "C" {

CUresult cuGetErrorName(CUresult error, const char** out) {
  switch (error) {
    case kSuccess: *out = "CUDA_SUCCESS"; return kSuccess;
    case kInvalidValue: *out = "CUDA_ERROR_INVALID_VALUE"; return kSuccess;
    case kOutOfMemory: *out = "CUDA_ERROR_OUT_OF_MEMORY"; return kSuccess;
    case kNoDevice: *out = "CUDA_ERROR_NO_DEVICE"; return kSuccess;
    case kInvalidDevice: *out = "CUDA_ERROR_INVALID_DEVICE"; return kSuccess;
    case kInvalidContext: *out = "CUDA_ERROR_INVALID_CONTEXT"; return kSuccess;
    case kMapFailed: *out = "CUDA_ERROR_MAP_FAILED"; return kSuccess;
    case kInvalidHandle: *out = "CUDA_ERROR_INVALID_HANDLE"; return kSuccess;
    case kNotReady: *out = "CUDA_ERROR_NOT_READY"; return kSuccess;
    default: *out = nullptr; return kInvalidValue;
  }
}
CUresult cuGetErrorString(CUresult error, const char** out) {
  if (error == kNoDevice) *out = "no CUDA-capable device is detected";
  else if (error == kOutOfMemory) *out = "out of memory";
  else *out = "fake driver error";
  return kSuccess;
}
CUresult cuInit(unsigned) {
  if (std::getenv("FAKE_CUDA_NO_DEVICE")) return kNoDevice;
  // An MPS client joins the daemon named by CUDA_MPS_PIPE_DIRECTORY when CUDA starts: here it
  // signs a list the fake control daemon (test/gpu/fake/mps-control) reads.
  const char* pipes = std::getenv("CUDA_MPS_PIPE_DIRECTORY");
  if (pipes != nullptr && access((std::string(pipes) + "/control").c_str(), F_OK) == 0) {
    if (FILE* clients = std::fopen((std::string(pipes) + "/fake-clients").c_str(), "a")) {
      std::fprintf(clients, "%d\n", static_cast<int>(getpid()));
      std::fclose(clients);
    }
  }
  return kSuccess;
}
CUresult cuDriverGetVersion(int* version) { *version = 13000; return kSuccess; }
CUresult cuDeviceGetCount(int* count) { *count = DeviceCount(); return kSuccess; }
CUresult cuDeviceGet(int* device, int ordinal) {
  if (ordinal < 0 || ordinal >= DeviceCount()) return kInvalidDevice;
  *device = ordinal;
  return kSuccess;
}
CUresult cuDeviceGetName(char* name, int length, int device) {
  std::snprintf(name, static_cast<size_t>(length), "Fake GPU %d", device);
  return kSuccess;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, int) {
  *value = attribute == 75 ? 9 : attribute == 76 ? 0 : 0;
  return kSuccess;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
  const char* limit = std::getenv("FAKE_CUDA_MEMORY_LIMIT");
  *bytes = limit ? std::strtoull(limit, nullptr, 10) : 80ull << 30;
  return kSuccess;
}
CUresult cuDeviceGetUuid_v2(char* uuid, int device) {
  for (int i = 0; i < 16; ++i) uuid[i] = static_cast<char>(0x10 * device + i);
  return kSuccess;
}
CUresult cuDevicePrimaryCtxRetain(void** context, int device) {
  *context = reinterpret_cast<void*>(static_cast<uintptr_t>(0x1000 + device));
  return kSuccess;
}
CUresult cuCtxSetCurrent(void* context) { current = context; return kSuccess; }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  if (current == nullptr) return kInvalidContext;
  std::lock_guard<std::mutex> lock(mutex);
  // A memory limit is the device's size, as far as anyone asking is concerned.
  const char* limit = std::getenv("FAKE_CUDA_MEMORY_LIMIT");
  *total = limit ? std::strtoull(limit, nullptr, 10) : 80ull << 30;
  *free_bytes = *total > total_allocated ? *total - total_allocated : 0;
  return kSuccess;
}
CUresult cuMemAlloc_v2(CUdeviceptr* ptr, size_t size) {
  if (current == nullptr) return kInvalidContext;
  if (size == 0) return kInvalidValue;
  const char* limit = std::getenv("FAKE_CUDA_MEMORY_LIMIT");
  std::lock_guard<std::mutex> lock(mutex);
  if (limit && total_allocated + size > std::strtoull(limit, nullptr, 10)) return kOutOfMemory;
  int fd = memfd_create("fake-cuda", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) return kOutOfMemory;
  void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (data == MAP_FAILED) {
    close(fd);
    return kOutOfMemory;
  }
  *ptr = reinterpret_cast<CUdeviceptr>(data);
  allocations[*ptr] = Allocation{fd, size, false, 1, "", current};
  total_allocated += size;
  return kSuccess;
}
CUresult cuMemFree_v2(CUdeviceptr ptr) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = allocations.find(ptr);
  if (it == allocations.end() || it->second.imported) return kInvalidValue;
  munmap(reinterpret_cast<void*>(ptr), it->second.size);
  close(it->second.fd);
  total_allocated -= it->second.size;
  allocations.erase(it);
  return kSuccess;
}
CUresult cuMemGetAddressRange_v2(CUdeviceptr* base, size_t* size, CUdeviceptr ptr) {
  std::lock_guard<std::mutex> lock(mutex);
  Allocation* found = nullptr;
  CUdeviceptr start = 0;
  if (!Find(ptr, &start, &found)) return kInvalidValue;
  if (base) *base = start;
  if (size) *size = found->size;
  return kSuccess;
}
CUresult cuMemHostAlloc(void** data, size_t size, unsigned) {
  if (current == nullptr) return kInvalidContext;
  *data = std::aligned_alloc(4096, (size + 4095) / 4096 * 4096);
  return *data ? kSuccess : kOutOfMemory;
}
CUresult cuMemFreeHost(void* data) { std::free(data); return kSuccess; }

// Page-locked ranges, as cuMemHostRegister keeps them: overlaps and unknown bases are refused.
std::map<uintptr_t, size_t> registered;

// As the real driver: a copy that starts in page-locked memory must end in the same registration.
bool SpansRegistrations(const void* host, size_t n) {
  auto start = reinterpret_cast<uintptr_t>(host);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = registered.upper_bound(start);
  if (it == registered.begin()) return false;
  --it;
  return start < it->first + it->second && start + n > it->first + it->second;
}

CUresult cuMemHostRegister_v2(void* data, size_t size, unsigned flags) {
  if (current == nullptr) return kInvalidContext;
  if (data == nullptr || size == 0 || flags != 1) return kInvalidValue;
  auto start = reinterpret_cast<uintptr_t>(data);
  std::lock_guard<std::mutex> lock(mutex);
  for (auto& [base, length] : registered) {
    if (start < base + length && base < start + size) return 712;  // CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
  }
  registered[start] = size;
  return kSuccess;
}
CUresult cuMemHostUnregister(void* data) {
  std::lock_guard<std::mutex> lock(mutex);
  if (registered.erase(reinterpret_cast<uintptr_t>(data)) == 0) return 713;  // CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
  return kSuccess;
}
// Bytes page-locked now — for tests that check unlocking.
size_t fakeCudaRegisteredBytes() {
  std::lock_guard<std::mutex> lock(mutex);
  size_t total = 0;
  for (auto& [base, length] : registered) total += length;
  return total;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  if (SpansRegistrations(src, n)) return kInvalidValue;
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  return kSuccess;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  if (SpansRegistrations(dst, n)) return kInvalidValue;
  std::memcpy(dst, reinterpret_cast<void*>(src), n);
  return kSuccess;
}
CUresult CopyDeviceBytes(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), n);
  return kSuccess;
}
// Within one device. Between devices trellis copies with cuMemcpyPeer, and this fake refuses
// anything else there (perhaps more strictly than the real driver), so that tests see which ran.
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    CUdeviceptr base = 0;
    Allocation* target = nullptr;
    Allocation* source = nullptr;
    if (Find(dst, &base, &target) && Find(src, &base, &source) && target->context != source->context) return kInvalidValue;
  }
  return CopyDeviceBytes(dst, src, n);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) { return stream ? cuMemcpyHtoD_v2(dst, src, n) : kInvalidHandle; }
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) { return stream ? cuMemcpyDtoH_v2(dst, src, n) : kInvalidHandle; }
// Every fake device is host memory: a copy between two devices' contexts is a copy, once each
// pointer is checked to belong to the context named with it (as the real driver requires).
CUresult cuMemcpyPeer(CUdeviceptr dst, void* dst_context, CUdeviceptr src, void* src_context, size_t n) {
  if (dst_context == nullptr || src_context == nullptr) return kInvalidContext;
  {
    std::lock_guard<std::mutex> lock(mutex);
    CUdeviceptr base = 0;
    Allocation* allocation = nullptr;
    if (Find(dst, &base, &allocation) && allocation->context != dst_context) return kInvalidValue;
    if (Find(src, &base, &allocation) && allocation->context != src_context) return kInvalidValue;
  }
  return CopyDeviceBytes(dst, src, n);
}
CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void* dst_context, CUdeviceptr src, void* src_context, size_t n, void* stream) {
  return stream ? cuMemcpyPeer(dst, dst_context, src, src_context, n) : kInvalidHandle;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) { return stream ? cuMemcpyDtoD_v2(dst, src, n) : kInvalidHandle; }
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) { std::memset(reinterpret_cast<void*>(dst), value, n); return kSuccess; }
CUresult cuStreamCreate(void** stream, unsigned flags) {
  if (current == nullptr) return kInvalidContext;
  *stream = new int(static_cast<int>(flags));
  return kSuccess;
}
CUresult cuStreamDestroy_v2(void* stream) { delete static_cast<int*>(stream); return kSuccess; }
CUresult cuStreamSynchronize(void*) { return kSuccess; }
CUresult cuEventCreate(void** event, unsigned flags) {
  if (current == nullptr) return kInvalidContext;
  auto* made = new Event();
  made->timing = (flags & 0x2) == 0;  // without CU_EVENT_DISABLE_TIMING
  *event = made;
  return kSuccess;
}
// As the real driver: both recorded with timing and done; the time between their completions.
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
  auto* first = static_cast<Event*>(start);
  auto* last = static_cast<Event*>(end);
  if (!first->timing || !last->timing || !first->recorded || !last->recorded) return kInvalidHandle;
  auto now = std::chrono::steady_clock::now();
  if (now < first->done || now < last->done) return kNotReady;
  *ms = std::chrono::duration<float, std::milli>(last->done - first->done).count();
  return kSuccess;
}
CUresult cuEventRecord(void* event, void* stream) {
  auto* e = static_cast<Event*>(event);
  e->done = std::chrono::steady_clock::now() + std::chrono::microseconds(EventDelayUs());
  e->recorded = true;
  return stream ? kSuccess : kInvalidHandle;
}
CUresult cuEventQuery(void* event) {
  auto* e = static_cast<Event*>(event);
  return !e->recorded || std::chrono::steady_clock::now() >= e->done ? kSuccess : kNotReady;
}
// Work runs when issued here, so a recorded event's work is done: waiting on it orders nothing.
CUresult cuStreamWaitEvent(void* stream, void* event, unsigned flags) {
  return stream == nullptr || event == nullptr || flags != 0 ? kInvalidHandle : kSuccess;
}
CUresult cuIpcGetMemHandle(Handle* handle, CUdeviceptr base) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = allocations.find(base);
  if (it == allocations.end() || it->second.imported) return kInvalidValue;
  std::memset(handle, 0, sizeof *handle);
  *handle = Handle{kMagic, getpid(), it->second.fd, it->second.size, {}};
  return kSuccess;
}
CUresult cuIpcOpenMemHandle_v2(CUdeviceptr* ptr, Handle handle, unsigned flags) {
  if (current == nullptr) return kInvalidContext;
  if (handle.magic != kMagic || flags != 1) return kInvalidValue;
  if (handle.pid == getpid()) return kInvalidContext;  // as the real driver: not in the exporting process
  std::string key(reinterpret_cast<const char*>(&handle), sizeof handle);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto it = imports.find(key); it != imports.end()) {
    allocations[it->second].refs += 1;
    *ptr = it->second;
    return kSuccess;
  }
  std::string path = "/proc/" + std::to_string(handle.pid) + "/fd/" + std::to_string(handle.fd);
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return kMapFailed;
  void* data = mmap(nullptr, handle.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (data == MAP_FAILED) {
    close(fd);
    return kMapFailed;
  }
  *ptr = reinterpret_cast<CUdeviceptr>(data);
  allocations[*ptr] = Allocation{fd, handle.size, true, 1, key, current};
  imports[key] = *ptr;
  return kSuccess;
}
CUresult cuIpcCloseMemHandle(CUdeviceptr ptr) {
  std::lock_guard<std::mutex> lock(mutex);
  auto it = allocations.find(ptr);
  if (it == allocations.end() || !it->second.imported) return kInvalidValue;
  if (--it->second.refs > 0) return kSuccess;
  munmap(reinterpret_cast<void*>(ptr), it->second.size);
  close(it->second.fd);
  imports.erase(it->second.key);
  allocations.erase(it);
  return kSuccess;
}

// How many mappings the fake has open (imports) — for tests that check closing.
int fakeCudaOpenImports() {
  std::lock_guard<std::mutex> lock(mutex);
  return static_cast<int>(imports.size());
}

// ---------------------------------------------------------------------------------------------
// NCCL

// Several ranks (processes) meet in a shared segment named after the unique id: per ordered pair
// of ranks a ring of slots carries messages in order, a chunk a slot. Operations run on the
// calling thread (trellis's communicator thread); inside a group they are queued and run at the
// outermost ncclGroupEnd, all of them progressing together, as NCCL's grouped calls do.
constexpr size_t kSlotBytes = size_t{1} << 20;
constexpr uint32_t kSlots = 8;
constexpr int kMaxRanks = 8;
struct Slot {
  std::atomic<uint32_t> full;
  uint32_t length;
  char data[kSlotBytes];
};
struct Segment {
  std::atomic<int> arrived;
  Slot slots[kMaxRanks][kMaxRanks][kSlots];  // [source][destination][index]
};

struct ncclComm {
  int rank;
  int size;
  std::atomic<bool> aborted{false};
  std::atomic<bool> issued{false};
  std::deque<std::pair<const void*, size_t>> sends;  // one rank: sends to self wait for a receive
  std::deque<std::pair<void*, size_t>> recvs;
  Segment* segment = nullptr;
  uint32_t next_write[kMaxRanks] = {};
  uint32_t next_read[kMaxRanks] = {};
};

// A point-to-point transfer in progress: `done` bytes of `bytes` moved so far.
struct Transfer {
  bool send;
  int peer;
  char* data;
  size_t bytes;
  size_t done = 0;
  bool started = false;
};

// Moves what it can of `t` now; true when it is complete.
static bool Progress(ncclComm* comm, Transfer& t) {
  while (t.done < t.bytes || !t.started) {
    t.started = true;
    if (t.send) {
      Slot& slot = comm->segment->slots[comm->rank][t.peer][comm->next_write[t.peer] % kSlots];
      if (slot.full.load(std::memory_order_acquire)) return false;
      size_t piece = std::min(kSlotBytes, t.bytes - t.done);
      std::memcpy(slot.data, t.data + t.done, piece);
      slot.length = static_cast<uint32_t>(piece);
      slot.full.store(1, std::memory_order_release);
      comm->next_write[t.peer] += 1;
      t.done += piece;
    } else {
      Slot& slot = comm->segment->slots[t.peer][comm->rank][comm->next_read[t.peer] % kSlots];
      if (!slot.full.load(std::memory_order_acquire)) return false;
      size_t piece = std::min<size_t>(slot.length, t.bytes - t.done);
      std::memcpy(t.data + t.done, slot.data, piece);
      slot.full.store(0, std::memory_order_release);
      comm->next_read[t.peer] += 1;
      t.done += slot.length;
    }
    if (t.bytes == 0) break;
  }
  return true;
}

// Runs transfers together until all are complete (or the communicator is aborted: 3).
static int RunTransfers(ncclComm* comm, std::vector<Transfer>& transfers) {
  for (;;) {
    bool all = true;
    for (Transfer& t : transfers) all = Progress(comm, t) && all;
    if (all) return 0;
    if (comm->aborted) return 3;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

int ncclGetVersion(int* version) { *version = 22809; return 0; }
const char* ncclGetErrorString(int result) {
  switch (result) {
    case 0: return "no error";
    case 4: return "invalid argument";
    case 5: return "invalid usage";
    case 6: return "remote process exited or there was a network error";
    default: return "fake nccl error";
  }
}
const char* ncclGetLastError(ncclComm*) { return ""; }
int ncclGetUniqueId(char* id) {
  std::random_device random;
  for (int i = 0; i < 128; ++i) id[i] = static_cast<char>(random());
  return 0;
}
struct UniqueId {
  char internal[128];
};
int ncclCommInitRank(ncclComm** comm, int size, UniqueId id, int rank) {
  if (size < 1 || rank < 0 || rank >= size || size > kMaxRanks) return 4;
  auto* made = new ncclComm();
  made->rank = rank;
  made->size = size;
  if (size > 1) {
    char name[64] = "/fake-nccl-";
    for (int i = 0; i < 8; ++i) std::snprintf(name + 11 + 2 * i, 3, "%02x", static_cast<unsigned char>(id.internal[i]));
    int fd = shm_open(name, O_RDWR | O_CREAT, 0600);
    if (fd < 0 || ftruncate(fd, sizeof(Segment)) != 0) return 2;
    void* address = mmap(nullptr, sizeof(Segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (address == MAP_FAILED) return 2;
    made->segment = static_cast<Segment*>(address);
    // The last to arrive unlinks the name: every rank has the segment mapped by then, and none is
    // left behind however the ranks end. Peers that never come leave this rank waiting (and the
    // name in /dev/shm), as NCCL's blocking init waits.
    if (made->segment->arrived.fetch_add(1) + 1 == size) shm_unlink(name);
    while (made->segment->arrived.load() < size) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  *comm = made;
  return 0;
}
static void Leave(ncclComm* comm) {
  if (comm->segment == nullptr) return;
  munmap(comm->segment, sizeof(Segment));
  comm->segment = nullptr;
}
int ncclCommAbort(ncclComm* comm) {
  comm->aborted = true;  // leaked on purpose: a hung call may still read it
  return 0;
}
int ncclCommDestroy(ncclComm* comm) {
  Leave(comm);
  delete comm;
  return 0;
}
int ncclCommGetAsyncError(ncclComm* comm, int* result) {
  *result = std::getenv("FAKE_NCCL_ASYNC_ERROR") && comm->issued ? 6 : 0;
  return 0;
}

static size_t Size(int type) {
  static const size_t sizes[] = {1, 1, 4, 4, 8, 8, 2, 4, 8, 2};
  return type >= 0 && type <= 9 ? sizes[type] : 0;
}

}  // extern "C"

// Reduces `count` elements of `from` into `into` (sum, prod, max, min; avg sums and divides later).
template <typename T>
static void ReduceInto(T* into, const T* from, size_t count, int op) {
  for (size_t i = 0; i < count; ++i) {
    if (op == 0 || op == 4) into[i] = into[i] + from[i];
    else if (op == 1) into[i] = into[i] * from[i];
    else if (op == 2) into[i] = std::max(into[i], from[i]);
    else into[i] = std::min(into[i], from[i]);
  }
}
static bool Reduce(void* into, const void* from, size_t count, int type, int op) {
  switch (type) {
    case 0: ReduceInto(static_cast<int8_t*>(into), static_cast<const int8_t*>(from), count, op); return true;
    case 1: ReduceInto(static_cast<uint8_t*>(into), static_cast<const uint8_t*>(from), count, op); return true;
    case 2: ReduceInto(static_cast<int32_t*>(into), static_cast<const int32_t*>(from), count, op); return true;
    case 3: ReduceInto(static_cast<uint32_t*>(into), static_cast<const uint32_t*>(from), count, op); return true;
    case 4: ReduceInto(static_cast<int64_t*>(into), static_cast<const int64_t*>(from), count, op); return true;
    case 5: ReduceInto(static_cast<uint64_t*>(into), static_cast<const uint64_t*>(from), count, op); return true;
    case 7: ReduceInto(static_cast<float*>(into), static_cast<const float*>(from), count, op); return true;
    case 8: ReduceInto(static_cast<double*>(into), static_cast<const double*>(from), count, op); return true;
    default: return false;  // half precision: not reduced across ranks by this fake
  }
}

extern "C" {

// Every rank's `bytes` from `send` into `gathered` (rank order), by sending to and receiving from each.
static int Exchange(ncclComm* comm, const void* send, size_t bytes, std::vector<char>& gathered) {
  gathered.assign(bytes * comm->size, 0);
  std::memcpy(gathered.data() + bytes * comm->rank, send, bytes);
  std::vector<Transfer> transfers;
  for (int peer = 0; peer < comm->size; ++peer) {
    if (peer == comm->rank) continue;
    transfers.push_back({true, peer, const_cast<char*>(static_cast<const char*>(send)), bytes});
    transfers.push_back({false, peer, gathered.data() + bytes * peer, bytes});
  }
  return RunTransfers(comm, transfers);
}

static int Begin(ncclComm* comm, void* stream) {
  if (comm->aborted) return 3;
  if (stream == nullptr) return 4;
  comm->issued = true;
  if (std::getenv("FAKE_NCCL_HANG")) {
    while (!comm->aborted) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return 3;
  }
  return 0;
}

// all: the reduced whole in recv; else only this rank's share of it (reducescatter).
static int ReduceAll(const void* send, void* recv, size_t count, int type, int op, ncclComm* comm, bool all) {
  size_t element = Size(type);
  size_t total = all ? count : count * comm->size;
  std::vector<char> result(static_cast<const char*>(send), static_cast<const char*>(send) + total * element);
  if (comm->size > 1) {
    std::vector<char> gathered;
    if (int failed = Exchange(comm, send, total * element, gathered)) return failed;
    std::memcpy(result.data(), gathered.data(), total * element);
    for (int peer = 1; peer < comm->size; ++peer) {
      if (!Reduce(result.data(), gathered.data() + total * element * peer, total, type, op)) return 5;
    }
    if (op == 4 && (type == 7 || type == 8)) {
      for (size_t i = 0; i < total; ++i) {
        if (type == 7) reinterpret_cast<float*>(result.data())[i] /= comm->size;
        else reinterpret_cast<double*>(result.data())[i] /= comm->size;
      }
    }
  }
  std::memcpy(recv, result.data() + (all ? 0 : count * element * comm->rank), count * element);
  return 0;
}

int ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, ncclComm* comm, void* stream) {
  if (Size(type) == 0 || op < 0 || op > 4) return 4;
  if (int failed = Begin(comm, stream)) return failed;
  return ReduceAll(send, recv, count, type, op, comm, true);
}
int ncclReduceScatter(const void* send, void* recv, size_t count, int type, int op, ncclComm* comm, void* stream) {
  if (Size(type) == 0 || op < 0 || op > 4) return 4;
  if (int failed = Begin(comm, stream)) return failed;
  return ReduceAll(send, recv, count, type, op, comm, false);
}
int ncclAllGather(const void* send, void* recv, size_t count, int type, ncclComm* comm, void* stream) {
  if (Size(type) == 0) return 4;
  if (int failed = Begin(comm, stream)) return failed;
  size_t bytes = count * Size(type);
  if (comm->size == 1) {
    if (send != recv) std::memmove(recv, send, bytes);
    return 0;
  }
  std::vector<char> gathered;
  if (int failed = Exchange(comm, send, bytes, gathered)) return failed;
  std::memcpy(recv, gathered.data(), gathered.size());
  return 0;
}
int ncclBroadcast(const void* send, void* recv, size_t count, int type, int root, ncclComm* comm, void* stream) {
  if (Size(type) == 0 || root < 0 || root >= comm->size) return 4;
  if (int failed = Begin(comm, stream)) return failed;
  size_t bytes = count * Size(type);
  if (comm->size == 1) {
    if (send != recv) std::memmove(recv, send, bytes);
    return 0;
  }
  std::vector<Transfer> transfers;
  if (comm->rank == root) {
    for (int peer = 0; peer < comm->size; ++peer) {
      if (peer != root) transfers.push_back({true, peer, const_cast<char*>(static_cast<const char*>(send)), bytes});
    }
    if (send != recv) std::memmove(recv, send, bytes);
  } else {
    transfers.push_back({false, root, static_cast<char*>(recv), bytes});
  }
  return RunTransfers(comm, transfers);
}

// Point to point: with one rank, a send to self meets a receive from self in either order. With
// several, calls queue inside a group and run together at its end; outside one they run at once.
thread_local int group_depth = 0;
thread_local std::vector<std::pair<ncclComm*, Transfer>> grouped;

static int PointToPoint(bool send, void* data, size_t count, int type, int peer, ncclComm* comm, void* stream) {
  if (Size(type) == 0 || peer < 0 || peer >= comm->size || stream == nullptr) return 4;
  if (comm->aborted) return 3;
  comm->issued = true;
  size_t bytes = count * Size(type);
  if (comm->size == 1) {
    if (send ? !comm->recvs.empty() : !comm->sends.empty()) {
      if (send) {
        auto [recv, capacity] = comm->recvs.front();
        comm->recvs.pop_front();
        std::memcpy(recv, data, bytes < capacity ? bytes : capacity);
      } else {
        auto [source, length] = comm->sends.front();
        comm->sends.pop_front();
        std::memcpy(data, source, length < bytes ? length : bytes);
      }
    } else if (send) {
      comm->sends.emplace_back(data, bytes);
    } else {
      comm->recvs.emplace_back(data, bytes);
    }
    return 0;
  }
  Transfer transfer{send, peer, static_cast<char*>(data), bytes};
  if (group_depth > 0) {
    grouped.emplace_back(comm, transfer);
    return 0;
  }
  std::vector<Transfer> one{transfer};
  return RunTransfers(comm, one);
}
int ncclSend(const void* send, size_t count, int type, int peer, ncclComm* comm, void* stream) {
  return PointToPoint(true, const_cast<void*>(send), count, type, peer, comm, stream);
}
int ncclRecv(void* recv, size_t count, int type, int peer, ncclComm* comm, void* stream) {
  return PointToPoint(false, recv, count, type, peer, comm, stream);
}
int ncclGroupStart() { ++group_depth; return 0; }
int ncclGroupEnd() {
  if (group_depth <= 0) return 5;
  if (--group_depth > 0 || grouped.empty()) return 0;
  // One communicator per group here (trellis groups the calls of one communicator).
  ncclComm* comm = grouped.front().first;
  std::vector<Transfer> transfers;
  for (auto& [owner, transfer] : grouped) transfers.push_back(transfer);
  grouped.clear();
  return RunTransfers(comm, transfers);
}

}  // extern "C"
