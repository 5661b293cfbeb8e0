#include "cuda/completion.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/js_error.h"

namespace trellis::cuda {

// One per environment (main thread or worker thread) that submitted work.
struct JsSink {
  static void Deliver(Napi::Env env, Napi::Function, JsSink* sink, Pending* raw);
  // Completion thread: queues a finished item for its environment's JS thread.
  static void Hand(std::unique_ptr<Pending> pending);
  using Tsfn = Napi::TypedThreadSafeFunction<JsSink, Pending, &JsSink::Deliver>;

  Tsfn tsfn;
  std::mutex mutex;  // guards `alive` against the environment's teardown
  bool alive = true;
  size_t outstanding = 0;  // JS thread only: the TSFN is ref'd while this is non-zero
};

void JsSink::Deliver(Napi::Env env, Napi::Function, JsSink* sink, Pending* raw) {
  std::unique_ptr<Pending> pending(raw);
  if (env == nullptr || !pending) {  // the environment is being torn down
    if (pending) pending->Abandon();
    return;
  }
  Napi::HandleScope scope(env);
  try {
    if (pending->error) pending->deferred_->Reject(ToJsError(env, *pending->error).Value());
    else pending->deferred_->Resolve(env.Undefined());
  } catch (const Napi::Error& error) {  // the error factory itself threw
    pending->deferred_->Reject(error.Value());
  }
  if (--sink->outstanding == 0) sink->tsfn.Unref(env);
}

void JsSink::Hand(std::unique_ptr<Pending> pending) {
  std::shared_ptr<JsSink> sink = pending->sink_;
  {
    std::lock_guard<std::mutex> lock(sink->mutex);
    if (sink->alive && sink->tsfn.NonBlockingCall(pending.get()) == napi_ok) {
      pending.release();  // owned by the TSFN queue now
      return;
    }
  }
  pending->Abandon();
}

namespace {

constexpr auto kMinDelay = std::chrono::microseconds(10);
constexpr auto kMaxDelay = std::chrono::microseconds(500);

class CompletionThread {
 public:
  static CompletionThread& Get() {
    static auto* thread = new CompletionThread();  // lives (detached) for the process
    return *thread;
  }

  void Add(std::unique_ptr<Pending> pending) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      incoming_.push_back(std::move(pending));
    }
    wake_.notify_one();
  }

 private:
  CompletionThread() { std::thread([this] { Run(); }).detach(); }

  // Polls with a backoff from 10 µs to 0.5 ms while anything is outstanding; sleeps otherwise.
  void Run() {
    std::vector<std::unique_ptr<Pending>> active;
    auto delay = kMinDelay;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        auto ready = [&] { return !incoming_.empty(); };
        if (active.empty()) wake_.wait(lock, ready);
        else wake_.wait_for(lock, delay, ready);
        if (!incoming_.empty()) delay = kMinDelay;
        for (auto& pending : incoming_) active.push_back(std::move(pending));
        incoming_.clear();
      }
      bool progressed = false;
      for (size_t i = 0; i < active.size();) {
        bool done = false;
        try {
          done = active[i]->Poll();
        } catch (const NativeError& error) {
          active[i]->error = error;
          done = true;
        } catch (const std::exception& error) {
          active[i]->error = NativeError("ERR_CUDA", std::string("completion poll failed: ") + error.what());
          done = true;
        }
        if (!done) {
          ++i;
          continue;
        }
        JsSink::Hand(std::move(active[i]));
        active[i] = std::move(active.back());
        active.pop_back();
        progressed = true;
      }
      delay = progressed ? kMinDelay : std::min<std::chrono::microseconds>(delay * 2, kMaxDelay);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::unique_ptr<Pending>> incoming_;
};

std::mutex registry_mutex;
std::unordered_map<napi_env, std::shared_ptr<JsSink>>& Registry() {
  static auto* registry = new std::unordered_map<napi_env, std::shared_ptr<JsSink>>();
  return *registry;
}

std::shared_ptr<JsSink> SinkFor(Napi::Env env) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = Registry().find(env);
  if (it != Registry().end()) return it->second;
  auto sink = std::make_shared<JsSink>();
  sink->tsfn = JsSink::Tsfn::New(env, "trellis-cuda-completion", 0, 1, sink.get());
  sink->tsfn.Unref(env);
  Registry()[env] = sink;
  // Added after the TSFN's own teardown hook, so it runs first: nothing is handed to a TSFN that
  // the environment is about to delete.
  napi_env key = env;
  env.AddCleanupHook([sink, key] {
    {
      std::lock_guard<std::mutex> sink_lock(sink->mutex);
      sink->alive = false;
    }
    std::lock_guard<std::mutex> registry_lock(registry_mutex);
    Registry().erase(key);
  });
  return sink;
}

}  // namespace

Napi::Promise Submit(Napi::Env env, std::unique_ptr<Pending> pending) {
  std::shared_ptr<JsSink> sink = SinkFor(env);
  pending->deferred_.emplace(Napi::Promise::Deferred::New(env));
  Napi::Promise promise = pending->deferred_->Promise();
  pending->sink_ = sink;
  if (sink->outstanding++ == 0) sink->tsfn.Ref(env);
  CompletionThread::Get().Add(std::move(pending));
  return promise;
}

bool EventDone(const Event& event) {
  const DriverTable& cu = Driver("cuEventQuery");
  MakeCurrent(event.device);
  CUresult result = cu.cuEventQuery(event.event);
  if (result == CUDA_ERROR_NOT_READY) return false;
  Check(result, "cuEventQuery");
  return true;
}

bool EventPending::Poll() { return EventDone(*event_); }

}  // namespace trellis::cuda
