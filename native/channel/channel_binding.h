#pragma once

#include <napi.h>

namespace trellis::channel {

// Registers the channel class on `exports`.
void RegisterChannelBinding(Napi::Env env, Napi::Object exports);

}  // namespace trellis::channel
