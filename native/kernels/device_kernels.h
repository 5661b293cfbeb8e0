// The operations of a decoder rank's layers on a device (lib/llm/device-layers.ts), on one of two
// backends with one interface:
//  - cuda: the kernels of native/kernels/cuda (embedded as a fat binary, loaded with
//    cuModuleLoadData) and cuBLAS for the matrices, all queued on one stream of the rank's GPU;
//  - host: the same operations over host memory with the CPU kernels, run at once (CPU ranks run
//    their layers here), so the layers' bookkeeping (cache blocks, offsets, steps) is tested
//    where there is no GPU, and each CUDA kernel is checked against it where there is.
// Addresses are raw pointers into the backend's memory (device pointers, or host ones). The
// callers (device_kernels_binding.cc, from lib/llm/device-kernels.ts, which checks every extent)
// own the memory; these classes trust what they are given, as kernels do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace trellis::kernels {

// Element encodings of weights (the first three) and key/value caches (all four; kFloat8 is
// e4m3fn, as vLLM's fp8 caches: native/kernels/cpu_kernels.h CacheType).
enum class Element : int { kFloat32 = 0, kBfloat16 = 1, kFloat16 = 2, kFloat8 = 3 };

// Positions of one block of a sequence's key/value cache. A block holds them for all the rank's
// layers, laid out [layer][keys | values][kCacheBlockPositions][kvHeads][headSize]; a sequence's
// cache is a list of blocks (lib/llm/device-layers.ts hands them out and shares them between
// sequences with a common prefix).
constexpr int kCacheBlockPositions = 16;

// Where each row of a step stands, for the attention kernels: a step packs sequences end to end.
struct StepLayout {
  uint64_t row_sequence;  // int32 per row: the index of its sequence in the step
  uint64_t row_position;  // int32 per row: its position in the sequence
  uint64_t cache_blocks;  // uint64 per block: the step's sequences' block addresses, one list after another
  uint64_t cache_table;   // int32 per sequence: where its list starts in cache_blocks
  size_t rows;
  size_t sequences;
  // For attention: runs of a sequence's rows (int32 pairs: first row, rows; at most 16 rows
  // each), read in tiles, and the rows outside any run (int32 each), read one by one.
  uint64_t tiles;
  size_t tile_count;
  uint64_t single_rows;
  size_t single_count;
};

struct AttentionShape {
  int heads;
  int kv_heads;
  int head_size;
  Element cache;
};

class DeviceKernels {
 public:
  virtual ~DeviceKernels() = default;

  // out[rows, columns] = x[rows, depth] · weight[columns, depth]ᵀ + bias (bias 0: none).
  virtual void Linear(uint64_t out, uint64_t x, uint64_t weight, Element weight_type, uint64_t bias, size_t rows, size_t depth,
                      size_t columns) = 0;
  // The same with int8 weights quantized per output row: weight[c, k] · scales[c].
  virtual void LinearInt8(uint64_t out, uint64_t x, uint64_t weight, uint64_t scales, uint64_t bias, size_t rows, size_t depth, size_t columns) = 0;
  // out[row, column] += residual[row, column] (0: none) + bias[column] (0: none).
  virtual void AddRows(uint64_t out, uint64_t residual, uint64_t bias, size_t rows, size_t columns) = 0;
  virtual void RmsNorm(uint64_t out, uint64_t x, uint64_t gamma, size_t rows, size_t columns, float epsilon) = 0;
  virtual void LayerNorm(uint64_t out, uint64_t x, uint64_t gamma, uint64_t beta, size_t rows, size_t columns, float epsilon) = 0;
  virtual void SiluMultiply(uint64_t out, uint64_t gate, uint64_t up, size_t count) = 0;
  virtual void Gelu(uint64_t x, size_t count) = 0;
  // Splits the fused query/key/value rows [rows, (heads + 2·kvHeads)·headSize]: queries into
  // `queries` [rows, heads·headSize], keys and values into each row's cache at its position, with
  // per-head RMS norms (0: none) and rotary positions (inverse frequencies 0: none) applied.
  virtual void PrepareAttention(uint64_t queries, uint64_t qkv, const StepLayout& layout, const AttentionShape& shape, int layer,
                                uint64_t query_norm, uint64_t key_norm, float epsilon, uint64_t inverse_frequencies) = 0;
  // Causal attention of each row against its sequence's cache, into out [rows, heads·headSize];
  // window > 0: only the last `window` positions. A sequence's rows are consecutive positions.
  virtual void Attention(uint64_t out, uint64_t queries, const StepLayout& layout, const AttentionShape& shape, int layer, int window) = 0;
  // out[i, :] = x[rows[i], :] for i < count (rows: int32 in the backend's memory).
  virtual void GatherRows(uint64_t out, uint64_t x, uint64_t rows, size_t count, size_t width) = 0;
  // out[rows[i], :] += delta[i, :]; with weights (doubles; 0: none), out + weights[i] · delta[i, :]
  // in double, rounded once. The rows are distinct.
  virtual void ScatterAddRows(uint64_t out, uint64_t delta, uint64_t rows, uint64_t weights, size_t count, size_t width) = 0;
  virtual void Zero(uint64_t x, size_t count) = 0;
  // weights[rows, experts] (doubles): each row's topK experts' weights from the router's logits,
  // 0 elsewhere (as lib/llm/routing.ts routes). At most 256 experts.
  virtual void RouteExperts(uint64_t weights, uint64_t logits, size_t rows, size_t experts, size_t top_k, bool normalize) = 0;
  // out[row, :] += weights[row, expert] · result[row, :] (in double) where that weight is not 0.
  virtual void AddWeightedRows(uint64_t out, uint64_t result, uint64_t weights, size_t expert, size_t experts, size_t rows, size_t width) = 0;

  virtual void Upload(uint64_t target, const void* source, size_t bytes) = 0;
  virtual void Download(void* target, uint64_t source, size_t bytes) = 0;
  virtual void Copy(uint64_t target, uint64_t source, size_t bytes) = 0;
  // Returns once everything queued has run.
  virtual void Synchronize() = 0;
};

// Throws NativeError: ERR_CUDA_UNAVAILABLE, ERR_CUBLAS_UNAVAILABLE, ERR_CUDA (loading the module).
std::unique_ptr<DeviceKernels> CreateCudaKernels(int device);
std::unique_ptr<DeviceKernels> CreateHostKernels();

// Bytes of the embedded fat binary (0 when the addon was built without one).
size_t EmbeddedKernelImageBytes();

}  // namespace trellis::kernels
