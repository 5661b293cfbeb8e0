// Node-API face of channels. The fast path is synchronous with a short spin (a compiled graph's
// next message usually arrives within microseconds); longer waits go to a thread of the channel's
// own and settle a promise, so the event loop keeps serving other work meanwhile.
#include "channel/channel_binding.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "channel/channel.h"
#include "common/js_error.h"
#include "common/serial_executor.h"

namespace trellis::channel {
namespace {

// Microseconds a batch writer spins (yielding) for room before it sleeps.
constexpr int64_t kWriteSpinMicros = 50;

int64_t Milliseconds(const Napi::Value& value) {
  if (value.IsUndefined() || value.IsNull()) return -1;
  double number = value.As<Napi::Number>().DoubleValue();
  return std::isinf(number) || number < 0 ? -1 : static_cast<int64_t>(number);
}

NativeError Failure(WaitResult result, const std::string& name, const char* what) {
  if (result == WaitResult::kClosed) return NativeError("ERR_CHANNEL_CLOSED", std::string(what) + " on channel '" + name + "': the channel is closed");
  return NativeError("ERR_CHANNEL_TIMEOUT", std::string(what) + " on channel '" + name + "' timed out");
}

class ChannelBinding : public Napi::ObjectWrap<ChannelBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeChannel",
                       {
                           StaticMethod<&ChannelBinding::Create>("create"),
                           StaticMethod<&ChannelBinding::Destroy>("destroy"),
                           InstanceMethod<&ChannelBinding::TryWrite>("tryWrite"),
                           InstanceMethod<&ChannelBinding::WriteAsync>("writeAsync"),
                           InstanceMethod<&ChannelBinding::TryRead>("tryRead"),
                           InstanceMethod<&ChannelBinding::TryReadInto>("tryReadInto"),
                           InstanceMethod<&ChannelBinding::ReadAsync>("readAsync"),
                           InstanceMethod<&ChannelBinding::Close>("close"),
                           InstanceMethod<&ChannelBinding::Release>("release"),
                           InstanceMethod<&ChannelBinding::Finish>("finish"),
                           InstanceAccessor<&ChannelBinding::Finished>("finished"),
                           InstanceAccessor<&ChannelBinding::Written>("written"),
                           InstanceAccessor<&ChannelBinding::Read>("read"),
                           InstanceAccessor<&ChannelBinding::Closed>("closed"),
                       });
  }

  // new NativeChannel(name, reader): reader -1 opens the writing end.
  explicit ChannelBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ChannelBinding>(info) {
    Guarded(info.Env(), [&] {
      name_ = info[0].ToString().Utf8Value();
      channel_ = std::make_shared<Channel>(name_, info[1].As<Napi::Number>().Int32Value());
      // A thread blocked in a wait returns on close; the channel is unusable afterwards anyway.
      executor_ = std::make_unique<SerialExecutor>(info.Env(), "trellis-channel", [this] { Ref(); }, [this] { Unref(); },
                                                   [this] { if (channel_) channel_->Close(); });
      return 0;
    });
  }

  ~ChannelBinding() override { StopExecutor(); }

 private:
  Channel& channel() {
    if (!channel_) throw NativeError("ERR_CHANNEL_CLOSED", "channel '" + name_ + "' was released in this process");
    return *channel_;
  }

  static Napi::Value Create(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Channel::Create(info[0].ToString().Utf8Value(), info[1].As<Napi::Number>().Uint32Value(), info[2].As<Napi::Number>().Uint32Value(),
                      static_cast<uint64_t>(info[3].As<Napi::Number>().Int64Value()));
      return info.Env().Undefined();
    });
  }

  static Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Channel::Destroy(info[0].ToString().Utf8Value());
    return info.Env().Undefined();
  }

  static std::pair<const uint8_t*, uint64_t> Bytes(const Napi::Value& value) {
    if (!value.IsTypedArray()) throw InvalidArgument("channel messages are Uint8Arrays");
    auto array = value.As<Napi::TypedArray>();
    return {static_cast<const uint8_t*>(array.ArrayBuffer().Data()) + array.ByteOffset(), array.ByteLength()};
  }

  // tryWrite(bytes, spinMicros, waitMillis): true when written; false when the ring stayed full.
  Napi::Value TryWrite(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      auto [data, length] = Bytes(info[0]);
      Channel& c = channel();
      WaitResult result = c.WaitWritable(info[2].IsNumber() ? info[2].As<Napi::Number>().Int64Value() : 0,
                                         info[1].IsNumber() ? info[1].As<Napi::Number>().Int64Value() : 0);
      if (result == WaitResult::kClosed) throw Failure(result, name_, "write");
      if (result != WaitResult::kReady) return Napi::Boolean::New(info.Env(), false);
      c.Write(data, length);
      return Napi::Boolean::New(info.Env(), true);
    });
  }

  // writeAsync(bytes | bytes[], timeoutMs): on the channel's thread, waits for room (up to timeoutMs
  // for each message) and writes, in order; stops at the first failure (how many were written
  // then shows in `written`). A list lets a writer hand over a whole backlog at once, so that the
  // backlog drains while the JS thread does other things, e.g. waits for results.
  Napi::Value WriteAsync(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      std::vector<std::pair<const uint8_t*, uint64_t>> messages;
      if (info[0].IsArray()) {
        auto list = info[0].As<Napi::Array>();
        messages.reserve(list.Length());
        for (uint32_t i = 0; i < list.Length(); ++i) messages.push_back(Bytes(list.Get(i)));
      } else {
        messages.push_back(Bytes(info[0]));
      }
      int64_t timeout = Milliseconds(info[1]);
      auto c = channel_;
      channel();
      std::string name = name_;
      return executor_->Enqueue(
          info.Env(),
          [c, messages = std::move(messages), timeout, name] {
            // While room comes soon (a reader draining the ring), spin for it rather than sleep:
            // a sleeping writer costs the reader a wake-up call per message and itself a wake.
            int64_t spin_us = kWriteSpinMicros;
            for (const auto& [data, length] : messages) {
              auto started = std::chrono::steady_clock::now();
              WaitResult result = c->WaitWritable(timeout, spin_us);
              if (result != WaitResult::kReady) throw Failure(result, name, "write");
              c->Write(data, length);
              auto waited = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
              spin_us = waited < 4 * kWriteSpinMicros ? kWriteSpinMicros : 0;
            }
          },
          nullptr, {info[0]});
    });
  }

  // tryRead(spinMicros, waitMillis): the next message (a copy), or null when none arrived in time.
  // Waiting here blocks the JS thread: callers keep waitMillis short and yield in between.
  Napi::Value TryRead(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Channel& c = channel();
      WaitResult result = c.WaitReadable(info[1].IsNumber() ? info[1].As<Napi::Number>().Int64Value() : 0,
                                         info[0].IsNumber() ? info[0].As<Napi::Number>().Int64Value() : 0);
      if (result == WaitResult::kClosed) throw Failure(result, name_, "read");
      if (result != WaitResult::kReady) return info.Env().Null();
      return TakeMessage(info.Env(), c);
    });
  }

  // tryReadInto(inbox, spinMicros, waitMillis): like tryRead, but a message that fits `inbox` (a
  // Uint8Array the caller reuses) is copied there and its length returned: no buffer is made, which
  // was most of a small message's cost. A larger one comes back as a copy of its own.
  Napi::Value TryReadInto(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Channel& c = channel();
      if (!info[0].IsTypedArray()) throw InvalidArgument("tryReadInto needs a Uint8Array inbox");
      auto inbox = info[0].As<Napi::TypedArray>();
      WaitResult result = c.WaitReadable(info[2].IsNumber() ? info[2].As<Napi::Number>().Int64Value() : 0,
                                         info[1].IsNumber() ? info[1].As<Napi::Number>().Int64Value() : 0);
      if (result == WaitResult::kClosed) throw Failure(result, name_, "read");
      if (result != WaitResult::kReady) return info.Env().Null();
      uint64_t length = 0;
      const uint8_t* data = c.Peek(&length);
      if (length > inbox.ByteLength()) return TakeMessage(info.Env(), c);
      if (length > 0) std::memcpy(static_cast<uint8_t*>(inbox.ArrayBuffer().Data()) + inbox.ByteOffset(), data, length);
      c.Advance();
      return Napi::Number::New(info.Env(), static_cast<double>(length));
    });
  }

  static Napi::Value TakeMessage(Napi::Env env, Channel& c) {
    uint64_t length = 0;
    const uint8_t* data = c.Peek(&length);
    Napi::Buffer<uint8_t> copy = Napi::Buffer<uint8_t>::Copy(env, data, length);
    c.Advance();
    return copy;
  }

  // readAsync(timeoutMs): waits for the next message on the channel's thread.
  Napi::Value ReadAsync(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      int64_t timeout = Milliseconds(info[0]);
      auto c = channel_;
      channel();
      std::string name = name_;
      return executor_->Enqueue(
          info.Env(),
          [c, timeout, name] {
            WaitResult result = c->WaitReadable(timeout, 0);
            if (result != WaitResult::kReady) throw Failure(result, name, "read");
          },
          [c](Napi::Env env) { return TakeMessage(env, *c); });
    });
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (channel_) channel_->Close();
    return info.Env().Undefined();
  }

  // Unmaps this process's end; a waiting operation fails.
  Napi::Value Release(const Napi::CallbackInfo& info) {
    StopExecutor();
    channel_.reset();
    return info.Env().Undefined();
  }

  void StopExecutor() {
    if (!executor_) return;
    executor_->Stop();
    executor_.reset();
  }

  // finish(count): this reader is done with its first `count` messages (see Channel::Finish).
  Napi::Value Finish(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      channel().Finish(static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value()));
      return info.Env().Undefined();
    });
  }

  Napi::Value Finished(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), channel_ ? static_cast<double>(channel_->finished()) : 0); }
  Napi::Value Written(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), channel_ ? static_cast<double>(channel_->written()) : 0); }
  Napi::Value Read(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), channel_ ? static_cast<double>(channel_->read()) : 0); }
  Napi::Value Closed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !channel_ || channel_->closed()); }

  std::string name_;
  std::shared_ptr<Channel> channel_;
  std::unique_ptr<SerialExecutor> executor_;
};

}  // namespace

void RegisterChannelBinding(Napi::Env env, Napi::Object exports) { exports.Set("NativeChannel", ChannelBinding::Define(env)); }

}  // namespace trellis::channel
