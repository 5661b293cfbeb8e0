// Registers the native parts of trellis. Each part lives in its own folder and exposes one
// Register function; lib/native.ts is the typed face of everything registered here.
#include <napi.h>

#include "common/js_error.h"
#include "cuda/cuda_binding.h"
#include "image/image_binding.h"
#include "nccl/nccl_binding.h"
#include "channel/channel_binding.h"
#include "channel/connection_ring_binding.h"
#include "collective/communicator_binding.h"
#include "kernels/device_kernels_binding.h"
#include "kernels/kernels_binding.h"
#include "loop/busy_poll.h"
#include "store/store_binding.h"

namespace {

Napi::Value SetErrorFactory(const Napi::CallbackInfo& info) {
  auto* data = info.Env().GetInstanceData<trellis::AddonData>();
  if (!info[0].IsFunction()) {
    Napi::TypeError::New(info.Env(), "setErrorFactory expects a function").ThrowAsJavaScriptException();
    return info.Env().Undefined();
  }
  data->error_factory = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new trellis::AddonData());
  exports.Set("setErrorFactory", Napi::Function::New(env, SetErrorFactory));
  trellis::store::RegisterStoreBinding(env, exports);
  trellis::cuda::RegisterCudaBinding(env, exports);
  trellis::nccl::RegisterNcclBinding(env, exports);
  trellis::collective::RegisterCommunicatorBinding(env, exports);
  trellis::channel::RegisterChannelBinding(env, exports);
  trellis::channel::RegisterConnectionRingBinding(env, exports);
  trellis::loop::RegisterBusyPoll(env, exports);
  trellis::kernels::RegisterKernelsBinding(env, exports);
  trellis::kernels::RegisterDeviceKernelsBinding(env, exports);
  trellis::image::RegisterImageBinding(env, exports);
  return exports;
}

}  // namespace

NODE_API_MODULE(trellis, Init)
