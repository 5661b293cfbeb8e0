// Node-API face of connection rings: a driver makes one per worker and hands the worker its
// descriptor at spawn; each side writes whole batches of frames and takes what arrived.
#include "channel/connection_ring_binding.h"

#include <cmath>
#include <string>

#include "common/js_error.h"

namespace trellis::channel {
namespace {

Napi::FunctionReference& Constructor(Napi::Env env) { return env.GetInstanceData<AddonData>()->connection_ring_constructor; }

class ConnectionRingBinding : public Napi::ObjectWrap<ConnectionRingBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeConnectionRing",
                       {
                           StaticMethod<&ConnectionRingBinding::Create>("create"),
                           StaticMethod<&ConnectionRingBinding::Open>("open"),
                           InstanceMethod<&ConnectionRingBinding::Write>("write"),
                           InstanceMethod<&ConnectionRingBinding::Take>("take"),
                           InstanceMethod<&ConnectionRingBinding::MarkSleeping>("markSleeping"),
                           InstanceMethod<&ConnectionRingBinding::MarkAwake>("markAwake"),
                           InstanceMethod<&ConnectionRingBinding::CloseFd>("closeFd"),
                           InstanceMethod<&ConnectionRingBinding::Close>("close"),
                           InstanceAccessor<&ConnectionRingBinding::Fd>("fd"),
                           InstanceAccessor<&ConnectionRingBinding::Capacity>("capacity"),
                       });
  }

  explicit ConnectionRingBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ConnectionRingBinding>(info) {}

  std::shared_ptr<ConnectionRing> ring() const { return ring_; }

 private:
  static Napi::Object Wrap(Napi::Env env, ConnectionRing ring) {
    Napi::Object object = Constructor(env).New({});
    Unwrap(object)->ring_ = std::make_shared<ConnectionRing>(std::move(ring));
    return object;
  }

  // create(capacity): this process's end of a new ring; `fd` is the peer's way in.
  static Napi::Value Create(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (!info[0].IsNumber()) throw InvalidArgument("ConnectionRing.create expects a capacity in bytes");
      double capacity = info[0].As<Napi::Number>().DoubleValue();
      if (!(capacity >= 0) || std::floor(capacity) != capacity) throw InvalidArgument("a connection ring's capacity must be a whole number of bytes");
      return Wrap(info.Env(), ConnectionRing::Create(static_cast<uint64_t>(capacity)));
    });
  }

  // open(fd): the other end of a ring made by create() in another process.
  static Napi::Value Open(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (!info[0].IsNumber()) throw InvalidArgument("ConnectionRing.open expects a file descriptor");
      return Wrap(info.Env(), ConnectionRing::Open(info[0].As<Napi::Number>().Int32Value()));
    });
  }

  ConnectionRing& ring_or_throw() {
    if (!ring_) throw NativeError("ERR_CHANNEL_CLOSED", "the connection ring is closed");
    return *ring_;
  }

  // write(bytes): 0 written, 1 written and the reader must be rung, 2 no room (send it another way).
  Napi::Value Write(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (!info[0].IsTypedArray()) throw InvalidArgument("ConnectionRing.write expects a Uint8Array");
      auto bytes = info[0].As<Napi::Uint8Array>();
      auto result = ring_or_throw().Write(bytes.Data(), bytes.ByteLength());
      int code = result == ConnectionRing::WriteResult::kWritten ? 0 : result == ConnectionRing::WriteResult::kWrittenRing ? 1 : 2;
      return Napi::Number::New(info.Env(), code);
    });
  }

  // take(): a Buffer of every byte that arrived, or undefined when none did.
  Napi::Value Take(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      ConnectionRing& ring = ring_or_throw();
      uint64_t length = ring.Available();
      if (length == 0) return info.Env().Undefined();
      Napi::Buffer<uint8_t> buffer = Napi::Buffer<uint8_t>::New(info.Env(), length);
      ring.Take(buffer.Data(), length);
      return buffer;
    });
  }

  // What the event loop does around its poll (native/loop), for tests to drive by hand.
  Napi::Value MarkSleeping(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value { return Napi::Boolean::New(info.Env(), ring_or_throw().MarkSleeping()); });
  }
  Napi::Value MarkAwake(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      ring_or_throw().MarkAwake();
      return info.Env().Undefined();
    });
  }

  Napi::Value CloseFd(const Napi::CallbackInfo& info) {
    if (ring_) ring_->CloseFd();
    return info.Env().Undefined();
  }

  // The mapping goes once the event loop lets go of the ring too.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    ring_.reset();
    return info.Env().Undefined();
  }

  Napi::Value Fd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), ring_ ? ring_->fd() : -1); }
  Napi::Value Capacity(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), ring_ ? static_cast<double>(ring_->capacity()) : 0);
  }

  std::shared_ptr<ConnectionRing> ring_;
};

}  // namespace

std::shared_ptr<ConnectionRing> RingOf(const Napi::Value& value) {
  if (!value.IsObject() || !value.As<Napi::Object>().InstanceOf(Constructor(value.Env()).Value())) {
    throw InvalidArgument("expected a connection ring");
  }
  auto ring = ConnectionRingBinding::Unwrap(value.As<Napi::Object>())->ring();
  if (!ring) throw NativeError("ERR_CHANNEL_CLOSED", "the connection ring is closed");
  return ring;
}

void RegisterConnectionRingBinding(Napi::Env env, Napi::Object exports) {
  Napi::Function cls = ConnectionRingBinding::Define(env);
  Constructor(env) = Napi::Persistent(cls);
  exports.Set("ConnectionRing", cls);
}

}  // namespace trellis::channel
