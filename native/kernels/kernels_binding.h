#pragma once

#include <napi.h>

namespace trellis::kernels {

// Sets exports.kernels = { linear, layerNorm, gelu, rmsNorm, siluMultiply, rotary, attention }:
// synchronous f32 CPU kernels that check every argument before touching memory (see cpu_kernels.h
// for what each computes).
void RegisterKernelsBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::kernels
