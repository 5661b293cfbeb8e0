// Runs blocking work in order on one thread of its own and settles a promise per job on the JS
// thread. Used by objects whose operations wait on other processes (communicators, channels), so
// that waiting never blocks the event loop nor occupies libuv's thread pool.
//
// Lifetime: the worker thread and the completions it queues share a core with the executor, so a
// completion that reaches the JS thread after the executor was stopped (its owner released) still
// settles its promise without touching the executor. The executor also stops itself in an
// environment cleanup hook: an owner still open when the process exits is stopped (its wait
// interrupted, its thread joined, its thread-safe function released) before Node tears down
// thread-safe functions and finalizes objects, which otherwise aborts the process.
#pragma once

#include <napi.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/js_error.h"

namespace trellis {

class SerialExecutor {
 public:
  using Work = std::function<void()>;
  // Runs on the JS thread after the work succeeded; its value resolves the promise.
  using Finish = std::function<Napi::Value(Napi::Env)>;

  // on_busy/on_idle run on the JS thread when the first job is queued / the last one settles
  // (owners keep themselves alive between the two). interrupt runs on the JS thread when the
  // executor stops with work pending: it must make a running job return (close the channel,
  // abort the group), since stopping joins the thread.
  SerialExecutor(Napi::Env env, const char* name, std::function<void()> on_busy, std::function<void()> on_idle,
                 std::function<void()> interrupt)
      : env_(env), core_(std::make_shared<Core>()), interrupt_(std::move(interrupt)) {
    core_->on_busy = std::move(on_busy);
    core_->on_idle = std::move(on_idle);
    core_->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), name, 0, 1);
    core_->tsfn.Unref(env);
    NAPI_THROW_IF_FAILED_VOID(env, napi_add_env_cleanup_hook(env, &SerialExecutor::OnEnvironmentCleanup, this));
    hooked_ = true;
    thread_ = std::thread([core = core_] { Run(core); });
  }

  ~SerialExecutor() {
    Stop();
    if (hooked_) napi_remove_env_cleanup_hook(env_, &SerialExecutor::OnEnvironmentCleanup, this);
  }
  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  Napi::Value Enqueue(Napi::Env env, Work work, Finish finish, const std::vector<Napi::Value>& keep = {}) {
    auto job = std::make_shared<Job>(Job{std::move(work), std::move(finish), Napi::Promise::Deferred::New(env), {}, nullptr});
    for (const auto& value : keep) job->keep.push_back(Napi::Persistent(value));
    Napi::Value promise = job->deferred.Promise();
    bool first;
    {
      std::lock_guard<std::mutex> guard(core_->mutex);
      if (core_->stopping) throw NativeError("ERR_DESTROYED", "the object was destroyed");
      first = core_->pending++ == 0;
      core_->queue.push_back(job);
    }
    if (first) {
      core_->tsfn.Ref(env);
      core_->on_busy();
    }
    core_->ready.notify_one();
    return promise;
  }

  size_t pending() {
    std::lock_guard<std::mutex> guard(core_->mutex);
    return core_->pending;
  }

  // Interrupts the job running now (through interrupt), joins the thread and fails jobs not
  // started. Completions already queued still settle their promises when the JS thread reaches
  // them. Runs on the JS thread; a second call does nothing.
  void Stop() { StopFrom(false); }

 private:
  struct Job {
    Work work;
    Finish finish;
    Napi::Promise::Deferred deferred;
    std::vector<Napi::Reference<Napi::Value>> keep;  // buffers the work touches, alive until it ends
    std::unique_ptr<NativeError> error;
  };

  // What the thread and queued completions share with the executor (and outlive it with).
  struct Core {
    std::mutex mutex;
    std::condition_variable ready;
    std::deque<std::shared_ptr<Job>> queue;
    size_t pending = 0;
    bool stopping = false;
    // Set once stopped: completions settle their promise but leave the owner's bookkeeping alone.
    bool detached = false;
    std::function<void()> on_busy;
    std::function<void()> on_idle;
    Napi::ThreadSafeFunction tsfn;
  };

  static void OnEnvironmentCleanup(void* data) {
    auto* self = static_cast<SerialExecutor*>(data);
    self->hooked_ = false;
    self->StopFrom(true);
  }

  void StopFrom(bool exiting) {
    bool busy;
    {
      std::lock_guard<std::mutex> guard(core_->mutex);
      if (core_->stopping) return;
      core_->stopping = true;
      busy = core_->pending > 0;
    }
    if (busy && interrupt_) interrupt_();
    core_->ready.notify_all();
    if (thread_.joinable()) thread_.join();
    std::deque<std::shared_ptr<Job>> dropped;
    bool was_busy;
    {
      std::lock_guard<std::mutex> guard(core_->mutex);
      dropped.swap(core_->queue);
      was_busy = core_->pending > 0;
      core_->pending = 0;
      core_->detached = true;
    }
    // At exit nothing may call into JavaScript any more: the jobs are dropped unsettled.
    if (!exiting) {
      for (auto& job : dropped) {
        Napi::Env env = job->deferred.Env();
        job->deferred.Reject(ToJsError(env, NativeError("ERR_DESTROYED", "the object was destroyed before this operation ran")).Value());
      }
      if (was_busy) core_->on_idle();
    }
    core_->tsfn.Release();
  }

  static void Run(std::shared_ptr<Core> core) {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(core->mutex);
        core->ready.wait(lock, [&] { return core->stopping || !core->queue.empty(); });
        if (core->stopping || core->queue.empty()) return;
        job = core->queue.front();
        core->queue.pop_front();
      }
      try {
        job->work();
      } catch (const NativeError& error) {
        job->error = std::make_unique<NativeError>(error);
      } catch (const std::exception& error) {
        job->error = std::make_unique<NativeError>("ERR_NATIVE", error.what());
      }
      // Fails only while the environment is going away; the job is then dropped with it.
      core->tsfn.BlockingCall([core, job](Napi::Env env, Napi::Function) { Settle(core, job, env); });
    }
  }

  static void Settle(const std::shared_ptr<Core>& core, const std::shared_ptr<Job>& job, Napi::Env env) {
    if (job->error) {
      job->deferred.Reject(ToJsError(env, *job->error).Value());
    } else {
      try {
        job->deferred.Resolve(job->finish ? job->finish(env) : env.Undefined());
      } catch (const Napi::Error& error) {
        job->deferred.Reject(error.Value());
      }
    }
    job->keep.clear();
    bool idle;
    {
      std::lock_guard<std::mutex> guard(core->mutex);
      if (core->detached) return;
      idle = --core->pending == 0;
    }
    if (idle) {
      core->tsfn.Unref(env);
      core->on_idle();
    }
  }

  Napi::Env env_;
  std::shared_ptr<Core> core_;
  std::function<void()> interrupt_;
  std::thread thread_;
  bool hooked_ = false;
};

}  // namespace trellis
