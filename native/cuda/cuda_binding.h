#pragma once

#include <napi.h>

#include "cuda/memory.h"

namespace trellis::cuda {

// Registers `cuda` on `exports`: status, devices, allocator, DeviceMemory and Stream classes.
void RegisterCudaBinding(Napi::Env env, Napi::Object exports);

// The memory behind a DeviceMemory object: throws ERR_INVALID_ARGUMENT when `value` is not one,
// ERR_CUDA_FREED when it was freed. The copy shares ownership, so work in flight keeps it alive.
DeviceBuffer BufferOf(const Napi::Value& value, const char* what);

}  // namespace trellis::cuda
