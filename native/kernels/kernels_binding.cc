// Node-API face of the CPU kernels. The kernels run synchronously on the JS thread: each worker
// process is one rank computing its own shard, so there is no other work for that thread to do.
// Every argument is checked here, whatever lib/llm/kernels.ts already checked: the kernels index
// raw memory with these numbers, and a wrong one must be an error, not a stray read or write.
#include "kernels/kernels_binding.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "common/js_error.h"
#include "kernels/cpu_kernels.h"
#include "kernels/thread_pool.h"

namespace trellis::kernels {
namespace {

struct FloatArray {
  float* data;
  size_t length;
};

// A weight matrix: f32, 16-bit floats (bf16 or f16) kept in a Uint16Array, or int8 (with scales
// given apart) in an Int8Array.
struct WeightArray {
  const void* data;
  size_t length;
  size_t element_bytes;
  bool half;
  WeightType type;
  bool int8 = false;
};

struct IntArray {
  int32_t* data;
  size_t length;
};

std::string FormatNumber(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.17g", value);
  return text;
}

std::string Describe(const Napi::Value& value) {
  switch (value.Type()) {
    case napi_undefined: return "undefined";
    case napi_null: return "null";
    case napi_boolean: return "a boolean";
    case napi_number: return FormatNumber(value.As<Napi::Number>().DoubleValue());
    case napi_string: return "a string";
    case napi_bigint: return "a bigint";
    case napi_function: return "a function";
    default: break;
  }
  if (value.IsTypedArray()) {
    static const char* kNames[] = {"Int8Array",    "Uint8Array",   "Uint8ClampedArray", "Int16Array",    "Uint16Array",     "Int32Array",
                                   "Uint32Array",  "Float32Array", "Float64Array",      "BigInt64Array", "BigUint64Array"};
    const auto type = static_cast<size_t>(value.As<Napi::TypedArray>().TypedArrayType());
    return type < sizeof(kNames) / sizeof(kNames[0]) ? std::string("a ") + kNames[type] : "a TypedArray";
  }
  if (value.IsArray()) return "an Array";
  if (value.IsArrayBuffer()) return "an ArrayBuffer";
  if (value.IsDataView()) return "a DataView";
  return "an object";
}

FloatArray FloatArrayArgument(const char* kernel, const Napi::Value& value, const char* name) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array) {
    throw InvalidArgument(std::string(kernel) + ": " + name + " must be a Float32Array, got " + Describe(value));
  }
  // Float32Array::Data() already points at the view's first element (byteOffset applied).
  auto array = value.As<Napi::Float32Array>();
  return {array.Data(), array.ElementLength()};
}

// weight with its dtype: a Float32Array with dtype 'f32' (or none), or a Uint16Array holding the
// bits of 'bf16' or 'f16' values.
WeightArray WeightArgument(const char* kernel, const Napi::Value& value, const Napi::Value& dtype_value, const char* name) {
  std::string dtype = "f32";
  if (!dtype_value.IsUndefined()) {
    if (!dtype_value.IsString()) throw InvalidArgument(std::string(kernel) + ": " + name + "'s dtype must be 'f32', 'bf16', 'f16' or 'int8', got " + Describe(dtype_value));
    dtype = dtype_value.As<Napi::String>().Utf8Value();
  }
  if (dtype == "f32") {
    const FloatArray array = FloatArrayArgument(kernel, value, name);
    return {array.data, array.length, sizeof(float), false, WeightType::kBfloat16};
  }
  if (dtype == "int8") {
    if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_int8_array) {
      throw InvalidArgument(std::string(kernel) + ": " + name + " in int8 must be an Int8Array, got " + Describe(value));
    }
    auto array = value.As<Napi::Int8Array>();
    return {array.Data(), array.ElementLength(), 1, false, WeightType::kBfloat16, true};
  }
  if (dtype != "bf16" && dtype != "f16") throw InvalidArgument(std::string(kernel) + ": " + name + "'s dtype must be 'f32', 'bf16', 'f16' or 'int8', got '" + dtype + "'");
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_uint16_array) {
    throw InvalidArgument(std::string(kernel) + ": " + name + " in " + dtype + " must be a Uint16Array, got " + Describe(value));
  }
  auto array = value.As<Napi::Uint16Array>();
  return {array.Data(), array.ElementLength(), sizeof(uint16_t), true, dtype == "bf16" ? WeightType::kBfloat16 : WeightType::kFloat16};
}

IntArray Int32ArrayArgument(const char* kernel, const Napi::Value& value, const char* name) {
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
    throw InvalidArgument(std::string(kernel) + ": " + name + " must be an Int32Array, got " + Describe(value));
  }
  auto array = value.As<Napi::Int32Array>();
  return {array.Data(), array.ElementLength()};
}

// A positive (or, with minimum 0, non-negative) integer that a size_t and a double both hold exactly.
size_t DimensionArgument(const char* kernel, const Napi::Value& value, const char* name, double minimum) {
  const double number = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : NAN;
  if (!std::isfinite(number) || std::floor(number) != number || number < minimum || number > 9007199254740991.0 ||
      number > static_cast<double>(SIZE_MAX)) {
    const char* expected = minimum > 0 ? " must be a positive integer" : " must be a non-negative integer";
    throw InvalidArgument(std::string(kernel) + ": " + name + expected + ", got " + Describe(value));
  }
  return static_cast<size_t>(number);
}

// a * b, or an error naming the product when it does not fit in memory at all.
size_t Product(const char* kernel, const std::string& what, size_t a, size_t b) {
  size_t product;
  if (__builtin_mul_overflow(a, b, &product) || product > SIZE_MAX / sizeof(float)) {
    throw InvalidArgument(std::string(kernel) + ": " + what + " = " + std::to_string(a) + " * " + std::to_string(b) + " is too large");
  }
  return product;
}

void RequireLength(const char* kernel, const FloatArray& array, const char* name, size_t needed, const std::string& formula) {
  if (array.length < needed) {
    throw InvalidArgument(std::string(kernel) + ": " + name + " must hold at least " + formula + " = " + std::to_string(needed) +
                          " floats, got " + std::to_string(array.length));
  }
}

// Writing one array while reading an overlapping one would corrupt inputs not yet read.
void RequireDisjointBytes(const char* kernel, const char* written_name, const void* written, size_t written_bytes, const void* input,
                          size_t input_bytes, const char* input_name) {
  const auto written_begin = reinterpret_cast<uintptr_t>(written);
  const auto input_begin = reinterpret_cast<uintptr_t>(input);
  const bool disjoint = written_bytes == 0 || input_bytes == 0 || written_begin + written_bytes <= input_begin ||
                        input_begin + input_bytes <= written_begin;
  if (!disjoint) throw InvalidArgument(std::string(kernel) + ": " + written_name + " must not overlap " + input_name);
}

void RequireDisjoint(const char* kernel, const FloatArray& out, size_t out_used, const FloatArray& input, size_t input_used, const char* input_name) {
  RequireDisjointBytes(kernel, "out", out.data, out_used * sizeof(float), input.data, input_used * sizeof(float), input_name);
}

double EpsilonArgument(const char* kernel, const Napi::Value& value) {
  const double eps = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : NAN;
  if (!std::isfinite(eps) || eps < 0) throw InvalidArgument(std::string(kernel) + ": eps must be a finite number >= 0, got " + Describe(value));
  return eps;
}

// linear(out, x, weight, bias | null, m, k, n, weightDtype = 'f32', scales (int8 only))
Napi::Value LinearFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "linear";
    const FloatArray out = FloatArrayArgument(kernel, info[0], "out");
    const FloatArray x = FloatArrayArgument(kernel, info[1], "x");
    const WeightArray weight = WeightArgument(kernel, info[2], info[7], "weight");
    const bool has_bias = !info[3].IsNull() && !info[3].IsUndefined();
    const FloatArray bias = has_bias ? FloatArrayArgument(kernel, info[3], "bias") : FloatArray{nullptr, 0};
    const size_t m = DimensionArgument(kernel, info[4], "m", 1);
    const size_t k = DimensionArgument(kernel, info[5], "k", 1);
    const size_t n = DimensionArgument(kernel, info[6], "n", 1);
    const size_t out_size = Product(kernel, "m * n", m, n);
    const size_t x_size = Product(kernel, "m * k", m, k);
    const size_t weight_size = Product(kernel, "n * k", n, k);
    RequireLength(kernel, out, "out", out_size, "m * n = " + std::to_string(m) + " * " + std::to_string(n));
    RequireLength(kernel, x, "x", x_size, "m * k = " + std::to_string(m) + " * " + std::to_string(k));
    if (weight.length < weight_size) {
      const char* unit = weight.int8 ? " int8 values" : weight.half ? " 16-bit values" : " floats";
      throw InvalidArgument(std::string(kernel) + ": weight must hold at least n * k = " + std::to_string(n) + " * " + std::to_string(k) + " = " +
                            std::to_string(weight_size) + unit + ", got " + std::to_string(weight.length));
    }
    FloatArray scales{nullptr, 0};
    if (weight.int8) {
      scales = FloatArrayArgument(kernel, info[8], "scales");
      RequireLength(kernel, scales, "scales", n, "n");
      RequireDisjoint(kernel, out, out_size, scales, n, "scales");
    }
    if (has_bias) RequireLength(kernel, bias, "bias", n, "n");
    RequireDisjoint(kernel, out, out_size, x, x_size, "x");
    RequireDisjointBytes(kernel, "out", out.data, out_size * sizeof(float), weight.data, weight_size * weight.element_bytes, "weight");
    if (has_bias) RequireDisjoint(kernel, out, out_size, bias, n, "bias");
    const float* bias_data = has_bias ? bias.data : nullptr;
    if (weight.int8) Linear(out.data, x.data, static_cast<const int8_t*>(weight.data), scales.data, bias_data, m, k, n);
    else if (weight.half) Linear(out.data, x.data, static_cast<const uint16_t*>(weight.data), weight.type, bias_data, m, k, n);
    else Linear(out.data, x.data, static_cast<const float*>(weight.data), bias_data, m, k, n);
    return info.Env().Undefined();
  });
}

// layerNorm(out, x, gamma, beta, rows, cols, eps)
Napi::Value LayerNormFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "layerNorm";
    const FloatArray out = FloatArrayArgument(kernel, info[0], "out");
    const FloatArray x = FloatArrayArgument(kernel, info[1], "x");
    const FloatArray gamma = FloatArrayArgument(kernel, info[2], "gamma");
    const FloatArray beta = FloatArrayArgument(kernel, info[3], "beta");
    const size_t rows = DimensionArgument(kernel, info[4], "rows", 1);
    const size_t cols = DimensionArgument(kernel, info[5], "cols", 1);
    const double eps = EpsilonArgument(kernel, info[6]);
    const size_t size = Product(kernel, "rows * cols", rows, cols);
    const std::string formula = "rows * cols = " + std::to_string(rows) + " * " + std::to_string(cols);
    RequireLength(kernel, out, "out", size, formula);
    RequireLength(kernel, x, "x", size, formula);
    RequireLength(kernel, gamma, "gamma", cols, "cols");
    RequireLength(kernel, beta, "beta", cols, "cols");
    // Normalizing in place is the one overlap the kernel allows.
    if (out.data != x.data) RequireDisjoint(kernel, out, size, x, size, "x (unless it is x itself)");
    RequireDisjoint(kernel, out, size, gamma, cols, "gamma");
    RequireDisjoint(kernel, out, size, beta, cols, "beta");
    LayerNorm(out.data, x.data, gamma.data, beta.data, rows, cols, static_cast<float>(eps));
    return info.Env().Undefined();
  });
}

// gelu(x), in place
Napi::Value GeluFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const FloatArray x = FloatArrayArgument("gelu", info[0], "x");
    Gelu(x.data, x.length);
    return info.Env().Undefined();
  });
}

// rmsNorm(out, x, gamma, rows, cols, eps)
Napi::Value RmsNormFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "rmsNorm";
    const FloatArray out = FloatArrayArgument(kernel, info[0], "out");
    const FloatArray x = FloatArrayArgument(kernel, info[1], "x");
    const FloatArray gamma = FloatArrayArgument(kernel, info[2], "gamma");
    const size_t rows = DimensionArgument(kernel, info[3], "rows", 1);
    const size_t cols = DimensionArgument(kernel, info[4], "cols", 1);
    const double eps = EpsilonArgument(kernel, info[5]);
    const size_t size = Product(kernel, "rows * cols", rows, cols);
    const std::string formula = "rows * cols = " + std::to_string(rows) + " * " + std::to_string(cols);
    RequireLength(kernel, out, "out", size, formula);
    RequireLength(kernel, x, "x", size, formula);
    RequireLength(kernel, gamma, "gamma", cols, "cols");
    // Normalizing in place is the one overlap the kernel allows.
    if (out.data != x.data) RequireDisjoint(kernel, out, size, x, size, "x (unless it is x itself)");
    RequireDisjoint(kernel, out, size, gamma, cols, "gamma");
    RmsNorm(out.data, x.data, gamma.data, rows, cols, static_cast<float>(eps));
    return info.Env().Undefined();
  });
}

// siluMultiply(out, gate, up), elementwise over arrays of one length
Napi::Value SiluMultiplyFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "siluMultiply";
    const FloatArray out = FloatArrayArgument(kernel, info[0], "out");
    const FloatArray gate = FloatArrayArgument(kernel, info[1], "gate");
    const FloatArray up = FloatArrayArgument(kernel, info[2], "up");
    // The arrays carry the size, so a length that differs is a mistake rather than spare room.
    for (const auto& [array, name] : {std::pair{gate, "gate"}, std::pair{up, "up"}}) {
      if (array.length != out.length) {
        throw InvalidArgument(std::string(kernel) + ": " + name + " must have the length of out (" + std::to_string(out.length) + "), got " +
                              std::to_string(array.length));
      }
    }
    // Gating in place is the one overlap the kernel allows.
    if (out.data != gate.data) RequireDisjoint(kernel, out, out.length, gate, gate.length, "gate (unless it is gate itself)");
    RequireDisjoint(kernel, out, out.length, up, up.length, "up");
    SiluMultiply(out.data, gate.data, up.data, out.length);
    return info.Env().Undefined();
  });
}

// rotary(x, positions, inverseFrequencies, rows, heads, headDim), in place
Napi::Value RotaryFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "rotary";
    const FloatArray x = FloatArrayArgument(kernel, info[0], "x");
    const IntArray positions = Int32ArrayArgument(kernel, info[1], "positions");
    const FloatArray inverse_frequencies = FloatArrayArgument(kernel, info[2], "inverseFrequencies");
    const size_t rows = DimensionArgument(kernel, info[3], "rows", 1);
    const size_t heads = DimensionArgument(kernel, info[4], "heads", 1);
    const size_t head_dim = DimensionArgument(kernel, info[5], "headDim", 1);
    if (head_dim % 2 != 0) throw InvalidArgument(std::string(kernel) + ": headDim must be even, got " + std::to_string(head_dim));
    const size_t half = head_dim / 2;
    const size_t size = Product(kernel, "rows * heads * headDim", rows, Product(kernel, "heads * headDim", heads, head_dim));
    RequireLength(kernel, x, "x", size,
                  "rows * heads * headDim = " + std::to_string(rows) + " * " + std::to_string(heads) + " * " + std::to_string(head_dim));
    if (positions.length < rows) {
      throw InvalidArgument(std::string(kernel) + ": positions must hold at least rows = " + std::to_string(rows) + " integers, got " +
                            std::to_string(positions.length));
    }
    RequireLength(kernel, inverse_frequencies, "inverseFrequencies", half, "headDim / 2");
    // A negative position would rotate without complaint; it can only come from a caller's mistake.
    for (size_t row = 0; row < rows; ++row) {
      if (positions.data[row] < 0) {
        throw InvalidArgument(std::string(kernel) + ": positions[" + std::to_string(row) + "] must be >= 0, got " + std::to_string(positions.data[row]));
      }
    }
    RequireDisjointBytes(kernel, "x", x.data, size * sizeof(float), positions.data, rows * sizeof(int32_t), "positions");
    RequireDisjointBytes(kernel, "x", x.data, size * sizeof(float), inverse_frequencies.data, half * sizeof(float), "inverseFrequencies");
    Rotary(x.data, positions.data, inverse_frequencies.data, rows, heads, head_dim);
    return info.Env().Undefined();
  });
}

// attention(out, q, keys, values, queries, past, heads, headDim[, kvHeads[, window[, kvDtype]]])
Napi::Value AttentionFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "attention";
    const FloatArray out = FloatArrayArgument(kernel, info[0], "out");
    const FloatArray q = FloatArrayArgument(kernel, info[1], "q");
    // A 16-bit cache (kvDtype 'bf16' or 'f16') comes as Uint16Arrays.
    const WeightArray keys = WeightArgument(kernel, info[2], info[10], "keys");
    const WeightArray values = WeightArgument(kernel, info[3], info[10], "values");
    if (keys.int8) throw InvalidArgument(std::string(kernel) + ": kvDtype must be 'f32', 'bf16' or 'f16', got 'int8'");
    const size_t queries = DimensionArgument(kernel, info[4], "queries", 1);
    const size_t past = DimensionArgument(kernel, info[5], "past", 0);
    const size_t heads = DimensionArgument(kernel, info[6], "heads", 1);
    const size_t head_dim = DimensionArgument(kernel, info[7], "headDim", 1);
    // Without a kvHeads (the callers before grouped-query attention) each query head has its own.
    const size_t kv_heads = info[8].IsUndefined() ? heads : DimensionArgument(kernel, info[8], "kvHeads", 1);
    // No window (0 or undefined): every earlier position.
    const size_t window = info[9].IsUndefined() ? 0 : DimensionArgument(kernel, info[9], "window", 0);
    if (heads % kv_heads != 0) {
      throw InvalidArgument(std::string(kernel) + ": heads must be a multiple of kvHeads, got heads " + std::to_string(heads) + " and kvHeads " +
                            std::to_string(kv_heads));
    }
    size_t positions;
    if (__builtin_add_overflow(past, queries, &positions)) throw InvalidArgument(std::string(kernel) + ": past + queries is too large");
    const size_t width = Product(kernel, "heads * headDim", heads, head_dim);
    const size_t query_size = Product(kernel, "queries * heads * headDim", queries, width);
    const size_t cache_size = Product(kernel, "(past + queries) * kvHeads * headDim", positions, Product(kernel, "kvHeads * headDim", kv_heads, head_dim));
    // The score scratch holds queries * (past + queries) floats, or for one query a row per query
    // head of a kv head's group.
    Product(kernel, "queries * (past + queries)", queries, positions);
    Product(kernel, "heads / kvHeads * (past + queries)", heads / kv_heads, positions);
    const std::string query_formula =
        "queries * heads * headDim = " + std::to_string(queries) + " * " + std::to_string(heads) + " * " + std::to_string(head_dim);
    const std::string cache_formula =
        "(past + queries) * kvHeads * headDim = " + std::to_string(positions) + " * " + std::to_string(kv_heads) + " * " + std::to_string(head_dim);
    RequireLength(kernel, out, "out", query_size, query_formula);
    RequireLength(kernel, q, "q", query_size, query_formula);
    for (const auto& [array, name] : {std::pair{&keys, "keys"}, std::pair{&values, "values"}}) {
      if (array->length < cache_size) {
        throw InvalidArgument(std::string(kernel) + ": " + name + " must hold at least " + cache_formula + " = " + std::to_string(cache_size) +
                              (array->half ? " 16-bit values" : " floats") + ", got " + std::to_string(array->length));
      }
      RequireDisjointBytes(kernel, "out", out.data, query_size * sizeof(float), array->data, cache_size * array->element_bytes, name);
    }
    RequireDisjoint(kernel, out, query_size, q, query_size, "q");
    if (keys.half) {
      Attention(out.data, q.data, static_cast<const uint16_t*>(keys.data), static_cast<const uint16_t*>(values.data), keys.type, queries, past, heads,
                head_dim, kv_heads, window);
    } else {
      Attention(out.data, q.data, static_cast<const float*>(keys.data), static_cast<const float*>(values.data), queries, past, heads, head_dim,
                kv_heads, window);
    }
    return info.Env().Undefined();
  });
}

// narrow(out, x, dtype, count): the first count floats of x rounded to bf16 or f16, as bits into out.
Napi::Value NarrowFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "narrow";
    const std::string dtype = info[2].IsString() ? info[2].As<Napi::String>().Utf8Value() : std::string();
    if (dtype != "bf16" && dtype != "f16") throw InvalidArgument(std::string(kernel) + ": dtype must be 'bf16' or 'f16', got " + (info[2].IsString() ? "'" + dtype + "'" : Describe(info[2])));
    const WeightArray out = WeightArgument(kernel, info[0], info[2], "out");
    const FloatArray x = FloatArrayArgument(kernel, info[1], "x");
    const size_t count = DimensionArgument(kernel, info[3], "count", 0);
    if (out.length < count) throw InvalidArgument(std::string(kernel) + ": out must hold at least count = " + std::to_string(count) + " elements, got " + std::to_string(out.length));
    RequireLength(kernel, x, "x", count, "count");
    RequireDisjointBytes(kernel, "out", out.data, count * sizeof(uint16_t), x.data, count * sizeof(float), "x");
    Narrow(static_cast<uint16_t*>(const_cast<void*>(out.data)), x.data, out.type, count);
    return info.Env().Undefined();
  });
}

// widen(out, bits, dtype, count): the first count 16-bit values of bits, as f32, into out.
Napi::Value WidenFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const char* kernel = "widen";
    const FloatArray out = FloatArrayArgument(kernel, info[0], "out");
    const WeightArray in = WeightArgument(kernel, info[1], info[2], "bits");
    if (!in.half) throw InvalidArgument(std::string(kernel) + ": dtype must be 'bf16' or 'f16', got " + (in.int8 ? "'int8'" : "'f32'"));
    const size_t count = DimensionArgument(kernel, info[3], "count", 0);
    RequireLength(kernel, out, "out", count, "count");
    if (in.length < count) throw InvalidArgument(std::string(kernel) + ": bits must hold at least count = " + std::to_string(count) + " elements, got " + std::to_string(in.length));
    RequireDisjointBytes(kernel, "out", out.data, count * sizeof(float), in.data, count * sizeof(uint16_t), "bits");
    Widen(out.data, static_cast<const uint16_t*>(in.data), in.type, count);
    return info.Env().Undefined();
  });
}

// setThreads(threads): the threads the kernels of this process use, the caller's included.
Napi::Value SetThreadsFunction(const Napi::CallbackInfo& info) {
  return Guarded(info.Env(), [&]() -> Napi::Value {
    const size_t threads = DimensionArgument("setThreads", info[0], "threads", 1);
    // A rank never usefully runs more threads than a large host has cores.
    if (threads > 1024) throw InvalidArgument("setThreads: threads must be at most 1024, got " + std::to_string(threads));
    SetKernelThreads(threads);
    return info.Env().Undefined();
  });
}

Napi::Value ThreadsFunction(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(KernelThreads())); }

// The workers are joined before Node tears down the last environment that loaded the addon (the
// pool is per process; worker_threads each have an environment of their own).
std::atomic<int> environments{0};
void StopThreadsAtCleanup(void*) {
  if (environments.fetch_sub(1) == 1) StopKernelThreads();
}

}  // namespace

void RegisterKernelsBinding(Napi::Env env, Napi::Object exports) {
  Napi::Object kernels = Napi::Object::New(env);
  kernels.Set("linear", Napi::Function::New(env, LinearFunction, "linear"));
  kernels.Set("layerNorm", Napi::Function::New(env, LayerNormFunction, "layerNorm"));
  kernels.Set("gelu", Napi::Function::New(env, GeluFunction, "gelu"));
  kernels.Set("rmsNorm", Napi::Function::New(env, RmsNormFunction, "rmsNorm"));
  kernels.Set("siluMultiply", Napi::Function::New(env, SiluMultiplyFunction, "siluMultiply"));
  kernels.Set("rotary", Napi::Function::New(env, RotaryFunction, "rotary"));
  kernels.Set("attention", Napi::Function::New(env, AttentionFunction, "attention"));
  kernels.Set("widen", Napi::Function::New(env, WidenFunction, "widen"));
  kernels.Set("narrow", Napi::Function::New(env, NarrowFunction, "narrow"));
  kernels.Set("setThreads", Napi::Function::New(env, SetThreadsFunction, "setThreads"));
  kernels.Set("threads", Napi::Function::New(env, ThreadsFunction, "threads"));
  NAPI_THROW_IF_FAILED_VOID(env, napi_add_env_cleanup_hook(env, StopThreadsAtCleanup, nullptr));
  environments.fetch_add(1);
  exports.Set("kernels", kernels);
}

}  // namespace trellis::kernels
