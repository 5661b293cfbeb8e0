// Node-API face of DeviceKernels. Addresses arrive as bigints that lib/llm/device-kernels.ts took
// from its own allocations and checked against their sizes; here every number is checked for its
// type and range, and every failure becomes a typed JS error.
#include "kernels/device_kernels_binding.h"

#include <cmath>
#include <memory>
#include <string>

#include "common/js_error.h"
#include "kernels/device_kernels.h"

namespace trellis::kernels {
namespace {

uint64_t AddressArgument(const Napi::CallbackInfo& info, size_t index, const char* name) {
  const Napi::Value value = info[index];
  if (value.IsNull() || value.IsUndefined()) return 0;  // an optional operand left out
  if (!value.IsBigInt()) throw InvalidArgument(std::string(name) + " must be a bigint address or null");
  bool lossless = false;
  const uint64_t address = value.As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) throw InvalidArgument(std::string(name) + " is not a 64-bit address");
  return address;
}

size_t SizeArgument(const Napi::CallbackInfo& info, size_t index, const char* name) {
  const Napi::Value value = info[index];
  if (!value.IsNumber()) throw InvalidArgument(std::string(name) + " must be a number");
  const double number = value.As<Napi::Number>().DoubleValue();
  if (!(number >= 0) || number != std::floor(number) || number > 9007199254740991.0) {
    throw InvalidArgument(std::string(name) + " must be a non-negative integer, got " + std::to_string(number));
  }
  return static_cast<size_t>(number);
}

int IntArgument(const Napi::CallbackInfo& info, size_t index, const char* name) {
  const size_t value = SizeArgument(info, index, name);
  if (value > 0x7fffffff) throw InvalidArgument(std::string(name) + " is over 2^31 - 1");
  return static_cast<int>(value);
}

float FloatArgument(const Napi::CallbackInfo& info, size_t index, const char* name) {
  const Napi::Value value = info[index];
  if (!value.IsNumber() || !std::isfinite(value.As<Napi::Number>().DoubleValue())) throw InvalidArgument(std::string(name) + " must be a finite number");
  return value.As<Napi::Number>().FloatValue();
}

Element ElementArgument(const Napi::CallbackInfo& info, size_t index, const char* name) {
  const int value = IntArgument(info, index, name);
  if (value > 2) throw InvalidArgument(std::string(name) + " must be 0 (f32), 1 (bf16) or 2 (f16)");
  return static_cast<Element>(value);
}

// A key/value cache's elements: those of weights, or 3 (fp8, e4m3fn).
Element CacheElementArgument(const Napi::CallbackInfo& info, size_t index, const char* name) {
  const int value = IntArgument(info, index, name);
  if (value > 3) throw InvalidArgument(std::string(name) + " must be 0 (f32), 1 (bf16), 2 (f16) or 3 (fp8)");
  return static_cast<Element>(value);
}

// A host view (any TypedArray or ArrayBuffer) and its bytes.
std::pair<void*, size_t> HostBytes(const Napi::Value& value, const char* name) {
  if (value.IsTypedArray()) {
    auto array = value.As<Napi::TypedArray>();
    auto* base = static_cast<char*>(array.ArrayBuffer().Data()) + array.ByteOffset();
    return {base, array.ByteLength()};
  }
  if (value.IsArrayBuffer()) {
    auto buffer = value.As<Napi::ArrayBuffer>();
    return {buffer.Data(), buffer.ByteLength()};
  }
  throw InvalidArgument(std::string(name) + " must be a TypedArray or an ArrayBuffer");
}

// layout = { rowSequence, rowPosition, cacheBlocks, cacheTable, tiles, singleRows: addresses;
//            rows, sequences, tileCount, singleCount }
StepLayout LayoutArgument(const Napi::CallbackInfo& info, size_t index) {
  if (!info[index].IsObject()) throw InvalidArgument("layout must be an object");
  const Napi::Object object = info[index].As<Napi::Object>();
  auto address = [&](const char* name) -> uint64_t {
    const Napi::Value value = object.Get(name);
    if (value.IsNull() || value.IsUndefined()) return 0;
    if (!value.IsBigInt()) throw InvalidArgument(std::string("layout.") + name + " must be a bigint address");
    bool lossless = false;
    const uint64_t result = value.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw InvalidArgument(std::string("layout.") + name + " is not a 64-bit address");
    return result;
  };
  auto count = [&](const char* name) -> size_t {
    const Napi::Value value = object.Get(name);
    const double number = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : -1;
    if (!(number >= 0) || number != std::floor(number) || number > 2147483647.0) throw InvalidArgument(std::string("layout.") + name + " must be a count");
    return static_cast<size_t>(number);
  };
  StepLayout layout{};
  layout.row_sequence = address("rowSequence");
  layout.row_position = address("rowPosition");
  layout.cache_blocks = address("cacheBlocks");
  layout.cache_table = address("cacheTable");
  layout.tiles = address("tiles");
  layout.single_rows = address("singleRows");
  layout.rows = count("rows");
  layout.sequences = count("sequences");
  layout.tile_count = count("tileCount");
  layout.single_count = count("singleCount");
  return layout;
}

AttentionShape ShapeArgument(const Napi::CallbackInfo& info, size_t first) {
  AttentionShape shape{};
  shape.heads = IntArgument(info, first, "heads");
  shape.kv_heads = IntArgument(info, first + 1, "kvHeads");
  shape.head_size = IntArgument(info, first + 2, "headSize");
  shape.cache = CacheElementArgument(info, first + 3, "cacheType");
  if (shape.heads == 0 || shape.kv_heads == 0 || shape.heads % shape.kv_heads != 0) {
    throw InvalidArgument("heads (" + std::to_string(shape.heads) + ") must be a positive multiple of kvHeads (" + std::to_string(shape.kv_heads) + ")");
  }
  if (shape.head_size == 0 || shape.head_size % 2 != 0) throw InvalidArgument("headSize must be positive and even");
  return shape;
}

class DeviceKernelsObject : public Napi::ObjectWrap<DeviceKernelsObject> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DeviceKernels",
                       {
                           InstanceMethod<&DeviceKernelsObject::Linear>("linear"),
                           InstanceMethod<&DeviceKernelsObject::LinearInt8>("linearInt8"),
                           InstanceMethod<&DeviceKernelsObject::AddRows>("addRows"),
                           InstanceMethod<&DeviceKernelsObject::RmsNorm>("rmsNorm"),
                           InstanceMethod<&DeviceKernelsObject::LayerNorm>("layerNorm"),
                           InstanceMethod<&DeviceKernelsObject::SiluMultiply>("siluMultiply"),
                           InstanceMethod<&DeviceKernelsObject::Gelu>("gelu"),
                           InstanceMethod<&DeviceKernelsObject::PrepareAttention>("prepareAttention"),
                           InstanceMethod<&DeviceKernelsObject::Attention>("attention"),
                           InstanceMethod<&DeviceKernelsObject::GatherRows>("gatherRows"),
                           InstanceMethod<&DeviceKernelsObject::ScatterAddRows>("scatterAddRows"),
                           InstanceMethod<&DeviceKernelsObject::Zero>("zero"),
                           InstanceMethod<&DeviceKernelsObject::RouteExperts>("routeExperts"),
                           InstanceMethod<&DeviceKernelsObject::AddWeightedRows>("addWeightedRows"),
                           InstanceMethod<&DeviceKernelsObject::Upload>("upload"),
                           InstanceMethod<&DeviceKernelsObject::Download>("download"),
                           InstanceMethod<&DeviceKernelsObject::Copy>("copy"),
                           InstanceMethod<&DeviceKernelsObject::Synchronize>("synchronize"),
                           InstanceMethod<&DeviceKernelsObject::Close>("close"),
                       });
  }

  explicit DeviceKernelsObject(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DeviceKernelsObject>(info) {
    Guarded(info.Env(), [&] {
      if (!info[0].IsObject()) throw InvalidArgument("DeviceKernels takes { backend, device }");
      const Napi::Object options = info[0].As<Napi::Object>();
      const std::string backend = options.Get("backend").ToString().Utf8Value();
      if (backend == "cpu") {
        kernels_ = CreateHostKernels();
      } else if (backend == "cuda") {
        const Napi::Value device = options.Get("device");
        if (!device.IsNumber()) throw InvalidArgument("DeviceKernels: device must be a number");
        kernels_ = CreateCudaKernels(device.As<Napi::Number>().Int32Value());
      } else {
        throw InvalidArgument("DeviceKernels: backend must be 'cpu' or 'cuda', got '" + backend + "'");
      }
    });
  }

 private:
  DeviceKernels& Kernels() {
    if (!kernels_) throw NativeError("ERR_CLOSED", "these device kernels are closed");
    return *kernels_;
  }

  template <typename Body>
  Napi::Value Run(const Napi::CallbackInfo& info, Body&& body) {
    Guarded(info.Env(), [&] { body(Kernels()); });
    return info.Env().Undefined();
  }

  // linear(out, x, weight, weightType, bias, rows, depth, columns)
  Napi::Value Linear(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.Linear(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "x"), AddressArgument(info, 2, "weight"), ElementArgument(info, 3, "weightType"),
               AddressArgument(info, 4, "bias"), SizeArgument(info, 5, "rows"), SizeArgument(info, 6, "depth"), SizeArgument(info, 7, "columns"));
    });
  }

  // linearInt8(out, x, weight, scales, bias, rows, depth, columns)
  Napi::Value LinearInt8(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.LinearInt8(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "x"), AddressArgument(info, 2, "weight"), AddressArgument(info, 3, "scales"),
                   AddressArgument(info, 4, "bias"), SizeArgument(info, 5, "rows"), SizeArgument(info, 6, "depth"), SizeArgument(info, 7, "columns"));
    });
  }

  // addRows(out, residual, bias, rows, columns)
  Napi::Value AddRows(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.AddRows(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "residual"), AddressArgument(info, 2, "bias"), SizeArgument(info, 3, "rows"),
                SizeArgument(info, 4, "columns"));
    });
  }

  // rmsNorm(out, x, gamma, rows, columns, epsilon)
  Napi::Value RmsNorm(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.RmsNorm(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "x"), AddressArgument(info, 2, "gamma"), SizeArgument(info, 3, "rows"),
                SizeArgument(info, 4, "columns"), FloatArgument(info, 5, "epsilon"));
    });
  }

  // layerNorm(out, x, gamma, beta, rows, columns, epsilon)
  Napi::Value LayerNorm(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.LayerNorm(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "x"), AddressArgument(info, 2, "gamma"), AddressArgument(info, 3, "beta"),
                  SizeArgument(info, 4, "rows"), SizeArgument(info, 5, "columns"), FloatArgument(info, 6, "epsilon"));
    });
  }

  // siluMultiply(out, gate, up, count)
  Napi::Value SiluMultiply(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.SiluMultiply(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "gate"), AddressArgument(info, 2, "up"), SizeArgument(info, 3, "count"));
    });
  }

  // gelu(x, count)
  Napi::Value Gelu(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) { k.Gelu(AddressArgument(info, 0, "x"), SizeArgument(info, 1, "count")); });
  }

  // prepareAttention(queries, qkv, layout, heads, kvHeads, headSize, cacheType, layer, queryNorm, keyNorm, epsilon, inverseFrequencies)
  Napi::Value PrepareAttention(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.PrepareAttention(AddressArgument(info, 0, "queries"), AddressArgument(info, 1, "qkv"), LayoutArgument(info, 2), ShapeArgument(info, 3),
                         IntArgument(info, 7, "layer"), AddressArgument(info, 8, "queryNorm"), AddressArgument(info, 9, "keyNorm"),
                         FloatArgument(info, 10, "epsilon"), AddressArgument(info, 11, "inverseFrequencies"));
    });
  }

  // attention(out, queries, layout, heads, kvHeads, headSize, cacheType, layer, window)
  Napi::Value Attention(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.Attention(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "queries"), LayoutArgument(info, 2), ShapeArgument(info, 3),
                  IntArgument(info, 7, "layer"), IntArgument(info, 8, "window"));
    });
  }

  // gatherRows(out, x, rows, count, width)
  Napi::Value GatherRows(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.GatherRows(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "x"), AddressArgument(info, 2, "rows"), SizeArgument(info, 3, "count"),
                   SizeArgument(info, 4, "width"));
    });
  }

  // scatterAddRows(out, delta, rows, weights, count, width)
  Napi::Value ScatterAddRows(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.ScatterAddRows(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "delta"), AddressArgument(info, 2, "rows"), AddressArgument(info, 3, "weights"),
                       SizeArgument(info, 4, "count"), SizeArgument(info, 5, "width"));
    });
  }

  // zero(x, count)
  Napi::Value Zero(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) { k.Zero(AddressArgument(info, 0, "x"), SizeArgument(info, 1, "count")); });
  }

  // routeExperts(weights, logits, rows, experts, topK, normalize)
  Napi::Value RouteExperts(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.RouteExperts(AddressArgument(info, 0, "weights"), AddressArgument(info, 1, "logits"), SizeArgument(info, 2, "rows"), SizeArgument(info, 3, "experts"),
                     SizeArgument(info, 4, "topK"), info[5].ToBoolean().Value());
    });
  }

  // addWeightedRows(out, result, weights, expert, experts, rows, width)
  Napi::Value AddWeightedRows(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      k.AddWeightedRows(AddressArgument(info, 0, "out"), AddressArgument(info, 1, "result"), AddressArgument(info, 2, "weights"), SizeArgument(info, 3, "expert"),
                        SizeArgument(info, 4, "experts"), SizeArgument(info, 5, "rows"), SizeArgument(info, 6, "width"));
    });
  }

  // upload(target, view): all of view's bytes
  Napi::Value Upload(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      auto [data, bytes] = HostBytes(info[1], "source");
      k.Upload(AddressArgument(info, 0, "target"), data, bytes);
    });
  }

  // download(view, source): fills all of view's bytes
  Napi::Value Download(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) {
      auto [data, bytes] = HostBytes(info[0], "target");
      k.Download(data, AddressArgument(info, 1, "source"), bytes);
    });
  }

  // copy(target, source, bytes)
  Napi::Value Copy(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) { k.Copy(AddressArgument(info, 0, "target"), AddressArgument(info, 1, "source"), SizeArgument(info, 2, "bytes")); });
  }

  Napi::Value Synchronize(const Napi::CallbackInfo& info) {
    return Run(info, [&](DeviceKernels& k) { k.Synchronize(); });
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    Guarded(info.Env(), [&] { kernels_.reset(); });
    return info.Env().Undefined();
  }

  std::unique_ptr<DeviceKernels> kernels_;
};

// The address of a host buffer's first byte (the host backend's memory is JS ArrayBuffers, whose
// contents never move).
Napi::Value HostAddress(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    auto [data, bytes] = HostBytes(info[0], "buffer");
    (void)bytes;
    return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(reinterpret_cast<uintptr_t>(data)));
  });
}

Napi::Value ImageBytes(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(EmbeddedKernelImageBytes())); }

}  // namespace

void RegisterDeviceKernelsBinding(Napi::Env env, Napi::Object exports) {
  exports.Set("DeviceKernels", DeviceKernelsObject::Define(env));
  Napi::Object functions = Napi::Object::New(env);
  functions.Set("hostAddress", Napi::Function::New(env, HostAddress, "hostAddress"));
  functions.Set("imageBytes", Napi::Function::New(env, ImageBytes, "imageBytes"));
  functions.Set("cacheBlockPositions", Napi::Number::New(env, kCacheBlockPositions));
  exports.Set("deviceKernels", functions);
}

}  // namespace trellis::kernels
