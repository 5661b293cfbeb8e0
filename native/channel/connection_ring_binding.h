#pragma once

#include <napi.h>

#include <memory>

#include "channel/connection_ring.h"

namespace trellis::channel {

// Registers the connection ring class on `exports`.
void RegisterConnectionRingBinding(Napi::Env env, Napi::Object exports);

// The ring behind a JS connection ring object (the event loop watches it: native/loop).
std::shared_ptr<ConnectionRing> RingOf(const Napi::Value& value);

}  // namespace trellis::channel
