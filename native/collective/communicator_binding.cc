// Node-API face of the shared-memory communicator. Operations run in order on one thread per
// communicator (a collective blocks until its peers arrive) and resolve promises on the JS thread.
#include "collective/communicator_binding.h"

#include <memory>

#include "collective/shm_communicator.h"
#include "common/js_error.h"
#include "common/serial_executor.h"

namespace trellis::collective {
namespace {

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
      // Pending operations keep this object (and the process) alive.
      // Work still waiting on peers would wait forever once this rank stops (destroyed, or its
      // process exiting): the group is aborted, as ncclCommAbort does.
      executor_ = std::make_unique<SerialExecutor>(info.Env(), "trellis-communicator", [this] { Ref(); }, [this] { Unref(); }, [this] {
        if (communicator_) communicator_->Abort("a rank destroyed its communicator with work pending");
      });
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
    if (!communicator_ || stopped_) throw NativeError("ERR_COMMUNICATOR_DESTROYED", "the communicator was destroyed");
    return *communicator_;
  }

  Napi::Value Enqueue(Napi::Env env, std::function<void()> work, std::initializer_list<Napi::Value> buffers) {
    communicator();
    return executor_->Enqueue(env, std::move(work), nullptr, std::vector<Napi::Value>(buffers));
  }

  void Stop() {
    if (stopped_ || !executor_) return;
    stopped_ = true;
    executor_->Stop();
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
  std::unique_ptr<SerialExecutor> executor_;
  bool stopped_ = false;
};

}  // namespace

void RegisterCommunicatorBinding(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeShmCommunicator", CommunicatorBinding::Define(env));
}

}  // namespace trellis::collective
