// Node-API face of the object store. Views are slices of one external ArrayBuffer over the
// segment's data region; each view's pin is released by JS (explicitly or when it is collected).
#include "store/store_binding.h"

#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "common/js_error.h"
#include "store/store.h"

namespace trellis::store {
namespace {

// Node 20 creates external ArrayBuffers through Buffer, which holds at most 2^32 bytes.
constexpr uint64_t kMaxWindow = (1ull << 32) - 4096;

ObjectId IdArgument(const Napi::Value& value) {
  if (!value.IsString()) throw InvalidArgument("object id must be a 40-character hex string");
  return ObjectId::FromHex(value.As<Napi::String>().Utf8Value());
}

uint64_t SizeArgument(const Napi::Value& value, const char* what) {
  if (!value.IsNumber()) throw InvalidArgument(std::string(what) + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= 0) || std::floor(number) != number || number > 9007199254740991.0) {
    throw InvalidArgument(std::string(what) + " must be a non-negative integer, got " + value.ToString().Utf8Value());
  }
  return static_cast<uint64_t>(number);
}

struct Bytes {
  const uint8_t* data = nullptr;
  uint64_t length = 0;
};

Bytes BytesArgument(const Napi::Value& value, const char* what) {
  if (value.IsTypedArray()) {
    auto array = value.As<Napi::TypedArray>();
    auto buffer = array.ArrayBuffer();
    return {static_cast<const uint8_t*>(buffer.Data()) + array.ByteOffset(), array.ByteLength()};
  }
  if (value.IsDataView()) {
    auto view = value.As<Napi::DataView>();
    return {static_cast<const uint8_t*>(view.ArrayBuffer().Data()) + view.ByteOffset(), view.ByteLength()};
  }
  if (value.IsArrayBuffer()) {
    auto buffer = value.As<Napi::ArrayBuffer>();
    return {static_cast<const uint8_t*>(buffer.Data()), buffer.ByteLength()};
  }
  throw InvalidArgument(std::string(what) + " must be a TypedArray, DataView or ArrayBuffer");
}

class StoreBinding : public Napi::ObjectWrap<StoreBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeObjectStore",
                       {
                           InstanceMethod<&StoreBinding::CreateObject>("create"),
                           InstanceMethod<&StoreBinding::Write>("write"),
                           InstanceMethod<&StoreBinding::Seal>("seal"),
                           InstanceMethod<&StoreBinding::Abort>("abort"),
                           InstanceMethod<&StoreBinding::Put>("put"),
                           InstanceMethod<&StoreBinding::Get>("get"),
                           InstanceMethod<&StoreBinding::Release>("release"),
                           InstanceMethod<&StoreBinding::Region>("region"),
                           InstanceAccessor<&StoreBinding::DataSize>("dataSize"),
                           InstanceMethod<&StoreBinding::Delete>("delete"),
                           InstanceMethod<&StoreBinding::State>("state"),
                           InstanceMethod<&StoreBinding::Stats>("stats"),
                           InstanceMethod<&StoreBinding::Pinned>("pinned"),
                           InstanceMethod<&StoreBinding::Reap>("reapDeadProcesses"),
                           InstanceMethod<&StoreBinding::WatchSeals>("watchSeals"),
                           InstanceMethod<&StoreBinding::UnwatchSeals>("unwatchSeals"),
                           InstanceMethod<&StoreBinding::Close>("close"),
                           InstanceMethod<&StoreBinding::SetCrashPoint>("setCrashPoint"),
                           InstanceMethod<&StoreBinding::HoldLockForever>("holdLockForever"),
                           InstanceAccessor<&StoreBinding::Name>("name"),
                           InstanceAccessor<&StoreBinding::SegmentSize>("segmentSize"),
                       });
  }

  explicit StoreBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StoreBinding>(info) {
    Napi::Env env = info.Env();
    Guarded(env, [&] {
      if (!info[0].IsObject()) throw InvalidArgument("NativeObjectStore expects an options object");
      Napi::Object options = info[0].As<Napi::Object>();
      std::string mode = options.Get("mode").ToString().Utf8Value();
      std::string name = options.Get("name").ToString().Utf8Value();
      if (mode == "create") {
        CreateOptions create;
        create.name = name;
        if (options.Has("capacity") && !options.Get("capacity").IsUndefined()) create.capacity = SizeArgument(options.Get("capacity"), "capacity");
        if (options.Has("maxObjects") && !options.Get("maxObjects").IsUndefined()) {
          create.max_objects = static_cast<uint32_t>(SizeArgument(options.Get("maxObjects"), "maxObjects"));
        }
        if (options.Has("spillDirectory") && options.Get("spillDirectory").IsString()) {
          create.spill_directory = options.Get("spillDirectory").As<Napi::String>().Utf8Value();
        }
        if (options.Has("prefaultWindow") && !options.Get("prefaultWindow").IsUndefined()) {
          create.prefault_window = SizeArgument(options.Get("prefaultWindow"), "prefaultWindow");
        }
        store_ = Store::Create(create);
      } else if (mode == "attach") {
        store_ = Store::Attach(name);
      } else {
        throw InvalidArgument("mode must be 'create' or 'attach'");
      }
      return 0;
    });
  }

  ~StoreBinding() override { StopWatcher(); }

 private:
  Store& store() {
    if (!store_) throw NativeError("ERR_STORE_CLOSED", "object store is closed");
    return *store_;
  }

  // [offset in the data region, size, metadata copy | null, entry, generation]: JS makes the view
  // as a slice of the one region buffer, and names the pin by (entry, generation) to release it.
  Napi::Array Describe(Napi::Env env, const PinnedObject& object) {
    Napi::Array result = Napi::Array::New(env, 5);
    result.Set(0u, Napi::Number::New(env, static_cast<double>(object.data - store_->data_base())));
    result.Set(1u, Napi::Number::New(env, static_cast<double>(object.data_size)));
    if (object.metadata_size > 0) {
      result.Set(2u, Napi::Buffer<uint8_t>::Copy(env, object.metadata, object.metadata_size));
    } else {
      result.Set(2u, env.Null());
    }
    result.Set(3u, Napi::Number::New(env, object.entry));
    result.Set(4u, Napi::Number::New(env, object.generation));
    return result;
  }

  // region(start, length): an external ArrayBuffer over [start, start + length) of the data
  // region. JS asks for a few overlapping windows (Node 20 caps one buffer at 4 GiB) and slices
  // views from them: creating an external buffer per object would make V8 count its bytes as
  // fresh allocation and collect garbage after every large get. Each buffer keeps the mapping alive.
  Napi::Value Region(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      Store& s = store();
      uint64_t start = SizeArgument(info[0], "start");
      uint64_t length = SizeArgument(info[1], "length");
      if (start > s.data_size() || length > s.data_size() - start) {
        throw NativeError("ERR_OUT_OF_RANGE", "region window [" + std::to_string(start) + ", +" + std::to_string(length) +
                                                  ") is outside the data region of " + std::to_string(s.data_size()) + " bytes");
      }
      if (length > kMaxWindow) {
        throw NativeError("ERR_OUT_OF_RANGE", "a view window of " + std::to_string(length) + " bytes exceeds this Node.js's buffer limit");
      }
      auto* keep = new std::shared_ptr<Store>(store_);
      return Napi::ArrayBuffer::New(
          info.Env(), s.data_base() + start, length, [](Napi::Env, void*, std::shared_ptr<Store>* held) { delete held; }, keep);
    });
  }

  Napi::Value CreateObject(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      ObjectId id = IdArgument(info[0]);
      uint64_t size = SizeArgument(info[1], "size");
      Bytes metadata;
      if (info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNull()) metadata = BytesArgument(info[2], "metadata");
      PinnedObject object = store().Create(id, size, metadata.data, metadata.length);
      return Describe(info.Env(), object);
    });
  }

  Napi::Value Write(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      ObjectId id = IdArgument(info[0]);
      Bytes bytes = BytesArgument(info[1], "bytes");
      uint64_t offset = info.Length() > 2 && !info[2].IsUndefined() ? SizeArgument(info[2], "offset") : 0;
      store().Write(id, offset, bytes.data, bytes.length);
      return info.Env().Undefined();
    });
  }

  Napi::Value Seal(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      store().Seal(IdArgument(info[0]));
      return info.Env().Undefined();
    });
  }

  Napi::Value Abort(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      store().Abort(IdArgument(info[0]));
      return info.Env().Undefined();
    });
  }

  Napi::Value Put(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      ObjectId id = IdArgument(info[0]);
      Bytes data = BytesArgument(info[1], "data");
      Bytes metadata;
      if (info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNull()) metadata = BytesArgument(info[2], "metadata");
      store().Put(id, data.data, data.length, metadata.data, metadata.length);
      return info.Env().Undefined();
    });
  }

  // Returns [ArrayBuffer, metadata | null, token], or 0 when absent, 1 when not sealed yet.
  Napi::Value Get(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      ObjectId id = IdArgument(info[0]);
      PinnedObject object;
      GetStatus status = store().TryGet(id, &object);
      if (status == GetStatus::kAbsent) return Napi::Number::New(info.Env(), 0);
      if (status == GetStatus::kNotReady) return Napi::Number::New(info.Env(), 1);
      return Describe(info.Env(), object);
    });
  }

  // release(entry, generation): drops one pin this process holds.
  Napi::Value Release(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (!store_) return info.Env().Undefined();  // closing dropped every pin already
      store_->Release(static_cast<uint32_t>(SizeArgument(info[0], "entry")), static_cast<uint32_t>(SizeArgument(info[1], "generation")));
      return info.Env().Undefined();
    });
  }

  Napi::Value Delete(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      store().Delete(IdArgument(info[0]));
      return info.Env().Undefined();
    });
  }

  Napi::Value State(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      return Napi::String::New(info.Env(), store().StateOf(IdArgument(info[0])));
    });
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      StoreStats stats = store().Stats();
      Napi::Env env = info.Env();
      Napi::Object out = Napi::Object::New(env);
      auto set = [&](const char* key, uint64_t value) { out.Set(key, Napi::Number::New(env, static_cast<double>(value))); };
      set("segmentSize", stats.capacity);
      set("capacity", stats.data_capacity);
      set("bytesInUse", stats.bytes_in_use);
      set("objectCount", stats.object_count);
      set("maxObjects", stats.max_objects);
      set("pinnedObjects", stats.pinned_objects);
      set("spilledObjects", stats.spilled_objects);
      set("spilledBytes", stats.spilled_bytes);
      set("totalSpilledBytes", stats.total_spilled_bytes);
      set("totalRestoredBytes", stats.total_restored_bytes);
      set("totalSpilledObjects", stats.total_spilled_objects);
      set("totalRestoredObjects", stats.total_restored_objects);
      set("recoveries", stats.recoveries);
      set("prefaultedBytes", stats.prefaulted_bytes);
      set("attachedProcesses", stats.attached_processes);
      return out;
    });
  }

  Napi::Value Pinned(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      std::vector<PinnedEntry> pinned = store().Pinned();
      Napi::Env env = info.Env();
      Napi::Array out = Napi::Array::New(env, pinned.size());
      for (size_t i = 0; i < pinned.size(); i++) {
        const PinnedEntry& entry = pinned[i];
        Napi::Object object = Napi::Object::New(env);
        object.Set("objectId", Napi::String::New(env, entry.id.ToHex()));
        object.Set("state", Napi::String::New(env, entry.state));
        object.Set("deleted", Napi::Boolean::New(env, entry.deleted));
        object.Set("size", Napi::Number::New(env, static_cast<double>(entry.size)));
        Napi::Array holders = Napi::Array::New(env, entry.holders.size());
        for (size_t h = 0; h < entry.holders.size(); h++) {
          Napi::Object holder = Napi::Object::New(env);
          holder.Set("pid", Napi::Number::New(env, entry.holders[h].pid));
          holder.Set("pins", Napi::Number::New(env, entry.holders[h].count));
          holders.Set(h, holder);
        }
        object.Set("holders", holders);
        out.Set(i, object);
      }
      return out;
    });
  }

  Napi::Value Reap(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      return Napi::Number::New(info.Env(), store().ReapDeadProcesses());
    });
  }

  // watchSeals(callback): a native thread waits on the segment's seal futex and calls back on the
  // JS thread (coalesced) whenever anything is sealed, restored or deleted, so that pending gets
  // re-check without occupying libuv's thread pool.
  Napi::Value WatchSeals(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      if (!info[0].IsFunction()) throw InvalidArgument("watchSeals expects a callback");
      Store& s = store();
      if (watcher_running_) return info.Env().Undefined();
      watcher_stop_.store(false);
      notify_pending_.store(false);
      tsfn_ = Napi::ThreadSafeFunction::New(info.Env(), info[0].As<Napi::Function>(), "trellis-seal-watch", 0, 1);
      watcher_running_ = true;
      std::shared_ptr<Store> keep = store_;
      uint32_t seen = s.seal_sequence();
      watcher_ = std::thread([this, keep, seen]() mutable {
        while (!watcher_stop_.load()) {
          keep->WaitForSeal(seen, 200);
          uint32_t now = keep->seal_sequence();
          if (now == seen || watcher_stop_.load()) continue;
          seen = now;
          if (!notify_pending_.exchange(true)) {
            tsfn_.NonBlockingCall([this](Napi::Env, Napi::Function callback) {
              notify_pending_.store(false);
              callback.Call({});
            });
          }
        }
      });
      return info.Env().Undefined();
    });
  }

  Napi::Value UnwatchSeals(const Napi::CallbackInfo& info) {
    StopWatcher();
    return info.Env().Undefined();
  }

  void StopWatcher() {
    if (!watcher_running_) return;
    watcher_stop_.store(true);
    if (store_) store_->WakeSealWaiters();
    if (watcher_.joinable()) watcher_.join();
    tsfn_.Release();
    watcher_running_ = false;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      StopWatcher();
      if (store_) store_->Close();
      // Views keep the Store (and its mapping) alive until they are collected.
      store_.reset();
      return info.Env().Undefined();
    });
  }

  Napi::Value SetCrashPoint(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      store().SetCrashPoint(info[0].ToString().Utf8Value());
      return info.Env().Undefined();
    });
  }

  Napi::Value HoldLockForever(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value { store().HoldLockForever(); });
  }

  Napi::Value DataSize(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      return Napi::Number::New(info.Env(), static_cast<double>(store().data_size()));
    });
  }

  Napi::Value Name(const Napi::CallbackInfo& info) {
    return Napi::String::New(info.Env(), name_cache());
  }

  Napi::Value SegmentSize(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      return Napi::Number::New(info.Env(), static_cast<double>(store().segment_size()));
    });
  }

  std::string name_cache() {
    if (store_) name_ = store_->name();
    return name_;
  }

  std::shared_ptr<Store> store_;
  std::string name_;
  std::thread watcher_;
  std::atomic<bool> watcher_stop_{false};
  std::atomic<bool> notify_pending_{false};
  bool watcher_running_ = false;
  Napi::ThreadSafeFunction tsfn_;
};

}  // namespace

void RegisterStoreBinding(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeObjectStore", StoreBinding::Define(env));
  exports.Set("defaultStoreCapacity", Napi::Function::New(env, [](const Napi::CallbackInfo& info) {
                return Napi::Number::New(info.Env(), static_cast<double>(DefaultCapacity()));
              }));
}

}  // namespace trellis::store
