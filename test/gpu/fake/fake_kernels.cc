// The fake driver's modules and launches, and a fake cuBLAS: enough of both for the decoder's
// device kernels (native/kernels/device_kernels.cc) to run end to end on the host. The kernels are
// trellis's own CUDA source, compiled here as C++ under kernel_emulation.h; cuModuleLoadData
// accepts any image and cuModuleGetFunction finds them by name. Each launch's arguments are read
// back through the kernel's own parameter types, as the GPU reads them, so a launch that passes
// an argument of the wrong size shows here. cublasGemmEx computes in double on the host with
// cuBLAS's column-major conventions, and refuses what cuBLAS would.
#include "kernel_emulation.h"

#include "../../../native/kernels/cuda/decoder_kernels.cu"

#include <string>
#include <tuple>
#include <utility>

namespace {

using CUresult = int;
constexpr CUresult kSuccess = 0, kInvalidValue = 1, kNotFound = 500, kInvalidHandle = 400;

struct Kernel {
  const char* name;
  std::function<void(void**, EmulatedDim, EmulatedDim, size_t)> launch;
};

template <typename... Arguments, size_t... Index>
std::tuple<Arguments...> Read(void** parameters, std::index_sequence<Index...>) {
  return std::tuple<Arguments...>(*static_cast<Arguments*>(parameters[Index])...);
}

template <typename... Arguments>
Kernel Make(const char* name, void (*kernel)(Arguments...)) {
  return {name, [kernel](void** parameters, EmulatedDim grid, EmulatedDim block, size_t shared) {
            const auto arguments = Read<Arguments...>(parameters, std::index_sequence_for<Arguments...>{});
            trellis_emulation::Run(grid, block, shared, [&] { std::apply(kernel, arguments); });
          }};
}

const std::vector<Kernel>& Kernels() {
  static const std::vector<Kernel> kernels = {
      Make("trellis_narrow", trellis_narrow),
      Make("trellis_add_rows", trellis_add_rows),
      Make("trellis_rms_norm", trellis_rms_norm),
      Make("trellis_layer_norm", trellis_layer_norm),
      Make("trellis_silu_multiply", trellis_silu_multiply),
      Make("trellis_gelu", trellis_gelu),
      Make("trellis_prepare_attention", trellis_prepare_attention),
      Make("trellis_attention", trellis_attention),
      Make("trellis_attention_tiles", trellis_attention_tiles),
      Make("trellis_attention_grouped", trellis_attention_grouped),
      Make("trellis_gather_rows", trellis_gather_rows),
      Make("trellis_scatter_add_rows", trellis_scatter_add_rows),
      Make("trellis_zero", trellis_zero),
      Make("trellis_linear_int8_small", trellis_linear_int8_small),
      Make("trellis_dequantize_int8", trellis_dequantize_int8),
      Make("trellis_route_experts", trellis_route_experts),
      Make("trellis_add_weighted_rows", trellis_add_weighted_rows),
  };
  return kernels;
}

int modules = 0;

double Element(const void* base, size_t index, int type) {
  if (type == 0) return static_cast<const float*>(base)[index];
  const unsigned short bits = static_cast<const unsigned short*>(base)[index];
  if (type == 2) return __half2float(__ushort_as_half(bits));
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}

}  // namespace

extern "C" {

CUresult cuModuleLoadData(void** module, const void* image) {
  if (module == nullptr || image == nullptr) return kInvalidValue;
  *module = new int(++modules);
  return kSuccess;
}

CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
  if (module == nullptr) return kInvalidHandle;
  for (const Kernel& kernel : Kernels()) {
    if (std::string(kernel.name) == name) {
      *function = const_cast<Kernel*>(&kernel);
      return kSuccess;
    }
  }
  return kNotFound;
}

CUresult cuModuleUnload(void* module) {
  delete static_cast<int*>(module);
  return kSuccess;
}

CUresult cuLaunchKernel(void* function, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x, unsigned block_y, unsigned block_z,
                        unsigned shared_bytes, void* stream, void** parameters, void** extra) {
  if (function == nullptr || parameters == nullptr || extra != nullptr) return kInvalidValue;
  // The limits of the real hardware, and what the emulation needs (whole warps).
  if (grid_x == 0 || grid_y == 0 || grid_z != 1 || grid_y > 65535 || block_y != 1 || block_z != 1 || block_x == 0 || block_x > 1024 || block_x % 32 != 0 ||
      shared_bytes > 48 * 1024) {
    std::fprintf(stderr, "fake cuLaunchKernel: refused grid (%u, %u, %u) block (%u, %u, %u) shared %u\n", grid_x, grid_y, grid_z, block_x, block_y, block_z,
                 shared_bytes);
    return kInvalidValue;
  }
  (void)stream;  // launches run at once, in order: every stream is synchronous here
  static_cast<Kernel*>(function)->launch(parameters, EmulatedDim{grid_x, grid_y, 1}, EmulatedDim{block_x, 1, 1}, shared_bytes);
  return kSuccess;
}

// ---- cuBLAS ----
int cublasCreate_v2(void** handle) {
  *handle = new int(0);
  return 0;
}
int cublasDestroy_v2(void* handle) {
  delete static_cast<int*>(handle);
  return 0;
}
int cublasSetStream_v2(void* handle, void*) { return handle ? 0 : 1; }
int cublasGetVersion_v2(void*, int* version) {
  *version = 130000;
  return 0;
}
const char* cublasGetStatusString(int status) { return status == 0 ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_INVALID_VALUE (fake)"; }

int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* a, int a_type, int lda, const void* b, int b_type,
                 int ldb, const void* beta, void* c, int c_type, int ldc, int compute_type, int algo) {
  constexpr int kInvalid = 7;
  const bool type_ok = (a_type == 0 || a_type == 2 || a_type == 14) && a_type == b_type && c_type == 0;
  if (handle == nullptr || !type_ok || compute_type != 68 || algo != -1 || m < 0 || n < 0 || k < 0 || (transa != 0 && transa != 1) ||
      (transb != 0 && transb != 1) || lda < std::max(1, transa ? k : m) || ldb < std::max(1, transb ? n : k) || ldc < std::max(1, m)) {
    std::fprintf(stderr, "fake cublasGemmEx: refused m %d n %d k %d types %d/%d/%d lda %d ldb %d ldc %d\n", m, n, k, a_type, b_type, c_type, lda, ldb, ldc);
    return kInvalid;
  }
  const int a_code = a_type == 0 ? 0 : a_type == 2 ? 2 : 1;
  const float scale = *static_cast<const float*>(alpha);
  const float keep = *static_cast<const float*>(beta);
  float* out = static_cast<float*>(c);
  for (int column = 0; column < n; column++) {
    for (int row = 0; row < m; row++) {
      double sum = 0;
      for (int p = 0; p < k; p++) {
        const size_t a_index = transa ? static_cast<size_t>(p) + static_cast<size_t>(row) * lda : static_cast<size_t>(row) + static_cast<size_t>(p) * lda;
        const size_t b_index = transb ? static_cast<size_t>(column) + static_cast<size_t>(p) * ldb : static_cast<size_t>(p) + static_cast<size_t>(column) * ldb;
        sum += Element(a, a_index, a_code) * Element(b, b_index, a_code);
      }
      float& target = out[static_cast<size_t>(row) + static_cast<size_t>(column) * ldc];
      target = static_cast<float>(scale * sum + (keep != 0.f ? keep * target : 0.f));
    }
  }
  return 0;
}

}  // extern "C"
