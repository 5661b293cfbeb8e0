#pragma once

#include <napi.h>

namespace trellis::kernels {

// Sets exports.DeviceKernels (a class: new DeviceKernels({ backend: 'cpu' | 'cuda', device })
// whose methods queue a decoder layer's operations on that backend, addresses as bigints), and
// exports.deviceKernels = { hostAddress(buffer), imageBytes() }. See device_kernels.h.
void RegisterDeviceKernelsBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::kernels
