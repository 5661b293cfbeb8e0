#pragma once

#include <napi.h>

namespace trellis::collective {

// Registers the shared-memory communicator class on `exports`.
void RegisterCommunicatorBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::collective
