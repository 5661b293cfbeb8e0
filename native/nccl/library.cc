#include "nccl/library.h"

#include <cstdlib>

#include "common/dynamic_library.h"

namespace trellis::nccl {
namespace {

Table table;

LibraryStatus Load() {
  LibraryStatus status;
  DynamicLibrary library("TRELLIS_NCCL_LIBRARY", "libnccl.so.2", "NCCL library");
  status.library_path = library.path();
  Table loaded;
#define TRELLIS_NCCL_RESOLVE(name, type) library.Resolve(loaded.name, #name);
  TRELLIS_NCCL_FUNCTIONS(TRELLIS_NCCL_RESOLVE)
#undef TRELLIS_NCCL_RESOLVE
  if (!library.ok()) {
    status.reason = library.reason();
    return status;
  }
  library.ResolveOptional(loaded.ncclGetLastError, "ncclGetLastError");
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
