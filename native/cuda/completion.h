// Promises settled when GPU work completes, without blocking the event loop or libuv's pool: one
// completion thread per process polls what was submitted (a recorded event, an NCCL operation)
// and hands each finished item to the JS thread of the environment that submitted it, through
// that environment's ThreadSafeFunction.
#pragma once

#include <napi.h>

#include <memory>
#include <optional>

#include "common/error.h"
#include "cuda/driver.h"

namespace trellis::cuda {

struct JsSink;

class Pending {
 public:
  virtual ~Pending() = default;
  // Completion thread: true once finished; a failure sets `error`.
  virtual bool Poll() = 0;
  // The environment is gone: drop JS references without calling into it.
  virtual void Abandon() {}

  std::optional<NativeError> error;

 private:
  friend Napi::Promise Submit(Napi::Env, std::unique_ptr<Pending>);
  friend struct JsSink;
  std::optional<Napi::Promise::Deferred> deferred_;
  std::shared_ptr<JsSink> sink_;
};

// JS thread: hands `pending` to the completion thread and returns the promise it will settle.
// While anything is outstanding the environment's event loop is kept alive.
Napi::Promise Submit(Napi::Env env, std::unique_ptr<Pending> pending);

// Settles when `event` (recorded by the caller) completes; `keep` stays alive until then.
class EventPending : public Pending {
 public:
  EventPending(std::shared_ptr<Event> event, std::shared_ptr<void> keep = nullptr)
      : event_(std::move(event)), keep_(std::move(keep)) {}
  bool Poll() override;

 protected:
  std::shared_ptr<Event> event_;
  std::shared_ptr<void> keep_;
};

// cuEventQuery as a poll: true when complete, false while not ready; errors throw ERR_CUDA.
bool EventDone(const Event& event);

}  // namespace trellis::cuda
