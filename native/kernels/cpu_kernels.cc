// The prebuilt addon must run on any x86-64, so it is compiled for the baseline and the hot loops
// come twice: AVX2+FMA versions (target attributes, chosen at run time by CPUID) and portable ones
// written with GCC vector extensions (SSE2 on x86-64, NEON elsewhere).
//
// Linear and attention's scores are dot products of contiguous rows (weights are [out, in]), so
// both run through one blocked kernel: a tile of several x rows × several weight rows keeps one
// vector accumulator per pair in registers, each loaded vector feeding several FMAs. Weight rows
// are walked in column blocks sized to stay in L2 while the x rows pass over them (many x rows go
// in chunks that stay in L2 too), and long rows are cut into depth blocks so a tile's rows stay
// in L1.
#include "kernels/cpu_kernels.h"
#include "kernels/thread_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(TRELLIS_KERNELS_PORTABLE_ONLY)
#define TRELLIS_KERNELS_AVX2 1
#include <immintrin.h>
#define TRELLIS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace trellis::kernels {
namespace {

// Half-precision weight elements, kept as the checkpoint stores them: distinct types so that the
// dot kernels pick their widening load by overload.
struct Bfloat16 {
  uint16_t bits;
};
struct Float16 {
  uint16_t bits;
};
// An 8-bit float of a key/value cache: e4m3fn (1 sign, 4 exponent bits biased by 7, 3 mantissa
// bits; no infinities, S.1111.111 is NaN; largest finite 448), as vLLM's fp8 caches keep them.
struct Float8 {
  uint8_t bits;
};

float DecodeFloat8(uint8_t bits) {
  const float sign = (bits & 0x80) != 0 ? -1.0f : 1.0f;
  const int exponent = (bits >> 3) & 0xf;
  const int mantissa = bits & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  // Subnormals (exponent 0) count eighths of 2^-6.
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
}

// Every code's value: widening is one table load (a gather of eight in AVX2).
struct Float8Table {
  float values[256];
  Float8Table() {
    for (int code = 0; code < 256; ++code) values[code] = DecodeFloat8(static_cast<uint8_t>(code));
  }
};
const Float8Table kFloat8Table;

inline float WidenScalar(float value) { return value; }
// An int8 weight is widened as is; its row's scale multiplies the finished sum.
inline float WidenScalar(int8_t value) { return static_cast<float>(value); }
// A bf16 is the top half of an f32.
inline float WidenScalar(Bfloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.bits) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}
inline float WidenScalar(Float8 value) { return kFloat8Table.values[value.bits]; }
inline float WidenScalar(Float16 value) {
  const uint32_t sign = static_cast<uint32_t>(value.bits & 0x8000) << 16;
  const uint32_t exponent = (value.bits >> 10) & 0x1f;
  uint32_t mantissa = value.bits & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal half: shift the mantissa up until its leading one is the implicit bit.
    int32_t shift = 0;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    bits = sign | (static_cast<uint32_t>(113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
  }
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// out[r, c] = (first ? bias[c] or 0 : out[r, c]) + Σ_d x[r, d] · weight[c, d], over one depth
// block; the pointers already sit at the block's first element. Weight is float, Bfloat16 or
// Float16; each is widened to f32 as it is loaded, so the arithmetic (and its order) is the same
// for all three, and a half-precision matrix gives exactly what its f32 widening gives.
template <class Weight>
struct DotProblem {
  const float* x;
  size_t x_stride;
  size_t rows;
  const Weight* weight;
  size_t weight_stride;
  size_t columns;
  size_t depth;
  float* out;
  size_t out_stride;
  const float* bias;
  // Attention needs row r only up to column causal_past + r: strips stop there (a strip may still
  // compute a few columns past the limit of its first rows, which the caller ignores).
  bool causal;
  size_t causal_past;
  // int8 weights: each weight row's scale, applied to its sums (per depth block) before the bias.
  const float* scales = nullptr;
};

// Accumulators per tile: Rows × ColumnsPerTile plus the Rows x vectors and one weight vector fill
// the 16 vector registers of both SSE2 and AVX2.
constexpr int ColumnsPerTile(int rows) { return rows == 3 ? 4 : rows == 2 ? 6 : 8; }
constexpr size_t kMaxRowsPerStrip = 3;
// A multiple of every ColumnsPerTile, so column blocks split into whole tiles.
constexpr size_t kColumnBlockGranule = 24;

struct Blocking {
  size_t depth;
  size_t columns;
  size_t row_chunk;
  // Up to this many rows run as one chunk.
  size_t whole_rows;
};

Blocking ChooseBlocking(size_t depth, size_t weight_bytes) {
  // Rows up to 1024 floats run whole (a 3 × 4 tile then reads 28 KiB, about L1); longer ones in
  // near-equal blocks of whole vectors, so the partial sums cost few extra passes over out.
  constexpr size_t kMaxDepthBlock = 1024;
  size_t depth_block = depth;
  if (depth > kMaxDepthBlock) {
    size_t blocks = (depth + kMaxDepthBlock - 1) / kMaxDepthBlock;
    depth_block = ((depth + blocks - 1) / blocks + 7) / 8 * 8;
  }
  // A column block's weights take about a third of a typical 512 KiB L2, leaving room for the x
  // rows streaming past and for out.
  constexpr size_t kWeightBlockBytes = 160 * 1024;
  // The depth block depends on depth alone, never on the weight type: it sets the order of the sums.
  size_t columns = kWeightBlockBytes / (depth_block * weight_bytes);
  columns = std::max(kColumnBlockGranule, columns / kColumnBlockGranule * kColumnBlockGranule);
  // Many rows of x would stream from L3 once per column block, and a second process doing the
  // same (another rank) then halves both. So rows go in chunks whose depth block stays in L2 next
  // to the column block (about 400 KiB together, under a 512 KiB L2). Chunks are a multiple of
  // the strip height, and at least 96 rows so each re-read of the weights still feeds many rows.
  // x that fits a 1 MiB L2 by itself runs whole: there is little L3 traffic to save, and each
  // extra chunk re-reads the weights.
  constexpr size_t kRowChunkBytes = 256 * 1024;
  constexpr size_t kMinRowChunk = 96;
  size_t chunk = std::max(kMinRowChunk, kRowChunkBytes / (depth_block * sizeof(float)));
  chunk = chunk / kMaxRowsPerStrip * kMaxRowsPerStrip;
  constexpr size_t kWholeXBytes = 1024 * 1024;
  const size_t whole_rows = std::max(2 * chunk, kWholeXBytes / (depth_block * sizeof(float)));
  return {depth_block, columns, chunk, whole_rows};
}

inline void StoreTileSum(float* out, size_t column, float sum, bool first, const float* bias, const float* scales) {
  if (scales != nullptr) sum *= scales[column];
  if (!first) *out += sum;
  else *out = (bias != nullptr ? bias[column] : 0.0f) + sum;
}

// Calls Tile<Rows, Count> for a run-time count below Columns (the last, partial tile of a strip).
template <class Isa, int Rows, int Columns, class Weight>
inline void PartialTile(size_t count, const DotProblem<Weight>& problem, size_t row, size_t column, bool first) {
  if constexpr (Columns > 0) {
    if (count == Columns) Isa::template Tile<Rows, Columns>(problem, row, column, first);
    else PartialTile<Isa, Rows, Columns - 1>(count, problem, row, column, first);
  }
}

// Below this many multiply-adds a call runs on one thread: handing out parts costs more.
constexpr size_t kParallelMinWork = size_t{1} << 16;

// `parallel`: column blocks may run on the kernel threads (never from inside a ParallelFor task).
// A column block always starts at a multiple of kColumnBlockGranule, a multiple of every tile's
// width, so each output lands in the same place of the same tile shape, and is summed in the same
// order, however the columns are cut: the thread count never changes a result.
template <class Isa, class Weight>
void DotProducts(const DotProblem<Weight>& whole, bool parallel = false) {
  const Blocking blocking = ChooseBlocking(whole.depth, sizeof(Weight));
  size_t block_columns = blocking.columns;
  const size_t threads = parallel && whole.rows * whole.columns * whole.depth >= kParallelMinWork ? KernelThreads() : 1;
  if (threads > 1) {
    // Enough blocks for every thread to take a couple, in whole granules.
    const size_t wanted = 2 * threads;
    const size_t per_block = ((whole.columns + wanted - 1) / wanted + kColumnBlockGranule - 1) / kColumnBlockGranule * kColumnBlockGranule;
    block_columns = std::max(kColumnBlockGranule, std::min(block_columns, per_block));
  }
  const size_t column_blocks = (whole.columns + block_columns - 1) / block_columns;
  size_t chunk_rows = whole.rows;
  if (whole.rows > blocking.whole_rows) {
    // Near-equal chunks, so no small leftover chunk re-reads every weight for a few rows.
    const size_t chunks = (whole.rows + blocking.row_chunk - 1) / blocking.row_chunk;
    chunk_rows = ((whole.rows + chunks - 1) / chunks + kMaxRowsPerStrip - 1) / kMaxRowsPerStrip * kMaxRowsPerStrip;
  }
  for (size_t depth_begin = 0; depth_begin < whole.depth; depth_begin += blocking.depth) {
    DotProblem<Weight> problem = whole;
    problem.x += depth_begin;
    problem.weight += depth_begin;
    problem.depth = std::min(blocking.depth, whole.depth - depth_begin);
    const bool first = depth_begin == 0;
    for (size_t chunk_begin = 0; chunk_begin < whole.rows; chunk_begin += chunk_rows) {
      const size_t chunk_end = std::min(whole.rows, chunk_begin + chunk_rows);
      const auto column_block = [&](size_t block) {
        const size_t column_begin = block * block_columns;
        const size_t column_end = std::min(whole.columns, column_begin + block_columns);
        for (size_t row = chunk_begin; row < chunk_end;) {
          // Four rows left run as 2 + 2: a 1-row strip loads almost a vector per FMA.
          const size_t left = chunk_end - row;
          const size_t rows = left == 4 ? 2 : std::min(kMaxRowsPerStrip, left);
          size_t end = column_end;
          if (whole.causal) end = std::min(end, whole.causal_past + row + rows);
          if (end > column_begin) {
            // The strip's loop lives in the Isa so its tiles inline within the Isa's target.
            if (rows == 3) Isa::template RunStrip<3>(problem, row, column_begin, end, first);
            else if (rows == 2) Isa::template RunStrip<2>(problem, row, column_begin, end, first);
            else Isa::template RunStrip<1>(problem, row, column_begin, end, first);
          }
          row += rows;
        }
      };
      if (threads > 1) {
        ParallelFor(column_blocks, column_block);
      } else {
        for (size_t block = 0; block < column_blocks; ++block) column_block(block);
      }
    }
  }
}

// GPT-2's tanh form equals x · sigmoid(2u): 0.5(1 + tanh(u)) = 1 / (1 + e^(-2u)). The sigmoid form
// has no 1 + tanh cancellation for negative x.
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

inline float GeluScalar(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return x / (1.0f + std::exp(-2.0f * u));
}

// For x below about -88, e^-x overflows to infinity and the quotient is -0, SiLU's limit.
inline float SiluScalar(float x) { return x / (1.0f + std::exp(-x)); }

void SoftmaxScalar(float* scores, size_t count, float scale) {
  float maximum = scores[0];
  for (size_t i = 1; i < count; ++i) maximum = std::max(maximum, scores[i]);
  float sum = 0.0f;
  for (size_t i = 0; i < count; ++i) {
    scores[i] = std::exp((scores[i] - maximum) * scale);
    sum += scores[i];
  }
  const float inverse = 1.0f / sum;
  for (size_t i = 0; i < count; ++i) scores[i] *= inverse;
}

// ---------------------------------------------------------------------------------------------
// Portable: 4-float GCC vector extensions.

typedef float Float4 __attribute__((vector_size(16)));

inline Float4 Load4(const float* source) {
  Float4 value;
  std::memcpy(&value, source, sizeof(value));
  return value;
}

inline Float4 LoadWeights4(const float* source) { return Load4(source); }

template <class Half>
inline Float4 LoadWeights4(const Half* source) {
  return Float4{WidenScalar(source[0]), WidenScalar(source[1]), WidenScalar(source[2]), WidenScalar(source[3])};
}

struct Portable {
  template <int Rows, int Columns, class Weight>
  static void Tile(const DotProblem<Weight>& problem, size_t row, size_t column, bool first) {
    const float* x = problem.x + row * problem.x_stride;
    const Weight* weight = problem.weight + column * problem.weight_stride;
    Float4 accumulators[Rows][Columns] = {};
    size_t d = 0;
    for (; d + 4 <= problem.depth; d += 4) {
      Float4 x_vectors[Rows];
      for (int r = 0; r < Rows; ++r) x_vectors[r] = Load4(x + r * problem.x_stride + d);
      for (int c = 0; c < Columns; ++c) {
        const Float4 w = LoadWeights4(weight + c * problem.weight_stride + d);
        for (int r = 0; r < Rows; ++r) accumulators[r][c] += x_vectors[r] * w;
      }
    }
    for (int r = 0; r < Rows; ++r) {
      for (int c = 0; c < Columns; ++c) {
        const Float4 a = accumulators[r][c];
        float sum = (a[0] + a[2]) + (a[1] + a[3]);
        for (size_t tail = d; tail < problem.depth; ++tail) sum += x[r * problem.x_stride + tail] * WidenScalar(weight[c * problem.weight_stride + tail]);
        StoreTileSum(problem.out + (row + r) * problem.out_stride + column + c, column + c, sum, first, problem.bias, problem.scales);
      }
    }
  }

  template <int Rows, class Weight>
  static void RunStrip(const DotProblem<Weight>& problem, size_t row, size_t column_begin, size_t column_end, bool first) {
    constexpr int kColumns = ColumnsPerTile(Rows);
    size_t column = column_begin;
    for (; column + kColumns <= column_end; column += kColumns) Tile<Rows, kColumns>(problem, row, column, first);
    if (column < column_end) PartialTile<Portable, Rows, kColumns - 1>(column_end - column, problem, row, column, first);
  }

  static void Softmax(float* scores, size_t count, float scale) { SoftmaxScalar(scores, count, scale); }

  template <class Value>
  static void WeightedSum(float* out, const float* weights, size_t count, const Value* values, size_t stride, size_t size, bool accumulate) {
    if (!accumulate) std::fill(out, out + size, 0.0f);
    for (size_t position = 0; position < count; ++position) {
      const float weight = weights[position];
      const Value* row = values + position * stride;
      for (size_t i = 0; i < size; ++i) out[i] += weight * WidenScalar(row[i]);
    }
  }

  // out[r, :] = the `size` elements of row r (`stride` apart) widened to f32, for `rows` rows.
  template <class Value>
  static void Widen(float* out, const Value* rows, size_t count, size_t stride, size_t size) {
    for (size_t row = 0; row < count; ++row) {
      for (size_t i = 0; i < size; ++i) out[row * size + i] = WidenScalar(rows[row * stride + i]);
    }
  }

  static void Gelu(float* x, size_t count) {
    for (size_t i = 0; i < count; ++i) x[i] = GeluScalar(x[i]);
  }

  static void SiluMultiply(float* out, const float* gate, const float* up, size_t count) {
    for (size_t i = 0; i < count; ++i) out[i] = SiluScalar(gate[i]) * up[i];
  }
};

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA.

#ifdef TRELLIS_KERNELS_AVX2

// Lanes [0, count) set: masked loads read nothing past a row's end (and so cannot fault).
TRELLIS_TARGET_AVX2 inline __m256i TailMask(size_t count) {
  static const int32_t kMaskSource[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskSource + 8 - count));
}

TRELLIS_TARGET_AVX2 inline float Sum8(__m256 value) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(value), _mm256_extractf128_ps(value, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// The sums of four accumulators, one per lane: three horizontal adds instead of four reductions.
TRELLIS_TARGET_AVX2 inline __m128 Sum4x8(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

TRELLIS_TARGET_AVX2 inline float Max8(__m256 value) {
  __m128 maximum = _mm_max_ps(_mm256_castps256_ps128(value), _mm256_extractf128_ps(value, 1));
  maximum = _mm_max_ps(maximum, _mm_movehl_ps(maximum, maximum));
  maximum = _mm_max_ss(maximum, _mm_movehdup_ps(maximum));
  return _mm_cvtss_f32(maximum);
}

// e^x to about 2 ulp (Cephes' expf): e^x = 2^n · e^r with |r| <= ln2/2 and a degree-6 polynomial
// for e^r. Inputs are clamped to the normal range; NaN stays NaN (max/min return their second
// operand when either is NaN).
TRELLIS_TARGET_AVX2 inline __m256 Exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
  x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln 2 in two parts, so n · ln2_high is exact and r keeps its low bits.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

TRELLIS_TARGET_AVX2 inline __m256 LoadWeights8(const float* source) { return _mm256_loadu_ps(source); }

TRELLIS_TARGET_AVX2 inline __m256 LoadWeights8(const Bfloat16* source) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

TRELLIS_TARGET_AVX2 inline __m256 LoadWeights8(const Float16* source) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source)));
}

// e4m3fn to f32 in registers (a gather from the table is several times slower): the exponent and
// mantissa bits, placed at the top of an f32's, read as an f32 2^120 times too small, normal or
// (exponent 0) denormal alike; the sign goes back on after, and S.1111.111 becomes NaN.
TRELLIS_TARGET_AVX2 inline __m256 LoadWeights8(const Float8* source) {
  const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(source)));
  const __m256i magnitude = _mm256_and_si256(codes, _mm256_set1_epi32(0x7f));
  const __m256 scaled = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(magnitude, 20)), _mm256_set1_ps(0x1p120f));
  const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(codes, _mm256_set1_epi32(0x80)), 24));
  const __m256 nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7f)));
  return _mm256_or_ps(_mm256_blendv_ps(scaled, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), nan), sign);
}

TRELLIS_TARGET_AVX2 inline __m256 LoadWeights8(const int8_t* source) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(source))));
}

// The last count (< 8) elements of a row, the other lanes zero, reading nothing past the row.
TRELLIS_TARGET_AVX2 inline __m256 LoadWeightsTail(const float* source, size_t count) {
  return _mm256_maskload_ps(source, TailMask(count));
}

template <class Half>
TRELLIS_TARGET_AVX2 inline __m256 LoadWeightsTail(const Half* source, size_t count) {
  Half padded[8] = {};
  std::memcpy(padded, source, count * sizeof(Half));
  return LoadWeights8(padded);
}

struct Avx2 {
  template <int Rows, int Columns, class Weight>
  TRELLIS_TARGET_AVX2 static inline void Tile(const DotProblem<Weight>& problem, size_t row, size_t column, bool first) {
    const float* x = problem.x + row * problem.x_stride;
    const Weight* weight = problem.weight + column * problem.weight_stride;
    __m256 accumulators[Rows][Columns];
    for (int r = 0; r < Rows; ++r) {
      for (int c = 0; c < Columns; ++c) accumulators[r][c] = _mm256_setzero_ps();
    }
    size_t d = 0;
    for (; d + 8 <= problem.depth; d += 8) {
      __m256 x_vectors[Rows];
      for (int r = 0; r < Rows; ++r) x_vectors[r] = _mm256_loadu_ps(x + r * problem.x_stride + d);
      for (int c = 0; c < Columns; ++c) {
        const __m256 w = LoadWeights8(weight + c * problem.weight_stride + d);
        for (int r = 0; r < Rows; ++r) accumulators[r][c] = _mm256_fmadd_ps(x_vectors[r], w, accumulators[r][c]);
      }
    }
    if (d < problem.depth) {
      const __m256i mask = TailMask(problem.depth - d);
      __m256 x_vectors[Rows];
      for (int r = 0; r < Rows; ++r) x_vectors[r] = _mm256_maskload_ps(x + r * problem.x_stride + d, mask);
      for (int c = 0; c < Columns; ++c) {
        const __m256 w = LoadWeightsTail(weight + c * problem.weight_stride + d, problem.depth - d);
        for (int r = 0; r < Rows; ++r) accumulators[r][c] = _mm256_fmadd_ps(x_vectors[r], w, accumulators[r][c]);
      }
    }
    for (int r = 0; r < Rows; ++r) {
      float* target = problem.out + (row + r) * problem.out_stride + column;
      int c = 0;
      for (; c + 4 <= Columns; c += 4) {
        __m128 sums = Sum4x8(accumulators[r][c], accumulators[r][c + 1], accumulators[r][c + 2], accumulators[r][c + 3]);
        if (problem.scales != nullptr) sums = _mm_mul_ps(sums, _mm_loadu_ps(problem.scales + column + c));
        if (!first) sums = _mm_add_ps(sums, _mm_loadu_ps(target + c));
        else if (problem.bias != nullptr) sums = _mm_add_ps(sums, _mm_loadu_ps(problem.bias + column + c));
        _mm_storeu_ps(target + c, sums);
      }
      for (; c < Columns; ++c) StoreTileSum(target + c, column + c, Sum8(accumulators[r][c]), first, problem.bias, problem.scales);
    }
  }

  template <int Rows, class Weight>
  TRELLIS_TARGET_AVX2 static void RunStrip(const DotProblem<Weight>& problem, size_t row, size_t column_begin, size_t column_end, bool first) {
    constexpr int kColumns = ColumnsPerTile(Rows);
    size_t column = column_begin;
    for (; column + kColumns <= column_end; column += kColumns) Tile<Rows, kColumns>(problem, row, column, first);
    if (column < column_end) PartialTile<Avx2, Rows, kColumns - 1>(column_end - column, problem, row, column, first);
  }

  TRELLIS_TARGET_AVX2 static void Softmax(float* scores, size_t count, float scale) {
    size_t i = 0;
    __m256 maximum = _mm256_set1_ps(scores[0]);
    for (; i + 8 <= count; i += 8) maximum = _mm256_max_ps(maximum, _mm256_loadu_ps(scores + i));
    float largest = Max8(maximum);
    for (; i < count; ++i) largest = std::max(largest, scores[i]);
    const __m256 largest_vector = _mm256_set1_ps(largest);
    const __m256 scale_vector = _mm256_set1_ps(scale);
    __m256 sums = _mm256_setzero_ps();
    i = 0;
    for (; i + 8 <= count; i += 8) {
      const __m256 e = Exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + i), largest_vector), scale_vector));
      _mm256_storeu_ps(scores + i, e);
      sums = _mm256_add_ps(sums, e);
    }
    float sum = Sum8(sums);
    for (; i < count; ++i) {
      scores[i] = std::exp((scores[i] - largest) * scale);
      sum += scores[i];
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / sum);
    i = 0;
    for (; i + 8 <= count; i += 8) _mm256_storeu_ps(scores + i, _mm256_mul_ps(_mm256_loadu_ps(scores + i), inverse));
    for (; i < count; ++i) scores[i] *= 1.0f / sum;
  }

  // out[0, size) = Σ_p weights[p] · values[p · stride, +size). Up to 64 outputs at a time stay in
  // registers over all positions: eight independent FMA chains hide FMA latency.
  // Values are f32 or a 16-bit cache's, widened as they are loaded.
  template <class Value>
  TRELLIS_TARGET_AVX2 static void WeightedSum(float* out, const float* weights, size_t count, const Value* values, size_t stride,
                                              size_t size, bool accumulate) {
    size_t begin = 0;
    for (; begin + 64 <= size; begin += 64) WeightedSumChunk<8>(out + begin, weights, count, values + begin, stride, accumulate);
    for (; begin + 8 <= size; begin += 8) WeightedSumChunk<1>(out + begin, weights, count, values + begin, stride, accumulate);
    if (begin < size) {
      const __m256i mask = TailMask(size - begin);
      __m256 sum = accumulate ? _mm256_maskload_ps(out + begin, mask) : _mm256_setzero_ps();
      for (size_t position = 0; position < count; ++position) {
        sum = _mm256_fmadd_ps(_mm256_set1_ps(weights[position]), LoadWeightsTail(values + position * stride + begin, size - begin), sum);
      }
      _mm256_maskstore_ps(out + begin, mask, sum);
    }
  }

  template <int Vectors, class Value>
  TRELLIS_TARGET_AVX2 static inline void WeightedSumChunk(float* out, const float* weights, size_t count, const Value* values, size_t stride,
                                                         bool accumulate) {
    __m256 sums[Vectors];
    for (int v = 0; v < Vectors; ++v) sums[v] = accumulate ? _mm256_loadu_ps(out + 8 * v) : _mm256_setzero_ps();
    for (size_t position = 0; position < count; ++position) {
      const __m256 weight = _mm256_set1_ps(weights[position]);
      const Value* row = values + position * stride;
      for (int v = 0; v < Vectors; ++v) sums[v] = _mm256_fmadd_ps(weight, LoadWeights8(row + 8 * v), sums[v]);
    }
    for (int v = 0; v < Vectors; ++v) _mm256_storeu_ps(out + 8 * v, sums[v]);
  }

  template <class Value>
  TRELLIS_TARGET_AVX2 static void Widen(float* out, const Value* rows, size_t count, size_t stride, size_t size) {
    for (size_t row = 0; row < count; ++row) {
      const Value* source = rows + row * stride;
      float* target = out + row * size;
      size_t i = 0;
      for (; i + 8 <= size; i += 8) _mm256_storeu_ps(target + i, LoadWeights8(source + i));
      if (i < size) _mm256_maskstore_ps(target + i, TailMask(size - i), LoadWeightsTail(source + i, size - i));
    }
  }

  TRELLIS_TARGET_AVX2 static void Gelu(float* x, size_t count) {
    const __m256 scale = _mm256_set1_ps(kGeluScale);
    const __m256 cubic = _mm256_set1_ps(kGeluScale * kGeluCubic);
    const __m256 minus_two = _mm256_set1_ps(-2.0f);
    const __m256 one = _mm256_set1_ps(1.0f);
    // As in SiluMultiply: past Exp8's clamp the quotient would grow with |x| where GELU vanishes.
    const __m256 clamp = _mm256_set1_ps(88.3f);
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
      const __m256 value = _mm256_loadu_ps(x + i);
      const __m256 u = _mm256_mul_ps(value, _mm256_fmadd_ps(cubic, _mm256_mul_ps(value, value), scale));
      const __m256 exponent = _mm256_mul_ps(minus_two, u);
      const __m256 vanishing = _mm256_cmp_ps(exponent, clamp, _CMP_GT_OQ);
      const __m256 e = Exp8(exponent);
      _mm256_storeu_ps(x + i, _mm256_andnot_ps(vanishing, _mm256_div_ps(value, _mm256_add_ps(one, e))));
    }
    for (; i < count; ++i) x[i] = GeluScalar(x[i]);
  }

  TRELLIS_TARGET_AVX2 static void SiluMultiply(float* out, const float* gate, const float* up, size_t count) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 one = _mm256_set1_ps(1.0f);
    // Exp8 clamps its input at 88.3, so below gate = -88.3 the quotient would be gate / e^88.3,
    // growing with |gate| while SiLU shrinks to 0 (it is already under 4e-37 there): those lanes
    // are set to 0. NaN compares false and stays NaN.
    const __m256 vanishing = _mm256_set1_ps(-88.3f);
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
      const __m256 value = _mm256_loadu_ps(gate + i);
      const __m256 e = Exp8(_mm256_xor_ps(value, sign));
      const __m256 silu = _mm256_andnot_ps(_mm256_cmp_ps(value, vanishing, _CMP_LT_OQ), _mm256_div_ps(value, _mm256_add_ps(one, e)));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < count; ++i) out[i] = SiluScalar(gate[i]) * up[i];
  }
};

bool UseAvx2() {
  // libgcc's check includes the OS saving the YMM registers (XGETBV), not only CPUID.
  static const bool use = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return use;
}

#endif  // TRELLIS_KERNELS_AVX2

// Where one sequence's keys (or values) sit in its cache: positions in blocks of
// `block_positions`, block b starting `offset` elements after the address blocks[b], a position's
// row `stride` elements after the previous one's. A contiguous cache is one block.
template <class KeyValue>
struct CacheRows {
  const uint64_t* blocks;
  size_t block_positions;
  size_t offset;
  size_t stride;

  const KeyValue* Row(size_t position) const {
    return reinterpret_cast<const KeyValue*>(static_cast<uintptr_t>(blocks[position / block_positions])) + offset +
           (position % block_positions) * stride;
  }
  // Positions from `position` to the end of its block.
  size_t RunFrom(size_t position) const { return block_positions - position % block_positions; }
};

// Attention reads its keys and values a run of positions at a time (at most kRunPositions, and
// never across a cache block's end), each run first packed into scratch: widened to f32 and made
// contiguous (a cache row interleaves every key/value head, so a head's rows lie far apart). A
// run is packed once for every query it serves: the group of query heads sharing its key/value
// head when decoding, every query row of a head in a prompt. The packing is what makes the dot
// products and sums fast (in f32 too: 2.0-2.4x for a 256-row prompt, 1.5-1.8x for decoding at
// 4,096 positions on the project's 2-core EPYC VM), and it changes no sum: the weighted sums continue from
// run to run in order, and only a run's last dot-kernel tile may round differently from a whole
// cache's.
constexpr size_t kRunPositions = 64;

template <class Isa, class KeyValue>
void AttentionWith(float* out, const float* q, const CacheRows<KeyValue>& keys, const CacheRows<KeyValue>& values, size_t queries, size_t past,
                   size_t heads, size_t head_size, size_t kv_heads, size_t window) {
  const size_t positions = past + queries;
  // The first position query i (at past + i) attends to: window positions back, itself included.
  const auto first_position = [&](size_t query) -> size_t {
    const size_t position = past + query;
    return window != 0 && position + 1 > window ? position + 1 - window : 0;
  };
  const size_t stride = heads * head_size;
  const size_t kv_stride = keys.stride;
  const size_t group = heads / kv_heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_size)));
  // Packs each run of positions [from, to) of one key/value head into `packed` ([run, head_size])
  // and calls visit(first position, count).
  const auto for_each_run = [&](const CacheRows<KeyValue>& rows, size_t kv_head, size_t from, size_t to, float* packed, const auto& visit) {
    for (size_t position = from; position < to;) {
      const size_t count = std::min({rows.RunFrom(position), to - position, kRunPositions});
      Isa::Widen(packed, rows.Row(position) + kv_head * head_size, count, kv_stride, head_size);
      visit(position, count);
      position += count;
    }
  };
  // One query (decoding) scores a kv head's whole group at once: the group's query heads lie side
  // by side in q, so they are the rows of one dot problem and each packed key feeds every head of
  // the group. Several queries (prefill) are rows of one head instead. Heads are independent: with
  // kernel threads, each task takes one (a kv head's group when decoding).
  const bool decoding = queries == 1;
  const auto decode_group = [&](size_t kv_head) {
    // Only the window's keys are scored: a long sequence with a short window costs the window.
    const size_t first = first_position(0);
    const size_t count = positions - first;
    std::vector<float> scores(group * count);
    std::vector<float> packed(kRunPositions * head_size);
    const size_t offset = kv_head * group * head_size;
    for_each_run(keys, kv_head, first, positions, packed.data(), [&](size_t from, size_t run) {
      DotProblem<float> problem{q + offset, head_size, group, packed.data(), head_size, run, head_size, scores.data() + (from - first), count, nullptr, false, 0};
      DotProducts<Isa>(problem);
    });
    for (size_t member = 0; member < group; ++member) Isa::Softmax(scores.data() + member * count, count, scale);
    // Runs outer, heads inner: each head's sum still goes through the positions in order.
    for_each_run(values, kv_head, first, positions, packed.data(), [&](size_t from, size_t run) {
      for (size_t member = 0; member < group; ++member) {
        Isa::WeightedSum(out + offset + member * head_size, scores.data() + member * count + (from - first), run, packed.data(), head_size, head_size, from != first);
      }
    });
  };
  const auto prefill_head = [&](size_t head) {
    const size_t kv_head = head / group;
    std::vector<float> scores(queries * positions);
    std::vector<float> packed(kRunPositions * head_size);
    const size_t offset = head * head_size;
    for_each_run(keys, kv_head, 0, positions, packed.data(), [&](size_t from, size_t run) {
      // Query i needs key k only while k <= past + i: the run's keys start mattering at query
      // from - past, whose own causal limit then sits at the run's first key.
      const size_t first_query = from > past ? from - past : 0;
      DotProblem<float> problem{q + first_query * stride + offset, stride, queries - first_query, packed.data(), head_size, run, head_size,
                                scores.data() + first_query * positions + from, positions, nullptr, true, past + first_query - from};
      DotProducts<Isa>(problem);
    });
    // Scores before a row's window are computed with the rest of the strip and then skipped.
    for (size_t query = 0; query < queries; ++query) {
      const size_t first = first_position(query);
      Isa::Softmax(scores.data() + query * positions + first, past + query + 1 - first, scale);
    }
    // Runs outer, rows inner: each row's sum still goes through its positions in order.
    for_each_run(values, kv_head, 0, positions, packed.data(), [&](size_t from, size_t run) {
      for (size_t query = from > past ? from - past : 0; query < queries; ++query) {
        const size_t first = first_position(query);
        const size_t low = std::max(from, first);
        const size_t high = std::min(from + run, past + query + 1);
        if (low >= high) continue;
        Isa::WeightedSum(out + query * stride + offset, scores.data() + query * positions + low, high - low, packed.data() + (low - from) * head_size, head_size,
                         head_size, low != first);
      }
    });
  };
  const size_t tasks = decoding ? kv_heads : heads;
  if (queries * positions * heads * head_size >= kParallelMinWork && KernelThreads() > 1) {
    if (decoding) ParallelFor(tasks, decode_group);
    else ParallelFor(tasks, prefill_head);
    return;
  }
  for (size_t task = 0; task < tasks; ++task) {
    if (decoding) decode_group(task);
    else prefill_head(task);
  }
}

// The sum of a row, or of its squared distances from `center`, in double and four lanes at a
// time: an f32 sum over thousands of columns would drift with their order, and the variance of
// (x - mean) does not cancel as E[x²] - mean² can.
double RowSum(const float* in, size_t columns) {
  double sums[4] = {0, 0, 0, 0};
  size_t i = 0;
  for (; i + 4 <= columns; i += 4) {
    for (int lane = 0; lane < 4; ++lane) sums[lane] += in[i + lane];
  }
  for (; i < columns; ++i) sums[0] += in[i];
  return sums[0] + sums[1] + sums[2] + sums[3];
}

double SquaredDistances(const float* in, size_t columns, double center) {
  double squares[4] = {0, 0, 0, 0};
  size_t i = 0;
  for (; i + 4 <= columns; i += 4) {
    for (int lane = 0; lane < 4; ++lane) {
      const double distance = in[i + lane] - center;
      squares[lane] += distance * distance;
    }
  }
  for (; i < columns; ++i) squares[0] += (in[i] - center) * (in[i] - center);
  return squares[0] + squares[1] + squares[2] + squares[3];
}

}  // namespace

namespace {

template <class Weight>
void LinearOf(float* out, const float* x, const Weight* weight, const float* bias, size_t rows, size_t depth, size_t columns) {
  const DotProblem<Weight> problem{x, depth, rows, weight, depth, columns, depth, out, columns, bias, false, 0};
#ifdef TRELLIS_KERNELS_AVX2
  if (UseAvx2()) return DotProducts<Avx2>(problem, true);
#endif
  DotProducts<Portable>(problem, true);
}

}  // namespace

void Linear(float* out, const float* x, const float* weight, const float* bias, size_t rows, size_t depth, size_t columns) {
  LinearOf(out, x, weight, bias, rows, depth, columns);
}

void Linear(float* out, const float* x, const int8_t* weight, const float* scales, const float* bias, size_t rows, size_t depth, size_t columns) {
  DotProblem<int8_t> problem{x, depth, rows, weight, depth, columns, depth, out, columns, bias, false, 0};
  problem.scales = scales;
#ifdef TRELLIS_KERNELS_AVX2
  if (UseAvx2()) return DotProducts<Avx2>(problem, true);
#endif
  DotProducts<Portable>(problem, true);
}

void Linear(float* out, const float* x, const uint16_t* weight, WeightType type, const float* bias, size_t rows, size_t depth, size_t columns) {
  if (type == WeightType::kBfloat16) LinearOf(out, x, reinterpret_cast<const Bfloat16*>(weight), bias, rows, depth, columns);
  else LinearOf(out, x, reinterpret_cast<const Float16*>(weight), bias, rows, depth, columns);
}

void Widen(float* out, const uint16_t* in, WeightType type, size_t count) {
  // Plain loops: gathering embedding rows is a small part of a step, and the compiler vectorizes bf16.
  if (type == WeightType::kBfloat16) {
    for (size_t i = 0; i < count; ++i) out[i] = WidenScalar(Bfloat16{in[i]});
  } else {
    for (size_t i = 0; i < count; ++i) out[i] = WidenScalar(Float16{in[i]});
  }
}

void LayerNorm(float* out, const float* x, const float* gamma, const float* beta, size_t rows, size_t columns, float epsilon) {
  for (size_t row = 0; row < rows; ++row) {
    const float* in = x + row * columns;
    float* target = out + row * columns;
    const double mean = RowSum(in, columns) / static_cast<double>(columns);
    const double variance = SquaredDistances(in, columns, mean) / static_cast<double>(columns);
    const float mean_float = static_cast<float>(mean);
    const float inverse_deviation = static_cast<float>(1.0 / std::sqrt(variance + static_cast<double>(epsilon)));
    // Element i of the row is read before it is written, so out == x is safe.
    for (size_t i = 0; i < columns; ++i) target[i] = (in[i] - mean_float) * inverse_deviation * gamma[i] + beta[i];
  }
}

void Gelu(float* x, size_t count) {
#ifdef TRELLIS_KERNELS_AVX2
  if (UseAvx2()) return Avx2::Gelu(x, count);
#endif
  Portable::Gelu(x, count);
}

void RmsNorm(float* out, const float* x, const float* gamma, size_t rows, size_t columns, float epsilon) {
  for (size_t row = 0; row < rows; ++row) {
    const float* in = x + row * columns;
    float* target = out + row * columns;
    const double mean_square = SquaredDistances(in, columns, 0.0) / static_cast<double>(columns);
    const float inverse_root = static_cast<float>(1.0 / std::sqrt(mean_square + static_cast<double>(epsilon)));
    // Element i of the row is read before it is written, so out == x is safe.
    for (size_t i = 0; i < columns; ++i) target[i] = in[i] * inverse_root * gamma[i];
  }
}

void SiluMultiply(float* out, const float* gate, const float* up, size_t count) {
#ifdef TRELLIS_KERNELS_AVX2
  if (UseAvx2()) return Avx2::SiluMultiply(out, gate, up, count);
#endif
  Portable::SiluMultiply(out, gate, up, count);
}

// The trig is per (row, frequency) and shared by the row's heads, so a row costs head_size / 2
// cos/sin pairs and then only multiply-adds, which the compiler vectorizes on its own.
void Rotary(float* x, const int32_t* positions, const float* inverse_frequencies, size_t rows, size_t heads, size_t head_size) {
  const size_t half = head_size / 2;
  std::vector<float> cosines(half);
  std::vector<float> sines(half);
  for (size_t row = 0; row < rows; ++row) {
    // Angles in double: at position 1e5 an f32 product is already off by about 4e-3 radians, and
    // cos/sin of it would carry that error. Only the results are rounded to f32.
    const double position = positions[row];
    for (size_t i = 0; i < half; ++i) {
      const double angle = position * static_cast<double>(inverse_frequencies[i]);
      cosines[i] = static_cast<float>(std::cos(angle));
      sines[i] = static_cast<float>(std::sin(angle));
    }
    float* row_x = x + row * heads * head_size;
    for (size_t head = 0; head < heads; ++head) {
      float* first = row_x + head * head_size;
      float* second = first + half;
      for (size_t i = 0; i < half; ++i) {
        const float a = first[i];
        const float b = second[i];
        first[i] = a * cosines[i] - b * sines[i];
        second[i] = b * cosines[i] + a * sines[i];
      }
    }
  }
}

namespace {

template <class KeyValue>
void AttentionOf(float* out, const float* q, const CacheRows<KeyValue>& keys, const CacheRows<KeyValue>& values, size_t queries, size_t past,
                 size_t heads, size_t head_size, size_t kv_heads, size_t window) {
#ifdef TRELLIS_KERNELS_AVX2
  if (UseAvx2()) return AttentionWith<Avx2>(out, q, keys, values, queries, past, heads, head_size, kv_heads, window);
#endif
  AttentionWith<Portable>(out, q, keys, values, queries, past, heads, head_size, kv_heads, window);
}

// A contiguous [positions, kv_heads, head_size] cache as one block.
template <class KeyValue>
void ContiguousAttention(float* out, const float* q, const KeyValue* keys, const KeyValue* values, size_t queries, size_t past, size_t heads,
                         size_t head_size, size_t kv_heads, size_t window) {
  const uint64_t key_block = reinterpret_cast<uintptr_t>(keys);
  const uint64_t value_block = reinterpret_cast<uintptr_t>(values);
  const size_t positions = past + queries;
  const size_t stride = kv_heads * head_size;
  AttentionOf(out, q, CacheRows<KeyValue>{&key_block, positions, 0, stride}, CacheRows<KeyValue>{&value_block, positions, 0, stride}, queries, past,
              heads, head_size, kv_heads, window);
}

// f32 to bf16 bits, rounding to nearest even; NaN stays a quiet NaN.
uint16_t NarrowToBfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// f32 to f16 bits, rounding to nearest even; beyond ±65504 is infinity.
uint16_t NarrowToFloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t sign = (bits >> 16) & 0x8000;
  const uint32_t magnitude = bits & 0x7fffffff;
  if (magnitude >= 0x7f800000) return static_cast<uint16_t>(sign | 0x7c00 | (magnitude > 0x7f800000 ? 0x200 : 0));
  if (magnitude >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);
  if (magnitude < 0x38800000) {
    // A subnormal half counts units of 2^-24; 2^-25 and below round to zero.
    if (magnitude <= 0x33000000) return static_cast<uint16_t>(sign);
    const uint32_t shift = 126 - (magnitude >> 23);
    const uint32_t mantissa = (magnitude & 0x7fffff) | 0x800000;
    uint32_t units = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (units & 1) != 0)) ++units;
    return static_cast<uint16_t>(sign | units);
  }
  uint32_t result = (magnitude >> 13) - (112u << 10);
  const uint32_t remainder = magnitude & 0x1fff;
  if (remainder > 0x1000 || (remainder == 0x1000 && (result & 1) != 0)) ++result;
  return static_cast<uint16_t>(sign | result);
}

// f32 to e4m3fn, rounding to nearest even and saturating at ±448 (no infinities); NaN stays NaN.
uint8_t NarrowToFloat8(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  const uint32_t magnitude = bits & 0x7fffffff;
  if (magnitude > 0x7f800000) return static_cast<uint8_t>(sign | 0x7f);
  // 464 (halfway between 448 and the next step, 480) and beyond saturate.
  if (magnitude >= 0x43e80000) return static_cast<uint8_t>(sign | 0x7e);
  if (magnitude < 0x3c800000) {
    // Below 2^-6: subnormal, in units of 2^-9, rounded to nearest even.
    const float units = std::fabs(value) * 512.0f;
    float whole = std::nearbyint(units);  // the default rounding mode: to nearest, ties to even
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(whole));
  }
  // Normal: keep 3 of the 23 mantissa bits, rounding the other 20 to nearest even.
  const uint32_t exponent = (magnitude >> 23) - 127 + 7;
  uint32_t kept = ((exponent << 3) | ((magnitude >> 20) & 0x7));
  const uint32_t rest = magnitude & 0xfffff;
  if (rest > 0x80000 || (rest == 0x80000 && (kept & 1) != 0)) ++kept;
  return static_cast<uint8_t>(sign | kept);
}

}  // namespace

void Attention(float* out, const float* q, const float* keys, const float* values, size_t queries, size_t past, size_t heads,
               size_t head_size, size_t kv_heads, size_t window) {
  ContiguousAttention(out, q, keys, values, queries, past, heads, head_size, kv_heads, window);
}

void Attention(float* out, const float* q, const uint16_t* keys, const uint16_t* values, WeightType type, size_t queries, size_t past,
               size_t heads, size_t head_size, size_t kv_heads, size_t window) {
  if (type == WeightType::kBfloat16) {
    ContiguousAttention(out, q, reinterpret_cast<const Bfloat16*>(keys), reinterpret_cast<const Bfloat16*>(values), queries, past, heads, head_size, kv_heads, window);
  } else {
    ContiguousAttention(out, q, reinterpret_cast<const Float16*>(keys), reinterpret_cast<const Float16*>(values), queries, past, heads, head_size, kv_heads, window);
  }
}

void BlockedAttention(float* out, const float* q, const BlockedCache& cache, CacheType type, size_t queries, size_t past, size_t heads,
                      size_t head_size, size_t kv_heads, size_t window) {
  const size_t stride = kv_heads * head_size;
  const auto run = [&](auto element) {
    using KeyValue = decltype(element);
    AttentionOf(out, q, CacheRows<KeyValue>{cache.blocks, cache.block_positions, cache.keys, stride},
                CacheRows<KeyValue>{cache.blocks, cache.block_positions, cache.values, stride}, queries, past, heads, head_size, kv_heads, window);
  };
  switch (type) {
    case CacheType::kFloat32: return run(float{});
    case CacheType::kBfloat16: return run(Bfloat16{});
    case CacheType::kFloat16: return run(Float16{});
    case CacheType::kFloat8: return run(Float8{});
  }
}

void NarrowFloat8(uint8_t* out, const float* in, size_t count) {
  for (size_t i = 0; i < count; ++i) out[i] = NarrowToFloat8(in[i]);
}

void WidenFloat8(float* out, const uint8_t* in, size_t count) {
  for (size_t i = 0; i < count; ++i) out[i] = kFloat8Table.values[in[i]];
}

void Narrow(uint16_t* out, const float* in, WeightType type, size_t count) {
  if (type == WeightType::kBfloat16) {
    for (size_t i = 0; i < count; ++i) out[i] = NarrowToBfloat16(in[i]);
  } else {
    for (size_t i = 0; i < count; ++i) out[i] = NarrowToFloat16(in[i]);
  }
}

}  // namespace trellis::kernels
