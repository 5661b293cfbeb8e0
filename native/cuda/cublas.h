// cuBLAS, loaded with dlopen at run time ($TRELLIS_CUBLAS_LIBRARY, else libcublas.so.13 or .12 on
// the loader path or under /usr/local/cuda). No cublas_api.h: the few types and values below are
// cuBLAS's public ones (cuBLAS 12 and 13 agree on them). Only the model layers on a GPU need it;
// the rest of the GPU layer works without it.
#pragma once

#include <string>

#include "common/error.h"
#include "cuda/driver.h"

namespace trellis::cublas {

using cublasHandle_t = struct cublasContext*;
using cublasStatus_t = int;
constexpr cublasStatus_t CUBLAS_STATUS_SUCCESS = 0;

// cudaDataType_t
constexpr int CUDA_R_32F = 0;
constexpr int CUDA_R_16F = 2;
constexpr int CUDA_R_16BF = 14;
// cublasOperation_t
constexpr int CUBLAS_OP_N = 0;
constexpr int CUBLAS_OP_T = 1;
// cublasComputeType_t, cublasGemmAlgo_t
constexpr int CUBLAS_COMPUTE_32F = 68;
constexpr int CUBLAS_GEMM_DEFAULT = -1;

#define TRELLIS_CUBLAS_FUNCTIONS(X)                                                                        \
  X(cublasCreate, "cublasCreate_v2", cublasStatus_t (*)(cublasHandle_t*))                                  \
  X(cublasDestroy, "cublasDestroy_v2", cublasStatus_t (*)(cublasHandle_t))                                 \
  X(cublasSetStream, "cublasSetStream_v2", cublasStatus_t (*)(cublasHandle_t, cuda::CUstream))            \
  X(cublasGetVersion, "cublasGetVersion_v2", cublasStatus_t (*)(cublasHandle_t, int*))                     \
  X(cublasGemmEx, "cublasGemmEx",                                                                          \
    cublasStatus_t (*)(cublasHandle_t, int, int, int, int, int, const void*, const void*, int, int, const void*, int, int, \
                       const void*, void*, int, int, int, int))

struct Table {
#define TRELLIS_CUBLAS_FIELD(field, symbol, type) \
  using field##_fn = type;                        \
  field##_fn field = nullptr;
  TRELLIS_CUBLAS_FUNCTIONS(TRELLIS_CUBLAS_FIELD)
#undef TRELLIS_CUBLAS_FIELD
  // Absent before cuBLAS 11.4: then statuses are reported by number.
  const char* (*cublasGetStatusString)(cublasStatus_t) = nullptr;
};

struct LibraryStatus {
  bool available = false;
  std::string reason;
  std::string library_path;
};

// Loaded once per process, on first use.
const LibraryStatus& Status();

// The table; throws ERR_CUBLAS_UNAVAILABLE (with the reason) when cuBLAS cannot be loaded.
const Table& Library(const char* call);

// Throws NativeError ERR_CUBLAS naming `call` and cuBLAS's status.
void Check(cublasStatus_t status, const char* call);

}  // namespace trellis::cublas
