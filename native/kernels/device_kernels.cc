#include "kernels/device_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "cuda/cublas.h"
#include "cuda/driver.h"
#include "kernels/cpu_kernels.h"

// The fat binary of native/kernels/cuda/decoder_kernels.cu (scripts/build-cuda-kernels.sh), in
// read-only data. binding.gyp puts its folder on the assembler's include path.
asm(R"(
  .section .rodata
  .balign 16
  .global trellis_decoder_kernels_image
trellis_decoder_kernels_image:
  .incbin "decoder_kernels.fatbin"
  .global trellis_decoder_kernels_image_end
trellis_decoder_kernels_image_end:
  .byte 0
  .previous
)");
extern "C" const unsigned char trellis_decoder_kernels_image[];
extern "C" const unsigned char trellis_decoder_kernels_image_end[];

namespace trellis::kernels {

size_t EmbeddedKernelImageBytes() { return static_cast<size_t>(trellis_decoder_kernels_image_end - trellis_decoder_kernels_image); }

namespace {

template <typename T>
T* At(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

WeightType HalfType(Element type) { return type == Element::kBfloat16 ? WeightType::kBfloat16 : WeightType::kFloat16; }

CacheType CacheTypeOf(Element type) {
  switch (type) {
    case Element::kFloat32: return CacheType::kFloat32;
    case Element::kBfloat16: return CacheType::kBfloat16;
    case Element::kFloat16: return CacheType::kFloat16;
    case Element::kFloat8: return CacheType::kFloat8;
  }
  return CacheType::kFloat32;
}

// ---------------------------------------------------------------------------------------------
// Host: the CPU kernels over host memory, run at once (CPU ranks run their layers here).
class HostKernels final : public DeviceKernels {
 public:
  void Linear(uint64_t out, uint64_t x, uint64_t weight, Element weight_type, uint64_t bias, size_t rows, size_t depth,
              size_t columns) override {
    if (weight_type == Element::kFloat32) {
      kernels::Linear(At<float>(out), At<const float>(x), At<const float>(weight), At<const float>(bias), rows, depth, columns);
    } else {
      kernels::Linear(At<float>(out), At<const float>(x), At<const uint16_t>(weight), HalfType(weight_type), At<const float>(bias), rows,
                      depth, columns);
    }
  }

  void LinearInt8(uint64_t out, uint64_t x, uint64_t weight, uint64_t scales, uint64_t bias, size_t rows, size_t depth, size_t columns) override {
    kernels::Linear(At<float>(out), At<const float>(x), At<const int8_t>(weight), At<const float>(scales), At<const float>(bias), rows, depth, columns);
  }

  void AddRows(uint64_t out, uint64_t residual, uint64_t bias, size_t rows, size_t columns) override {
    float* target = At<float>(out);
    const float* added = At<const float>(residual);
    const float* shift = At<const float>(bias);
    // As the CPU decoder's JavaScript adds them: in double, delta and bias first, rounded once.
    for (size_t row = 0; row < rows; row++) {
      for (size_t column = 0; column < columns; column++) {
        const size_t index = row * columns + column;
        double update = added != nullptr ? static_cast<double>(added[index]) : 0.0;
        if (shift != nullptr) update += static_cast<double>(shift[column]);
        target[index] = static_cast<float>(static_cast<double>(target[index]) + update);
      }
    }
  }

  void RmsNorm(uint64_t out, uint64_t x, uint64_t gamma, size_t rows, size_t columns, float epsilon) override {
    kernels::RmsNorm(At<float>(out), At<const float>(x), At<const float>(gamma), rows, columns, epsilon);
  }

  void LayerNorm(uint64_t out, uint64_t x, uint64_t gamma, uint64_t beta, size_t rows, size_t columns, float epsilon) override {
    kernels::LayerNorm(At<float>(out), At<const float>(x), At<const float>(gamma), At<const float>(beta), rows, columns, epsilon);
  }

  void SiluMultiply(uint64_t out, uint64_t gate, uint64_t up, size_t count) override {
    kernels::SiluMultiply(At<float>(out), At<const float>(gate), At<const float>(up), count);
  }

  void Gelu(uint64_t x, size_t count) override { kernels::Gelu(At<float>(x), count); }

  void PrepareAttention(uint64_t queries, uint64_t qkv, const StepLayout& layout, const AttentionShape& shape, int layer,
                        uint64_t query_norm, uint64_t key_norm, float epsilon, uint64_t inverse_frequencies) override {
    const size_t head_size = static_cast<size_t>(shape.head_size);
    const size_t heads = static_cast<size_t>(shape.heads);
    const size_t kv_heads = static_cast<size_t>(shape.kv_heads);
    const size_t row_width = (heads + 2 * kv_heads) * head_size;
    const size_t row_size = kv_heads * head_size;
    const int32_t* row_sequence = At<const int32_t>(layout.row_sequence);
    const int32_t* row_position = At<const int32_t>(layout.row_position);
    const uint64_t* cache_blocks = At<const uint64_t>(layout.cache_blocks);
    const int32_t* cache_table = At<const int32_t>(layout.cache_table);
    std::vector<float> head(head_size);
    std::vector<float> normed(head_size);
    for (size_t row = 0; row < layout.rows; row++) {
      const int32_t position = row_position[row];
      const size_t sequence = static_cast<size_t>(row_sequence[row]);
      const uint64_t block = cache_blocks[static_cast<size_t>(cache_table[sequence]) + static_cast<size_t>(position) / kCacheBlockPositions];
      const size_t in_block = static_cast<size_t>(position) % kCacheBlockPositions;
      for (size_t slot = 0; slot < heads + 2 * kv_heads; slot++) {
        std::memcpy(head.data(), At<const float>(qkv) + row * row_width + slot * head_size, head_size * sizeof(float));
        const bool is_value = slot >= heads + kv_heads;
        const uint64_t norm = slot < heads ? query_norm : (is_value ? 0 : key_norm);
        if (norm != 0) {
          kernels::RmsNorm(normed.data(), head.data(), At<const float>(norm), 1, head_size, epsilon);
          head.swap(normed);
        }
        if (!is_value && inverse_frequencies != 0) kernels::Rotary(head.data(), &position, At<const float>(inverse_frequencies), 1, 1, head_size);
        if (slot < heads) {
          std::memcpy(At<float>(queries) + (row * heads + slot) * head_size, head.data(), head_size * sizeof(float));
          continue;
        }
        const size_t kind = is_value ? 1 : 0;
        const size_t kv_head = is_value ? slot - heads - kv_heads : slot - heads;
        const size_t first = ((static_cast<size_t>(layer) * 2 + kind) * kCacheBlockPositions + in_block) * row_size + kv_head * head_size;
        if (shape.cache == Element::kFloat32) {
          std::memcpy(At<float>(block) + first, head.data(), head_size * sizeof(float));
        } else if (shape.cache == Element::kFloat8) {
          NarrowFloat8(At<uint8_t>(block) + first, head.data(), head_size);
        } else {
          Narrow(At<uint16_t>(block) + first, head.data(), HalfType(shape.cache), head_size);
        }
      }
    }
  }

  void Attention(uint64_t out, uint64_t queries, const StepLayout& layout, const AttentionShape& shape, int layer, int window) override {
    const size_t head_size = static_cast<size_t>(shape.head_size);
    const size_t query_width = static_cast<size_t>(shape.heads) * head_size;
    const size_t row_size = static_cast<size_t>(shape.kv_heads) * head_size;
    const int32_t* row_sequence = At<const int32_t>(layout.row_sequence);
    const int32_t* row_position = At<const int32_t>(layout.row_position);
    const uint64_t* cache_blocks = At<const uint64_t>(layout.cache_blocks);
    const int32_t* cache_table = At<const int32_t>(layout.cache_table);
    const size_t keys = static_cast<size_t>(layer) * 2 * kCacheBlockPositions * row_size;
    size_t row = 0;
    while (row < layout.rows) {
      // A run of one sequence's rows: consecutive positions, as the CPU decoder attends them.
      size_t end = row + 1;
      while (end < layout.rows && row_sequence[end] == row_sequence[row]) end++;
      const size_t sequence = static_cast<size_t>(row_sequence[row]);
      const BlockedCache cache{cache_blocks + cache_table[sequence], kCacheBlockPositions, keys, keys + kCacheBlockPositions * row_size};
      float* target = At<float>(out) + row * query_width;
      const float* query = At<const float>(queries) + row * query_width;
      const size_t past = static_cast<size_t>(row_position[row]);
      kernels::BlockedAttention(target, query, cache, CacheTypeOf(shape.cache), end - row, past, static_cast<size_t>(shape.heads), head_size,
                                static_cast<size_t>(shape.kv_heads), static_cast<size_t>(window));
      row = end;
    }
  }

  void GatherRows(uint64_t out, uint64_t x, uint64_t rows, size_t count, size_t width) override {
    const int32_t* list = At<const int32_t>(rows);
    for (size_t index = 0; index < count; index++) {
      std::memcpy(At<float>(out) + index * width, At<const float>(x) + static_cast<size_t>(list[index]) * width, width * sizeof(float));
    }
  }

  void ScatterAddRows(uint64_t out, uint64_t delta, uint64_t rows, uint64_t weights, size_t count, size_t width) override {
    const int32_t* list = At<const int32_t>(rows);
    const double* scales = At<const double>(weights);
    for (size_t index = 0; index < count; index++) {
      float* target = At<float>(out) + static_cast<size_t>(list[index]) * width;
      const float* source = At<const float>(delta) + index * width;
      for (size_t column = 0; column < width; column++) {
        // As the CPU decoder's JavaScript computes it: in double, rounded once.
        target[column] = scales != nullptr ? static_cast<float>(static_cast<double>(target[column]) + scales[index] * static_cast<double>(source[column]))
                                           : static_cast<float>(static_cast<double>(target[column]) + static_cast<double>(source[column]));
      }
    }
  }

  void Zero(uint64_t x, size_t count) override { std::memset(At<void>(x), 0, count * sizeof(float)); }

  void RouteExperts(uint64_t weights, uint64_t logits, size_t rows, size_t experts, size_t top_k, bool normalize) override {
    std::vector<double> probabilities(experts);
    std::vector<bool> taken(experts);
    std::vector<size_t> picked(top_k);
    for (size_t row = 0; row < rows; row++) {
      const float* scores = At<const float>(logits) + row * experts;
      double* out = At<double>(weights) + row * experts;
      float maximum = -INFINITY;
      for (size_t expert = 0; expert < experts; expert++) maximum = std::max(maximum, scores[expert]);
      double sum = 0.0;
      for (size_t expert = 0; expert < experts; expert++) {
        probabilities[expert] = std::exp(static_cast<double>(scores[expert]) - static_cast<double>(maximum));
        sum += probabilities[expert];
        out[expert] = 0.0;
      }
      std::fill(taken.begin(), taken.end(), false);
      double picked_sum = 0.0;
      for (size_t choice = 0; choice < top_k; choice++) {
        size_t best = experts;
        for (size_t expert = 0; expert < experts; expert++) {
          if (!taken[expert] && (best == experts || probabilities[expert] > probabilities[best])) best = expert;
        }
        taken[best] = true;
        picked[choice] = best;
        picked_sum += probabilities[best];
      }
      for (size_t choice = 0; choice < top_k; choice++) out[picked[choice]] = probabilities[picked[choice]] / (normalize ? picked_sum : sum);
    }
  }

  void AddWeightedRows(uint64_t out, uint64_t result, uint64_t weights, size_t expert, size_t experts, size_t rows, size_t width) override {
    for (size_t row = 0; row < rows; row++) {
      const double weight = At<const double>(weights)[row * experts + expert];
      if (weight == 0.0) continue;
      float* target = At<float>(out) + row * width;
      const float* source = At<const float>(result) + row * width;
      for (size_t column = 0; column < width; column++) target[column] = static_cast<float>(static_cast<double>(target[column]) + weight * static_cast<double>(source[column]));
    }
  }

  void Upload(uint64_t target, const void* source, size_t bytes) override { std::memcpy(At<void>(target), source, bytes); }
  void Download(void* target, uint64_t source, size_t bytes) override { std::memcpy(target, At<const void>(source), bytes); }
  void Copy(uint64_t target, uint64_t source, size_t bytes) override { std::memmove(At<void>(target), At<const void>(source), bytes); }
  void Synchronize() override {}
};

// ---------------------------------------------------------------------------------------------
// CUDA: everything queued on one stream; Upload and Download return once their copy is done.
using cuda::Check;

constexpr unsigned kElementwiseThreads = 256;
constexpr unsigned kRowThreads = 256;
constexpr unsigned kHeadThreads = 128;
constexpr unsigned kAttentionThreads = 128;  // four warps: trellis_attention's kAttentionWarps
constexpr int kMaxAttentionHeadSize = 256;   // trellis_attention's kMaxPerLane × 32
constexpr int kTileRows = 16;                // trellis_attention_tiles's
constexpr int kTileMaxHeadSize = 128;        // also trellis_attention_grouped's largest head
constexpr int kGroupMax = 8;                 // trellis_attention_grouped's largest group
constexpr size_t kInt8SmallRows = 16;        // trellis_linear_int8_small's

unsigned GridFor(size_t count, unsigned threads) {
  const size_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<size_t>(blocks, 1, 1u << 20));  // grid-stride loops take the rest
}

class CudaKernels final : public DeviceKernels {
 public:
  explicit CudaKernels(int device) : device_(Usable(device)), stream_(device) {
    const cuda::DriverTable& cu = cuda::Driver("DeviceKernels");
    const cublas::Table& blas = cublas::Library("DeviceKernels");
    cuda::MakeCurrent(device_);
    Check(cu.cuModuleLoadData(&module_, trellis_decoder_kernels_image), "cuModuleLoadData");
    try {
      narrow_ = Function("trellis_narrow");
      add_rows_ = Function("trellis_add_rows");
      rms_norm_ = Function("trellis_rms_norm");
      layer_norm_ = Function("trellis_layer_norm");
      silu_multiply_ = Function("trellis_silu_multiply");
      gelu_ = Function("trellis_gelu");
      prepare_attention_ = Function("trellis_prepare_attention");
      attention_ = Function("trellis_attention");
      attention_tiles_ = Function("trellis_attention_tiles");
      attention_grouped_ = Function("trellis_attention_grouped");
      gather_rows_ = Function("trellis_gather_rows");
      scatter_add_rows_ = Function("trellis_scatter_add_rows");
      zero_ = Function("trellis_zero");
      linear_int8_small_ = Function("trellis_linear_int8_small");
      dequantize_int8_ = Function("trellis_dequantize_int8");
      route_experts_ = Function("trellis_route_experts");
      add_weighted_rows_ = Function("trellis_add_weighted_rows");
      cublas::Check(blas.cublasCreate(&blas_), "cublasCreate_v2");
      cublas::Check(blas.cublasSetStream(blas_, stream_.get()), "cublasSetStream_v2");
    } catch (...) {
      Release();
      throw;
    }
  }

  ~CudaKernels() override { Release(); }

  void Linear(uint64_t out, uint64_t x, uint64_t weight, Element weight_type, uint64_t bias, size_t rows, size_t depth,
              size_t columns) override {
    Current();
    uint64_t input = x;
    int type = cublas::CUDA_R_32F;
    if (weight_type != Element::kFloat32) {
      // cuBLAS multiplies like by like: the input rounded to the weights' 16 bits, sums in f32.
      input = Scratch(rows * depth * 2);
      const uint64_t count = rows * depth;
      int narrow_type = static_cast<int>(weight_type);
      Launch(narrow_, GridFor(count, kElementwiseThreads), 1, kElementwiseThreads, 0, input, x, count, narrow_type);
      type = weight_type == Element::kBfloat16 ? cublas::CUDA_R_16BF : cublas::CUDA_R_16F;
    }
    // Row-major out[rows, columns] is column-major outᵀ = weight · xᵀ, weight being [columns, depth]
    // row-major, i.e. column-major [depth, columns], transposed.
    const float one = 1.f;
    const float zero = 0.f;
    cublas::Check(cublas::Library("linear").cublasGemmEx(blas_, cublas::CUBLAS_OP_T, cublas::CUBLAS_OP_N, Int(columns), Int(rows), Int(depth), &one,
                                                        At<const void>(weight), type, Int(depth), At<const void>(input), type, Int(depth), &zero,
                                                        At<void>(out), cublas::CUDA_R_32F, Int(columns), cublas::CUBLAS_COMPUTE_32F,
                                                        cublas::CUBLAS_GEMM_DEFAULT),
                  "cublasGemmEx");
    if (bias != 0) AddRows(out, 0, bias, rows, columns);
  }

  void LinearInt8(uint64_t out, uint64_t x, uint64_t weight, uint64_t scales, uint64_t bias, size_t rows, size_t depth, size_t columns) override {
    if (rows == 0) return;
    Current();
    if (rows <= kInt8SmallRows) {
      // Decoding: the weights' bytes are the cost, read once as int8.
      Launch(linear_int8_small_, static_cast<unsigned>((columns + 7) / 8), 1, 256, 0, out, x, weight, scales, bias, Int(rows), Int(depth), Int(columns));
      return;
    }
    // A prompt: the products are the cost; widen the matrix (scaled) to bf16 once and use cuBLAS.
    const uint64_t widened = WeightScratch(columns * depth * 2);
    Launch(dequantize_int8_, GridFor(columns * depth, kElementwiseThreads), 1, kElementwiseThreads, 0, widened, weight, scales, Int(columns), Int(depth));
    Linear(out, x, widened, Element::kBfloat16, bias, rows, depth, columns);
  }

  void AddRows(uint64_t out, uint64_t residual, uint64_t bias, size_t rows, size_t columns) override {
    Current();
    unsigned long long row_count = rows;
    Launch(add_rows_, GridFor(rows * columns, kElementwiseThreads), 1, kElementwiseThreads, 0, out, residual, bias, row_count, Int(columns));
  }

  void RmsNorm(uint64_t out, uint64_t x, uint64_t gamma, size_t rows, size_t columns, float epsilon) override {
    if (rows == 0) return;
    Current();
    Launch(rms_norm_, Blocks(rows), 1, kRowThreads, 0, out, x, gamma, Int(columns), epsilon);
  }

  void LayerNorm(uint64_t out, uint64_t x, uint64_t gamma, uint64_t beta, size_t rows, size_t columns, float epsilon) override {
    if (rows == 0) return;
    Current();
    Launch(layer_norm_, Blocks(rows), 1, kRowThreads, 0, out, x, gamma, beta, Int(columns), epsilon);
  }

  void SiluMultiply(uint64_t out, uint64_t gate, uint64_t up, size_t count) override {
    Current();
    unsigned long long elements = count;
    Launch(silu_multiply_, GridFor(count, kElementwiseThreads), 1, kElementwiseThreads, 0, out, gate, up, elements);
  }

  void Gelu(uint64_t x, size_t count) override {
    Current();
    unsigned long long elements = count;
    Launch(gelu_, GridFor(count, kElementwiseThreads), 1, kElementwiseThreads, 0, x, elements);
  }

  void PrepareAttention(uint64_t queries, uint64_t qkv, const StepLayout& layout, const AttentionShape& shape, int layer,
                        uint64_t query_norm, uint64_t key_norm, float epsilon, uint64_t inverse_frequencies) override {
    if (layout.rows == 0) return;
    if (shape.head_size > 1024) throw InvalidShape("a head of " + std::to_string(shape.head_size) + " elements is over the 1024 the kernels take");
    Current();
    int cache_type = static_cast<int>(shape.cache);
    Launch(prepare_attention_, Blocks(layout.rows), static_cast<unsigned>(shape.heads + 2 * shape.kv_heads), kHeadThreads,
           static_cast<unsigned>(shape.head_size) * 4, queries, qkv, layout.row_sequence, layout.row_position, layout.cache_blocks,
           layout.cache_table, layer, shape.heads, shape.kv_heads, shape.head_size, query_norm, key_norm, epsilon, inverse_frequencies,
           cache_type);
  }

  void Attention(uint64_t out, uint64_t queries, const StepLayout& layout, const AttentionShape& shape, int layer, int window) override {
    if (layout.rows == 0) return;
    if (shape.head_size > kMaxAttentionHeadSize) {
      throw InvalidShape("attention on the GPU takes heads of at most " + std::to_string(kMaxAttentionHeadSize) + " elements, got " +
                         std::to_string(shape.head_size));
    }
    Current();
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(shape.head_size)));
    int cache_type = static_cast<int>(shape.cache);
    const unsigned heads = static_cast<unsigned>(shape.heads);
    if (shape.head_size > kTileMaxHeadSize) {
      // Heads too wide for the tiles' shared memory: every row on its own.
      uint64_t every_row = 0;
      Launch(attention_, Blocks(layout.rows), heads, kAttentionThreads, 0, out, queries, every_row, layout.row_sequence, layout.row_position,
             layout.cache_blocks, layout.cache_table, layer, shape.heads, shape.kv_heads, shape.head_size, window, scale, cache_type);
      return;
    }
    if (layout.tile_count > 0) {
      const size_t head = static_cast<size_t>(shape.head_size);
      const unsigned shared = static_cast<unsigned>((kTileRows * head + 32 * (head + 1) + 32 * head + 4 * 32) * sizeof(float));
      Launch(attention_tiles_, Blocks(layout.tile_count), heads, kAttentionThreads, shared, out, queries, layout.tiles, layout.row_sequence,
             layout.row_position, layout.cache_blocks, layout.cache_table, layer, shape.heads, shape.kv_heads, shape.head_size, window, scale,
             cache_type);
    }
    if (layout.single_count > 0) {
      const int group = shape.heads / shape.kv_heads;
      if (group > 1 && group <= kGroupMax) {
        // Grouped-query heads: a block per key/value head reads each key once for its group.
        Launch(attention_grouped_, Blocks(layout.single_count), static_cast<unsigned>(shape.kv_heads), kAttentionThreads, 0, out, queries, layout.single_rows,
               layout.row_sequence, layout.row_position, layout.cache_blocks, layout.cache_table, layer, shape.heads, shape.kv_heads, shape.head_size, window,
               scale, cache_type);
      } else {
        Launch(attention_, Blocks(layout.single_count), heads, kAttentionThreads, 0, out, queries, layout.single_rows, layout.row_sequence,
               layout.row_position, layout.cache_blocks, layout.cache_table, layer, shape.heads, shape.kv_heads, shape.head_size, window, scale,
               cache_type);
      }
    }
  }

  void GatherRows(uint64_t out, uint64_t x, uint64_t rows, size_t count, size_t width) override {
    if (count == 0) return;
    Current();
    Launch(gather_rows_, GridFor(count * width, kElementwiseThreads), 1, kElementwiseThreads, 0, out, x, rows, Int(count), Int(width));
  }

  void ScatterAddRows(uint64_t out, uint64_t delta, uint64_t rows, uint64_t weights, size_t count, size_t width) override {
    if (count == 0) return;
    Current();
    Launch(scatter_add_rows_, GridFor(count * width, kElementwiseThreads), 1, kElementwiseThreads, 0, out, delta, rows, weights, Int(count), Int(width));
  }

  void RouteExperts(uint64_t weights, uint64_t logits, size_t rows, size_t experts, size_t top_k, bool normalize) override {
    if (rows == 0) return;
    if (experts > 256 || top_k == 0 || top_k > experts) throw InvalidShape("routing takes at most 256 experts and 1 to experts of them a row");
    Current();
    int normalized = normalize ? 1 : 0;
    Launch(route_experts_, GridFor(rows, 128), 1, 128, 0, weights, logits, Int(rows), Int(experts), Int(top_k), normalized);
  }

  void AddWeightedRows(uint64_t out, uint64_t result, uint64_t weights, size_t expert, size_t experts, size_t rows, size_t width) override {
    if (rows == 0) return;
    Current();
    Launch(add_weighted_rows_, GridFor(rows * width, kElementwiseThreads), 1, kElementwiseThreads, 0, out, result, weights, Int(expert), Int(experts), Int(rows),
           Int(width));
  }

  void Zero(uint64_t x, size_t count) override {
    if (count == 0) return;
    Current();
    unsigned long long elements = count;
    Launch(zero_, GridFor(count, kElementwiseThreads), 1, kElementwiseThreads, 0, x, elements);
  }

  void Upload(uint64_t target, const void* source, size_t bytes) override {
    if (bytes == 0) return;
    Current();
    const cuda::DriverTable& cu = cuda::Driver("upload");
    Check(cu.cuMemcpyHtoDAsync(target, source, bytes, stream_.get()), "cuMemcpyHtoDAsync");
    Check(cu.cuStreamSynchronize(stream_.get()), "cuStreamSynchronize");  // the source may change once we return
  }

  void Download(void* target, uint64_t source, size_t bytes) override {
    if (bytes == 0) return;
    Current();
    const cuda::DriverTable& cu = cuda::Driver("download");
    Check(cu.cuMemcpyDtoHAsync(target, source, bytes, stream_.get()), "cuMemcpyDtoHAsync");
    Check(cu.cuStreamSynchronize(stream_.get()), "cuStreamSynchronize");
  }

  void Copy(uint64_t target, uint64_t source, size_t bytes) override {
    if (bytes == 0) return;
    Current();
    Check(cuda::Driver("copy").cuMemcpyDtoDAsync(target, source, bytes, stream_.get()), "cuMemcpyDtoDAsync");
  }

  void Synchronize() override {
    Current();
    Check(cuda::Driver("synchronize").cuStreamSynchronize(stream_.get()), "cuStreamSynchronize");
  }

 private:
  // Says why not before anything is made: no driver, no cuBLAS, no kernels in this build.
  static int Usable(int device) {
    cuda::Driver("DeviceKernels");
    cublas::Library("DeviceKernels");
    if (EmbeddedKernelImageBytes() <= 1) throw NativeError("ERR_CUDA_UNAVAILABLE", "this build of the addon holds no CUDA kernels");
    return device;
  }

  static NativeError InvalidShape(const std::string& message) { return NativeError("ERR_INVALID_ARGUMENT", message); }

  static int Int(size_t value) {
    if (value > 0x7fffffff) throw InvalidShape("a dimension of " + std::to_string(value) + " is over what cuBLAS and the kernels index (2^31 - 1)");
    return static_cast<int>(value);
  }

  static unsigned Blocks(size_t rows) {
    if (rows > 0x7fffffff) throw InvalidShape("a step of " + std::to_string(rows) + " rows is over the grid's 2^31 - 1 blocks");
    return static_cast<unsigned>(rows);
  }

  void Current() { cuda::MakeCurrent(device_); }

  cuda::CUfunction Function(const char* name) {
    cuda::CUfunction function = nullptr;
    Check(cuda::Driver("cuModuleGetFunction").cuModuleGetFunction(&function, module_, name), "cuModuleGetFunction");
    return function;
  }

  // Every argument is passed by address, as cuLaunchKernel wants; each must have its parameter's
  // exact size (uint64_t for pointers, int and float as they are).
  template <typename... Arguments>
  void Launch(cuda::CUfunction function, unsigned grid_x, unsigned grid_y, unsigned threads, unsigned shared_bytes, Arguments... arguments) {
    void* parameters[] = {static_cast<void*>(&arguments)...};
    Check(cuda::Driver("cuLaunchKernel").cuLaunchKernel(function, grid_x, grid_y, 1, threads, 1, 1, shared_bytes, stream_.get(), parameters, nullptr),
          "cuLaunchKernel");
  }

  // A device buffer of at least `bytes` for the narrowed inputs of 16-bit matrices, grown as needed.
  uint64_t Scratch(size_t bytes) { return Grow(scratch_, scratch_bytes_, bytes); }
  // Another, for int8 matrices widened to bf16 (whose inputs then use Scratch).
  uint64_t WeightScratch(size_t bytes) { return Grow(weight_scratch_, weight_scratch_bytes_, bytes); }

  uint64_t Grow(cuda::CUdeviceptr& buffer, size_t& size, size_t bytes) {
    if (bytes > size) {
      const cuda::DriverTable& cu = cuda::Driver("scratch");
      if (buffer != 0) {
        Check(cu.cuStreamSynchronize(stream_.get()), "cuStreamSynchronize");  // queued work may still read the old one
        Check(cu.cuMemFree(buffer), "cuMemFree");
      }
      const size_t grown = std::max(bytes, size * 2);
      buffer = 0;
      size = 0;
      Check(cu.cuMemAlloc(&buffer, grown), "cuMemAlloc");
      size = grown;
    }
    return buffer;
  }

  void Release() {
    const cuda::DriverStatus& status = cuda::Status();
    if (!status.available) return;
    const cuda::DriverTable& cu = cuda::Driver("release");
    cuda::MakeCurrent(device_);
    cu.cuStreamSynchronize(stream_.get());
    if (blas_ != nullptr) cublas::Library("release").cublasDestroy(blas_);
    blas_ = nullptr;
    if (scratch_ != 0) cu.cuMemFree(scratch_);
    scratch_ = 0;
    if (weight_scratch_ != 0) cu.cuMemFree(weight_scratch_);
    weight_scratch_ = 0;
    if (module_ != nullptr) cu.cuModuleUnload(module_);
    module_ = nullptr;
  }

  int device_;
  cuda::Stream stream_;
  cuda::CUmodule module_ = nullptr;
  cublas::cublasHandle_t blas_ = nullptr;
  cuda::CUdeviceptr scratch_ = 0;
  size_t scratch_bytes_ = 0;
  cuda::CUdeviceptr weight_scratch_ = 0;
  size_t weight_scratch_bytes_ = 0;
  cuda::CUfunction narrow_ = nullptr, add_rows_ = nullptr, rms_norm_ = nullptr, layer_norm_ = nullptr, silu_multiply_ = nullptr, gelu_ = nullptr,
                   prepare_attention_ = nullptr, attention_ = nullptr, attention_tiles_ = nullptr, attention_grouped_ = nullptr,
                   gather_rows_ = nullptr, scatter_add_rows_ = nullptr, zero_ = nullptr,
                   linear_int8_small_ = nullptr, dequantize_int8_ = nullptr, route_experts_ = nullptr, add_weighted_rows_ = nullptr;
};

}  // namespace

std::unique_ptr<DeviceKernels> CreateCudaKernels(int device) { return std::make_unique<CudaKernels>(device); }
std::unique_ptr<DeviceKernels> CreateHostKernels() { return std::make_unique<HostKernels>(); }

}  // namespace trellis::kernels
