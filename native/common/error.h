// Errors raised by native code. Core code (no Node-API) throws NativeError; the binding layer turns
// it into the JS error class registered for its `code` (see lib/native.ts), so every failure that
// reaches JavaScript is typed.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>

namespace trellis {

class NativeError : public std::runtime_error {
 public:
  using Detail = std::variant<double, std::string>;

  NativeError(std::string code, std::string message)
      : std::runtime_error(std::move(message)), code_(std::move(code)) {}

  NativeError& with(const std::string& key, double value) {
    details_[key] = value;
    return *this;
  }
  NativeError& with(const std::string& key, std::string value) {
    details_[key] = std::move(value);
    return *this;
  }

  const std::string& code() const { return code_; }
  const std::map<std::string, Detail>& details() const { return details_; }

 private:
  std::string code_;
  std::map<std::string, Detail> details_;
};

// A failed system call: names the call, what it acted on, and the errno text.
inline NativeError SystemError(const std::string& call, const std::string& subject, int error_number) {
  NativeError error("ERR_SYSTEM", call + "(" + subject + ") failed: " + std::strerror(error_number));
  error.with("syscall", call).with("errno", static_cast<double>(error_number));
  return error;
}

}  // namespace trellis
