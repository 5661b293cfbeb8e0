// Node-API face of native/cuda. Every method runs under Guarded, so failures reach JS as typed
// errors (CudaError with `call`, or ERR_CUDA_UNAVAILABLE when the driver is absent).
#include "cuda/cuda_binding.h"

#include <cmath>
#include <cstring>
#include <optional>

#include <unistd.h>

#include "common/js_error.h"
#include "cuda/completion.h"

namespace trellis::cuda {
namespace {

// Tags tell our wrapped objects apart from any other ObjectWrap before unwrapping.
constexpr napi_type_tag kDeviceMemoryTag = {0x7472656c6c697301ull, 0x6465766d656d6f72ull};
constexpr napi_type_tag kStreamTag = {0x7472656c6c697302ull, 0x73747265616d0000ull};
constexpr napi_type_tag kEventTag = {0x7472656c6c697303ull, 0x6576656e74000000ull};

// exportIpcPacked()'s bytes: see DeviceMemoryBinding::ImportPacked.
constexpr size_t kPackedIpcBytes = 104;

uint64_t IntegerArgument(const Napi::Value& value, const char* what) {
  if (!value.IsNumber()) throw InvalidArgument(std::string(what) + " must be a number");
  double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= 0) || std::floor(number) != number || number > 9007199254740991.0) {
    throw InvalidArgument(std::string(what) + " must be a non-negative integer, got " + value.ToString().Utf8Value());
  }
  return static_cast<uint64_t>(number);
}

int DeviceArgument(const Napi::Value& value) {
  uint64_t device = IntegerArgument(value, "device");
  if (device > 1u << 16) throw InvalidArgument("device " + std::to_string(device) + " is out of range");
  return static_cast<int>(device);
}

struct HostBytes {
  uint8_t* data = nullptr;
  size_t length = 0;
};

HostBytes ViewArgument(const Napi::Value& value, const char* what) {
  if (value.IsTypedArray()) {
    auto array = value.As<Napi::TypedArray>();
    return {static_cast<uint8_t*>(array.ArrayBuffer().Data()) + array.ByteOffset(), array.ByteLength()};
  }
  if (value.IsDataView()) {
    auto view = value.As<Napi::DataView>();
    return {static_cast<uint8_t*>(view.ArrayBuffer().Data()) + view.ByteOffset(), view.ByteLength()};
  }
  throw InvalidArgument(std::string(what) + " must be a TypedArray or DataView");
}

Napi::Uint8Array HandleBytes(Napi::Env env, const CUipcMemHandle& handle) {
  auto bytes = Napi::Uint8Array::New(env, sizeof handle.reserved);
  std::memcpy(bytes.Data(), handle.reserved, sizeof handle.reserved);
  return bytes;
}

void CheckRange(uint64_t offset, uint64_t length, uint64_t size, const char* what) {
  if (offset > size || length > size - offset) {
    throw NativeError("ERR_OUT_OF_RANGE", std::string(what) + " [" + std::to_string(offset) + ", +" + std::to_string(length) +
                                              ") is outside device memory of " + std::to_string(size) + " bytes");
  }
}

// After enqueueing work that reads or writes `keep`, a failure must not let the memory go back to
// a cache while the copy may still run: wait for the stream, then rethrow.
template <typename Body>
void EnqueueOrDrain(CUstream stream, Body&& body) {
  try {
    body();
  } catch (const NativeError&) {
    Driver().cuStreamSynchronize(stream);  // best effort; the first error is the one reported
    throw;
  }
}

class StreamBinding : public Napi::ObjectWrap<StreamBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "CudaStream",
                       {
                           InstanceAccessor<&StreamBinding::Device>("device"),
                           InstanceAccessor<&StreamBinding::Address>("address"),
                           InstanceMethod<&StreamBinding::Synchronize>("synchronize"),
                           InstanceMethod<&StreamBinding::Wait>("wait"),
                           InstanceMethod<&StreamBinding::Destroy>("destroy"),
                       });
  }

  explicit StreamBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StreamBinding>(info) {
    Guarded(info.Env(), [&] {
      Driver("createStream");
      device_ = DeviceArgument(info[0]);
      stream_ = std::make_shared<Stream>(device_);
      info.This().As<Napi::Object>().TypeTag(&kStreamTag);
      return 0;
    });
  }

  // The stream, or ERR_CUDA_FREED after destroy().
  const std::shared_ptr<Stream>& stream() const {
    if (!stream_) throw NativeError("ERR_CUDA_FREED", "the CUDA stream was destroyed");
    return stream_;
  }

  static StreamBinding* From(const Napi::Value& value) {
    if (!value.IsObject() || !value.As<Napi::Object>().CheckTypeTag(&kStreamTag)) {
      throw InvalidArgument("stream must be a CUDA Stream (or omitted)");
    }
    return Unwrap(value.As<Napi::Object>());
  }

 private:
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), device_); }

  // The CUstream, for other CUDA code in the process (a model runtime's kernels) to queue on.
  Napi::Value Address(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(reinterpret_cast<uintptr_t>(stream()->get())));
    });
  }

  Napi::Value Synchronize(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const std::shared_ptr<Stream>& s = stream();
      const DriverTable& cu = Driver("synchronize");
      std::shared_ptr<Event> event = AcquireEvent(device_);
      MakeCurrent(device_);
      Check(cu.cuEventRecord(event->event, s->get()), "cuEventRecord");
      return Submit(info.Env(), std::make_unique<EventPending>(std::move(event), s));
    });
  }

  // wait(event): work queued on this stream from now on starts after `event`'s work is done.
  Napi::Value Wait(const Napi::CallbackInfo& info);

  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    stream_.reset();  // queued work still completes; synchronize() promises hold the stream
    return info.Env().Undefined();
  }

  int device_ = 0;
  std::shared_ptr<Stream> stream_;
};

// new CudaEvent(stream): a marker recorded on `stream` now, done once the work queued there
// before it is. A pooled event without timing (see AcquireEvent), back to its pool when collected.
class EventBinding : public Napi::ObjectWrap<EventBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "CudaEvent",
                       {
                           InstanceAccessor<&EventBinding::Device>("device"),
                           InstanceMethod<&EventBinding::Done>("done"),
                           InstanceMethod<&EventBinding::Synchronize>("synchronize"),
                           InstanceMethod<&EventBinding::ElapsedMs>("elapsedMs"),
                       });
  }

  explicit EventBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EventBinding>(info) {
    Guarded(info.Env(), [&] {
      const DriverTable& cu = Driver("record");
      stream_ = StreamBinding::From(info[0])->stream();
      event_ = AcquireEvent(stream_->device(), info[1].ToBoolean().Value());
      MakeCurrent(stream_->device());
      Check(cu.cuEventRecord(event_->event, stream_->get()), "cuEventRecord");
      info.This().As<Napi::Object>().TypeTag(&kEventTag);
      return 0;
    });
  }

  static EventBinding* From(const Napi::Value& value) {
    if (!value.IsObject() || !value.As<Napi::Object>().CheckTypeTag(&kEventTag)) {
      throw InvalidArgument("event must be a CUDA event from stream.record()");
    }
    return Unwrap(value.As<Napi::Object>());
  }

  const std::shared_ptr<Event>& event() const { return event_; }

 private:
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), event_ ? event_->device : -1); }

  Napi::Value Done(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value { return Napi::Boolean::New(info.Env(), EventDone(*event_)); });
  }

  // Settled by the completion thread: the event loop never blocks on it.
  Napi::Value Synchronize(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value { return Submit(info.Env(), std::make_unique<EventPending>(event_, stream_)); });
  }

  // elapsedMs(later): milliseconds of GPU time from this event to `later`, both recorded with
  // timing and both done.
  Napi::Value ElapsedMs(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const std::shared_ptr<Event>& later = From(info[0])->event();
      if (!event_->timing || !later->timing) throw InvalidArgument("elapsedMs needs two events recorded with { timing: true }");
      if (!EventDone(*event_) || !EventDone(*later)) {
        throw NativeError("ERR_CUDA_NOT_READY", "elapsedMs: an event's work is not done yet (await its synchronize() first)");
      }
      const DriverTable& cu = Driver("elapsedMs");
      float ms = 0;
      MakeCurrent(event_->device);
      Check(cu.cuEventElapsedTime(&ms, event_->event, later->event), "cuEventElapsedTime");
      return Napi::Number::New(info.Env(), ms);
    });
  }

  std::shared_ptr<Stream> stream_;
  std::shared_ptr<Event> event_;
};

Napi::Value StreamBinding::Wait(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const std::shared_ptr<Stream>& s = stream();
    const std::shared_ptr<Event>& event = EventBinding::From(info[0])->event();
    const DriverTable& cu = Driver("wait");
    MakeCurrent(device_);
    Check(cu.cuStreamWaitEvent(s->get(), event->event, 0), "cuStreamWaitEvent");
    return info.Env().Undefined();
  });
}

// Holds what an async copy touches until its event completes.
struct CopyKeep {
  DeviceBuffer buffer;
  std::shared_ptr<PinnedBuffer> pinned;
  std::shared_ptr<Stream> stream;
};

// What a device-to-device copy in flight needs alive: both buffers (neither goes back to a cache
// or closes its mapping before the copy is done) and the stream.
struct DeviceCopyKeep {
  DeviceBuffer target;
  DeviceBuffer source;
  std::shared_ptr<Stream> stream;
};

// A device-to-host copy staged through pinned memory. The completion thread moves the bytes into
// the JS view once the DMA is done (as fs.read fills buffers from libuv's threads); the persistent
// reference keeps the view's memory alive until the promise settles.
class CopyToHostPending : public EventPending {
 public:
  CopyToHostPending(std::shared_ptr<Event> event, std::shared_ptr<CopyKeep> keep, Napi::Value target, HostBytes bytes)
      : EventPending(std::move(event), keep), keep_(std::move(keep)), target_(Napi::Persistent(target)), bytes_(bytes) {}

  bool Poll() override {
    if (!EventPending::Poll()) return false;
    std::memcpy(bytes_.data, keep_->pinned->data, bytes_.length);
    return true;
  }

  void Abandon() override { target_.SuppressDestruct(); }

 private:
  std::shared_ptr<CopyKeep> keep_;
  Napi::Reference<Napi::Value> target_;
  HostBytes bytes_;
};

class DeviceMemoryBinding : public Napi::ObjectWrap<DeviceMemoryBinding> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DeviceMemory",
                       {
                           InstanceAccessor<&DeviceMemoryBinding::DeviceValue>("device"),
                           InstanceAccessor<&DeviceMemoryBinding::ByteLength>("byteLength"),
                           InstanceAccessor<&DeviceMemoryBinding::Address>("address"),
                           InstanceAccessor<&DeviceMemoryBinding::Imported>("imported"),
                           InstanceAccessor<&DeviceMemoryBinding::Freed>("freed"),
                           InstanceMethod<&DeviceMemoryBinding::CopyFromHost>("copyFromHost"),
                           InstanceMethod<&DeviceMemoryBinding::CopyToHost>("copyToHost"),
                           InstanceMethod<&DeviceMemoryBinding::CopyFromDevice>("copyFromDevice"),
                           InstanceMethod<&DeviceMemoryBinding::CopyFromDeviceAsync>("copyFromDeviceAsync"),
                           InstanceMethod<&DeviceMemoryBinding::CopyFromHostAsync>("copyFromHostAsync"),
                           InstanceMethod<&DeviceMemoryBinding::CopyToHostAsync>("copyToHostAsync"),
                           InstanceMethod<&DeviceMemoryBinding::Fill>("fill"),
                           InstanceMethod<&DeviceMemoryBinding::ExportIpcHandle>("exportIpc"),
                           InstanceMethod<&DeviceMemoryBinding::ExportIpcPacked>("exportIpcPacked"),
                           InstanceMethod<&DeviceMemoryBinding::Free>("free"),
                       });
  }

  // new DeviceMemory({ device, byteLength }) allocates; new DeviceMemory({ ipc }) imports, and so
  // does new DeviceMemory(packed), from exportIpcPacked()'s bytes; new DeviceMemory({ share })
  // holds another share of `share`'s memory.
  explicit DeviceMemoryBinding(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceMemoryBinding>(info) {
    Guarded(info.Env(), [&] {
      if (info[0].IsTypedArray()) {
        buffer_ = ImportPacked(info[0]);
        device_ = buffer_->device;
        size_ = buffer_->size;
        address_ = buffer_->ptr;
        imported_ = true;
        info.This().As<Napi::Object>().TypeTag(&kDeviceMemoryTag);
        return 0;
      }
      if (!info[0].IsObject()) throw InvalidArgument("DeviceMemory expects { device, byteLength }, { ipc } or { share }");
      Napi::Object options = info[0].As<Napi::Object>();
      Napi::Value ipc = options.Get("ipc");
      Napi::Value share = options.Get("share");
      if (share.IsObject()) {
        // A share of the same memory: it goes back once every share has been freed or collected.
        buffer_ = From(share, "share")->buffer();
      } else if (ipc.IsObject()) {
        buffer_ = Import(ipc.As<Napi::Object>());
      } else {
        int device = DeviceArgument(options.Get("device"));
        buffer_ = Allocate(device, IntegerArgument(options.Get("byteLength"), "byteLength"));
      }
      device_ = buffer_->device;
      size_ = buffer_->size;
      address_ = buffer_->ptr;
      imported_ = buffer_->imported;
      info.This().As<Napi::Object>().TypeTag(&kDeviceMemoryTag);
      return 0;
    });
  }

  const DeviceBuffer& buffer() const {
    if (!buffer_) throw NativeError("ERR_CUDA_FREED", "device memory was freed");
    return *buffer_;
  }

  static DeviceMemoryBinding* From(const Napi::Value& value, const char* what) {
    if (!value.IsObject() || !value.As<Napi::Object>().CheckTypeTag(&kDeviceMemoryTag)) {
      throw InvalidArgument(std::string(what) + " must be CUDA DeviceMemory");
    }
    return Unwrap(value.As<Napi::Object>());
  }

 private:
  static DeviceBuffer Import(Napi::Object ipc) {
    Napi::Value handle_value = ipc.Get("handle");
    if (!handle_value.IsTypedArray() || handle_value.As<Napi::TypedArray>().ByteLength() != sizeof(CUipcMemHandle)) {
      throw InvalidArgument("ipc.handle must be the 64 bytes of a CUDA IPC memory handle");
    }
    HostBytes bytes = ViewArgument(handle_value, "ipc.handle");
    CUipcMemHandle handle;
    std::memcpy(handle.reserved, bytes.data, sizeof handle.reserved);
    uint64_t offset = IntegerArgument(ipc.Get("offset"), "ipc.offset");
    uint64_t size = IntegerArgument(ipc.Get("byteLength"), "ipc.byteLength");
    // The exporter's device, found by UUID under this process's numbering; if it is not visible
    // here, the mapping goes into device 0's context (the driver enables peer access lazily).
    int device = -1;
    Napi::Value uuid = ipc.Get("deviceUuid");
    Driver("importIpc");
    if (uuid.IsString() && !uuid.As<Napi::String>().Utf8Value().empty()) {
      device = DeviceByUuid(uuid.As<Napi::String>().Utf8Value());
    } else {
      device = DeviceArgument(ipc.Get("device"));
    }
    if (device < 0) device = 0;
    Napi::Value exporter = ipc.Get("processId");
    return ImportIpc(device, handle, offset, size, exporter.IsNumber() ? exporter.As<Napi::Number>().Uint32Value() : 0);
  }

  // The packed form, for tensor transport: one typed array read with no property lookups or
  // strings, where the object form costs a reader's every IPC argument several microseconds.
  // Layout: handle (64 bytes), offset and size (u64 each, host order: only processes of this host
  // read it), device UUID (16 bytes), the exporter's pid (u32), 4 bytes of padding.
  static DeviceBuffer ImportPacked(const Napi::Value& value) {
    napi_typedarray_type type;
    size_t length = 0;
    void* data = nullptr;
    if (napi_get_typedarray_info(value.Env(), value, &type, &length, &data, nullptr, nullptr) != napi_ok ||
        type != napi_uint8_array || length != kPackedIpcBytes) {
      throw InvalidArgument("a packed IPC handle must be the " + std::to_string(kPackedIpcBytes) + " bytes of a Uint8Array from exportIpcPacked()");
    }
    const auto* bytes = static_cast<const unsigned char*>(data);
    CUipcMemHandle handle;
    std::memcpy(handle.reserved, bytes, sizeof handle.reserved);
    uint64_t offset = 0;
    uint64_t size = 0;
    std::memcpy(&offset, bytes + 64, sizeof offset);
    std::memcpy(&size, bytes + 72, sizeof size);
    Driver("importIpc");
    // As in Import: the exporter's device by UUID, else device 0's context.
    int device = DeviceByUuidBytes(bytes + 80);
    uint32_t exporter = 0;
    std::memcpy(&exporter, bytes + 96, sizeof exporter);
    return ImportIpc(device < 0 ? 0 : device, handle, offset, size, exporter);
  }

  Napi::Value ExportIpcPacked(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DeviceBuffer& b = buffer();
      IpcExport exported = ExportIpc(b);
      auto packed = Napi::Uint8Array::New(info.Env(), kPackedIpcBytes);
      uint8_t* out = packed.Data();
      uint64_t offset = exported.offset;
      uint64_t size = b.size;
      CUuuid uuid = DeviceUuidBytes(b.device);
      std::memcpy(out, exported.handle.reserved, 64);
      std::memcpy(out + 64, &offset, sizeof offset);
      std::memcpy(out + 72, &size, sizeof size);
      std::memcpy(out + 80, uuid.bytes, sizeof uuid.bytes);
      const uint32_t exporter = static_cast<uint32_t>(getpid());
      std::memcpy(out + 96, &exporter, sizeof exporter);
      std::memset(out + 100, 0, 4);
      return packed;
    });
  }

  Napi::Value DeviceValue(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), device_); }
  Napi::Value ByteLength(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(size_)); }
  Napi::Value Address(const Napi::CallbackInfo& info) { return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(address_)); }
  Napi::Value Imported(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), imported_); }
  Napi::Value Freed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !buffer_.has_value()); }

  // copyFromHost(source, byteOffset): writes all of `source` at `byteOffset`; complete on return.
  Napi::Value CopyFromHost(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DeviceBuffer& b = buffer();
      HostBytes source = ViewArgument(info[0], "source");
      uint64_t offset = IntegerArgument(info[1], "byteOffset");
      CheckRange(offset, source.length, b.size, "copyFromHost");
      if (source.length > 0) {
        const DriverTable& cu = Driver("copyFromHost");
        CopyHostToDevice(b.device, b.ptr + offset, source.data, source.length);
        // From pageable memory the call may return before the DMA lands.
        Check(cu.cuStreamSynchronize(nullptr), "cuStreamSynchronize");
      }
      return info.Env().Undefined();
    });
  }

  // copyToHost(target, byteOffset): fills `target` from `byteOffset`; complete on return.
  Napi::Value CopyToHost(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DeviceBuffer& b = buffer();
      HostBytes target = ViewArgument(info[0], "target");
      uint64_t offset = IntegerArgument(info[1], "byteOffset");
      CheckRange(offset, target.length, b.size, "copyToHost");
      if (target.length > 0) {
        CopyDeviceToHost(b.device, target.data, b.ptr + offset, target.length);
      }
      return info.Env().Undefined();
    });
  }

  // copyFromDevice(source, byteLength, sourceOffset, targetOffset); complete on return.
  Napi::Value CopyFromDevice(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DeviceBuffer& target = buffer();
      DeviceBuffer source = From(info[0], "source")->buffer();
      uint64_t length = IntegerArgument(info[1], "byteLength");
      uint64_t source_offset = IntegerArgument(info[2], "sourceOffset");
      uint64_t target_offset = IntegerArgument(info[3], "targetOffset");
      CheckRange(source_offset, length, source.size, "copyFromDevice source");
      CheckRange(target_offset, length, target.size, "copyFromDevice target");
      if (length > 0) {
        const DriverTable& cu = Driver("copyFromDevice");
        MakeCurrent(target.device);
        if (source.device == target.device) {
          Check(cu.cuMemcpyDtoD(target.ptr + target_offset, source.ptr + source_offset, length), "cuMemcpyDtoD_v2");
        } else {
          // Between two devices' contexts, GPU to GPU (over NVLink or PCIe), never through the host.
          Check(cu.cuMemcpyPeer(target.ptr + target_offset, ContextOf(target.device), source.ptr + source_offset, ContextOf(source.device), length),
                "cuMemcpyPeer");
        }
        Check(cu.cuStreamSynchronize(nullptr), "cuStreamSynchronize");
      }
      return info.Env().Undefined();
    });
  }

  std::shared_ptr<Stream> StreamArgument(const Napi::Value& value, int device) {
    if (value.IsUndefined() || value.IsNull()) return nullptr;
    std::shared_ptr<Stream> stream = StreamBinding::From(value)->stream();
    if (stream->device() != device) {
      throw InvalidArgument("the stream is on device " + std::to_string(stream->device()) + ", the memory on device " +
                            std::to_string(device));
    }
    return stream;
  }

  // copyFromHostAsync(source, stream | null): stages `source` in pinned memory (so the caller may
  // reuse it at once) and resolves when the copy to device offset 0 has completed.
  // copyFromDeviceAsync(source, byteLength, sourceOffset, targetOffset, stream): on `stream` (null:
  // this device's copy stream), never staged through the host; settles when the copy is done.
  Napi::Value CopyFromDeviceAsync(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DriverTable& cu = Driver("copyFromDeviceAsync");
      const DeviceBuffer& target = buffer();
      DeviceBuffer source = From(info[0], "source")->buffer();
      uint64_t length = IntegerArgument(info[1], "byteLength");
      uint64_t source_offset = IntegerArgument(info[2], "sourceOffset");
      uint64_t target_offset = IntegerArgument(info[3], "targetOffset");
      CheckRange(source_offset, length, source.size, "copyFromDeviceAsync source");
      CheckRange(target_offset, length, target.size, "copyFromDeviceAsync target");
      auto keep = std::make_shared<DeviceCopyKeep>(DeviceCopyKeep{target, std::move(source), StreamArgument(info[4], target.device)});
      CUstream stream = keep->stream ? keep->stream->get() : CopyStream(target.device);
      std::shared_ptr<Event> event = AcquireEvent(target.device);
      MakeCurrent(target.device);
      EnqueueOrDrain(stream, [&] {
        if (length > 0 && keep->source.device == keep->target.device) {
          Check(cu.cuMemcpyDtoDAsync(keep->target.ptr + target_offset, keep->source.ptr + source_offset, length, stream), "cuMemcpyDtoDAsync_v2");
        } else if (length > 0) {
          Check(cu.cuMemcpyPeerAsync(keep->target.ptr + target_offset, ContextOf(keep->target.device), keep->source.ptr + source_offset,
                                     ContextOf(keep->source.device), length, stream),
                "cuMemcpyPeerAsync");
        }
        Check(cu.cuEventRecord(event->event, stream), "cuEventRecord");
      });
      return Submit(info.Env(), std::make_unique<EventPending>(std::move(event), std::move(keep)));
    });
  }

  Napi::Value CopyFromHostAsync(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DriverTable& cu = Driver("copyFromHostAsync");
      const DeviceBuffer& b = buffer();
      HostBytes source = ViewArgument(info[0], "source");
      CheckRange(0, source.length, b.size, "copyFromHostAsync");
      auto keep = std::make_shared<CopyKeep>(CopyKeep{b, AllocatePinned(b.device, source.length), StreamArgument(info[1], b.device)});
      CUstream stream = keep->stream ? keep->stream->get() : CopyStream(b.device);
      std::memcpy(keep->pinned->data, source.data, source.length);
      std::shared_ptr<Event> event = AcquireEvent(b.device);
      MakeCurrent(b.device);
      EnqueueOrDrain(stream, [&] {
        if (source.length > 0) Check(cu.cuMemcpyHtoDAsync(b.ptr, keep->pinned->data, source.length, stream), "cuMemcpyHtoDAsync_v2");
        Check(cu.cuEventRecord(event->event, stream), "cuEventRecord");
      });
      return Submit(info.Env(), std::make_unique<EventPending>(std::move(event), std::move(keep)));
    });
  }

  // copyToHostAsync(target, stream | null): device offset 0 into pinned memory, then into
  // `target` on the completion thread; resolves after both.
  Napi::Value CopyToHostAsync(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DriverTable& cu = Driver("copyToHostAsync");
      const DeviceBuffer& b = buffer();
      HostBytes target = ViewArgument(info[0], "target");
      CheckRange(0, target.length, b.size, "copyToHostAsync");
      auto keep = std::make_shared<CopyKeep>(CopyKeep{b, AllocatePinned(b.device, target.length), StreamArgument(info[1], b.device)});
      CUstream stream = keep->stream ? keep->stream->get() : CopyStream(b.device);
      std::shared_ptr<Event> event = AcquireEvent(b.device);
      MakeCurrent(b.device);
      EnqueueOrDrain(stream, [&] {
        if (target.length > 0) Check(cu.cuMemcpyDtoHAsync(keep->pinned->data, b.ptr, target.length, stream), "cuMemcpyDtoHAsync_v2");
        Check(cu.cuEventRecord(event->event, stream), "cuEventRecord");
      });
      return Submit(info.Env(), std::make_unique<CopyToHostPending>(std::move(event), std::move(keep), info[0], target));
    });
  }

  // fill(byte): every byte of the buffer; complete on return.
  Napi::Value Fill(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DeviceBuffer& b = buffer();
      uint64_t byte = IntegerArgument(info[0], "byte");
      if (byte > 255) throw InvalidArgument("fill byte must be 0..255");
      if (b.size > 0) {
        const DriverTable& cu = Driver("fill");
        MakeCurrent(b.device);
        Check(cu.cuMemsetD8(b.ptr, static_cast<unsigned char>(byte), b.size), "cuMemsetD8_v2");
        Check(cu.cuStreamSynchronize(nullptr), "cuStreamSynchronize");
      }
      return info.Env().Undefined();
    });
  }

  Napi::Value ExportIpcHandle(const Napi::CallbackInfo& info) {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      const DeviceBuffer& b = buffer();
      IpcExport exported = ExportIpc(b);
      Napi::Env env = info.Env();
      Napi::Object out = Napi::Object::New(env);
      out.Set("handle", HandleBytes(env, exported.handle));
      out.Set("offset", Napi::Number::New(env, static_cast<double>(exported.offset)));
      out.Set("byteLength", Napi::Number::New(env, static_cast<double>(b.size)));
      out.Set("device", Napi::Number::New(env, b.device));
      out.Set("deviceUuid", Napi::String::New(env, DeviceUuid(b.device)));
      out.Set("processId", Napi::Number::New(env, static_cast<double>(getpid())));
      return out;
    });
  }

  Napi::Value Free(const Napi::CallbackInfo& info) {
    buffer_.reset();  // back to the cache (or unmapped) once work in flight is done with it
    return info.Env().Undefined();
  }

  std::optional<DeviceBuffer> buffer_;
  int device_ = 0;
  size_t size_ = 0;
  CUdeviceptr address_ = 0;
  bool imported_ = false;
};

Napi::Object StatusObject(Napi::Env env) {
  const DriverStatus& status = Status();
  Napi::Object out = Napi::Object::New(env);
  out.Set("available", Napi::Boolean::New(env, status.available));
  if (!status.available) out.Set("reason", Napi::String::New(env, status.reason));
  out.Set("libraryPath", Napi::String::New(env, status.library_path));
  if (status.driver_version != 0) out.Set("driverVersion", Napi::Number::New(env, status.driver_version));
  out.Set("deviceCount", Napi::Number::New(env, status.device_count));
  return out;
}

Napi::Value DeviceInfo(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const DriverTable& cu = Driver("deviceInfo");
    int device = DeviceArgument(info[0]);
    MakeCurrent(device);  // validates; cuMemGetInfo_v2 reads the current context's device
    CUdevice handle = 0;
    Check(cu.cuDeviceGet(&handle, device), "cuDeviceGet");
    char name[256] = {};
    Check(cu.cuDeviceGetName(name, sizeof name - 1, handle), "cuDeviceGetName");
    size_t total = 0;
    Check(cu.cuDeviceTotalMem(&total, handle), "cuDeviceTotalMem_v2");
    size_t free_bytes = 0;
    size_t context_total = 0;
    Check(cu.cuMemGetInfo(&free_bytes, &context_total), "cuMemGetInfo_v2");
    int major = 0;
    int minor = 0;
    Check(cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle), "cuDeviceGetAttribute");
    Check(cu.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle), "cuDeviceGetAttribute");
    Napi::Env env = info.Env();
    Napi::Object out = Napi::Object::New(env);
    out.Set("index", Napi::Number::New(env, device));
    out.Set("name", Napi::String::New(env, name));
    out.Set("totalMemory", Napi::Number::New(env, static_cast<double>(total)));
    out.Set("freeMemory", Napi::Number::New(env, static_cast<double>(free_bytes)));
    Napi::Array capability = Napi::Array::New(env, 2);
    capability.Set(0u, Napi::Number::New(env, major));
    capability.Set(1u, Napi::Number::New(env, minor));
    out.Set("computeCapability", capability);
    out.Set("uuid", Napi::String::New(env, DeviceUuid(device)));
    return out;
  });
}

Napi::Value AllocatorStatsValue(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    AllocatorStats stats = Stats(DeviceArgument(info[0]));
    Napi::Env env = info.Env();
    Napi::Object out = Napi::Object::New(env);
    out.Set("allocatedBytes", Napi::Number::New(env, static_cast<double>(stats.allocated_bytes)));
    out.Set("cachedBytes", Napi::Number::New(env, static_cast<double>(stats.cached_bytes)));
    out.Set("allocations", Napi::Number::New(env, static_cast<double>(stats.allocations)));
    out.Set("reuses", Napi::Number::New(env, static_cast<double>(stats.reuses)));
    return out;
  });
}

Napi::Value PageLockStatsValue(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    Driver("pageLockStats");
    PageLockStats stats = PageLockStatistics();
    Napi::Env env = info.Env();
    Napi::Object out = Napi::Object::New(env);
    out.Set("lockedBytes", Napi::Number::New(env, static_cast<double>(stats.locked_bytes)));
    out.Set("chunksLocked", Napi::Number::New(env, static_cast<double>(stats.chunks_locked)));
    out.Set("chunksRefused", Napi::Number::New(env, static_cast<double>(stats.chunks_failed)));
    out.Set("lockMs", Napi::Number::New(env, static_cast<double>(stats.lock_ns) / 1e6));
    return out;
  });
}

// allocateHost(device, byteLength): page-locked host memory as a Uint8Array; back to the pinned
// cache when the array is collected.
Napi::Value AllocateHostValue(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    int device = DeviceArgument(info[0]);
    uint64_t length = IntegerArgument(info[1], "byteLength");
    if (length == 0) throw InvalidArgument("allocateHost: byteLength must be positive");
    auto* pinned = new std::shared_ptr<PinnedBuffer>(AllocatePinned(device, length));
    Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(info.Env(), (*pinned)->data, length,
                                                      [](Napi::Env, void*, std::shared_ptr<PinnedBuffer>* hold) { delete hold; }, pinned);
    return Napi::Uint8Array::New(info.Env(), length, buffer, 0);
  });
}

}  // namespace

DeviceBuffer BufferOf(const Napi::Value& value, const char* what) { return DeviceMemoryBinding::From(value, what)->buffer(); }

void RegisterCudaBinding(Napi::Env env, Napi::Object exports) {
  Napi::Object cuda = Napi::Object::New(env);
  cuda.Set("status", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value { return StatusObject(info.Env()); }));
  cuda.Set("deviceCount", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               Driver("deviceCount");
               return Napi::Number::New(info.Env(), Status().device_count);
             });
           }));
  cuda.Set("deviceInfo", Napi::Function::New(env, DeviceInfo));
  cuda.Set("allocatorStats", Napi::Function::New(env, AllocatorStatsValue));
  cuda.Set("pageLockStats", Napi::Function::New(env, PageLockStatsValue));
  cuda.Set("allocateHost", Napi::Function::New(env, AllocateHostValue));
  cuda.Set("emptyCache", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               EmptyCache(info[0].IsUndefined() ? -1 : DeviceArgument(info[0]));
               return info.Env().Undefined();
             });
           }));
  cuda.Set("setIdleIpcMappings", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               Driver("setIdleIpcMappings");
               SetIdleMappings(static_cast<size_t>(IntegerArgument(info[0], "count")));
               return info.Env().Undefined();
             });
           }));
  cuda.Set("exportedFreeBlocks", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               std::vector<ExportedBlock> blocks = ExportedFreeBlocks(DeviceArgument(info[0]));
               Napi::Array out = Napi::Array::New(info.Env(), blocks.size());
               for (size_t i = 0; i < blocks.size(); ++i) {
                 Napi::Object block = Napi::Object::New(info.Env());
                 block.Set("id", static_cast<double>(blocks[i].id));
                 block.Set("byteLength", static_cast<double>(blocks[i].bytes));
                 block.Set("handle", HandleBytes(info.Env(), blocks[i].handle));
                 block.Set("idleMs", blocks[i].idle_ms);
                 out.Set(i, block);
               }
               return out;
             });
           }));
  cuda.Set("freeExportedBlocks", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               int device = DeviceArgument(info[0]);
               if (!info[1].IsArray()) throw InvalidArgument("freeExportedBlocks expects an array of block ids");
               Napi::Array list = info[1].As<Napi::Array>();
               std::vector<uint64_t> ids;
               for (uint32_t i = 0; i < list.Length(); ++i) ids.push_back(IntegerArgument(list.Get(i), "block id"));
               return Napi::Number::New(info.Env(), static_cast<double>(FreeExportedBlocks(device, ids)));
             });
           }));
  cuda.Set("closeMappingsOfExporter", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               uint64_t pid = IntegerArgument(info[0], "processId");
               if (pid > UINT32_MAX) throw InvalidArgument("processId must be a process id, got " + std::to_string(pid));
               return Napi::Number::New(info.Env(), static_cast<double>(CloseMappingsOfExporter(static_cast<uint32_t>(pid))));
             });
           }));
  cuda.Set("closeIdleIpcMappings", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               Driver("closeIdleIpcMappings");
               if (!info[0].IsArray()) throw InvalidArgument("closeIdleIpcMappings expects an array of IPC handles");
               Napi::Array list = info[0].As<Napi::Array>();
               std::vector<CUipcMemHandle> handles;
               for (uint32_t i = 0; i < list.Length(); ++i) {
                 HostBytes bytes = ViewArgument(list.Get(i), "IPC handle");
                 if (bytes.length != sizeof(CUipcMemHandle)) throw InvalidArgument("an IPC handle is 64 bytes");
                 CUipcMemHandle handle;
                 std::memcpy(handle.reserved, bytes.data, sizeof handle.reserved);
                 handles.push_back(handle);
               }
               std::vector<CUipcMemHandle> in_use = CloseIdleMappingsOf(handles);
               Napi::Array out = Napi::Array::New(info.Env(), in_use.size());
               for (size_t i = 0; i < in_use.size(); ++i) out.Set(i, HandleBytes(info.Env(), in_use[i]));
               return out;
             });
           }));
  cuda.Set("ipcStats", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
             return Guarded(info.Env(), [&]() -> Napi::Value {
               Driver("ipcStats");
               IpcStats stats = IpcStatistics();
               Napi::Object out = Napi::Object::New(info.Env());
               out.Set("inUse", static_cast<double>(stats.in_use));
               out.Set("idle", static_cast<double>(stats.idle));
               out.Set("opens", static_cast<double>(stats.opens));
               out.Set("reuses", static_cast<double>(stats.reuses));
               out.Set("closes", static_cast<double>(stats.closes));
               out.Set("openMicros", static_cast<double>(stats.open_ns) / 1000.0);
               return out;
             });
           }));
  cuda.Set("DeviceMemory", DeviceMemoryBinding::Define(env));
  cuda.Set("Stream", StreamBinding::Define(env));
  cuda.Set("CudaEvent", EventBinding::Define(env));
  exports.Set("cuda", cuda);
}

}  // namespace trellis::cuda
