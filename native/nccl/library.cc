#include "nccl/library.h"

#include <dlfcn.h>

#include <cstdlib>

namespace trellis::nccl {
namespace {

Table table;

LibraryStatus Load() {
  LibraryStatus status;
  const char* override_path = std::getenv("TRELLIS_NCCL_LIBRARY");
  status.library_path = override_path != nullptr && *override_path != '\0' ? override_path : "libnccl.so.2";
  void* handle = dlopen(status.library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* error = dlerror();
    std::string text = error != nullptr ? error : "unknown dlopen error";
    bool missing = text.find("No such file") != std::string::npos;
    status.reason = status.library_path + (missing ? " not found: " : " could not be loaded: ") + text;
    return status;
  }
  Table loaded;
#define TRELLIS_NCCL_RESOLVE(name, type)                                                                    \
  if (status.reason.empty()) {                                                                              \
    dlerror();                                                                                              \
    loaded.name = reinterpret_cast<type>(dlsym(handle, #name));                                             \
    if (loaded.name == nullptr) {                                                                           \
      const char* error = dlerror();                                                                        \
      status.reason = status.library_path + " is not a usable NCCL library: symbol " #name " not found" +   \
                      (error != nullptr ? std::string(" (") + error + ")" : std::string());                 \
    }                                                                                                       \
  }
  TRELLIS_NCCL_FUNCTIONS(TRELLIS_NCCL_RESOLVE)
#undef TRELLIS_NCCL_RESOLVE
  if (!status.reason.empty()) {
    dlclose(handle);
    return status;
  }
  loaded.ncclGetLastError = reinterpret_cast<const char* (*)(ncclComm_t)>(dlsym(handle, "ncclGetLastError"));
  table = loaded;  // stays loaded for the process
  if (ncclResult_t result = table.ncclGetVersion(&status.version); result != ncclSuccess) {
    status.reason = "ncclGetVersion failed: " + ErrorText(result);
    return status;
  }
  status.available = true;
  return status;
}

}  // namespace

size_t ElementSize(int type) {
  switch (type) {
    case ncclInt8:
    case ncclUint8:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
    default:
      return 0;
  }
}

const LibraryStatus& Status() {
  static const LibraryStatus status = Load();
  return status;
}

const Table& Library(const char* call) {
  const LibraryStatus& status = Status();
  if (!status.available) {
    throw NativeError("ERR_NCCL_UNAVAILABLE", std::string(call) + ": NCCL is not available: " + status.reason).with("call", call);
  }
  return table;
}

std::string ErrorText(ncclResult_t result) {
  std::string text = table.ncclGetErrorString != nullptr ? table.ncclGetErrorString(result) : "";
  if (text.empty()) text = "ncclResult_t " + std::to_string(static_cast<int>(result));
  if (table.ncclGetLastError != nullptr) {
    const char* last = table.ncclGetLastError(nullptr);
    if (last != nullptr && *last != '\0') text += ": " + std::string(last);
  }
  return text;
}

void Check(ncclResult_t result, const char* call) {
  if (result != ncclSuccess) {
    throw NativeError("ERR_NCCL", std::string(call) + " failed: " + ErrorText(result))
        .with("call", call)
        .with("result", static_cast<double>(result));
  }
}

}  // namespace trellis::nccl
