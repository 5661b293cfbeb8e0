#pragma once

#include <napi.h>

namespace trellis::nccl {

// Registers `nccl` on `exports`: status, uniqueId and the Communicator class.
void RegisterNcclBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::nccl
