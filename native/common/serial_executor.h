// Runs blocking work in order on one thread of its own and settles a promise per job on the JS
// thread. Used by objects whose operations wait on other processes (communicators, channels), so
// that waiting never blocks the event loop nor occupies libuv's thread pool.
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
  // (owners keep themselves alive between the two).
  SerialExecutor(Napi::Env env, const char* name, std::function<void()> on_busy, std::function<void()> on_idle)
      : on_busy_(std::move(on_busy)), on_idle_(std::move(on_idle)) {
    tsfn_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), name, 0, 1);
    tsfn_.Unref(env);
    thread_ = std::thread([this] { Run(); });
  }

  ~SerialExecutor() { Stop(); }
  SerialExecutor(const SerialExecutor&) = delete;
  SerialExecutor& operator=(const SerialExecutor&) = delete;

  Napi::Value Enqueue(Napi::Env env, Work work, Finish finish, const std::vector<Napi::Value>& keep = {}) {
    auto job = std::make_shared<Job>(Job{std::move(work), std::move(finish), Napi::Promise::Deferred::New(env), {}, nullptr});
    for (const auto& value : keep) job->keep.push_back(Napi::Persistent(value));
    Napi::Value promise = job->deferred.Promise();
    bool first;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (stopping_) throw NativeError("ERR_DESTROYED", "the object was destroyed");
      first = pending_++ == 0;
      queue_.push_back(job);
    }
    if (first) {
      tsfn_.Ref(env);
      on_busy_();
    }
    ready_.notify_one();
    return promise;
  }

  size_t pending() {
    std::lock_guard<std::mutex> guard(mutex_);
    return pending_;
  }

  // Finishes the job running now (the owner must make it return, e.g. by aborting its wait) and
  // drops jobs not started.
  void Stop() {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (stopped_) return;
      stopping_ = stopped_ = true;
    }
    ready_.notify_all();
    if (thread_.joinable()) thread_.join();
    // Jobs never started fail rather than hang (Stop runs on the JS thread).
    std::deque<std::shared_ptr<Job>> dropped;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      dropped.swap(queue_);
    }
    for (auto& job : dropped) {
      Napi::Env env = job->deferred.Env();
      job->deferred.Reject(ToJsError(env, NativeError("ERR_DESTROYED", "the object was destroyed before this operation ran")).Value());
      bool idle;
      {
        std::lock_guard<std::mutex> guard(mutex_);
        idle = --pending_ == 0;
      }
      if (idle) on_idle_();
    }
    tsfn_.Release();
  }

 private:
  struct Job {
    Work work;
    Finish finish;
    Napi::Promise::Deferred deferred;
    std::vector<Napi::Reference<Napi::Value>> keep;  // buffers the work touches, alive until it ends
    std::unique_ptr<NativeError> error;
  };

  void Run() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (stopping_ || queue_.empty()) return;
        job = queue_.front();
        queue_.pop_front();
      }
      try {
        job->work();
      } catch (const NativeError& error) {
        job->error = std::make_unique<NativeError>(error);
      } catch (const std::exception& error) {
        job->error = std::make_unique<NativeError>("ERR_NATIVE", error.what());
      }
      tsfn_.BlockingCall([this, job](Napi::Env env, Napi::Function) {
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
          std::lock_guard<std::mutex> guard(mutex_);
          idle = --pending_ == 0;
        }
        if (idle) {
          tsfn_.Unref(env);
          on_idle_();
        }
      });
    }
  }

  std::function<void()> on_busy_;
  std::function<void()> on_idle_;
  Napi::ThreadSafeFunction tsfn_;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::shared_ptr<Job>> queue_;
  size_t pending_ = 0;
  bool stopping_ = false;
  bool stopped_ = false;
};

}  // namespace trellis
