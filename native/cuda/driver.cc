#include "cuda/driver.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "common/dynamic_library.h"

namespace trellis::cuda {
namespace {

DriverTable table;

DriverStatus Load() {
  DriverStatus status;
  DynamicLibrary library("TRELLIS_CUDA_DRIVER", "libcuda.so.1", "CUDA driver");
  status.library_path = library.path();
  DriverTable loaded;
#define TRELLIS_CUDA_RESOLVE(field, symbol, type) library.Resolve(loaded.field, symbol);
  TRELLIS_CUDA_FUNCTIONS(TRELLIS_CUDA_RESOLVE)
#undef TRELLIS_CUDA_RESOLVE
  if (!library.ok()) {
    status.reason = library.reason();
    return status;
  }
  table = loaded;  // the library stays loaded for the life of the process
  if (table.cuDriverGetVersion(&status.driver_version) != CUDA_SUCCESS) status.driver_version = 0;
  if (CUresult result = table.cuInit(0); result != CUDA_SUCCESS) {
    status.reason = "cuInit failed: " + ErrorText(result);
    return status;
  }
  if (CUresult result = table.cuDeviceGetCount(&status.device_count); result != CUDA_SUCCESS) {
    status.reason = "cuDeviceGetCount failed: " + ErrorText(result);
    return status;
  }
  if (status.device_count == 0) {
    status.reason = "no CUDA device is visible (CUDA_VISIBLE_DEVICES=" +
                    std::string(std::getenv("CUDA_VISIBLE_DEVICES") ? std::getenv("CUDA_VISIBLE_DEVICES") : "") + ")";
    return status;
  }
  status.available = true;
  return status;
}

struct DeviceState {
  std::once_flag context_once;
  CUcontext context = nullptr;
  std::mutex mutex;  // guards the pool and the copy stream
  std::vector<CUevent> events;
  std::vector<CUevent> timing_events;
  CUstream copy_stream = nullptr;
};

// One per visible device, created with the status and never destroyed (the driver tears down at
// process exit; destroying CUDA objects from static destructors races that).
std::vector<DeviceState>& Devices() {
  static auto* devices = new std::vector<DeviceState>(static_cast<size_t>(Status().device_count));
  return *devices;
}

DeviceState& StateOf(int device) {
  const DriverStatus& status = Status();
  if (device < 0 || device >= status.device_count) {
    throw NativeError("ERR_INVALID_ARGUMENT", "device " + std::to_string(device) + " is not a visible CUDA device (" +
                                                  std::to_string(status.device_count) + " visible)");
  }
  return Devices()[static_cast<size_t>(device)];
}

}  // namespace

const DriverStatus& Status() {
  static const DriverStatus status = Load();
  return status;
}

const DriverTable& Driver(const char* call) {
  const DriverStatus& status = Status();
  if (!status.available) {
    throw NativeError("ERR_CUDA_UNAVAILABLE", std::string(call) + ": CUDA is not available: " + status.reason).with("call", call);
  }
  return table;
}

std::string ErrorText(CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (table.cuGetErrorName == nullptr || table.cuGetErrorName(result, &name) != CUDA_SUCCESS || name == nullptr) {
    return "CUresult " + std::to_string(result);
  }
  if (table.cuGetErrorString(result, &text) != CUDA_SUCCESS || text == nullptr) return name;
  return std::string(name) + " (" + text + ")";
}

CUcontext ContextOf(int device) {
  const DriverTable& cu = Driver("context");
  DeviceState& state = StateOf(device);
  std::call_once(state.context_once, [&] {  // an exception leaves the flag unset, so a later call retries
    CUdevice handle = 0;
    Check(cu.cuDeviceGet(&handle, device), "cuDeviceGet");
    Check(cu.cuDevicePrimaryCtxRetain(&state.context, handle), "cuDevicePrimaryCtxRetain");
  });
  return state.context;
}

void MakeCurrent(int device) {
  CUcontext context = ContextOf(device);
  Check(Driver("MakeCurrent").cuCtxSetCurrent(context), "cuCtxSetCurrent");
}

CUuuid DeviceUuidBytes(int device) {
  const DriverTable& cu = Driver("deviceUuid");
  StateOf(device);
  CUdevice handle = 0;
  Check(cu.cuDeviceGet(&handle, device), "cuDeviceGet");
  CUuuid uuid{};
  Check(cu.cuDeviceGetUuid(&uuid, handle), "cuDeviceGetUuid_v2");
  return uuid;
}

int DeviceByUuidBytes(const unsigned char* uuid) {
  // Read once, as in DeviceByUuid.
  static const std::vector<CUuuid> uuids = [] {
    std::vector<CUuuid> all;
    for (int device = 0; device < Status().device_count; ++device) all.push_back(DeviceUuidBytes(device));
    return all;
  }();
  for (size_t device = 0; device < uuids.size(); ++device) {
    if (std::memcmp(uuids[device].bytes, uuid, sizeof uuids[device].bytes) == 0) return static_cast<int>(device);
  }
  return -1;
}

std::string DeviceUuid(int device) {
  CUuuid uuid = DeviceUuidBytes(device);
  // nvidia-smi's form: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx
  std::string out = "GPU-";
  char hex[3];
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) out += '-';
    std::snprintf(hex, sizeof hex, "%02x", static_cast<unsigned char>(uuid.bytes[i]));
    out += hex;
  }
  return out;
}

int DeviceByUuid(const std::string& uuid) {
  // Read once: every IPC import names its device by UUID, and a device's UUID never changes.
  static const std::vector<std::string> uuids = [] {
    std::vector<std::string> all;
    for (int device = 0; device < Status().device_count; ++device) all.push_back(DeviceUuid(device));
    return all;
  }();
  for (size_t device = 0; device < uuids.size(); ++device) {
    if (uuids[device] == uuid) return static_cast<int>(device);
  }
  return -1;
}

std::shared_ptr<Event> AcquireEvent(int device, bool timing) {
  const DriverTable& cu = Driver("cuEventCreate");
  DeviceState& state = StateOf(device);
  CUevent event = nullptr;
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    std::vector<CUevent>& pool = timing ? state.timing_events : state.events;
    if (!pool.empty()) {
      event = pool.back();
      pool.pop_back();
    }
  }
  if (event == nullptr) {
    MakeCurrent(device);
    Check(cu.cuEventCreate(&event, timing ? CU_EVENT_DEFAULT : CU_EVENT_DISABLE_TIMING), "cuEventCreate");
  }
  return std::shared_ptr<Event>(new Event{device, event, timing}, [](Event* done) {
    DeviceState& owner = Devices()[static_cast<size_t>(done->device)];
    std::lock_guard<std::mutex> lock(owner.mutex);
    // A recorded event may be re-recorded: no need to wait.
    (done->timing ? owner.timing_events : owner.events).push_back(done->event);
    delete done;
  });
}

CUstream CopyStream(int device) {
  const DriverTable& cu = Driver("cuStreamCreate");
  DeviceState& state = StateOf(device);
  std::lock_guard<std::mutex> lock(state.mutex);
  if (state.copy_stream == nullptr) {
    MakeCurrent(device);
    Check(cu.cuStreamCreate(&state.copy_stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
  }
  return state.copy_stream;
}

Stream::Stream(int device) : device_(device) {
  const DriverTable& cu = Driver("cuStreamCreate");
  MakeCurrent(device);
  Check(cu.cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING), "cuStreamCreate");
}

Stream::~Stream() {
  // Work still queued completes first; the driver frees the stream after it (cuStreamDestroy docs).
  if (stream_ != nullptr) table.cuStreamDestroy(stream_);
}

}  // namespace trellis::cuda
