// CPU kernels of the blockwise 8-bit state ops (schemas and math: lowrank_optim/ops/quant.py):
// quantize_blockwise_, dequantize_blockwise and blockwise_adam_. Blocks of `block_size` elements along
// the last dimension are independent: at::parallel_for hands out ranges of whole blocks, and each block is
// computed the same way whatever the range, so results do not depend on the thread count.
//
// blockwise_adam_ does a block in one pass over its bytes: the codes are dequantized, updated and their
// new maxima taken in one loop that also writes N; the updated moments stay in two stack buffers of at
// most 4096 floats each (32 KiB: L1/L2) until the second loop quantizes them back.
//
// Parity with the defaults (codes and absmax bitwise): every value is rounded where the default rounds
// it, in fp32: map[code]·absmax, the moment update as lowrank_adam_ (csrc/cpu/adam.cpp; fused
// multiply-adds exactly where ATen's vectorized kernels fuse them, per cpu::kernel_variant()), the new
// absmax (a maximum: exact), x / divisor (IEEE division), and the code (a count of thresholds: exact). N
// is within 2 ulp only (ATen's vectorized sqrt is not correctly rounded; std::sqrt is).
//
// The code search is branchless: a binary search of 8 fixed steps over the thresholds padded to 255 with
// +inf, counting the thresholds t with !(x <= t). For a number that is t < x (the default's
// searchsorted, right=False); a NaN passes every test and is clamped to the last code, as the default
// gives it explicitly. With no branch on the data the element loop vectorizes (gathers from the
// thresholds, 8 or 16 lanes).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "../common/quant_checks.h"
#include "common.h"

namespace lowrank_optim {
namespace {

using quant::kMaxBlockSize;
using quant::kMaxMapLength;

// The binary search's table: 255 thresholds at most (a 256-value map), and 8 steps cover them.
constexpr int kThresholds = kMaxMapLength - 1;
// Elements per task: enough that scheduling is negligible.
constexpr int64_t kGrainElements = 32768;

// The argument checks, with the defaults' messages and exception types, are common/quant_checks.h's
// (shared with the CUDA bindings).

// ---- the tables of one map -----------------------------------------------------------------------

// The binary search as levels: at level k (k = 0..7, step s = 128 >> k) a value whose search is at
// candidate j (0 <= j < 2^k; j is the code's first k bits) is compared with levels[k][j] =
// thresholds[(2j + 1)·s - 1], and j becomes 2j + (passed). After level 7, j is the code. The SIMD variants
// fetch levels[k][j] for 16 lanes at once with register permutes (AVX-512: levels 0..4 hold at most 16
// values, one permute; 5..7 two-table permutes and blends) or, for the AVX2 variant's levels 4..7, with
// gathers: measured on Zen 4, 16M elements, 1 thread: 0.8 ns per element with permutes, 5.3 with gathers
// only, 8.2 scalar; AVX2 3.1 with permutes for levels 0..3 and gathers after, 6.7 with gathers only.
constexpr int kLevels = 8;

// A map's dequantization table (256 entries: codes past the map's end give NaN, as the default's padded
// table does), its search thresholds (t_k = (map[k] + map[k+1]) · 0.5 in fp32, padded with +inf) and
// their levels.
struct MapTables {
  alignas(64) float values[kMaxMapLength];
  alignas(64) float thresholds[kThresholds];
  alignas(64) float levels[kLevels][128];
  int32_t last;  // len(map) - 1: the code of a NaN
};

MapTables map_tables(const at::Tensor& code_map) {
  MapTables tables{};
  const float* map = code_map.const_data_ptr<float>();
  const int64_t length = code_map.numel();
  for (int64_t k = 0; k < kMaxMapLength; ++k) {
    tables.values[k] = k < length ? map[k] : std::numeric_limits<float>::quiet_NaN();
  }
  for (int64_t k = 0; k < kThresholds; ++k) {
    tables.thresholds[k] = k + 1 < length ? (map[k] + map[k + 1]) * 0.5f : std::numeric_limits<float>::infinity();
  }
  for (int level = 0; level < kLevels; ++level) {
    const int step = 128 >> level;
    for (int j = 0; j < (1 << level); ++j) tables.levels[level][j] = tables.thresholds[(2 * j + 1) * step - 1];
  }
  tables.last = static_cast<int32_t>(length - 1);
  return tables;
}

// ---- scalar arithmetic (the plain variant, non-x86 targets, and the AVX2 variant's last elements) ---

// The number of thresholds t with !(x <= t), clamped to the last code: the levels' search, 8 steps of
// 128, 64, ..., 1 over the 255 sorted thresholds (the largest index read is 254).
LOWRANK_OPTIM_ALWAYS_INLINE int32_t code_of(float x, const float* __restrict__ thresholds, int32_t last) {
  int32_t position = 0;
  for (int32_t step = 128; step >= 1; step /= 2) {
    position += static_cast<int32_t>(!(x <= thresholds[position + step - 1])) * step;
  }
  return std::min(position, last);
}

// |x| as its bits: for non-negative floats the integer order is the float order, and every NaN lies
// above +inf, so an integer maximum of these is max |x| with NaN propagation (torch.amax's rule), in any
// order and without a branch. A NaN maximum is whichever NaN had the largest payload.
LOWRANK_OPTIM_ALWAYS_INLINE uint32_t magnitude_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & 0x7fffffffu;
}

LOWRANK_OPTIM_ALWAYS_INLINE float from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

LOWRANK_OPTIM_ALWAYS_INLINE float divisor_of(float absmax) { return absmax > 0.0f ? absmax : 1.0f; }

LOWRANK_OPTIM_ALWAYS_INLINE uint32_t maximum_bits(const float* __restrict__ values, int64_t begin, int64_t end,
                                                  uint32_t maximum) {
  for (int64_t i = begin; i < end; ++i) maximum = std::max(maximum, magnitude_bits(values[i]));
  return maximum;
}

LOWRANK_OPTIM_ALWAYS_INLINE void codes_scalar(const float* __restrict__ values, int64_t begin, int64_t end,
                                              float divisor, const MapTables& tables, uint8_t* __restrict__ codes) {
  for (int64_t i = begin; i < end; ++i) {
    codes[i] = static_cast<uint8_t>(code_of(values[i] / divisor, tables.thresholds, tables.last));
  }
}

LOWRANK_OPTIM_ALWAYS_INLINE void dequantize_scalar(const uint8_t* __restrict__ codes, int64_t begin, int64_t end,
                                                   float scale, const MapTables& tables, float* __restrict__ out) {
  for (int64_t i = begin; i < end; ++i) out[i] = tables.values[codes[i]] * scale;
}

struct AdamPointers {
  const float* lowrank;
  uint8_t* exp_avg;
  float* exp_avg_absmax;
  uint8_t* exp_avg_sq;
  float* exp_avg_sq_absmax;
  float* normalized;
};

// lowrank_adam_'s fp32 coefficients (csrc/cpu/adam.cpp): 1 - beta formed in double, then rounded.
struct AdamCoefficients {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// Elements [begin, end) of a block at `offset`: dequantize (map[code]·absmax), update as update_moments_
// rounds (M·b1, then + (1-b1)·R as one fma on a vectorized ATen; V·b2, then + ((1-b2)·R)·R likewise; the
// products rounded first on a DEFAULT one), N = M / (sqrt(V) + eps); the updated moments go to `m`, `v`
// (block-relative) and their magnitudes into the two maxima.
template <bool Fused>
LOWRANK_OPTIM_ALWAYS_INLINE void adam_scalar(const AdamPointers& p, int64_t offset, int64_t begin, int64_t end,
                                             float am, float av, const MapTables& signed_tables,
                                             const MapTables& unsigned_tables, const AdamCoefficients& c,
                                             float* __restrict__ m, float* __restrict__ v, uint32_t& m_max,
                                             uint32_t& v_max) {
  for (int64_t i = begin; i < end; ++i) {
    const float ri = p.lowrank[offset + i];
    const float m_decayed = (signed_tables.values[p.exp_avg[offset + i]] * am) * c.beta1;
    const float v_decayed = (unsigned_tables.values[p.exp_avg_sq[offset + i]] * av) * c.beta2;
    const float weighted_r = c.one_minus_beta2 * ri;
    const float mi = Fused ? std::fma(ri, c.one_minus_beta1, m_decayed) : m_decayed + ri * c.one_minus_beta1;
    const float vi = Fused ? std::fma(weighted_r, ri, v_decayed) : v_decayed + weighted_r * ri;
    m[i] = mi;
    v[i] = vi;
    p.normalized[offset + i] = mi / (std::sqrt(vi) + c.eps);
    m_max = std::max(m_max, magnitude_bits(mi));
    v_max = std::max(v_max, magnitude_bits(vi));
  }
}

// ---- block loops -----------------------------------------------------------------------------------

// Block `block` of a (rows x n) tensor with `per_row` blocks per row: its first element and its length.
struct BlockSpan {
  int64_t offset, count;
};

LOWRANK_OPTIM_ALWAYS_INLINE BlockSpan block_span(int64_t block, int64_t n, int64_t per_row, int64_t block_size) {
  const int64_t row = block / per_row;
  const int64_t start = (block - row * per_row) * block_size;
  return {row * n + start, std::min(block_size, n - start)};
}

struct Geometry {
  int64_t n, per_row, blocks, block_size, grain;
};

Geometry geometry(const at::Tensor& tensor, int64_t block_size) {
  const int64_t n = tensor.size(-1);
  const int64_t per_row = (n + block_size - 1) / block_size;
  const int64_t rows = n == 0 ? 0 : tensor.numel() / n;
  return {n, per_row, rows * per_row, block_size, std::max<int64_t>(1, kGrainElements / block_size)};
}

// One variant's three kernels over a range of blocks. The SIMD variants' per-block functions are called,
// not inlined (GCC inlines no function compiled for a wider target into these generic loops); a call per
// block is noise next to the block's work. `Simd` supplies, for a block: maximum(values, count)
// (bits), codes(values, count, divisor, tables, out), dequantize(codes, count, scale, tables, out) and
// adam(p, offset, count, am, av, tables..., c, m, v, m_max, v_max).
template <typename Simd>
struct Kernels {
  static LOWRANK_OPTIM_ALWAYS_INLINE void quantize(const float* x, uint8_t* codes, float* absmax,
                                                   const MapTables& tables, const Geometry& g, int64_t first,
                                                   int64_t last) {
    // Plain loops, no lambdas: a lambda's body would be compiled without the variant's target.
    for (int64_t block = first; block < last; ++block) {
      const BlockSpan b = block_span(block, g.n, g.per_row, g.block_size);
      const float maximum = from_bits(Simd::maximum(x + b.offset, b.count));
      absmax[block] = maximum;
      Simd::codes(x + b.offset, b.count, divisor_of(maximum), tables, codes + b.offset);
    }
  }

  static LOWRANK_OPTIM_ALWAYS_INLINE void dequantize(const uint8_t* codes, const float* absmax, const MapTables& tables,
                                                     float* out, const Geometry& g, int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      const BlockSpan b = block_span(block, g.n, g.per_row, g.block_size);
      Simd::dequantize(codes + b.offset, b.count, absmax[block], tables, out + b.offset);
    }
  }

  // Per block: dequantize, update, N and the new maxima in one loop; the updated moments wait in `m` and
  // `v` (at most 2 x 16 KiB) for the two quantizing loops.
  static LOWRANK_OPTIM_ALWAYS_INLINE void adam(const AdamPointers& p, const MapTables& signed_tables,
                                               const MapTables& unsigned_tables, const AdamCoefficients& c,
                                               const Geometry& g, int64_t first, int64_t last) {
    alignas(64) float m[kMaxBlockSize];
    alignas(64) float v[kMaxBlockSize];
    for (int64_t block = first; block < last; ++block) {
      const BlockSpan b = block_span(block, g.n, g.per_row, g.block_size);
      uint32_t m_max = 0, v_max = 0;
      Simd::adam(p, b.offset, b.count, p.exp_avg_absmax[block], p.exp_avg_sq_absmax[block], signed_tables,
                 unsigned_tables, c, m, v, m_max, v_max);
      const float new_am = from_bits(m_max), new_av = from_bits(v_max);
      p.exp_avg_absmax[block] = new_am;
      p.exp_avg_sq_absmax[block] = new_av;
      Simd::codes(m, b.count, divisor_of(new_am), signed_tables, p.exp_avg + b.offset);
      Simd::codes(v, b.count, divisor_of(new_av), unsigned_tables, p.exp_avg_sq + b.offset);
    }
  }
};

// Scalar, with or without fused multiply-adds (only the Adam update has any).
template <bool Fused>
struct Scalar {
  static LOWRANK_OPTIM_ALWAYS_INLINE uint32_t maximum(const float* values, int64_t count) {
    return maximum_bits(values, 0, count, 0);
  }
  static LOWRANK_OPTIM_ALWAYS_INLINE void codes(const float* values, int64_t count, float divisor,
                                                const MapTables& tables, uint8_t* out) {
    codes_scalar(values, 0, count, divisor, tables, out);
  }
  static LOWRANK_OPTIM_ALWAYS_INLINE void dequantize(const uint8_t* codes, int64_t count, float scale,
                                                     const MapTables& tables, float* out) {
    dequantize_scalar(codes, 0, count, scale, tables, out);
  }
  static LOWRANK_OPTIM_ALWAYS_INLINE void adam(const AdamPointers& p, int64_t offset, int64_t count, float am, float av,
                                               const MapTables& s, const MapTables& u, const AdamCoefficients& c,
                                               float* m, float* v, uint32_t& m_max, uint32_t& v_max) {
    adam_scalar<Fused>(p, offset, 0, count, am, av, s, u, c, m, v, m_max, v_max);
  }
};

#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
// GCC 12 reports the intrinsics headers' own undefined-vector idiom (`__Y`) as maybe uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// ---- AVX2 (8 lanes; the kFused variant on x86) -----------------------------------------------------

struct Avx2 {
  // Levels 0..3 (at most 8 candidates) by permutes of registers, 4..7 by gathers from the levels.
  static LOWRANK_OPTIM_FMA_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __m256i search(__m256 x, const __m256 (&low)[4],
                                                                               const MapTables& tables) {
    __m256i j = _mm256_setzero_si256();
    for (int level = 0; level < kLevels; ++level) {
      const __m256 t = level < 4 ? _mm256_permutevar8x32_ps(low[level], j)
                                 : _mm256_i32gather_ps(tables.levels[level], j, 4);
      // !(x <= t) is all ones (-1) where the value passes: j = 2j + 1 there.
      const __m256i passed = _mm256_castps_si256(_mm256_cmp_ps(x, t, _CMP_NLE_UQ));
      j = _mm256_sub_epi32(_mm256_add_epi32(j, j), passed);
    }
    return _mm256_min_epi32(j, _mm256_set1_epi32(tables.last));
  }

  static LOWRANK_OPTIM_FMA_TARGET LOWRANK_OPTIM_ALWAYS_INLINE void store_bytes(uint8_t* out, __m256i codes) {
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
  }

  static LOWRANK_OPTIM_FMA_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __m256i load_codes(const uint8_t* codes) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
  }

  static LOWRANK_OPTIM_FMA_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __m256i magnitudes(__m256 x) {
    return _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7fffffff));
  }

  static LOWRANK_OPTIM_FMA_TARGET LOWRANK_OPTIM_ALWAYS_INLINE uint32_t reduce_max(__m256i lanes) {
    alignas(32) uint32_t values[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(values), lanes);
    uint32_t maximum = 0;
    for (uint32_t value : values) maximum = std::max(maximum, value);
    return maximum;
  }

  static LOWRANK_OPTIM_FMA_TARGET uint32_t maximum(const float* values, int64_t count) {
    __m256i lanes = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) lanes = _mm256_max_epu32(lanes, magnitudes(_mm256_loadu_ps(values + i)));
    return maximum_bits(values, i, count, reduce_max(lanes));
  }

  static LOWRANK_OPTIM_FMA_TARGET void codes(const float* values, int64_t count,
                                                                           float divisor, const MapTables& tables,
                                                                           uint8_t* out) {
    const __m256 low[4] = {_mm256_load_ps(tables.levels[0]), _mm256_load_ps(tables.levels[1]),
                           _mm256_load_ps(tables.levels[2]), _mm256_load_ps(tables.levels[3])};
    const __m256 d = _mm256_set1_ps(divisor);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) store_bytes(out + i, search(_mm256_div_ps(_mm256_loadu_ps(values + i), d), low, tables));
    codes_scalar(values, i, count, divisor, tables, out);
  }

  static LOWRANK_OPTIM_FMA_TARGET void dequantize(const uint8_t* codes, int64_t count,
                                                                                float scale, const MapTables& tables,
                                                                                float* out) {
    const __m256 s = _mm256_set1_ps(scale);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(tables.values, load_codes(codes + i), 4), s));
    }
    dequantize_scalar(codes, i, count, scale, tables, out);
  }

  static LOWRANK_OPTIM_FMA_TARGET void adam(const AdamPointers& p, int64_t offset,
                                                                          int64_t count, float am, float av,
                                                                          const MapTables& s, const MapTables& u,
                                                                          const AdamCoefficients& c, float* m, float* v,
                                                                          uint32_t& m_max, uint32_t& v_max) {
    const __m256 am8 = _mm256_set1_ps(am), av8 = _mm256_set1_ps(av);
    const __m256 beta1 = _mm256_set1_ps(c.beta1), one_minus_beta1 = _mm256_set1_ps(c.one_minus_beta1);
    const __m256 beta2 = _mm256_set1_ps(c.beta2), one_minus_beta2 = _mm256_set1_ps(c.one_minus_beta2);
    const __m256 eps = _mm256_set1_ps(c.eps);
    __m256i m_lanes = _mm256_setzero_si256(), v_lanes = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      const __m256 r = _mm256_loadu_ps(p.lowrank + offset + i);
      const __m256 m_old = _mm256_mul_ps(_mm256_i32gather_ps(s.values, load_codes(p.exp_avg + offset + i), 4), am8);
      const __m256 v_old = _mm256_mul_ps(_mm256_i32gather_ps(u.values, load_codes(p.exp_avg_sq + offset + i), 4), av8);
      const __m256 mi = _mm256_fmadd_ps(r, one_minus_beta1, _mm256_mul_ps(m_old, beta1));
      const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, r), r, _mm256_mul_ps(v_old, beta2));
      _mm256_store_ps(m + i, mi);
      _mm256_store_ps(v + i, vi);
      _mm256_storeu_ps(p.normalized + offset + i, _mm256_div_ps(mi, _mm256_add_ps(_mm256_sqrt_ps(vi), eps)));
      m_lanes = _mm256_max_epu32(m_lanes, magnitudes(mi));
      v_lanes = _mm256_max_epu32(v_lanes, magnitudes(vi));
    }
    m_max = reduce_max(m_lanes);
    v_max = reduce_max(v_lanes);
    adam_scalar<true>(p, offset, i, count, am, av, s, u, c, m, v, m_max, v_max);
  }
};

// ---- AVX-512 (16 lanes, masked tails; the kFused512 variant) ----------------------------------------

struct Avx512 {
  // The levels in registers: 0..4 one register each, 5 two, 6 four, 7 eight.
  struct Levels {
    __m512 low[5], l5[2], l6[4], l7[8];
  };

  static LOWRANK_OPTIM_AVX512_TARGET LOWRANK_OPTIM_ALWAYS_INLINE Levels load_levels(const MapTables& tables) {
    Levels levels;
    for (int k = 0; k < 5; ++k) levels.low[k] = _mm512_load_ps(tables.levels[k]);
    for (int q = 0; q < 2; ++q) levels.l5[q] = _mm512_load_ps(tables.levels[5] + 16 * q);
    for (int q = 0; q < 4; ++q) levels.l6[q] = _mm512_load_ps(tables.levels[6] + 16 * q);
    for (int q = 0; q < 8; ++q) levels.l7[q] = _mm512_load_ps(tables.levels[7] + 16 * q);
    return levels;
  }

  static LOWRANK_OPTIM_AVX512_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __m512i step(__m512 x, __m512 t, __m512i j) {
    const __m512i doubled = _mm512_add_epi32(j, j);
    return _mm512_mask_add_epi32(doubled, _mm512_cmp_ps_mask(x, t, _CMP_NLE_UQ), doubled, _mm512_set1_epi32(1));
  }

  // permutex2var reads 32 values (5 bits of j); the higher bits pick among those pairs of registers.
  static LOWRANK_OPTIM_AVX512_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __m512i search(__m512 x, const Levels& l,
                                                                                 __m512i last) {
    __m512i j = _mm512_setzero_si512();
    for (int k = 0; k < 5; ++k) j = step(x, _mm512_permutexvar_ps(j, l.low[k]), j);
    j = step(x, _mm512_permutex2var_ps(l.l5[0], j, l.l5[1]), j);
    const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
    {
      const __mmask16 high = _mm512_test_epi32_mask(j, bit5);
      const __m512 t = _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(l.l6[0], j, l.l6[1]),
                                            _mm512_permutex2var_ps(l.l6[2], j, l.l6[3]));
      j = step(x, t, j);
    }
    {
      const __mmask16 b5 = _mm512_test_epi32_mask(j, bit5), b6 = _mm512_test_epi32_mask(j, bit6);
      const __m512 low = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l.l7[0], j, l.l7[1]),
                                              _mm512_permutex2var_ps(l.l7[2], j, l.l7[3]));
      const __m512 high = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l.l7[4], j, l.l7[5]),
                                               _mm512_permutex2var_ps(l.l7[6], j, l.l7[7]));
      j = step(x, _mm512_mask_blend_ps(b6, low, high), j);
    }
    return _mm512_min_epi32(j, last);
  }

  static LOWRANK_OPTIM_AVX512_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __mmask16 tail_mask(int64_t remaining) {
    return remaining >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << remaining) - 1u);
  }

  static LOWRANK_OPTIM_AVX512_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __m512i load_codes(__mmask16 mask, const uint8_t* codes) {
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, codes));
  }

  static LOWRANK_OPTIM_AVX512_TARGET LOWRANK_OPTIM_ALWAYS_INLINE __m512i magnitudes(__m512 x) {
    return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
  }

  static LOWRANK_OPTIM_AVX512_TARGET uint32_t maximum(const float* values, int64_t count) {
    __m512i lanes = _mm512_setzero_si512();
    for (int64_t i = 0; i < count; i += 16) {
      lanes = _mm512_max_epu32(lanes, magnitudes(_mm512_maskz_loadu_ps(tail_mask(count - i), values + i)));
    }
    return _mm512_reduce_max_epu32(lanes);
  }

  static LOWRANK_OPTIM_AVX512_TARGET void codes(const float* values, int64_t count,
                                                                              float divisor, const MapTables& tables,
                                                                              uint8_t* out) {
    const Levels levels = load_levels(tables);
    const __m512 d = _mm512_set1_ps(divisor);
    const __m512i last = _mm512_set1_epi32(tables.last);
    for (int64_t i = 0; i < count; i += 16) {
      const __mmask16 mask = tail_mask(count - i);
      const __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, values + i), d);
      _mm512_mask_cvtepi32_storeu_epi8(out + i, mask, search(x, levels, last));
    }
  }

  static LOWRANK_OPTIM_AVX512_TARGET void dequantize(const uint8_t* codes, int64_t count,
                                                                                   float scale, const MapTables& tables,
                                                                                   float* out) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < count; i += 16) {
      const __mmask16 mask = tail_mask(count - i);
      const __m512 values = _mm512_i32gather_ps(load_codes(mask, codes + i), tables.values, 4);
      _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(values, s));
    }
  }

  static LOWRANK_OPTIM_AVX512_TARGET void adam(const AdamPointers& p, int64_t offset,
                                                                             int64_t count, float am, float av,
                                                                             const MapTables& s, const MapTables& u,
                                                                             const AdamCoefficients& c, float* m,
                                                                             float* v, uint32_t& m_max,
                                                                             uint32_t& v_max) {
    const __m512 am16 = _mm512_set1_ps(am), av16 = _mm512_set1_ps(av);
    const __m512 beta1 = _mm512_set1_ps(c.beta1), one_minus_beta1 = _mm512_set1_ps(c.one_minus_beta1);
    const __m512 beta2 = _mm512_set1_ps(c.beta2), one_minus_beta2 = _mm512_set1_ps(c.one_minus_beta2);
    const __m512 eps = _mm512_set1_ps(c.eps);
    __m512i m_lanes = _mm512_setzero_si512(), v_lanes = _mm512_setzero_si512();
    for (int64_t i = 0; i < count; i += 16) {
      const __mmask16 mask = tail_mask(count - i);
      const __m512 r = _mm512_maskz_loadu_ps(mask, p.lowrank + offset + i);
      const __m512 m_old = _mm512_mul_ps(_mm512_i32gather_ps(load_codes(mask, p.exp_avg + offset + i), s.values, 4), am16);
      const __m512 v_old = _mm512_mul_ps(_mm512_i32gather_ps(load_codes(mask, p.exp_avg_sq + offset + i), u.values, 4), av16);
      const __m512 mi = _mm512_fmadd_ps(r, one_minus_beta1, _mm512_mul_ps(m_old, beta1));
      const __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, r), r, _mm512_mul_ps(v_old, beta2));
      _mm512_store_ps(m + i, mi);  // the buffers hold a whole number of vectors (kMaxBlockSize % 16 == 0)
      _mm512_store_ps(v + i, vi);
      _mm512_mask_storeu_ps(p.normalized + offset + i, mask, _mm512_div_ps(mi, _mm512_add_ps(_mm512_sqrt_ps(vi), eps)));
      // Only the block's lanes count towards its maxima (the others dequantized code 0 of the zero bytes).
      m_lanes = _mm512_mask_max_epu32(m_lanes, mask, m_lanes, magnitudes(mi));
      v_lanes = _mm512_mask_max_epu32(v_lanes, mask, v_lanes, magnitudes(vi));
    }
    m_max = _mm512_reduce_max_epu32(m_lanes);
    v_max = _mm512_reduce_max_epu32(v_lanes);
  }
};
#pragma GCC diagnostic pop
#endif

// The functions each variant is compiled as: the plain one (ATen DEFAULT: products rounded), the fused
// one (AVX2+FMA on x86, native fma elsewhere) and, on x86, the AVX-512 one. The same arithmetic in each,
// so the same bits; only the Adam update's fusion differs, as ATen's does.
#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
using FusedSimd = Avx2;
#else
using FusedSimd = Scalar<true>;
#endif

#define LOWRANK_OPTIM_QUANT_VARIANT(ATTRIBUTES, SUFFIX, SIMD)                                                     \
  ATTRIBUTES void quantize_range_##SUFFIX(const float* x, uint8_t* codes, float* absmax, const MapTables& tables,  \
                                          const Geometry& g, int64_t first, int64_t last) {                        \
    Kernels<SIMD>::quantize(x, codes, absmax, tables, g, first, last);                                           \
  }                                                                                                                \
  ATTRIBUTES void dequantize_range_##SUFFIX(const uint8_t* codes, const float* absmax, const MapTables& tables,    \
                                            float* out, const Geometry& g, int64_t first, int64_t last) {          \
    Kernels<SIMD>::dequantize(codes, absmax, tables, out, g, first, last);                                       \
  }                                                                                                                \
  ATTRIBUTES void adam_range_##SUFFIX(const AdamPointers& p, const MapTables& s, const MapTables& u,               \
                                      const AdamCoefficients& c, const Geometry& g, int64_t first, int64_t last) { \
    Kernels<SIMD>::adam(p, s, u, c, g, first, last);                                                             \
  }

LOWRANK_OPTIM_QUANT_VARIANT(, plain, Scalar<false>)
LOWRANK_OPTIM_QUANT_VARIANT(LOWRANK_OPTIM_FMA_TARGET, fused, FusedSimd)
#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
LOWRANK_OPTIM_QUANT_VARIANT(LOWRANK_OPTIM_AVX512_TARGET, fused512, Avx512)
#endif
#undef LOWRANK_OPTIM_QUANT_VARIANT

// Runs `kernel_suffix` of the variant kernel_variant() names over every block, in parallel.
#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
#define LOWRANK_OPTIM_QUANT_DISPATCH(NAME, ...)                                        \
  do {                                                                                 \
    const cpu::Variant variant = cpu::kernel_variant();                                \
    at::parallel_for(0, g.blocks, g.grain, [&](int64_t first, int64_t last) {          \
      if (variant == cpu::Variant::kFused512) return NAME##_fused512(__VA_ARGS__);     \
      if (variant == cpu::Variant::kFused) return NAME##_fused(__VA_ARGS__);           \
      NAME##_plain(__VA_ARGS__);                                                       \
    });                                                                                \
  } while (false)
#else
#define LOWRANK_OPTIM_QUANT_DISPATCH(NAME, ...)                                        \
  do {                                                                                 \
    const cpu::Variant variant = cpu::kernel_variant();                                \
    at::parallel_for(0, g.blocks, g.grain, [&](int64_t first, int64_t last) {          \
      if (variant != cpu::Variant::kPlain) return NAME##_fused(__VA_ARGS__);           \
      NAME##_plain(__VA_ARGS__);                                                       \
    });                                                                                \
  } while (false)
#endif

// ---- the ops ---------------------------------------------------------------------------------------

void quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& code_map, int64_t block_size, at::Tensor codes,
                            at::Tensor absmax) {
  quant::check_quantize_args(x, code_map, block_size, codes, absmax);
  const Geometry g = geometry(x, block_size);
  const MapTables tables = map_tables(code_map);
  const float* x_ptr = x.const_data_ptr<float>();
  uint8_t* codes_ptr = codes.data_ptr<uint8_t>();
  float* absmax_ptr = absmax.data_ptr<float>();
  LOWRANK_OPTIM_QUANT_DISPATCH(quantize_range, x_ptr, codes_ptr, absmax_ptr, tables, g, first, last);
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code_map,
                                    int64_t block_size) {
  quant::check_dequantize_args(codes, absmax, code_map, block_size);
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const Geometry g = geometry(codes, block_size);
  const MapTables tables = map_tables(code_map);
  const uint8_t* codes_ptr = codes.const_data_ptr<uint8_t>();
  const float* absmax_ptr = absmax.const_data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  LOWRANK_OPTIM_QUANT_DISPATCH(dequantize_range, codes_ptr, absmax_ptr, tables, out_ptr, g, first, last);
  return out;
}

void blockwise_adam_cpu(const at::Tensor& lowrank, at::Tensor exp_avg, at::Tensor exp_avg_absmax, at::Tensor exp_avg_sq,
                        at::Tensor exp_avg_sq_absmax, at::Tensor normalized, const at::Tensor& signed_map,
                        const at::Tensor& unsigned_map, double beta1, double beta2, double eps, int64_t block_size,
                        const std::optional<at::Tensor>& skip) {
  const char* op = "blockwise_adam_";
  quant::check_adam_args(lowrank, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, normalized, signed_map,
                         unsigned_map, block_size, skip);
  const c10::Device device = lowrank.device();
  // A skipped update: the state keeps its codes and maxima, and N is zero (read directly on the CPU).
  if (cpu::skipped(op, skip, device)) {
    normalized.zero_();
    return;
  }
  const Geometry g = geometry(lowrank, block_size);
  const MapTables signed_tables = map_tables(signed_map);
  const MapTables unsigned_tables = map_tables(unsigned_map);
  const AdamCoefficients c{static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                           static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
  const AdamPointers p{lowrank.const_data_ptr<float>(), exp_avg.data_ptr<uint8_t>(), exp_avg_absmax.data_ptr<float>(),
                       exp_avg_sq.data_ptr<uint8_t>(), exp_avg_sq_absmax.data_ptr<float>(),
                       normalized.data_ptr<float>()};
  LOWRANK_OPTIM_QUANT_DISPATCH(adam_range, p, signed_tables, unsigned_tables, c, g, first, last);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CPU, m) {
  m.impl("quantize_blockwise_", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("blockwise_adam_", &blockwise_adam_cpu);
}

}  // namespace lowrank_optim
