// Busy-polling before the event loop sleeps: after a process sends a message that a reply will
// answer, waking from a blocked epoll_wait costs tens of microseconds per hop on a host with idle
// cores (the scheduler's wake-up, the core's exit from a sleep state). For a short budget after
// each arm(), this process checks libuv's backend instead of letting it block.
#pragma once

#include <napi.h>

namespace trellis::loop {

void RegisterBusyPoll(Napi::Env env, Napi::Object exports);

}  // namespace trellis::loop
