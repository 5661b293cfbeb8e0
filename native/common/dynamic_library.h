// A shared library opened at run time (never linked at build time), its symbols looked up one by
// one, and the first failure kept as a sentence for users: which file, and what was wrong with it.
#pragma once

#include <dlfcn.h>

#include <cstdlib>
#include <string>

namespace trellis {

class DynamicLibrary {
 public:
  // Opens the file named by $`override_variable` when set, else `default_name`.
  DynamicLibrary(const char* override_variable, const char* default_name, const char* what) : what_(what) {
    const char* override_path = std::getenv(override_variable);
    Open(override_path != nullptr && *override_path != '\0' ? override_path : default_name);
  }

  // Opens `path` as it is (a caller trying several places in turn).
  DynamicLibrary(const std::string& path, const char* what) : what_(what) { Open(path); }

  // On failure the library is closed; on success it stays loaded for the life of the process.
  ~DynamicLibrary() {
    if (handle_ != nullptr && !reason_.empty()) dlclose(handle_);
  }
  DynamicLibrary(const DynamicLibrary&) = delete;
  DynamicLibrary& operator=(const DynamicLibrary&) = delete;

  bool ok() const { return reason_.empty(); }
  const std::string& path() const { return path_; }
  const std::string& reason() const { return reason_; }

  // Looks `symbol` up into `slot`; the first missing symbol becomes the reason.
  template <typename Function>
  void Resolve(Function& slot, const char* symbol) {
    if (!ok()) return;
    dlerror();
    slot = reinterpret_cast<Function>(dlsym(handle_, symbol));
    if (slot == nullptr) {
      const char* error = dlerror();
      reason_ = path_ + " is not a usable " + what_ + ": symbol " + symbol + " not found" +
                (error != nullptr ? std::string(" (") + error + ")" : std::string());
    }
  }

  // A symbol that newer versions have and older ones lack: null when absent, never a failure.
  template <typename Function>
  void ResolveOptional(Function& slot, const char* symbol) {
    slot = ok() ? reinterpret_cast<Function>(dlsym(handle_, symbol)) : nullptr;
  }

 private:
  void Open(const std::string& path) {
    path_ = path;
    handle_ = dlopen(path_.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_ == nullptr) {
      const char* error = dlerror();
      std::string text = error != nullptr ? error : "unknown dlopen error";
      bool missing = text.find("No such file") != std::string::npos;
      reason_ = path_ + (missing ? " not found: " : " could not be loaded: ") + text;
    }
  }

  std::string what_;
  std::string path_;
  std::string reason_;
  void* handle_ = nullptr;
};

}  // namespace trellis
