// A uv_prepare handle runs just before libuv polls for I/O. When the poll would block (libuv's
// backend timeout is not zero) and an arm is outstanding, it polls libuv's backend file descriptor
// (the epoll instance: readable once any watched descriptor is) without blocking until something is
// ready or the spin ends; libuv's own poll then returns at once. Off until a cap is configured: on
// a host with fewer cores than busy processes, the spinning takes the CPU the peer needs to answer
// (measured: an empty call 106 -> 345 us on two cores).
//
// How long to spin is learned. JS reports each message that arrives (answered()); the time from
// the arm before it goes into a ring of the last kWaits, and a spin lasts a little over their 75th
// percentile if that is within the cap, and not at all otherwise: a driver whose calls run for
// milliseconds wastes nothing, one whose replies take 300 us spins about 300 us. Readiness alone
// cannot tell an answer: V8's background threads wake the loop too (seen here 15-40 us after each
// send), so a spin ended by something else resumes on the next pass while its time lasts.
#include "loop/busy_poll.h"

#include <poll.h>
#include <time.h>
#include <uv.h>

#include <algorithm>
#include <array>
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

constexpr size_t kWaits = 16;

struct BusyPoll {
  uv_prepare_t prepare{};
  uv_loop_t* loop = nullptr;
  napi_async_cleanup_hook_handle cleanup = nullptr;
  int64_t cap_ns = 0;
  int64_t armed_at_ns = 0;  // the outstanding arm (0: none)
  bool slept = false;       // the loop slept since that arm
  std::array<int64_t, kWaits> waits{};
  size_t wait_count = 0;
  size_t next_wait = 0;
  int64_t spin_ns = 0;  // what the waits call for now (0: answers come too late to spin for)
  // Statistics: spins begun, answers that found the loop awake, nanoseconds spent spinning.
  uint64_t spins = 0;
  uint64_t hits = 0;
  uint64_t spun_ns = 0;
};

// An answer can sit in the socket while the loop is busy: a wait past this counts as "too late",
// whatever the exact figure.
constexpr int64_t kLongestWaitNs = 1'000'000'000;

void LearnWait(BusyPoll* state, int64_t wait_ns) {
  state->waits[state->next_wait] = std::min(wait_ns, kLongestWaitNs);
  state->next_wait = (state->next_wait + 1) % kWaits;
  state->wait_count = std::min(state->wait_count + 1, kWaits);
  std::array<int64_t, kWaits> sorted = state->waits;
  std::sort(sorted.begin(), sorted.begin() + static_cast<long>(state->wait_count));
  int64_t typical = sorted[(state->wait_count * 3) / 4];  // the 75th percentile
  // A quarter more and 5 us: an answer a little later than the typical one is still caught.
  int64_t wanted = typical + typical / 4 + 5'000;
  state->spin_ns = typical <= state->cap_ns ? std::min(wanted, state->cap_ns) : 0;
}

void OnPrepare(uv_prepare_t* handle) {
  auto* state = static_cast<BusyPoll*>(handle->data);
  if (state->armed_at_ns == 0 || state->slept) return;
  int timeout_ms = uv_backend_timeout(state->loop);
  if (timeout_ms == 0) return;  // libuv will not block: nothing to save, and the arm stays
  int64_t started = NowNs();
  int64_t until = state->armed_at_ns + state->spin_ns;
  if (timeout_ms > 0) until = std::min(until, started + static_cast<int64_t>(timeout_ms) * 1'000'000);
  if (started < until) {
    pollfd backend{uv_backend_fd(state->loop), POLLIN, 0};
    state->spins += 1;
    int64_t now = started;
    bool ready = false;
    while (now < until) {
      int polled = poll(&backend, 1, 0);
      if (polled > 0) {
        ready = true;
        break;
      }
      if (polled < 0 && errno != EINTR) break;
      for (int i = 0; i < 16; i++) Relax();
      now = NowNs();
    }
    state->spun_ns += static_cast<uint64_t>(NowNs() - started);
    if (ready) return;  // the answer, or a wake of another kind: the next pass spins on if so
  }
  state->slept = true;
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
  // configure(capMicros): the longest spin; 0 turns it off.
  busy_poll.Set("configure", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    if (!info[0].IsNumber() || info[0].As<Napi::Number>().DoubleValue() < 0) {
      throw Napi::TypeError::New(info.Env(), "busyPoll.configure expects a cap in microseconds, 0 or more");
    }
    BusyPoll* state = StateOf(info);
    state->cap_ns = static_cast<int64_t>(info[0].As<Napi::Number>().DoubleValue() * 1000);
    // Until answers have been seen, spin for up to the cap.
    state->wait_count = 0;
    state->next_wait = 0;
    state->spin_ns = state->cap_ns;
    return info.Env().Undefined();
  }, "configure", state));
  // arm(): a reply is expected; spin for it before the loop next sleeps.
  busy_poll.Set("arm", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    BusyPoll* state = StateOf(info);
    if (state->cap_ns == 0) return info.Env().Undefined();
    state->armed_at_ns = NowNs();
    state->slept = false;
    return info.Env().Undefined();
  }, "arm", state));
  // answered(): a message arrived; what the outstanding arm waited is learned.
  busy_poll.Set("answered", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    BusyPoll* state = StateOf(info);
    if (state->armed_at_ns == 0) return info.Env().Undefined();
    LearnWait(state, NowNs() - state->armed_at_ns);
    if (!state->slept) state->hits += 1;
    state->armed_at_ns = 0;
    return info.Env().Undefined();
  }, "answered", state));
  busy_poll.Set("stats", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    BusyPoll* state = StateOf(info);
    Napi::Object stats = Napi::Object::New(info.Env());
    stats.Set("capMicros", static_cast<double>(state->cap_ns) / 1000);
    stats.Set("spinMicros", static_cast<double>(state->spin_ns) / 1000);
    stats.Set("spins", static_cast<double>(state->spins));
    stats.Set("hits", static_cast<double>(state->hits));
    stats.Set("spunMicros", static_cast<double>(state->spun_ns) / 1000);
    return stats;
  }, "stats", state));
  exports.Set("busyPoll", busy_poll);
}

}  // namespace trellis::loop
