// NCCL communicators for JavaScript. Each communicator has an issue thread that makes every NCCL
// call for it, in order (ncclCommInitRank blocks until all ranks join; collectives can block the
// host while connections are set up; group calls are per thread). Each operation's promise is
// settled by the completion thread (native/cuda/completion.h) when the event recorded after it
// completes. While waiting it polls ncclCommGetAsyncError and the operation's deadline: on an
// asynchronous error or a timeout it aborts the communicator (ncclCommAbort), which fails every
// pending and later operation, so a dead peer cannot hang the survivors.
#include "nccl/nccl_binding.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>

#include "common/js_error.h"
#include "cuda/completion.h"
#include "cuda/cuda_binding.h"
#include "nccl/library.h"

namespace trellis::nccl {
namespace {

using Clock = std::chrono::steady_clock;

// One operation's progress: written by the issue thread, read by the completion thread.
struct OpSlot {
  enum State : int { kQueued, kIssued, kFailed };
  std::atomic<int> state{kQueued};
  std::shared_ptr<cuda::Event> event;  // set before kIssued; null when there is nothing to wait for
  std::optional<NativeError> error;    // set before kFailed

  void Issue(std::shared_ptr<cuda::Event> done) {
    event = std::move(done);
    state.store(kIssued, std::memory_order_release);
  }
  void Fail(NativeError failure) {
    error = std::move(failure);
    state.store(kFailed, std::memory_order_release);
  }
};

enum class JobKind { kInit, kCall, kGroupStart, kGroupEnd, kDestroy };

struct Job {
  JobKind kind;
  std::function<void(const Table&, ncclComm_t, cudaStream_t)> call;  // kCall
  std::shared_ptr<OpSlot> slot;  // null for kGroupStart
};

class Comm : public std::enable_shared_from_this<Comm> {
 public:
  Comm(int rank, int size, int device, const ncclUniqueId& id, std::chrono::milliseconds timeout)
      : rank_(rank), size_(size), device_(device), id_(id), timeout_(timeout) {}

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // Starts the issue thread; the init job is queued first. Returns the init slot.
  std::shared_ptr<OpSlot> Start() {
    auto slot = std::make_shared<OpSlot>();
    Push(Job{JobKind::kInit, nullptr, slot});
    std::thread([self = shared_from_this()] { self->Run(); }).detach();
    return slot;
  }

  // Queues a job; if the communicator is closed, fails its slot at once.
  void Push(Job job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!closing_) {
        queue_.push_back(std::move(job));
        queued_.notify_one();
        return;
      }
    }
    if (job.slot) job.slot->Fail(ClosedError());
  }

  // The error every operation fails with once the communicator is aborted, if it is.
  std::optional<NativeError> AbortError() {
    std::lock_guard<std::mutex> lock(mutex_);
    return abort_error_;
  }

  // An asynchronous failure NCCL has recorded on the communicator, if any.
  std::optional<NativeError> AsyncError() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (comm_ == nullptr) return std::nullopt;
    ncclResult_t async = ncclSuccess;
    ncclResult_t result = table_->ncclCommGetAsyncError(comm_, &async);
    if (result != ncclSuccess) async = result;
    if (async == ncclSuccess || async == ncclInProgress) return std::nullopt;
    return NativeError("ERR_NCCL", "NCCL communicator (rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
                                       ") failed: " + ErrorText(async))
        .with("call", "ncclCommGetAsyncError")
        .with("result", static_cast<double>(async));
  }

  // Fails everything pending and later with `error` and aborts the NCCL communicator. Never
  // blocks the caller: ncclCommAbort runs on its own thread once the issue thread is out of NCCL
  // (or after 200 ms, when it is stuck in a call only the abort can end).
  void Abort(const NativeError& error) {
    ncclComm_t comm = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (abort_error_ || destroyed_) return;
      abort_error_ = error;
      closing_ = true;
      comm = comm_;
      comm_ = nullptr;
    }
    queued_.notify_all();
    if (comm == nullptr) return;
    std::thread([self = shared_from_this(), comm] {
      {
        std::unique_lock<std::mutex> lock(self->mutex_);
        self->idle_.wait_for(lock, std::chrono::milliseconds(200), [&] { return !self->in_call_; });
      }
      self->table_->ncclCommAbort(comm);  // nothing is left to report a failure to
    }).detach();
  }

  // Queues ncclCommDestroy after everything already queued; later operations fail.
  void Destroy(std::shared_ptr<OpSlot> slot) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closing_) {
      if (slot) {
        if (abort_error_) slot->Fail(*abort_error_);
        else slot->Issue(nullptr);  // already destroyed
      }
      return;
    }
    queue_.push_back(Job{JobKind::kDestroy, nullptr, slot ? slot : std::make_shared<OpSlot>()});
    closing_ = true;
    queued_.notify_one();
  }

 private:
  NativeError ClosedError() {
    if (abort_error_) return *abort_error_;
    return NativeError("ERR_NCCL_DESTROYED", "the NCCL communicator was destroyed");
  }

  void Run() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        queued_.wait(lock, [&] { return !queue_.empty() || (closing_ && abort_error_); });
        if (queue_.empty()) return;  // aborted and drained
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      switch (job.kind) {
        case JobKind::kInit: Init(*job.slot); break;
        case JobKind::kDestroy: DestroyNow(*job.slot); return;
        default: Issue(job); break;
      }
    }
  }

  void Init(OpSlot& slot) {
    try {
      table_ = &Library("ncclCommInitRank");
      cuda::MakeCurrent(device_);  // NCCL's runtime uses this thread's current (primary) context
      stream_ = std::make_unique<cuda::Stream>(device_);
      ncclComm_t comm = nullptr;
      Check(table_->ncclCommInitRank(&comm, size_, id_, rank_), "ncclCommInitRank");
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!abort_error_) std::swap(comm_, comm);
      }
      if (comm != nullptr) table_->ncclCommAbort(comm);  // timed out or aborted while joining
      slot.Issue(nullptr);
    } catch (const NativeError& error) {
      std::lock_guard<std::mutex> lock(mutex_);
      init_error_ = error;
      slot.Fail(error);
    }
  }

  void Issue(const Job& job) {
    ncclComm_t comm = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::optional<NativeError> refusal = abort_error_ ? abort_error_ : init_error_;
      if (!refusal && comm_ == nullptr) refusal = NativeError("ERR_NCCL", "the NCCL communicator is not initialized");
      if (refusal) {
        if (job.slot) job.slot->Fail(*refusal);
        if (job.kind == JobKind::kGroupEnd) FailGroup(*refusal);
        return;
      }
      comm = comm_;
      in_call_ = true;
    }
    try {
      cuda::MakeCurrent(device_);
      switch (job.kind) {
        case JobKind::kGroupStart:
          group_depth_ += 1;
          Check(table_->ncclGroupStart(), "ncclGroupStart");
          break;
        case JobKind::kCall:
          job.call(*table_, comm, stream_->get());
          if (group_depth_ > 0) group_.push_back(job.slot);
          else job.slot->Issue(Record());
          break;
        case JobKind::kGroupEnd:
          group_depth_ -= 1;
          group_.push_back(job.slot);
          Check(table_->ncclGroupEnd(), "ncclGroupEnd");
          if (group_depth_ == 0) {
            std::shared_ptr<cuda::Event> event = Record();
            for (auto& member : group_) member->Issue(event);
            group_.clear();
          }
          break;
        default:
          break;
      }
    } catch (const NativeError& error) {
      if (job.kind == JobKind::kGroupEnd) FailGroup(error);
      else if (job.slot) job.slot->Fail(error);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_call_ = false;
    }
    idle_.notify_all();
  }

  void FailGroup(const NativeError& error) {
    for (auto& member : group_) member->Fail(error);
    group_.clear();
  }

  std::shared_ptr<cuda::Event> Record() {
    std::shared_ptr<cuda::Event> event = cuda::AcquireEvent(device_);
    cuda::Check(cuda::Driver().cuEventRecord(event->event, stream_->get()), "cuEventRecord");
    return event;
  }

  void DestroyNow(OpSlot& slot) {
    ncclComm_t comm = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      destroyed_ = true;
      std::swap(comm, comm_);
    }
    try {
      if (comm != nullptr) {
        cuda::MakeCurrent(device_);
        Check(table_->ncclCommDestroy(comm), "ncclCommDestroy");
      }
      slot.Issue(nullptr);
    } catch (const NativeError& error) {
      slot.Fail(error);
    }
  }

  const int rank_;
  const int size_;
  const int device_;
  const ncclUniqueId id_;
  const std::chrono::milliseconds timeout_;
  const Table* table_ = nullptr;  // set by Init, before comm_

  std::mutex mutex_;
  std::condition_variable queued_;
  std::condition_variable idle_;
  std::deque<Job> queue_;
  ncclComm_t comm_ = nullptr;
  bool in_call_ = false;
  bool closing_ = false;  // no more jobs are accepted
  bool destroyed_ = false;
  std::optional<NativeError> abort_error_;
  std::optional<NativeError> init_error_;

  // Issue thread only.
  std::unique_ptr<cuda::Stream> stream_;
  int group_depth_ = 0;
  std::vector<std::shared_ptr<OpSlot>> group_;
};

// Settles one operation: when its event completes, or when the communicator fails or the deadline
// passes (which aborts the communicator).
class OpPending : public cuda::Pending {
 public:
  OpPending(std::shared_ptr<Comm> comm, std::shared_ptr<OpSlot> slot, std::string what, std::vector<cuda::DeviceBuffer> keep = {})
      : comm_(std::move(comm)),
        slot_(std::move(slot)),
        what_(std::move(what)),
        keep_(std::move(keep)),
        deadline_(Clock::now() + comm_->timeout()) {}

  bool Poll() override {
    if (std::optional<NativeError> aborted = comm_->AbortError()) {
      error = *aborted;
      return true;
    }
    int state = slot_->state.load(std::memory_order_acquire);
    if (state == OpSlot::kFailed) {
      error = *slot_->error;
      return true;
    }
    if (state == OpSlot::kIssued && (!slot_->event || cuda::EventDone(*slot_->event))) return true;
    if (std::optional<NativeError> failed = comm_->AsyncError()) {
      comm_->Abort(*failed);
      error = *failed;
      return true;
    }
    if (Clock::now() >= deadline_) {
      NativeError timeout("ERR_NCCL_TIMEOUT", what_ + " did not complete within " + std::to_string(comm_->timeout().count()) +
                                                  " ms (rank " + std::to_string(comm_->rank()) + " of " + std::to_string(comm_->size()) +
                                                  "): a peer may be dead or stuck; the communicator was aborted");
      timeout.with("call", what_).with("timeoutMs", static_cast<double>(comm_->timeout().count()));
      comm_->Abort(timeout);
      error = comm_->AbortError().value_or(timeout);
      return true;
    }
    return false;
  }

 private:
  std::shared_ptr<Comm> comm_;
  std::shared_ptr<OpSlot> slot_;
  std::string what_;
  std::vector<cuda::DeviceBuffer> keep_;
  Clock::time_point deadline_;
};

uint64_t IntegerArgument(const Napi::Value& value, const char* what, uint64_t max = 9007199254740991ull) {
  if (!value.IsNumber()) throw InvalidArgument(std::string(what) + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= 0) || std::floor(number) != number || number > static_cast<double>(max)) {
    throw InvalidArgument(std::string(what) + " must be an integer in [0, " + std::to_string(max) + "], got " +
                          value.ToString().Utf8Value());
  }
  return static_cast<uint64_t>(number);
}

class CommBinding : public Napi::ObjectWrap<CommBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NcclCommunicator",
                       {
                           InstanceAccessor<&CommBinding::Rank>("rank"),
                           InstanceAccessor<&CommBinding::Size>("size"),
                           InstanceAccessor<&CommBinding::Device>("device"),
                           InstanceMethod<&CommBinding::Ready>("ready"),
                           InstanceMethod<&CommBinding::AllReduce>("allreduce"),
                           InstanceMethod<&CommBinding::AllGather>("allgather"),
                           InstanceMethod<&CommBinding::ReduceScatter>("reducescatter"),
                           InstanceMethod<&CommBinding::Broadcast>("broadcast"),
                           InstanceMethod<&CommBinding::Send>("send"),
                           InstanceMethod<&CommBinding::Recv>("recv"),
                           InstanceMethod<&CommBinding::GroupStart>("groupStart"),
                           InstanceMethod<&CommBinding::GroupEnd>("groupEnd"),
                           InstanceMethod<&CommBinding::AbortComm>("abort"),
                           InstanceMethod<&CommBinding::DestroyComm>("destroy"),
                       });
  }

  // new NcclCommunicator({ rank, size, uniqueId, device, timeoutMs }): starts joining at once;
  // ready() resolves when every rank has joined.
  explicit CommBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CommBinding>(info) {
    Guarded(info.Env(), [&] {
      Library("NcclCommunicator");
      cuda::Driver("NcclCommunicator");
      if (!info[0].IsObject()) throw InvalidArgument("NcclCommunicator expects { rank, size, uniqueId, device, timeoutMs }");
      Napi::Object options = info[0].As<Napi::Object>();
      int size = static_cast<int>(IntegerArgument(options.Get("size"), "size", 1u << 20));
      if (size < 1) throw InvalidArgument("size must be at least 1");
      int rank = static_cast<int>(IntegerArgument(options.Get("rank"), "rank", static_cast<uint64_t>(size - 1)));
      int device = static_cast<int>(IntegerArgument(options.Get("device"), "device", 1u << 16));
      cuda::MakeCurrent(device);  // validates the index now rather than on the issue thread
      uint64_t timeout = options.Get("timeoutMs").IsUndefined() ? 60000 : IntegerArgument(options.Get("timeoutMs"), "timeoutMs");
      Napi::Value id_value = options.Get("uniqueId");
      if (!id_value.IsTypedArray() || id_value.As<Napi::TypedArray>().ByteLength() != NCCL_UNIQUE_ID_BYTES) {
        throw InvalidArgument("uniqueId must be the 128 bytes of an NCCL unique id");
      }
      auto id_array = id_value.As<Napi::TypedArray>();
      ncclUniqueId id;
      std::memcpy(id.internal, static_cast<uint8_t*>(id_array.ArrayBuffer().Data()) + id_array.ByteOffset(), sizeof id.internal);
      comm_ = std::make_shared<Comm>(rank, size, device, id, std::chrono::milliseconds(timeout));
      std::shared_ptr<OpSlot> slot = comm_->Start();
      Napi::Promise ready = cuda::Submit(info.Env(), std::make_unique<OpPending>(comm_, slot, "ncclCommInitRank"));
      ready_ = Napi::Persistent(ready.As<Napi::Object>());
      return 0;
    });
  }

  ~CommBinding() override {
    if (comm_ && !closed_) comm_->Destroy(nullptr);  // collected without destroy(): tear down in order
  }

 private:
  Napi::Value Rank(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), comm_->rank()); }
  Napi::Value Size(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), comm_->size()); }
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), comm_->device()); }
  Napi::Value Ready(const Napi::CallbackInfo& info) { return ready_.Value(); }

  cuda::DeviceBuffer Buffer(const Napi::Value& value, const char* what, uint64_t count, size_t element, uint64_t multiple = 1) {
    cuda::DeviceBuffer buffer = cuda::BufferOf(value, what);
    if (buffer.device != comm_->device()) {
      throw InvalidArgument(std::string(what) + " is on device " + std::to_string(buffer.device) + ", the communicator on device " +
                            std::to_string(comm_->device()));
    }
    if (count > (UINT64_MAX / element) / multiple) throw NativeError("ERR_OUT_OF_RANGE", std::string(what) + ": count is too large");
    uint64_t needed = count * element * multiple;
    if (buffer.size < needed) {
      throw NativeError("ERR_OUT_OF_RANGE", std::string(what) + " holds " + std::to_string(buffer.size) + " bytes; the operation needs " +
                                                std::to_string(needed));
    }
    return buffer;
  }

  static ncclDataType_t TypeArgument(const Napi::Value& value) {
    uint64_t type = IntegerArgument(value, "dtype", ncclBfloat16);
    return static_cast<ncclDataType_t>(type);
  }

  static ncclRedOp_t OpArgument(const Napi::Value& value) {
    return static_cast<ncclRedOp_t>(IntegerArgument(value, "op", ncclAvg));
  }

  int PeerArgument(const Napi::Value& value, const char* what) {
    return static_cast<int>(IntegerArgument(value, what, static_cast<uint64_t>(comm_->size() - 1)));
  }

  Napi::Promise Enqueue(Napi::Env env, const char* what, std::vector<cuda::DeviceBuffer> keep,
                        std::function<void(const Table&, ncclComm_t, cudaStream_t)> call) {
    auto slot = std::make_shared<OpSlot>();
    if (closed_) slot->Fail(comm_->AbortError().value_or(NativeError("ERR_NCCL_DESTROYED", "the NCCL communicator was destroyed")));
    else comm_->Push(Job{JobKind::kCall, std::move(call), slot});
    return cuda::Submit(env, std::make_unique<OpPending>(comm_, slot, what, std::move(keep)));
  }

  // allreduce(send, recv, count, dtype, op)
  Napi::Value AllReduce(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      uint64_t count = IntegerArgument(info[2], "count");
      ncclDataType_t type = TypeArgument(info[3]);
      ncclRedOp_t op = OpArgument(info[4]);
      size_t element = ElementSize(type);
      cuda::DeviceBuffer send = Buffer(info[0], "send buffer", count, element);
      cuda::DeviceBuffer recv = Buffer(info[1], "receive buffer", count, element);
      CUdeviceptrPair ptrs{send.ptr, recv.ptr};
      return Enqueue(info.Env(), "ncclAllReduce", {send, recv}, [ptrs, count, type, op](const Table& t, ncclComm_t c, cudaStream_t s) {
        Check(t.ncclAllReduce(ptrs.Send(), ptrs.Recv(), count, type, op, c, s), "ncclAllReduce");
      });
    });
  }

  // allgather(send, recv, sendCount, dtype): recv holds size × sendCount elements.
  Napi::Value AllGather(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      uint64_t count = IntegerArgument(info[2], "sendCount");
      ncclDataType_t type = TypeArgument(info[3]);
      size_t element = ElementSize(type);
      cuda::DeviceBuffer send = Buffer(info[0], "send buffer", count, element);
      cuda::DeviceBuffer recv = Buffer(info[1], "receive buffer", count, element, static_cast<uint64_t>(comm_->size()));
      CUdeviceptrPair ptrs{send.ptr, recv.ptr};
      return Enqueue(info.Env(), "ncclAllGather", {send, recv}, [ptrs, count, type](const Table& t, ncclComm_t c, cudaStream_t s) {
        Check(t.ncclAllGather(ptrs.Send(), ptrs.Recv(), count, type, c, s), "ncclAllGather");
      });
    });
  }

  // reducescatter(send, recv, recvCount, dtype, op): send holds size × recvCount elements.
  Napi::Value ReduceScatter(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      uint64_t count = IntegerArgument(info[2], "recvCount");
      ncclDataType_t type = TypeArgument(info[3]);
      ncclRedOp_t op = OpArgument(info[4]);
      size_t element = ElementSize(type);
      cuda::DeviceBuffer send = Buffer(info[0], "send buffer", count, element, static_cast<uint64_t>(comm_->size()));
      cuda::DeviceBuffer recv = Buffer(info[1], "receive buffer", count, element);
      CUdeviceptrPair ptrs{send.ptr, recv.ptr};
      return Enqueue(info.Env(), "ncclReduceScatter", {send, recv}, [ptrs, count, type, op](const Table& t, ncclComm_t c, cudaStream_t s) {
        Check(t.ncclReduceScatter(ptrs.Send(), ptrs.Recv(), count, type, op, c, s), "ncclReduceScatter");
      });
    });
  }

  // broadcast(send, recv, count, dtype, root)
  Napi::Value Broadcast(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      uint64_t count = IntegerArgument(info[2], "count");
      ncclDataType_t type = TypeArgument(info[3]);
      int root = PeerArgument(info[4], "root");
      size_t element = ElementSize(type);
      cuda::DeviceBuffer send = Buffer(info[0], "send buffer", count, element);
      cuda::DeviceBuffer recv = Buffer(info[1], "receive buffer", count, element);
      CUdeviceptrPair ptrs{send.ptr, recv.ptr};
      return Enqueue(info.Env(), "ncclBroadcast", {send, recv}, [ptrs, count, type, root](const Table& t, ncclComm_t c, cudaStream_t s) {
        Check(t.ncclBroadcast(ptrs.Send(), ptrs.Recv(), count, type, root, c, s), "ncclBroadcast");
      });
    });
  }

  // send(buffer, count, dtype, peer)
  Napi::Value Send(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      uint64_t count = IntegerArgument(info[1], "count");
      ncclDataType_t type = TypeArgument(info[2]);
      int peer = PeerArgument(info[3], "peer");
      cuda::DeviceBuffer buffer = Buffer(info[0], "send buffer", count, ElementSize(type));
      CUdeviceptrPair ptrs{buffer.ptr, buffer.ptr};
      return Enqueue(info.Env(), "ncclSend", {buffer}, [ptrs, count, type, peer](const Table& t, ncclComm_t c, cudaStream_t s) {
        Check(t.ncclSend(ptrs.Send(), count, type, peer, c, s), "ncclSend");
      });
    });
  }

  // recv(buffer, count, dtype, peer)
  Napi::Value Recv(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      uint64_t count = IntegerArgument(info[1], "count");
      ncclDataType_t type = TypeArgument(info[2]);
      int peer = PeerArgument(info[3], "peer");
      cuda::DeviceBuffer buffer = Buffer(info[0], "receive buffer", count, ElementSize(type));
      CUdeviceptrPair ptrs{buffer.ptr, buffer.ptr};
      return Enqueue(info.Env(), "ncclRecv", {buffer}, [ptrs, count, type, peer](const Table& t, ncclComm_t c, cudaStream_t s) {
        Check(t.ncclRecv(ptrs.Recv(), count, type, peer, c, s), "ncclRecv");
      });
    });
  }

  Napi::Value GroupStart(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (closed_) throw comm_->AbortError().value_or(NativeError("ERR_NCCL_DESTROYED", "the NCCL communicator was destroyed"));
      group_depth_ += 1;
      comm_->Push(Job{JobKind::kGroupStart, nullptr, nullptr});
      return info.Env().Undefined();
    });
  }

  // Resolves when every operation since the matching groupStart() has completed.
  Napi::Value GroupEnd(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (group_depth_ == 0) throw InvalidArgument("groupEnd() without a matching groupStart()");
      group_depth_ -= 1;
      auto slot = std::make_shared<OpSlot>();
      if (closed_) slot->Fail(comm_->AbortError().value_or(NativeError("ERR_NCCL_DESTROYED", "the NCCL communicator was destroyed")));
      else comm_->Push(Job{JobKind::kGroupEnd, nullptr, slot});
      return cuda::Submit(info.Env(), std::make_unique<OpPending>(comm_, slot, "ncclGroupEnd"));
    });
  }

  // abort(reason?): fails every pending and later operation on this rank with ERR_NCCL_ABORTED
  // and aborts the NCCL communicator (its peers then fail with an NCCL error or a timeout).
  Napi::Value AbortComm(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      std::string reason = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "abort() was called";
      comm_->Abort(NativeError("ERR_NCCL_ABORTED", "the NCCL communicator was aborted: " + reason).with("call", "ncclCommAbort"));
      closed_ = true;
      return info.Env().Undefined();
    });
  }

  // destroy(): ncclCommDestroy after everything queued; resolves when done.
  Napi::Value DestroyComm(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      auto slot = std::make_shared<OpSlot>();
      comm_->Destroy(slot);
      closed_ = true;
      return cuda::Submit(info.Env(), std::make_unique<OpPending>(comm_, slot, "ncclCommDestroy"));
    });
  }

  // Device addresses as the pointers NCCL takes.
  struct CUdeviceptrPair {
    cuda::CUdeviceptr send;
    cuda::CUdeviceptr recv;
    const void* Send() const { return reinterpret_cast<const void*>(static_cast<uintptr_t>(send)); }
    void* Recv() const { return reinterpret_cast<void*>(static_cast<uintptr_t>(recv)); }
  };

  std::shared_ptr<Comm> comm_;
  Napi::ObjectReference ready_;
  bool closed_ = false;  // JS thread: abort() or destroy() was called
  int group_depth_ = 0;  // JS thread: open groups
};

Napi::Object StatusObject(Napi::Env env) {
  const LibraryStatus& status = Status();
  Napi::Object out = Napi::Object::New(env);
  out.Set("available", Napi::Boolean::New(env, status.available));
  if (!status.available) out.Set("reason", Napi::String::New(env, status.reason));
  out.Set("libraryPath", Napi::String::New(env, status.library_path));
  if (status.version != 0) out.Set("version", Napi::Number::New(env, status.version));
  return out;
}

Napi::Value UniqueId(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const Table& table = Library("ncclGetUniqueId");
    ncclUniqueId id;
    Check(table.ncclGetUniqueId(&id), "ncclGetUniqueId");
    auto out = Napi::Uint8Array::New(info.Env(), NCCL_UNIQUE_ID_BYTES);
    std::memcpy(out.Data(), id.internal, NCCL_UNIQUE_ID_BYTES);
    return out;
  });
}

}  // namespace

void RegisterNcclBinding(Napi::Env env, Napi::Object exports) {
  Napi::Object nccl = Napi::Object::New(env);
  nccl.Set("status", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value { return StatusObject(info.Env()); }));
  nccl.Set("uniqueId", Napi::Function::New(env, UniqueId));
  nccl.Set("Communicator", CommBinding::Define(env));
  exports.Set("nccl", nccl);
}

}  // namespace trellis::nccl
