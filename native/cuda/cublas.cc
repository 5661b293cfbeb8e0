#include "cuda/cublas.h"

#include <cstdlib>
#include <memory>
#include <vector>

#include <dlfcn.h>

#include "common/dynamic_library.h"

namespace trellis::cublas {
namespace {

Table table;

LibraryStatus Load() {
  LibraryStatus status;
  // The toolkit's lib directory is often not on the loader path: look there too.
  std::vector<std::string> candidates;
  const char* override_path = std::getenv("TRELLIS_CUBLAS_LIBRARY");
  if (override_path != nullptr && *override_path != '\0') {
    candidates.push_back(override_path);
  } else {
    for (const char* version : {"13", "12"}) {
      const std::string name = std::string("libcublas.so.") + version;
      candidates.push_back(name);
      candidates.push_back("/usr/local/cuda/lib64/" + name);
      candidates.push_back("/usr/local/cuda/targets/x86_64-linux/lib/" + name);
    }
  }
  std::string reasons;
  for (const std::string& candidate : candidates) {
    // libcublas needs libcublasLt beside it; a toolkit directory off the loader path would not
    // find it by name, so open it first from the same directory (once loaded, its name is found).
    const size_t slash = candidate.rfind('/');
    const size_t suffix = candidate.rfind(".so.");
    if (slash != std::string::npos && suffix != std::string::npos && suffix > slash) {
      const std::string version = candidate.substr(suffix + 4);
      const std::string lt = candidate.substr(0, slash + 1) + "libcublasLt.so." + version;
      if (void* handle = dlopen(lt.c_str(), RTLD_NOW | RTLD_LOCAL); handle == nullptr) dlerror();
    }
    DynamicLibrary library(candidate, "cuBLAS library");
    Table loaded;
#define TRELLIS_CUBLAS_RESOLVE(field, symbol, type) library.Resolve(loaded.field, symbol);
    TRELLIS_CUBLAS_FUNCTIONS(TRELLIS_CUBLAS_RESOLVE)
#undef TRELLIS_CUBLAS_RESOLVE
    library.ResolveOptional(loaded.cublasGetStatusString, "cublasGetStatusString");
    if (!library.ok()) {
      if (!reasons.empty()) reasons += "; ";
      reasons += library.reason();
      continue;
    }
    table = loaded;  // stays loaded for the life of the process
    status.available = true;
    status.library_path = library.path();
    return status;
  }
  status.reason = reasons;
  status.library_path = candidates.front();
  return status;
}

}  // namespace

const LibraryStatus& Status() {
  static const LibraryStatus status = Load();
  return status;
}

const Table& Library(const char* call) {
  const LibraryStatus& status = Status();
  if (!status.available) {
    throw NativeError("ERR_CUBLAS_UNAVAILABLE", std::string(call) + ": cuBLAS is not available: " + status.reason).with("call", call);
  }
  return table;
}

void Check(cublasStatus_t result, const char* call) {
  if (result == CUBLAS_STATUS_SUCCESS) return;
  const char* text = table.cublasGetStatusString != nullptr ? table.cublasGetStatusString(result) : nullptr;
  throw NativeError("ERR_CUBLAS", std::string(call) + " failed: " + (text != nullptr ? text : "cublasStatus " + std::to_string(result)))
      .with("call", call)
      .with("result", static_cast<double>(result));
}

}  // namespace trellis::cublas
