#pragma once

#include <napi.h>

namespace trellis::store {

// Registers the ObjectStore native class on `exports`.
void RegisterStoreBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::store
