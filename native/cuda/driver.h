// The CUDA driver API, loaded with dlopen at run time (libcuda.so.1, or $TRELLIS_CUDA_DRIVER).
// Nothing here includes cuda.h or links CUDA: the few types and signatures trellis needs are
// declared below, with the values of CUDA 13's cuda.h. Versioned symbols (cuMemAlloc_v2, ...) are
// the ones cuda.h #defines the plain names to. No Node-API here: bench/native links this file too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/error.h"

namespace trellis::cuda {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
struct CUipcMemHandle {
  char reserved[64];  // CU_IPC_HANDLE_SIZE
};
struct CUuuid {
  char bytes[16];
};

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
constexpr unsigned CU_STREAM_NON_BLOCKING = 0x1;
constexpr unsigned CU_EVENT_DEFAULT = 0x0;
constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned CU_MEMHOSTALLOC_PORTABLE = 0x1;
constexpr unsigned CU_MEMHOSTREGISTER_PORTABLE = 0x1;
constexpr unsigned CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1;

// field, exported symbol, signature
#define TRELLIS_CUDA_FUNCTIONS(X)                                                                  \
  X(cuGetErrorName, "cuGetErrorName", CUresult (*)(CUresult, const char**))                        \
  X(cuGetErrorString, "cuGetErrorString", CUresult (*)(CUresult, const char**))                    \
  X(cuInit, "cuInit", CUresult (*)(unsigned))                                                       \
  X(cuDriverGetVersion, "cuDriverGetVersion", CUresult (*)(int*))                                   \
  X(cuDeviceGetCount, "cuDeviceGetCount", CUresult (*)(int*))                                       \
  X(cuDeviceGet, "cuDeviceGet", CUresult (*)(CUdevice*, int))                                       \
  X(cuDeviceGetName, "cuDeviceGetName", CUresult (*)(char*, int, CUdevice))                         \
  X(cuDeviceGetAttribute, "cuDeviceGetAttribute", CUresult (*)(int*, int, CUdevice))                \
  X(cuDeviceTotalMem, "cuDeviceTotalMem_v2", CUresult (*)(size_t*, CUdevice))                       \
  X(cuDeviceGetUuid, "cuDeviceGetUuid_v2", CUresult (*)(CUuuid*, CUdevice))                         \
  X(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", CUresult (*)(CUcontext*, CUdevice))       \
  X(cuCtxSetCurrent, "cuCtxSetCurrent", CUresult (*)(CUcontext))                                    \
  X(cuMemGetInfo, "cuMemGetInfo_v2", CUresult (*)(size_t*, size_t*))                                \
  X(cuMemAlloc, "cuMemAlloc_v2", CUresult (*)(CUdeviceptr*, size_t))                                \
  X(cuMemFree, "cuMemFree_v2", CUresult (*)(CUdeviceptr))                                           \
  X(cuMemGetAddressRange, "cuMemGetAddressRange_v2", CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr)) \
  X(cuMemHostAlloc, "cuMemHostAlloc", CUresult (*)(void**, size_t, unsigned))                       \
  X(cuMemFreeHost, "cuMemFreeHost", CUresult (*)(void*))                                            \
  X(cuMemHostRegister, "cuMemHostRegister_v2", CUresult (*)(void*, size_t, unsigned))               \
  X(cuMemHostUnregister, "cuMemHostUnregister", CUresult (*)(void*))                                \
  X(cuMemcpyHtoD, "cuMemcpyHtoD_v2", CUresult (*)(CUdeviceptr, const void*, size_t))                \
  X(cuMemcpyDtoH, "cuMemcpyDtoH_v2", CUresult (*)(void*, CUdeviceptr, size_t))                      \
  X(cuMemcpyDtoD, "cuMemcpyDtoD_v2", CUresult (*)(CUdeviceptr, CUdeviceptr, size_t))                \
  X(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", CUresult (*)(CUdeviceptr, const void*, size_t, CUstream)) \
  X(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2", CUresult (*)(void*, CUdeviceptr, size_t, CUstream))  \
  X(cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2", CUresult (*)(CUdeviceptr, CUdeviceptr, size_t, CUstream)) \
  X(cuMemcpyPeer, "cuMemcpyPeer", CUresult (*)(CUdeviceptr, CUcontext, CUdeviceptr, CUcontext, size_t)) \
  X(cuMemcpyPeerAsync, "cuMemcpyPeerAsync", CUresult (*)(CUdeviceptr, CUcontext, CUdeviceptr, CUcontext, size_t, CUstream)) \
  X(cuMemsetD8, "cuMemsetD8_v2", CUresult (*)(CUdeviceptr, unsigned char, size_t))                  \
  X(cuStreamCreate, "cuStreamCreate", CUresult (*)(CUstream*, unsigned))                            \
  X(cuStreamDestroy, "cuStreamDestroy_v2", CUresult (*)(CUstream))                                  \
  X(cuStreamSynchronize, "cuStreamSynchronize", CUresult (*)(CUstream))                             \
  X(cuEventCreate, "cuEventCreate", CUresult (*)(CUevent*, unsigned))                               \
  X(cuEventRecord, "cuEventRecord", CUresult (*)(CUevent, CUstream))                                \
  X(cuEventQuery, "cuEventQuery", CUresult (*)(CUevent))                                            \
  X(cuStreamWaitEvent, "cuStreamWaitEvent", CUresult (*)(CUstream, CUevent, unsigned))              \
  X(cuEventElapsedTime, "cuEventElapsedTime", CUresult (*)(float*, CUevent, CUevent))               \
  X(cuIpcGetMemHandle, "cuIpcGetMemHandle", CUresult (*)(CUipcMemHandle*, CUdeviceptr))             \
  X(cuIpcOpenMemHandle, "cuIpcOpenMemHandle_v2", CUresult (*)(CUdeviceptr*, CUipcMemHandle, unsigned)) \
  X(cuIpcCloseMemHandle, "cuIpcCloseMemHandle", CUresult (*)(CUdeviceptr))                        \
  X(cuModuleLoadData, "cuModuleLoadData", CUresult (*)(CUmodule*, const void*))                    \
  X(cuModuleGetFunction, "cuModuleGetFunction", CUresult (*)(CUfunction*, CUmodule, const char*))  \
  X(cuModuleUnload, "cuModuleUnload", CUresult (*)(CUmodule))                                      \
  X(cuLaunchKernel, "cuLaunchKernel",                                                              \
    CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream, void**, void**))

struct DriverTable {
#define TRELLIS_CUDA_FIELD(field, symbol, type) \
  using field##_fn = type;                      \
  field##_fn field = nullptr;
  TRELLIS_CUDA_FUNCTIONS(TRELLIS_CUDA_FIELD)
#undef TRELLIS_CUDA_FIELD
};

// What loading found. Loaded once per process, on first use, thread-safely.
struct DriverStatus {
  bool available = false;
  std::string reason;        // why not, when not
  std::string library_path;  // what was (or would have been) opened
  int driver_version = 0;    // cuDriverGetVersion, when the library loaded (e.g. 13000)
  int device_count = 0;
};

const DriverStatus& Status();

// The function table; throws ERR_CUDA_UNAVAILABLE (with the reason) when CUDA is not usable.
// `call` names the operation for the error.
const DriverTable& Driver(const char* call = "cuda");

// "CUDA_ERROR_X (description)" for a result code.
std::string ErrorText(CUresult result);

// Throws NativeError ERR_CUDA naming `call` and the driver's error name and string.
inline void Check(CUresult result, const char* call) {
  if (result != CUDA_SUCCESS) {
    throw NativeError("ERR_CUDA", std::string(call) + " failed: " + ErrorText(result))
        .with("call", call)
        .with("result", static_cast<double>(result));
  }
}

// The device's primary context, retained on first use (one per device per process); checks that
// `device` is a valid index.
CUcontext ContextOf(int device);
// ContextOf(device), made current on the calling thread.
void MakeCurrent(int device);

// Index of the visible device with this UUID ("GPU-xxxxxxxx-..."), or -1.
int DeviceByUuid(const std::string& uuid);
std::string DeviceUuid(int device);
// The same by the UUID's 16 raw bytes (the packed IPC handle's form).
int DeviceByUuidBytes(const unsigned char* uuid);
CUuuid DeviceUuidBytes(int device);

// A recorded-completion marker from a per-device pool; it goes back to the pool when the last owner
// drops it. Pooled events live for the process.
struct Event {
  int device;
  CUevent event;
  bool timing = false;
};
// From the device's pool; `timing` events (for elapsed times) come from a pool of their own, the
// others are made without timing, which makes recording them cheaper.
std::shared_ptr<Event> AcquireEvent(int device, bool timing = false);

// The device's own non-blocking stream for copies that name no stream (lives for the process).
CUstream CopyStream(int device);

// An owned non-blocking stream on `device`.
class Stream {
 public:
  explicit Stream(int device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  int device() const { return device_; }
  CUstream get() const { return stream_; }

 private:
  int device_;
  CUstream stream_ = nullptr;
};

}  // namespace trellis::cuda
