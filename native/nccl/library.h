// NCCL, loaded with dlopen at run time (libnccl.so.2, or $TRELLIS_NCCL_LIBRARY). No nccl.h: the
// types and the values below are NCCL's public ones (nccl.h, 2.x). No Node-API here: bench/native
// links this file too.
#pragma once

#include <cstddef>
#include <string>

#include "common/error.h"
#include "cuda/driver.h"

namespace trellis::nccl {

using ncclComm_t = struct ncclComm*;
using cudaStream_t = cuda::CUstream;  // the runtime's and the driver's stream are one type

constexpr int NCCL_UNIQUE_ID_BYTES = 128;
struct ncclUniqueId {
  char internal[NCCL_UNIQUE_ID_BYTES];
};

enum ncclResult_t : int {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
};

enum ncclDataType_t : int {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9,
};

enum ncclRedOp_t : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };

// Bytes per element of a data type, or 0 when the value is not one.
size_t ElementSize(int type);

#define TRELLIS_NCCL_FUNCTIONS(X)                                                                                   \
  X(ncclGetVersion, ncclResult_t (*)(int*))                                                                         \
  X(ncclGetErrorString, const char* (*)(ncclResult_t))                                                              \
  X(ncclGetUniqueId, ncclResult_t (*)(ncclUniqueId*))                                                               \
  X(ncclCommInitRank, ncclResult_t (*)(ncclComm_t*, int, ncclUniqueId, int))                                         \
  X(ncclCommAbort, ncclResult_t (*)(ncclComm_t))                                                                    \
  X(ncclCommDestroy, ncclResult_t (*)(ncclComm_t))                                                                  \
  X(ncclCommGetAsyncError, ncclResult_t (*)(ncclComm_t, ncclResult_t*))                                             \
  X(ncclAllReduce, ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t)) \
  X(ncclBroadcast, ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t))     \
  X(ncclAllGather, ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t))          \
  X(ncclReduceScatter, ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t)) \
  X(ncclSend, ncclResult_t (*)(const void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t))                 \
  X(ncclRecv, ncclResult_t (*)(void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t))                       \
  X(ncclGroupStart, ncclResult_t (*)())                                                                             \
  X(ncclGroupEnd, ncclResult_t (*)())

struct Table {
#define TRELLIS_NCCL_FIELD(name, type) \
  using name##_fn = type;               \
  name##_fn name = nullptr;
  TRELLIS_NCCL_FUNCTIONS(TRELLIS_NCCL_FIELD)
#undef TRELLIS_NCCL_FIELD
  // Optional (NCCL >= 2.13): the last error's detail.
  const char* (*ncclGetLastError)(ncclComm_t) = nullptr;
};

struct LibraryStatus {
  bool available = false;
  std::string reason;
  std::string library_path;
  int version = 0;  // ncclGetVersion: 22809 for 2.28.9
};

// Loaded once per process, on first use, thread-safely.
const LibraryStatus& Status();
// Throws ERR_NCCL_UNAVAILABLE (with the reason) when NCCL is not usable.
const Table& Library(const char* call = "nccl");

// Throws NativeError ERR_NCCL naming `call`, ncclGetErrorString and (if any) ncclGetLastError
// (which takes no communicator: its argument is unused, and ours may be aborted already).
void Check(ncclResult_t result, const char* call);
std::string ErrorText(ncclResult_t result);

}  // namespace trellis::nccl
