// Node-API face of the shared-memory communicator. Operations run in order on one thread per
// communicator (a collective blocks until its peers arrive) and resolve promises on the JS thread.
#include "collective/communicator_binding.h"

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "collective/shm_communicator.h"
#include "common/js_error.h"

namespace trellis::collective {
namespace {

struct Job {
  std::function<void()> work;
  Napi::Promise::Deferred deferred;
  std::vector<Napi::Reference<Napi::Value>> keep;  // buffers the work touches, alive until it ends
  std::unique_ptr<NativeError> error;
};

struct Span {
  uint8_t* data;
  uint64_t bytes;
};

Span SpanArgument(const Napi::Value& value, const char* what) {
  if (!value.IsTypedArray()) throw InvalidArgument(std::string(what) + " must be a TypedArray");
  auto array = value.As<Napi::TypedArray>();
  return {static_cast<uint8_t*>(array.ArrayBuffer().Data()) + array.ByteOffset(), array.ByteLength()};
}

DataType TypeArgument(const Napi::Value& value) {
  static const char* names[] = {"f32", "f16", "bf16", "i8", "u8", "i32", "i64"};
  std::string name = value.ToString().Utf8Value();
  for (uint32_t i = 0; i < 7; ++i) {
    if (name == names[i]) return static_cast<DataType>(i);
  }
  throw InvalidArgument("dtype '" + name + "' is not one of f32, f16, bf16, i8, u8, i32, i64");
}

ReduceOp OpArgument(const Napi::Value& value) {
  static const char* names[] = {"sum", "prod", "min", "max", "avg"};
  std::string name = value.IsUndefined() ? "sum" : value.ToString().Utf8Value();
  for (uint32_t i = 0; i < 5; ++i) {
    if (name == names[i]) return static_cast<ReduceOp>(i);
  }
  throw InvalidArgument("reduce op '" + name + "' is not one of sum, prod, min, max, avg");
}

int IntArgument(const Napi::Value& value, const char* what) {
  if (!value.IsNumber()) throw InvalidArgument(std::string(what) + " must be a number");
  return value.As<Napi::Number>().Int32Value();
}

class CommunicatorBinding : public Napi::ObjectWrap<CommunicatorBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeShmCommunicator",
                       {
                           StaticMethod<&CommunicatorBinding::CreateSegment>("createSegment"),
                           StaticMethod<&CommunicatorBinding::UnlinkSegment>("unlinkSegment"),
                           InstanceMethod<&CommunicatorBinding::AllReduce>("allreduce"),
                           InstanceMethod<&CommunicatorBinding::AllGather>("allgather"),
                           InstanceMethod<&CommunicatorBinding::ReduceScatter>("reducescatter"),
                           InstanceMethod<&CommunicatorBinding::Broadcast>("broadcast"),
                           InstanceMethod<&CommunicatorBinding::Transfer>("transfer"),
                           InstanceMethod<&CommunicatorBinding::Barrier>("barrier"),
                           InstanceMethod<&CommunicatorBinding::Abort>("abort"),
                           InstanceMethod<&CommunicatorBinding::Destroy>("destroy"),
                       });
  }

  // new NativeShmCommunicator(name, rank, size, timeoutMs)
  explicit CommunicatorBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CommunicatorBinding>(info) {
    Guarded(info.Env(), [&] {
      std::string name = info[0].ToString().Utf8Value();
      communicator_ = std::make_shared<ShmCommunicator>(name, IntArgument(info[1], "rank"), IntArgument(info[2], "size"),
                                                        info[3].IsNumber() ? info[3].As<Napi::Number>().Int64Value() : 60000);
      tsfn_ = Napi::ThreadSafeFunction::New(info.Env(), Napi::Function::New(info.Env(), [](const Napi::CallbackInfo&) {}), "trellis-communicator", 0, 1);
      tsfn_.Unref(info.Env());
      thread_ = std::thread([this] { Run(); });
      return 0;
    });
  }

  ~CommunicatorBinding() override { Stop(); }

 private:
  static Napi::Value CreateSegment(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      ShmCommunicator::CreateSegment(info[0].ToString().Utf8Value(), IntArgument(info[1], "size"),
                                     static_cast<uint64_t>(info[2].As<Napi::Number>().Int64Value()));
      return info.Env().Undefined();
    });
  }

  static Napi::Value UnlinkSegment(const Napi::CallbackInfo& info) {
    ShmCommunicator::UnlinkSegment(info[0].ToString().Utf8Value());
    return info.Env().Undefined();
  }

  ShmCommunicator& communicator() {
    if (!communicator_ || stopping_) throw NativeError("ERR_COMMUNICATOR_DESTROYED", "the communicator was destroyed");
    return *communicator_;
  }

  // Queues `work` on the communicator's thread; the promise settles when it has run.
  Napi::Value Enqueue(Napi::Env env, std::function<void()> work, std::initializer_list<Napi::Value> buffers) {
    communicator();
    auto job = std::make_shared<Job>(Job{std::move(work), Napi::Promise::Deferred::New(env), {}, nullptr});
    for (const auto& buffer : buffers) job->keep.push_back(Napi::Persistent(buffer));
    Napi::Promise promise = job->deferred.Promise();
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (pending_++ == 0) {
        // Keep the process and this object alive while work is queued.
        tsfn_.Ref(env);
        Ref();
      }
      queue_.push_back(job);
    }
    ready_.notify_one();
    return promise;
  }

  void Run() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = queue_.front();
        queue_.pop_front();
      }
      try {
        job->work();
      } catch (const NativeError& error) {
        job->error = std::make_unique<NativeError>(error);
      } catch (const std::exception& error) {
        job->error = std::make_unique<NativeError>("ERR_COMMUNICATOR", error.what());
      }
      tsfn_.BlockingCall([this, job](Napi::Env env, Napi::Function) {
        if (job->error) job->deferred.Reject(ToJsError(env, *job->error).Value());
        else job->deferred.Resolve(env.Undefined());
        job->keep.clear();
        bool idle;
        {
          std::lock_guard<std::mutex> guard(mutex_);
          idle = --pending_ == 0;
        }
        if (idle) {
          tsfn_.Unref(env);
          Unref();
        }
      });
    }
  }

  void Stop() {
    bool busy;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (stopped_) return;
      stopping_ = true;
      stopped_ = true;
      busy = pending_ > 0;
    }
    // Work still waiting on peers would wait forever: abort the group (as ncclCommAbort does).
    if (busy && communicator_) communicator_->Abort("a rank destroyed its communicator with work pending");
    ready_.notify_all();
    if (thread_.joinable()) thread_.join();
    tsfn_.Release();
  }

  Napi::Value AllReduce(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Span span = SpanArgument(info[0], "tensor");
      DataType type = TypeArgument(info[1]);
      ReduceOp op = OpArgument(info[2]);
      uint64_t count = span.bytes / ElementSize(type);
      auto c = communicator_;
      return Enqueue(info.Env(), [c, span, count, type, op] { c->AllReduce(span.data, count, type, op); }, {info[0]});
    });
  }

  Napi::Value AllGather(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Span input = SpanArgument(info[0], "input");
      Span output = SpanArgument(info[1], "output");
      if (output.bytes != input.bytes * communicator().size()) {
        throw InvalidArgument("allgather output holds " + std::to_string(output.bytes) + " bytes; it needs size x input = " +
                              std::to_string(input.bytes * communicator().size()));
      }
      auto c = communicator_;
      return Enqueue(info.Env(), [c, input, output] { c->AllGather(input.data, output.data, input.bytes); }, {info[0], info[1]});
    });
  }

  Napi::Value ReduceScatter(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Span input = SpanArgument(info[0], "input");
      Span output = SpanArgument(info[1], "output");
      DataType type = TypeArgument(info[2]);
      ReduceOp op = OpArgument(info[3]);
      if (input.bytes != output.bytes * communicator().size()) {
        throw InvalidArgument("reducescatter input holds " + std::to_string(input.bytes) + " bytes; it needs size x output = " +
                              std::to_string(output.bytes * communicator().size()));
      }
      uint64_t count = output.bytes / ElementSize(type);
      auto c = communicator_;
      return Enqueue(info.Env(), [c, input, output, count, type, op] { c->ReduceScatter(input.data, output.data, count, type, op); },
                     {info[0], info[1]});
    });
  }

  Napi::Value Broadcast(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Span span = SpanArgument(info[0], "tensor");
      int root = IntArgument(info[1], "root");
      auto c = communicator_;
      return Enqueue(info.Env(), [c, span, root] { c->Broadcast(span.data, span.bytes, root); }, {info[0]});
    });
  }

  // transfer([[isSend, peer, typedArray], ...]): a group of sends and receives completing together.
  Napi::Value Transfer(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (!info[0].IsArray()) throw InvalidArgument("transfer expects an array of [send, peer, tensor]");
      Napi::Array list = info[0].As<Napi::Array>();
      auto transfers = std::make_shared<std::vector<PeerTransfer>>();
      for (uint32_t i = 0; i < list.Length(); ++i) {
        Napi::Array entry = list.Get(i).As<Napi::Array>();
        Span span = SpanArgument(entry.Get(2u), "tensor");
        transfers->push_back(PeerTransfer{entry.Get(0u).ToBoolean().Value(), IntArgument(entry.Get(1u), "peer"), span.data, span.bytes, 0});
      }
      auto c = communicator_;
      return Enqueue(info.Env(), [c, transfers] { c->Transfer(*transfers); }, {info[0]});
    });
  }

  Napi::Value Barrier(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      auto c = communicator_;
      return Enqueue(info.Env(), [c] { c->Barrier(); }, {});
    });
  }

  Napi::Value Abort(const Napi::CallbackInfo& info) {
    if (communicator_) communicator_->Abort(info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "aborted by a rank");
    return info.Env().Undefined();
  }

  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Stop();
    return info.Env().Undefined();
  }

  std::shared_ptr<ShmCommunicator> communicator_;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Job>> queue_;
  size_t pending_ = 0;
  bool stopping_ = false;
  bool stopped_ = false;
  Napi::ThreadSafeFunction tsfn_;
};

}  // namespace

void RegisterCommunicatorBinding(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeShmCommunicator", CommunicatorBinding::Define(env));
}

}  // namespace trellis::collective
