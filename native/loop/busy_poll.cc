// A uv_prepare handle runs just before libuv polls for I/O. When the poll would block (libuv's
// backend timeout is not zero) and the armed budget has time left, it polls libuv's backend file
// descriptor (the epoll instance: readable once any watched descriptor is) without blocking until
// something is ready or the budget ends; libuv's own poll then returns at once. Off until a
// budget is configured: on a host with fewer cores than busy processes, the spinning takes the
// CPU the peer needs to answer (measured: an empty call 106 -> 345 us on two cores).
#include "loop/busy_poll.h"

#include <poll.h>
#include <time.h>
#include <uv.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>

#include "common/js_error.h"

namespace trellis::loop {
namespace {

int64_t NowNs() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
}

inline void Relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct BusyPoll {
  uv_prepare_t prepare{};
  uv_loop_t* loop = nullptr;
  napi_async_cleanup_hook_handle cleanup = nullptr;
  int64_t budget_ns = 0;
  int64_t deadline_ns = 0;
  // Backing off where answers come later than the budget (a driver whose calls run for
  // milliseconds): after kMissesBeforePause misses in a row, the next `pause` arms do not spin;
  // each pause that ends in misses again doubles it, up to kMaxPause; a hit resets it.
  int misses_in_row = 0;
  int paused_arms = 0;
  int pause = kPause;
  // Statistics: spins begun, spins that saw I/O arrive, nanoseconds spent spinning.
  uint64_t spins = 0;
  uint64_t hits = 0;
  uint64_t spun_ns = 0;

  static constexpr int kMissesBeforePause = 8;
  static constexpr int kPause = 64;
  static constexpr int kMaxPause = 4096;
};

void OnPrepare(uv_prepare_t* handle) {
  auto* state = static_cast<BusyPoll*>(handle->data);
  if (state->deadline_ns == 0) return;
  int64_t started = NowNs();
  int64_t until = state->deadline_ns;
  state->deadline_ns = 0;  // one spin per arm
  if (started >= until) return;
  int timeout_ms = uv_backend_timeout(state->loop);
  if (timeout_ms == 0) return;  // libuv will not block: nothing to save
  if (timeout_ms > 0) until = std::min(until, started + static_cast<int64_t>(timeout_ms) * 1'000'000);
  if (state->paused_arms > 0) {
    state->paused_arms -= 1;
    return;
  }
  pollfd backend{uv_backend_fd(state->loop), POLLIN, 0};
  state->spins += 1;
  bool hit = false;
  int64_t now = started;
  while (now < until) {
    int ready = poll(&backend, 1, 0);
    if (ready > 0) {
      hit = true;
      break;
    }
    if (ready < 0 && errno != EINTR) break;
    for (int i = 0; i < 16; i++) Relax();
    now = NowNs();
  }
  state->spun_ns += static_cast<uint64_t>(NowNs() - started);
  if (hit) {
    state->hits += 1;
    state->misses_in_row = 0;
    state->pause = BusyPoll::kPause;
  } else if (++state->misses_in_row >= BusyPoll::kMissesBeforePause) {
    state->paused_arms = state->pause;
    state->pause = std::min(state->pause * 2, BusyPoll::kMaxPause);
    state->misses_in_row = 0;
  }
}

void OnClosed(uv_handle_t* handle) {
  auto* state = static_cast<BusyPoll*>(handle->data);
  napi_remove_async_cleanup_hook(state->cleanup);
  delete state;
}

// At environment teardown: the handle must be closed before the loop is.
void OnCleanup(napi_async_cleanup_hook_handle, void* data) {
  auto* state = static_cast<BusyPoll*>(data);
  uv_prepare_stop(&state->prepare);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->prepare), OnClosed);
}

BusyPoll* StateOf(const Napi::CallbackInfo& info) { return static_cast<BusyPoll*>(info.Data()); }

}  // namespace

void RegisterBusyPoll(Napi::Env env, Napi::Object exports) {
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    throw Napi::Error::New(env, "busyPoll: no event loop");
  }
  auto* state = new BusyPoll();
  state->loop = loop;
  state->prepare.data = state;
  if (uv_prepare_init(loop, &state->prepare) != 0) {
    delete state;
    throw Napi::Error::New(env, "busyPoll: uv_prepare_init failed");
  }
  uv_prepare_start(&state->prepare, OnPrepare);
  // It never keeps the process alive by itself.
  uv_unref(reinterpret_cast<uv_handle_t*>(&state->prepare));
  if (napi_add_async_cleanup_hook(env, OnCleanup, state, &state->cleanup) != napi_ok) {
    throw Napi::Error::New(env, "busyPoll: napi_add_async_cleanup_hook failed");
  }

  Napi::Object busy_poll = Napi::Object::New(env);
  // configure(budgetMicros): 0 turns it off.
  busy_poll.Set("configure", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    if (!info[0].IsNumber() || info[0].As<Napi::Number>().DoubleValue() < 0) {
      throw Napi::TypeError::New(info.Env(), "busyPoll.configure expects a budget in microseconds, 0 or more");
    }
    StateOf(info)->budget_ns = static_cast<int64_t>(info[0].As<Napi::Number>().DoubleValue() * 1000);
    return info.Env().Undefined();
  }, "configure", state));
  // arm(): a reply is expected; spin for up to the budget before the loop next sleeps.
  busy_poll.Set("arm", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    BusyPoll* state = StateOf(info);
    if (state->budget_ns > 0) state->deadline_ns = NowNs() + state->budget_ns;
    return info.Env().Undefined();
  }, "arm", state));
  busy_poll.Set("stats", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    BusyPoll* state = StateOf(info);
    Napi::Object stats = Napi::Object::New(info.Env());
    stats.Set("budgetMicros", static_cast<double>(state->budget_ns) / 1000);
    stats.Set("spins", static_cast<double>(state->spins));
    stats.Set("hits", static_cast<double>(state->hits));
    stats.Set("spunMicros", static_cast<double>(state->spun_ns) / 1000);
    return stats;
  }, "stats", state));
  exports.Set("busyPoll", busy_poll);
}

}  // namespace trellis::loop
