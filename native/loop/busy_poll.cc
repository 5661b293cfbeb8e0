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
//
// The same hooks watch the connection rings this process reads (native/channel/connection_ring):
// the spin looks at them as well as at the backend, and before the loop blocks each ring is
// marked sleeping (its writer then rings the socket). A ring with bytes keeps the loop from
// blocking (an idle handle), and a uv_check handle, which runs right after the poll, marks the
// rings awake and hands the ids of those with bytes to JS.
#include "loop/busy_poll.h"

#include <poll.h>
#include <time.h>
#include <uv.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "channel/connection_ring_binding.h"
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

struct WatchedRing {
  uint32_t id;
  std::shared_ptr<channel::ConnectionRing> ring;
};

struct BusyPoll {
  uv_prepare_t prepare{};
  uv_check_t check{};
  uv_idle_t idle{};  // active: the loop must not block (a ring has bytes)
  int open_handles = 0;
  uv_loop_t* loop = nullptr;
  napi_env env = nullptr;
  std::vector<WatchedRing> rings;
  bool rings_marked = false;  // marked sleeping before this pass's poll
  Napi::FunctionReference on_readable;
  std::optional<Napi::AsyncContext> context;
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

bool AnyRingReadable(const BusyPoll* state) {
  for (const WatchedRing& watched : state->rings) {
    if (watched.ring->Readable()) return true;
  }
  return false;
}

void Idle(uv_idle_t*) {}

// Keeps libuv's coming poll from blocking: the check phase reads the rings right after it.
void StayAwake(BusyPoll* state) { uv_idle_start(&state->idle, Idle); }

// The loop is about to block: each ring is marked sleeping, unless bytes came meanwhile.
void MarkRingsSleeping(BusyPoll* state) {
  state->rings_marked = !state->rings.empty();
  for (const WatchedRing& watched : state->rings) {
    if (!watched.ring->MarkSleeping()) StayAwake(state);
  }
}

void OnPrepare(uv_prepare_t* handle) {
  auto* state = static_cast<BusyPoll*>(handle->data);
  int timeout_ms = uv_backend_timeout(state->loop);
  if (timeout_ms == 0) return;  // libuv will not block: nothing to save, and the arm stays
  if (AnyRingReadable(state)) {
    StayAwake(state);
    return;
  }
  if (state->armed_at_ns == 0 || state->slept) {
    MarkRingsSleeping(state);
    return;
  }
  int64_t started = NowNs();
  int64_t until = state->armed_at_ns + state->spin_ns;
  if (timeout_ms > 0) until = std::min(until, started + static_cast<int64_t>(timeout_ms) * 1'000'000);
  if (started < until) {
    pollfd backend{uv_backend_fd(state->loop), POLLIN, 0};
    state->spins += 1;
    int64_t now = started;
    bool ready = false;
    bool ring_ready = false;
    while (now < until) {
      if (AnyRingReadable(state)) {
        ring_ready = true;
        break;
      }
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
    if (ring_ready) {
      StayAwake(state);
      return;
    }
    if (ready) return;  // the answer, or a wake of another kind: the next pass spins on if so
  }
  state->slept = true;
  MarkRingsSleeping(state);
}

void OnCheck(uv_check_t* handle) {
  auto* state = static_cast<BusyPoll*>(handle->data);
  uv_idle_stop(&state->idle);
  std::vector<uint32_t> readable;
  for (const WatchedRing& watched : state->rings) {
    if (state->rings_marked) watched.ring->MarkAwake();
    if (watched.ring->Readable()) readable.push_back(watched.id);
  }
  state->rings_marked = false;
  if (readable.empty() || state->on_readable.IsEmpty() || !state->context) return;
  Napi::Env env(state->env);
  Napi::HandleScope scope(env);
  Napi::Array ids = Napi::Array::New(env, readable.size());
  for (size_t i = 0; i < readable.size(); i++) ids.Set(static_cast<uint32_t>(i), readable[i]);
  try {
    // MakeCallback: promises the callback settles run their continuations before it returns.
    state->on_readable.MakeCallback(env.Global(), {ids}, *state->context);
  } catch (const Napi::Error& error) {
    // As a throw from a socket's data handler would: the process's uncaught-exception path.
    napi_fatal_exception(state->env, error.Value());
  }
}

void OnClosed(uv_handle_t* handle) {
  auto* state = static_cast<BusyPoll*>(handle->data);
  if (--state->open_handles > 0) return;
  napi_remove_async_cleanup_hook(state->cleanup);
  delete state;
}

// At environment teardown: the handles must be closed before the loop is.
void OnCleanup(napi_async_cleanup_hook_handle, void* data) {
  auto* state = static_cast<BusyPoll*>(data);
  state->on_readable.Reset();
  state->context.reset();
  state->rings.clear();
  uv_prepare_stop(&state->prepare);
  uv_check_stop(&state->check);
  uv_idle_stop(&state->idle);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->prepare), OnClosed);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->check), OnClosed);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->idle), OnClosed);
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
  state->env = env;
  state->prepare.data = state;
  state->check.data = state;
  state->idle.data = state;
  if (uv_prepare_init(loop, &state->prepare) != 0 || uv_check_init(loop, &state->check) != 0 || uv_idle_init(loop, &state->idle) != 0) {
    throw Napi::Error::New(env, "busyPoll: initializing the event loop's handles failed");
  }
  state->open_handles = 3;
  uv_prepare_start(&state->prepare, OnPrepare);
  uv_check_start(&state->check, OnCheck);
  // They never keep the process alive by themselves.
  uv_unref(reinterpret_cast<uv_handle_t*>(&state->prepare));
  uv_unref(reinterpret_cast<uv_handle_t*>(&state->check));
  uv_unref(reinterpret_cast<uv_handle_t*>(&state->idle));
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
  // learn(waitMicros): learns one wait as answered() would, without the clock: the policy's tests
  // feed it exact waits (a real wait on a loaded host can be descheduled past the cap).
  busy_poll.Set("learn", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    if (!info[0].IsNumber() || !(info[0].As<Napi::Number>().DoubleValue() >= 0)) {
      throw Napi::TypeError::New(info.Env(), "busyPoll.learn expects a wait in microseconds, 0 or more");
    }
    LearnWait(StateOf(info), static_cast<int64_t>(info[0].As<Napi::Number>().DoubleValue() * 1000));
    return info.Env().Undefined();
  }, "learn", state));
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
  // watchRing(ring, id): read by this process; its id goes to the readable callback.
  busy_poll.Set("watchRing", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    return Guarded(info.Env(), [&]() -> Napi::Value {
      BusyPoll* state = StateOf(info);
      auto ring = channel::RingOf(info[0]);
      if (!info[1].IsNumber()) throw InvalidArgument("busyPoll.watchRing expects a ring and a numeric id");
      state->rings.push_back({info[1].As<Napi::Number>().Uint32Value(), std::move(ring)});
      return info.Env().Undefined();
    });
  }, "watchRing", state));
  busy_poll.Set("unwatchRing", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    BusyPoll* state = StateOf(info);
    uint32_t id = info[0].As<Napi::Number>().Uint32Value();
    std::erase_if(state->rings, [id](const WatchedRing& watched) { return watched.id == id; });
    return info.Env().Undefined();
  }, "unwatchRing", state));
  // onRingsReadable(callback): called with the ids of watched rings that have bytes.
  busy_poll.Set("onRingsReadable", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    BusyPoll* state = StateOf(info);
    if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "busyPoll.onRingsReadable expects a function");
    state->on_readable = Napi::Persistent(info[0].As<Napi::Function>());
    if (!state->context) state->context.emplace(info.Env(), "trellis:connection-ring");
    return info.Env().Undefined();
  }, "onRingsReadable", state));
  exports.Set("busyPoll", busy_poll);
}

}  // namespace trellis::loop
