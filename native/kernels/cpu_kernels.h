// f32 row-major CPU kernels (weights may be bf16 or f16) for the transformer that runs in worker processes (lib/llm). Each call
// runs on the calling thread: a worker process is one rank, and its parallelism is the ranks.
// The kernels trust their arguments; kernels_binding.cc checks them before any call from JS.
#pragma once

#include <cstddef>
#include <cstdint>

namespace trellis::kernels {

// out[rows, columns] = x[rows, depth] · weight[columns, depth]ᵀ + bias[columns]; bias may be null.
// weight is laid out as PyTorch's Linear stores it, [out features, in features], so each output is
// a dot product of two contiguous rows. out must not overlap x, weight or bias.
void Linear(float* out, const float* x, const float* weight, const float* bias, size_t rows, size_t depth, size_t columns);

// How a 16-bit weight matrix encodes its values: bfloat16 (the top half of an f32) or IEEE half.
enum class WeightType { kBfloat16, kFloat16 };

// Linear with weights kept in 16 bits. Each weight is widened to f32 as it is loaded and the sums
// run in f32 in the same order as the f32 Linear, so the result equals Linear over the widened
// matrix exactly, while the matrix takes half the memory and half the bandwidth.
void Linear(float* out, const float* x, const uint16_t* weight, WeightType type, const float* bias, size_t rows, size_t depth,
            size_t columns);

// Linear with weights quantized to int8 per output row: weight[c, d] stands for weight[c, d] ·
// scales[c]. The int8 values are widened as they are loaded and each row's sum is scaled once
// (per depth block) before the bias: a quarter of f32's memory and bandwidth.
void Linear(float* out, const float* x, const int8_t* weight, const float* scales, const float* bias, size_t rows, size_t depth, size_t columns);

// out[i] = in[i] widened to f32 (exact). out must not overlap in.
void Widen(float* out, const uint16_t* in, WeightType type, size_t count);

// Per row of `columns`: (x - mean) / sqrt(variance + epsilon) * gamma + beta. out may be x itself
// (but may not overlap it otherwise).
void LayerNorm(float* out, const float* x, const float* gamma, const float* beta, size_t rows, size_t columns, float epsilon);

// In place, GPT-2's tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x³))).
void Gelu(float* x, size_t count);

// Per row of `columns`: x / sqrt(mean(x²) + epsilon) * gamma (Llama's RMSNorm). out may be x itself
// (but may not overlap it otherwise).
void RmsNorm(float* out, const float* x, const float* gamma, size_t rows, size_t columns, float epsilon);

// out[i] = gate[i] / (1 + e^-gate[i]) * up[i]: SiLU(gate) · up, the gated MLP of Llama-family
// decoders. out may be gate itself (but may not overlap it otherwise, nor up).
void SiluMultiply(float* out, const float* gate, const float* up, size_t count);

// In place, rotary position embedding of x[rows, heads, head_size] in Hugging Face's rotate_half
// pairing: element i of each head turns with element i + head_size / 2 by the angle
// positions[row] · inverse_frequencies[i]. head_size is even, positions are >= 0, and x overlaps
// neither positions nor inverse_frequencies.
void Rotary(float* x, const int32_t* positions, const float* inverse_frequencies, size_t rows, size_t heads, size_t head_size);

// Causal self-attention of one sequence against its key/value cache. q and out: [queries, heads,
// head_size]; keys and values: [past + queries, kv_heads, head_size], heads a multiple of kv_heads
// (grouped-query attention: query head h reads kv head h / (heads / kv_heads)). Query i sits at
// position past + i and attends to positions 0..past + i with scale 1/sqrt(head_size); with a
// sliding window (window > 0, Mistral's) only to the last `window` of them, itself included. out
// must not overlap the inputs.
void Attention(float* out, const float* q, const float* keys, const float* values, size_t queries, size_t past, size_t heads,
               size_t head_size, size_t kv_heads, size_t window = 0);

// Attention over a key/value cache kept in 16 bits (bf16 or f16), widened as it is read; the same
// arithmetic as over the cache's f32 widening.
void Attention(float* out, const float* q, const uint16_t* keys, const uint16_t* values, WeightType type, size_t queries, size_t past,
               size_t heads, size_t head_size, size_t kv_heads, size_t window = 0);

// A sequence's cache kept in blocks of `block_positions` positions (lib/llm/device-layers.ts):
// block b of the sequence starts at the address blocks[b]; within a block, this layer's keys start
// `keys` elements in and its values `values` elements in, each position's row [kv_heads,
// head_size] after the previous one's.
struct BlockedCache {
  const uint64_t* blocks;
  size_t block_positions;
  size_t keys;
  size_t values;
};

// How a key/value cache keeps its elements: f32, bf16, f16, or 8-bit e4m3fn floats (vLLM's fp8
// cache: 3 mantissa bits, largest finite 448, no infinities).
enum class CacheType { kFloat32, kBfloat16, kFloat16, kFloat8 };

// Attention as above over a cache in blocks, its elements widened to f32 as they are read: the
// same sums in the same order; only a run of keys cut at a block's end may round its dot
// products' last bit differently.
void BlockedAttention(float* out, const float* q, const BlockedCache& cache, CacheType type, size_t queries, size_t past, size_t heads,
                      size_t head_size, size_t kv_heads, size_t window = 0);

// out[i] = in[i] as e4m3fn: rounded to nearest even, beyond ±448 saturated to ±448, NaN kept.
void NarrowFloat8(uint8_t* out, const float* in, size_t count);
// out[i] = the value of e4m3fn code in[i].
void WidenFloat8(float* out, const uint8_t* in, size_t count);

// out[i] = in[i] rounded to the nearest bf16 or f16 (ties to even; f16 beyond ±65504 is infinity).
// out must not overlap in.
void Narrow(uint16_t* out, const float* in, WeightType type, size_t count);

}  // namespace trellis::kernels
