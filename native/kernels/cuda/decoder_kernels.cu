// CUDA kernels for a decoder rank's layers on a GPU (lib/llm/device-layers.ts). Activations are
// f32 row-major, as on the CPU; weights and the key/value cache may be 16-bit. The matrices go to
// cuBLAS; these kernels are everything around them.
//
// Compiled by scripts/build-cuda-kernels.sh into a fat binary (cubins for the common data-centre
// architectures plus PTX the driver can compile for newer ones) that the addon embeds and loads
// with cuModuleLoadData, so nothing here is linked against the CUDA runtime and the addon builds
// and loads where there is no CUDA at all. Names are extern "C" so the loader finds them as written.
//
// A sequence's cache is a list of blocks of kCacheBlock positions, each block holding them for all
// of this rank's layers:
//   [layer][keys | values][kCacheBlock][kvHeads][headSize]
// so a step passes each sequence's block addresses (sequences with a common prefix share its
// blocks), and each layer's kernels find their part from the layer index.
//
// The tests also compile this file as C++ for the host (test/gpu/fake/kernel_emulation.h runs each
// block's threads as fibers, with barriers for __syncthreads and the warp shuffles), so the
// kernels' indexing and synchronisation are checked where there is no GPU.
#ifndef TRELLIS_KERNEL_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define TRELLIS_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
#include <stdint.h>

namespace {

// Element encodings, as lib/llm/device-kernels.ts numbers them (kFloat8 for caches only).
constexpr int kFloat32 = 0;
constexpr int kBfloat16 = 1;
constexpr int kFloat16 = 2;
constexpr int kFloat8 = 3;

// e4m3fn (vLLM's fp8 caches): 1 sign, 4 exponent bits biased by 7, 3 mantissa bits; no
// infinities, S.1111.111 is NaN, the largest finite 448. Converted in software, the same on every
// architecture (and in the host emulation) as the CPU kernels' table.
__device__ __forceinline__ float Float8ToFloat(uint8_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x80u) << 24;
  const uint32_t exponent = (bits >> 3) & 0xfu;
  const uint32_t mantissa = bits & 0x7u;
  if (exponent == 0xfu && mantissa == 0x7u) return __uint_as_float(sign | 0x7fc00000u);
  if (exponent == 0) return __uint_as_float(sign | __float_as_uint(static_cast<float>(mantissa) * 0.001953125f));  // eighths of 2^-6
  return __uint_as_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Rounded to nearest even; beyond ±448 saturated to ±448; NaN kept.
__device__ __forceinline__ uint8_t FloatToFloat8(float value) {
  const uint32_t bits = __float_as_uint(value);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  if (magnitude >= 0x43e80000u) return static_cast<uint8_t>(sign | 0x7eu);  // 464 and beyond
  if (magnitude < 0x3c800000u) return static_cast<uint8_t>(sign | static_cast<uint8_t>(rintf(__uint_as_float(magnitude) * 512.f)));  // below 2^-6
  uint32_t kept = ((((magnitude >> 23) - 120u) << 3) | ((magnitude >> 20) & 0x7u));
  const uint32_t rest = magnitude & 0xfffffu;
  if (rest > 0x80000u || (rest == 0x80000u && (kept & 1u) != 0)) ++kept;
  return static_cast<uint8_t>(sign | kept);
}

__device__ __forceinline__ float LoadElement(const void* base, size_t index, int type) {
  if (type == kFloat32) return static_cast<const float*>(base)[index];
  if (type == kFloat8) return Float8ToFloat(static_cast<const uint8_t*>(base)[index]);
  const uint16_t bits = static_cast<const uint16_t*>(base)[index];
  if (type == kFloat16) return __half2float(__ushort_as_half(bits));
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);  // bf16: the top half of an f32
}

__device__ __forceinline__ void StoreElement(void* base, size_t index, int type, float value) {
  if (type == kFloat32) {
    static_cast<float*>(base)[index] = value;
  } else if (type == kFloat8) {
    static_cast<uint8_t*>(base)[index] = FloatToFloat8(value);
  } else if (type == kBfloat16) {
    static_cast<uint16_t*>(base)[index] = __bfloat16_as_ushort(__float2bfloat16_rn(value));
  } else {
    static_cast<uint16_t*>(base)[index] = __half_as_ushort(__float2half_rn(value));
  }
}

// Positions in one block of a cache (native/kernels/device_kernels.h kCacheBlockPositions).
constexpr int kCacheBlock = 16;

// One key/value head of one layer in a sequence's cache: element e of position p's key is
// Block(p)[Key(p) + e], its value's Block(p)[Value(p) + e].
struct CacheHead {
  const unsigned long long* blocks;
  size_t keys;    // elements into a block: this layer's keys of this head, at the block's first position
  size_t values;  // and its values
  size_t row_size;

  __device__ __forceinline__ void* Block(int position) const { return reinterpret_cast<void*>(blocks[position / kCacheBlock]); }
  __device__ __forceinline__ size_t Key(int position) const { return keys + static_cast<size_t>(position % kCacheBlock) * row_size; }
  __device__ __forceinline__ size_t Value(int position) const { return values + static_cast<size_t>(position % kCacheBlock) * row_size; }
};

// cache_blocks: the step's sequences' block addresses, list after list; cache_table: where each
// sequence's list starts.
__device__ __forceinline__ CacheHead CacheHeadOf(const unsigned long long* cache_blocks, const int* cache_table, int sequence, int layer, int kv_heads,
                                                 int head_size, int kv_head) {
  const size_t row_size = static_cast<size_t>(kv_heads) * head_size;
  const size_t keys = static_cast<size_t>(layer) * 2 * kCacheBlock * row_size + static_cast<size_t>(kv_head) * head_size;
  return {cache_blocks + cache_table[sequence], keys, keys + kCacheBlock * row_size, row_size};
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ float BlockSum(float value) {
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  float total = 0.f;
  for (int index = 0; index < warps; index++) total += partial[index];
  return total;
}

}  // namespace

extern "C" {

// out[i] = in[i] rounded to bf16 or f16 (cuBLAS multiplies 16-bit weights by 16-bit inputs).
__global__ void trellis_narrow(uint16_t* out, const float* in, unsigned long long count, int type) {
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < count;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    StoreElement(out, index, type, in[index]);
  }
}

// out[row, column] += bias[column] (bias may be null) + (residual ? residual[row, column] : 0).
__global__ void trellis_add_rows(float* out, const float* residual, const float* bias, unsigned long long rows, int columns) {
  const unsigned long long count = rows * static_cast<unsigned long long>(columns);
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < count;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    float value = out[index];
    if (residual != nullptr) value += residual[index];
    if (bias != nullptr) value += bias[index % columns];
    out[index] = value;
  }
}

// One block per row: out = x / sqrt(mean(x²) + eps) · gamma. out may be x.
__global__ void trellis_rms_norm(float* out, const float* x, const float* gamma, int columns, float epsilon) {
  const float* in = x + static_cast<size_t>(blockIdx.x) * columns;
  float* target = out + static_cast<size_t>(blockIdx.x) * columns;
  float squares = 0.f;
  for (int column = threadIdx.x; column < columns; column += blockDim.x) squares += in[column] * in[column];
  const float scale = rsqrtf(BlockSum(squares) / columns + epsilon);
  for (int column = threadIdx.x; column < columns; column += blockDim.x) target[column] = in[column] * scale * gamma[column];
}

// One block per row: out = (x - mean) / sqrt(variance + eps) · gamma + beta. out may be x.
__global__ void trellis_layer_norm(float* out, const float* x, const float* gamma, const float* beta, int columns, float epsilon) {
  const float* in = x + static_cast<size_t>(blockIdx.x) * columns;
  float* target = out + static_cast<size_t>(blockIdx.x) * columns;
  float sum = 0.f;
  for (int column = threadIdx.x; column < columns; column += blockDim.x) sum += in[column];
  const float mean = BlockSum(sum) / columns;
  float squares = 0.f;
  for (int column = threadIdx.x; column < columns; column += blockDim.x) {
    const float centred = in[column] - mean;
    squares += centred * centred;
  }
  const float scale = rsqrtf(BlockSum(squares) / columns + epsilon);
  for (int column = threadIdx.x; column < columns; column += blockDim.x) target[column] = (in[column] - mean) * scale * gamma[column] + beta[column];
}

// out[i] = SiLU(gate[i]) · up[i]; out may be gate.
__global__ void trellis_silu_multiply(float* out, const float* gate, const float* up, unsigned long long count) {
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < count;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    const float value = gate[index];
    out[index] = value / (1.f + expf(-value)) * up[index];
  }
}

// In place, GPT-2's tanh approximation of GELU.
__global__ void trellis_gelu(float* x, unsigned long long count) {
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < count;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    const float value = x[index];
    x[index] = 0.5f * value * (1.f + tanhf(0.7978845608028654f * (value + 0.044715f * value * value * value)));
  }
}

// Splits each row of the fused projection [rows, (heads + 2·kvHeads)·headSize] into queries (out,
// [rows, heads·headSize]) and the new keys and values (into each row's sequence's cache at the
// row's position), applying per-head RMS norms (Qwen3; null: none) and rotary positions (null
// inverse frequencies: none) on the way. Grid: (rows, heads + 2·kvHeads); one block per head of a
// row, headSize at most 1024.
__global__ void trellis_prepare_attention(float* queries, const float* qkv, const int* row_sequence, const int* row_position,
                                          const unsigned long long* cache_blocks, const int* cache_table, int layer, int heads,
                                          int kv_heads, int head_size, const float* query_norm, const float* key_norm, float epsilon,
                                          const float* inverse_frequencies, int cache_type) {
  TRELLIS_DYNAMIC_SHARED(float, head);
  const int row = blockIdx.x;
  const int slot = blockIdx.y;  // [0, heads): a query head; then kvHeads key heads; then kvHeads value heads
  const int row_width = (heads + 2 * kv_heads) * head_size;
  const float* source = qkv + static_cast<size_t>(row) * row_width + static_cast<size_t>(slot) * head_size;
  for (int index = threadIdx.x; index < head_size; index += blockDim.x) head[index] = source[index];
  __syncthreads();
  const bool is_value = slot >= heads + kv_heads;
  const float* norm = slot < heads ? query_norm : (is_value ? nullptr : key_norm);
  if (norm != nullptr) {
    float squares = 0.f;
    for (int index = threadIdx.x; index < head_size; index += blockDim.x) squares += head[index] * head[index];
    const float scale = rsqrtf(BlockSum(squares) / head_size + epsilon);
    __syncthreads();
    for (int index = threadIdx.x; index < head_size; index += blockDim.x) head[index] = head[index] * scale * norm[index];
    __syncthreads();
  }
  const int position = row_position[row];
  if (!is_value && inverse_frequencies != nullptr) {
    // rotate_half pairing: element i turns with element i + headSize/2. Angles in double: in f32
    // they drift by milliradians at long positions.
    const int half = head_size / 2;
    for (int index = threadIdx.x; index < half; index += blockDim.x) {
      double sine, cosine;
      sincos(static_cast<double>(position) * static_cast<double>(inverse_frequencies[index]), &sine, &cosine);
      const float first = head[index];
      const float second = head[index + half];
      const float s = static_cast<float>(sine);
      const float c = static_cast<float>(cosine);
      head[index] = first * c - second * s;
      head[index + half] = second * c + first * s;
    }
    __syncthreads();
  }
  if (slot < heads) {
    float* target = queries + static_cast<size_t>(row) * heads * head_size + static_cast<size_t>(slot) * head_size;
    for (int index = threadIdx.x; index < head_size; index += blockDim.x) target[index] = head[index];
    return;
  }
  const int kv_head = is_value ? slot - heads - kv_heads : slot - heads;
  const CacheHead cache = CacheHeadOf(cache_blocks, cache_table, row_sequence[row], layer, kv_heads, head_size, kv_head);
  void* block = cache.Block(position);
  const size_t first = is_value ? cache.Value(position) : cache.Key(position);
  for (int index = threadIdx.x; index < head_size; index += blockDim.x) StoreElement(block, first + index, cache_type, head[index]);
}

// Causal grouped-query attention of rows of the step against their sequences' caches (which
// already hold the step's own keys and values), one row a block: the rows of `row_list` (null:
// every row of the step, block x being the row). Grid: (rows, heads); four warps a block, each
// taking every fourth key with a running (online) softmax, the lanes splitting the head's
// elements; the warps' partial results are merged at the end. A row at position p attends to
// keys [max(0, p - window + 1), p] (window 0: from 0). head_size at most 256. For decoding (one
// row a sequence); prompts' runs of rows go to trellis_attention_tiles.
constexpr int kAttentionWarps = 4;
constexpr int kMaxPerLane = 8;

__global__ void trellis_attention(float* out, const float* queries, const int* row_list, const int* row_sequence, const int* row_position,
                                  const unsigned long long* cache_blocks, const int* cache_table, int layer, int heads, int kv_heads,
                                  int head_size, int window, float scale, int cache_type) {
  __shared__ float warp_max[kAttentionWarps];
  __shared__ float warp_sum[kAttentionWarps];
  __shared__ float warp_acc[kAttentionWarps][kMaxPerLane * 32];
  const int row = row_list != nullptr ? row_list[blockIdx.x] : static_cast<int>(blockIdx.x);
  const int head = blockIdx.y;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int kv_head = head / (heads / kv_heads);
  const int position = row_position[row];
  const CacheHead cache = CacheHeadOf(cache_blocks, cache_table, row_sequence[row], layer, kv_heads, head_size, kv_head);
  const float* query = queries + (static_cast<size_t>(row) * heads + head) * head_size;

  float q[kMaxPerLane];
  float acc[kMaxPerLane];
#pragma unroll
  for (int part = 0; part < kMaxPerLane; part++) {
    const int element = lane + part * 32;
    q[part] = element < head_size ? query[element] * scale : 0.f;
    acc[part] = 0.f;
  }
  float running_max = -INFINITY;
  float running_sum = 0.f;
  const int start = window > 0 ? max(0, position - window + 1) : 0;
  for (int key = start + warp; key <= position; key += kAttentionWarps) {
    const void* block = cache.Block(key);
    const size_t key_at = cache.Key(key);
    const size_t value_at = cache.Value(key);
    float dot = 0.f;
#pragma unroll
    for (int part = 0; part < kMaxPerLane; part++) {
      const int element = lane + part * 32;
      if (element < head_size) dot += q[part] * LoadElement(block, key_at + element, cache_type);
    }
    for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    const float next_max = fmaxf(running_max, dot);
    const float correction = __expf(running_max - next_max);
    const float weight = __expf(dot - next_max);
    running_sum = running_sum * correction + weight;
#pragma unroll
    for (int part = 0; part < kMaxPerLane; part++) {
      const int element = lane + part * 32;
      if (element < head_size) acc[part] = acc[part] * correction + weight * LoadElement(block, value_at + element, cache_type);
    }
    running_max = next_max;
  }
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = running_sum;
  }
#pragma unroll
  for (int part = 0; part < kMaxPerLane; part++) warp_acc[warp][lane + part * 32] = acc[part];
  __syncthreads();
  if (warp != 0) return;
  float total_max = -INFINITY;
  for (int index = 0; index < kAttentionWarps; index++) total_max = fmaxf(total_max, warp_max[index]);
  float total_sum = 0.f;
  float factors[kAttentionWarps];
  for (int index = 0; index < kAttentionWarps; index++) {
    // A warp that saw no key has max -inf and sum 0: its factor is 0.
    factors[index] = warp_sum[index] > 0.f ? __expf(warp_max[index] - total_max) : 0.f;
    total_sum += warp_sum[index] * factors[index];
  }
  float* target = out + (static_cast<size_t>(row) * heads + head) * head_size;
#pragma unroll
  for (int part = 0; part < kMaxPerLane; part++) {
    const int element = lane + part * 32;
    if (element >= head_size) continue;
    float value = 0.f;
    for (int index = 0; index < kAttentionWarps; index++) value += warp_acc[index][element] * factors[index];
    target[element] = value / total_sum;
  }
}

// trellis_attention for grouped-query models, a block per (row, key/value head): the block scores
// each key once against all the query heads that share it (up to kGroupMax of them), so the cache
// is read once per key/value head instead of once per query head. Decoding at long contexts
// reads more cache than weights; this reads a group's share once. head_size at most
// kGroupMaxHead. Grid: (rows, kvHeads).
constexpr int kGroupMax = 8;
constexpr int kGroupMaxHead = 128;
constexpr int kGroupPerLane = kGroupMaxHead / 32;

__global__ void trellis_attention_grouped(float* out, const float* queries, const int* row_list, const int* row_sequence, const int* row_position,
                                          const unsigned long long* cache_blocks, const int* cache_table, int layer, int heads, int kv_heads,
                                          int head_size, int window, float scale, int cache_type) {
  __shared__ float warp_max[kAttentionWarps][kGroupMax];
  __shared__ float warp_sum[kAttentionWarps][kGroupMax];
  __shared__ float warp_acc[kAttentionWarps][kGroupMax][kGroupMaxHead];
  const int row = row_list != nullptr ? row_list[blockIdx.x] : static_cast<int>(blockIdx.x);
  const int kv_head = blockIdx.y;
  const int group = heads / kv_heads;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int position = row_position[row];
  const CacheHead cache = CacheHeadOf(cache_blocks, cache_table, row_sequence[row], layer, kv_heads, head_size, kv_head);
  const float* first_query = queries + (static_cast<size_t>(row) * heads + static_cast<size_t>(kv_head) * group) * head_size;

  float q[kGroupMax][kGroupPerLane];
  float acc[kGroupMax][kGroupPerLane];
  float running_max[kGroupMax];
  float running_sum[kGroupMax];
#pragma unroll
  for (int member = 0; member < kGroupMax; member++) {
    running_max[member] = -INFINITY;
    running_sum[member] = 0.f;
#pragma unroll
    for (int part = 0; part < kGroupPerLane; part++) {
      const int element = lane + part * 32;
      q[member][part] = member < group && element < head_size ? first_query[static_cast<size_t>(member) * head_size + element] * scale : 0.f;
      acc[member][part] = 0.f;
    }
  }
  const int start = window > 0 ? max(0, position - window + 1) : 0;
  for (int key = start + warp; key <= position; key += kAttentionWarps) {
    const void* block = cache.Block(key);
    const size_t key_at = cache.Key(key);
    const size_t value_at = cache.Value(key);
    float k[kGroupPerLane];
    float v[kGroupPerLane];
#pragma unroll
    for (int part = 0; part < kGroupPerLane; part++) {
      const int element = lane + part * 32;
      k[part] = element < head_size ? LoadElement(block, key_at + element, cache_type) : 0.f;
      v[part] = element < head_size ? LoadElement(block, value_at + element, cache_type) : 0.f;
    }
#pragma unroll
    for (int member = 0; member < kGroupMax; member++) {
      if (member >= group) break;
      float dot = 0.f;
#pragma unroll
      for (int part = 0; part < kGroupPerLane; part++) dot += q[member][part] * k[part];
      for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      const float next_max = fmaxf(running_max[member], dot);
      const float correction = __expf(running_max[member] - next_max);
      const float weight = __expf(dot - next_max);
      running_sum[member] = running_sum[member] * correction + weight;
#pragma unroll
      for (int part = 0; part < kGroupPerLane; part++) acc[member][part] = acc[member][part] * correction + weight * v[part];
      running_max[member] = next_max;
    }
  }
#pragma unroll
  for (int member = 0; member < kGroupMax; member++) {
    if (member >= group) break;
    if (lane == 0) {
      warp_max[warp][member] = running_max[member];
      warp_sum[warp][member] = running_sum[member];
    }
#pragma unroll
    for (int part = 0; part < kGroupPerLane; part++) warp_acc[warp][member][lane + part * 32] = acc[member][part];
  }
  __syncthreads();
  // Warp w writes query heads w, w + 4, ...: each merges the four warps' partial results.
  for (int member = warp; member < group; member += kAttentionWarps) {
    float total_max = -INFINITY;
    for (int index = 0; index < kAttentionWarps; index++) total_max = fmaxf(total_max, warp_max[index][member]);
    float factors[kAttentionWarps];
    float total_sum = 0.f;
    for (int index = 0; index < kAttentionWarps; index++) {
      factors[index] = warp_sum[index][member] > 0.f ? __expf(warp_max[index][member] - total_max) : 0.f;
      total_sum += warp_sum[index][member] * factors[index];
    }
    float* target = out + (static_cast<size_t>(row) * heads + static_cast<size_t>(kv_head) * group + member) * head_size;
    for (int part = 0; part < kGroupPerLane; part++) {
      const int element = lane + part * 32;
      if (element >= head_size) continue;
      float value = 0.f;
      for (int index = 0; index < kAttentionWarps; index++) value += warp_acc[index][member][element] * factors[index];
      target[element] = value / total_sum;
    }
  }
}

// Attention for runs of a prompt's rows: each block takes a tile of up to kTileRows consecutive
// rows of one sequence (tiles: pairs of first row and row count) for one head, and reads the keys
// and values they need once for all of them, 32 at a time into shared memory, instead of once a
// row. Each warp owns every fourth row of the tile; a lane scores one key of the chunk against a
// row (no reduction per key), the warp takes the chunk's maximum and sum with shuffles, and each
// lane accumulates its elements of the head over the chunk's values. Rows see only their own
// causal (and window) keys. head_size at most kTileMaxHead; dynamic shared memory:
// kTileRows·head_size (queries) + 32·(head_size + 1) (keys, padded against bank conflicts)
// + 32·head_size (values) + kAttentionWarps·32 (weights) floats.
constexpr int kTileRows = 16;
constexpr int kTileMaxHead = 128;
constexpr int kTileRowsPerWarp = kTileRows / kAttentionWarps;
constexpr int kTileElementsPerLane = kTileMaxHead / 32;

__global__ void trellis_attention_tiles(float* out, const float* queries, const int* tiles, const int* row_sequence, const int* row_position,
                                        const unsigned long long* cache_blocks, const int* cache_table, int layer, int heads, int kv_heads,
                                        int head_size, int window, float scale, int cache_type) {
  TRELLIS_DYNAMIC_SHARED(float, tile_shared);
  float* query_tile = tile_shared;                                 // [kTileRows][head_size]
  float* key_chunk = query_tile + kTileRows * head_size;           // [32][head_size + 1]
  float* value_chunk = key_chunk + 32 * (head_size + 1);           // [32][head_size]
  float* weights = value_chunk + 32 * head_size;                   // [warps][32]
  const int first = tiles[2 * blockIdx.x];
  const int count = tiles[2 * blockIdx.x + 1];
  const int head = blockIdx.y;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int kv_head = head / (heads / kv_heads);
  const int first_position = row_position[first];
  const int last_position = first_position + count - 1;
  const CacheHead cache = CacheHeadOf(cache_blocks, cache_table, row_sequence[first], layer, kv_heads, head_size, kv_head);

  for (int index = threadIdx.x; index < count * head_size; index += blockDim.x) {
    const int row = index / head_size;
    const int element = index % head_size;
    query_tile[row * head_size + element] = queries[(static_cast<size_t>(first + row) * heads + head) * head_size + element] * scale;
  }
  float running_max[kTileRowsPerWarp];
  float running_sum[kTileRowsPerWarp];
  float acc[kTileRowsPerWarp][kTileElementsPerLane];
#pragma unroll
  for (int slot = 0; slot < kTileRowsPerWarp; slot++) {
    running_max[slot] = -INFINITY;
    running_sum[slot] = 0.f;
#pragma unroll
    for (int part = 0; part < kTileElementsPerLane; part++) acc[slot][part] = 0.f;
  }
  const int start = window > 0 ? max(0, first_position - window + 1) : 0;
  for (int chunk = start; chunk <= last_position; chunk += 32) {
    __syncthreads();  // the previous chunk is no longer read (and the queries are in place)
    for (int index = threadIdx.x; index < 32 * head_size; index += blockDim.x) {
      const int key = index / head_size;
      const int element = index % head_size;
      const int position = chunk + key;
      const bool present = position <= last_position;
      key_chunk[key * (head_size + 1) + element] = present ? LoadElement(cache.Block(position), cache.Key(position) + element, cache_type) : 0.f;
      value_chunk[key * head_size + element] = present ? LoadElement(cache.Block(position), cache.Value(position) + element, cache_type) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int slot = 0; slot < kTileRowsPerWarp; slot++) {
      const int row = warp + slot * kAttentionWarps;
      if (row >= count) continue;  // the same for the whole warp
      const int position = first_position + row;
      const int key_position = chunk + lane;
      const int lowest = window > 0 ? position - window + 1 : 0;
      const bool visible = key_position <= position && key_position >= lowest;
      float score = -INFINITY;
      if (visible) {
        score = 0.f;
        const float* query = query_tile + row * head_size;
        const float* key = key_chunk + lane * (head_size + 1);
        for (int element = 0; element < head_size; element++) score += query[element] * key[element];
      }
      float chunk_max = score;
      for (int offset = 16; offset > 0; offset >>= 1) chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, offset));
      if (chunk_max == -INFINITY) continue;  // no key of this chunk is visible to the row (uniform in the warp)
      const float next_max = fmaxf(running_max[slot], chunk_max);
      const float correction = __expf(running_max[slot] - next_max);
      const float weight = visible ? __expf(score - next_max) : 0.f;
      float weight_sum = weight;
      for (int offset = 16; offset > 0; offset >>= 1) weight_sum += __shfl_xor_sync(0xffffffffu, weight_sum, offset);
      running_sum[slot] = running_sum[slot] * correction + weight_sum;
      running_max[slot] = next_max;
      weights[warp * 32 + lane] = weight;
      __syncwarp(0xffffffffu);
#pragma unroll
      for (int part = 0; part < kTileElementsPerLane; part++) {
        const int element = lane + part * 32;
        if (element >= head_size) continue;
        float value = acc[slot][part] * correction;
        for (int key = 0; key < 32; key++) value += weights[warp * 32 + key] * value_chunk[key * head_size + element];
        acc[slot][part] = value;
      }
      __syncwarp(0xffffffffu);  // the weights are read before the next row writes them
    }
  }
#pragma unroll
  for (int slot = 0; slot < kTileRowsPerWarp; slot++) {
    const int row = warp + slot * kAttentionWarps;
    if (row >= count) continue;
    float* target = out + (static_cast<size_t>(first + row) * heads + head) * head_size;
#pragma unroll
    for (int part = 0; part < kTileElementsPerLane; part++) {
      const int element = lane + part * 32;
      if (element < head_size) target[element] = acc[slot][part] / running_sum[slot];
    }
  }
}

// out[r, c] = (Σ_k x[r, k] · weight[c, k]) · scales[c] + bias[c] with int8 weights quantized per
// output row (lib/llm/kernels.ts quantizeRows), for steps of at most kInt8SmallRows rows
// (decoding): a warp a column, the lanes taking four weights at a time, every row of the step at
// once, so each weight byte is read once per step. Grid: ceil(columns / 8) blocks of 8 warps.
constexpr int kInt8SmallRows = 16;

__global__ void trellis_linear_int8_small(float* out, const float* x, const signed char* weight, const float* scales, const float* bias, int rows,
                                          int depth, int columns) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int column = blockIdx.x * 8 + warp;
  if (column >= columns) return;  // the whole warp: no shuffles are left out
  float sums[kInt8SmallRows];
#pragma unroll
  for (int row = 0; row < kInt8SmallRows; row++) sums[row] = 0.f;
  const signed char* weights = weight + static_cast<size_t>(column) * depth;
  const bool vector = (depth & 3) == 0 && (reinterpret_cast<uintptr_t>(weights) & 3) == 0;
  const int step = vector ? 128 : 32;
  for (int base = vector ? lane * 4 : lane; base < depth; base += step) {
    const int width = vector ? 4 : 1;
    float w[4];
    for (int part = 0; part < width; part++) w[part] = static_cast<float>(weights[base + part]);
#pragma unroll
    for (int row = 0; row < kInt8SmallRows; row++) {
      if (row >= rows) break;
      const float* input = x + static_cast<size_t>(row) * depth + base;
      for (int part = 0; part < width; part++) sums[row] += input[part] * w[part];
    }
  }
#pragma unroll
  for (int row = 0; row < kInt8SmallRows; row++) {
    if (row >= rows) break;
    float sum = sums[row];
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[static_cast<size_t>(row) * columns + column] = sum * scales[column] + (bias != nullptr ? bias[column] : 0.f);
  }
}

// out[c, k] = bf16(weight[c, k] · scales[c]): an int8 matrix widened for cuBLAS, for steps with
// more rows than the int8 kernel takes (prompts), where the products, not the bytes, cost.
__global__ void trellis_dequantize_int8(uint16_t* out, const signed char* weight, const float* scales, int columns, int depth) {
  const unsigned long long total = static_cast<unsigned long long>(columns) * depth;
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    StoreElement(out, index, kBfloat16, static_cast<float>(weight[index]) * scales[index / depth]);
  }
}

// out[i, :] = x[rows[i], :] for i < count: the rows of a step one adapter or one expert takes.
__global__ void trellis_gather_rows(float* out, const float* x, const int* rows, int count, int width) {
  const unsigned long long total = static_cast<unsigned long long>(count) * width;
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(index / width);
    const int column = static_cast<int>(index % width);
    out[index] = x[static_cast<size_t>(rows[row]) * width + column];
  }
}

// out[rows[i], :] += delta[i, :], or with weights (doubles, null: none) out[rows[i], :] =
// out + weights[i] · delta[i, :] summed in double and rounded once, as the host computes it. The
// rows of one call are distinct, so no two threads write one element.
__global__ void trellis_scatter_add_rows(float* out, const float* delta, const int* rows, const double* weights, int count, int width) {
  const unsigned long long total = static_cast<unsigned long long>(count) * width;
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(index / width);
    const int column = static_cast<int>(index % width);
    float& target = out[static_cast<size_t>(rows[row]) * width + column];
    if (weights != nullptr) {
      target = static_cast<float>(static_cast<double>(target) + weights[row] * static_cast<double>(delta[index]));
    } else {
      target += delta[index];
    }
  }
}

// Each row's topK experts by the router's softmax, as the host routes them (lib/llm/routing.ts:
// probabilities in double, ties to the lower index, weights over the topK's sum when
// normalizing): weights[row, expert] is the row's weight there, 0 where not chosen. A thread a
// row; at most kMaxExperts experts.
constexpr int kMaxExperts = 256;

__global__ void trellis_route_experts(double* weights, const float* logits, int rows, int experts, int top_k, int normalize) {
  for (int row = blockIdx.x * blockDim.x + threadIdx.x; row < rows; row += gridDim.x * blockDim.x) {
    const float* scores = logits + static_cast<size_t>(row) * experts;
    double* out = weights + static_cast<size_t>(row) * experts;
    float maximum = -INFINITY;
    for (int expert = 0; expert < experts; expert++) maximum = fmaxf(maximum, scores[expert]);
    double probabilities[kMaxExperts];
    double sum = 0.0;
    for (int expert = 0; expert < experts; expert++) {
      probabilities[expert] = exp(static_cast<double>(scores[expert]) - static_cast<double>(maximum));
      sum += probabilities[expert];
      out[expert] = 0.0;
    }
    unsigned long long taken[kMaxExperts / 64] = {0, 0, 0, 0};
    int picked[kMaxExperts];
    double picked_sum = 0.0;
    for (int choice = 0; choice < top_k; choice++) {
      int best = -1;
      for (int expert = 0; expert < experts; expert++) {
        const bool free = (taken[expert >> 6] & (1ull << (expert & 63))) == 0;
        if (free && (best < 0 || probabilities[expert] > probabilities[best])) best = expert;
      }
      taken[best >> 6] |= 1ull << (best & 63);
      picked[choice] = best;
      picked_sum += probabilities[best];
    }
    for (int choice = 0; choice < top_k; choice++) out[picked[choice]] = probabilities[picked[choice]] / (normalize ? picked_sum : sum);
  }
}

// out[row, :] = out + weights[row, expert] · result[row, :], in double and rounded once, for the
// rows whose weight there is not 0: one expert's share, computed over every row, added to the
// rows routed to it.
__global__ void trellis_add_weighted_rows(float* out, const float* result, const double* weights, int expert, int experts, int rows, int width) {
  const unsigned long long total = static_cast<unsigned long long>(rows) * width;
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    const int row = static_cast<int>(index / width);
    const double weight = weights[static_cast<size_t>(row) * experts + expert];
    if (weight != 0.0) out[index] = static_cast<float>(static_cast<double>(out[index]) + weight * static_cast<double>(result[index]));
  }
}

// x[i] = 0 for i < count.
__global__ void trellis_zero(float* x, unsigned long long count) {
  for (unsigned long long index = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; index < count;
       index += static_cast<unsigned long long>(gridDim.x) * blockDim.x) {
    x[index] = 0.f;
  }
}

}  // extern "C"
