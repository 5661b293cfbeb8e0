// The one place native failures cross into JavaScript. lib/native.ts registers a factory that maps
// an error `code` to its typed JS class (as better-sqlite3 hands its error class to C++).
#pragma once

#include <napi.h>

#include <exception>
#include <utility>

#include "common/error.h"

namespace trellis {

struct AddonData {
  Napi::FunctionReference error_factory;
  Napi::FunctionReference store_constructor;
  Napi::FunctionReference connection_ring_constructor;
};

inline Napi::Error ToJsError(Napi::Env env, const NativeError& error) {
  auto* data = env.GetInstanceData<AddonData>();
  Napi::Object details = Napi::Object::New(env);
  for (const auto& [key, value] : error.details()) {
    if (std::holds_alternative<double>(value)) details.Set(key, std::get<double>(value));
    else details.Set(key, std::get<std::string>(value));
  }
  if (data != nullptr && !data->error_factory.IsEmpty()) {
    Napi::Value made = data->error_factory.Call({Napi::String::New(env, error.code()), Napi::String::New(env, error.what()), details});
    if (made.IsObject()) return Napi::Error(env, made);
  }
  Napi::Error plain = Napi::Error::New(env, error.what());
  plain.Set("code", error.code());
  return plain;
}

// Runs `body`, turning NativeError into the registered JS error class.
template <typename Body>
auto Guarded(Napi::Env env, Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const NativeError& error) {
    throw ToJsError(env, error);
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw ToJsError(env, NativeError("ERR_OUT_OF_MEMORY", "native allocation failed"));
  }
}

inline NativeError InvalidArgument(const std::string& message) { return NativeError("ERR_INVALID_ARGUMENT", message); }

}  // namespace trellis
