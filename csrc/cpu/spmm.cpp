// CPU kernels of lowrank_optim::spmm_add_, spmm_t_add_ and sddmm (schemas and the math:
// lowrank_optim/ops/spmm.py). S is m x n, its support sorted flat row-major indices with a CSR row pointer.
//
// Layout. The dense operands are tokens x features, row-major: a column of S's row o is a column of the
// input, strided. The kernels therefore work on *panels*: a tile of kTile tokens transposed into
// features x kTile (fp32, or fp64 for fp64 tensors: bf16/fp16 are widened once, here), so that every
// nonzero costs one contiguous kTile-wide multiply-add over tokens from a panel row:
//   spmm_add_   out[t, o] += Σ_k v_k · X[t, c_k]: per row o, kTile accumulators stay in registers while
//               the row's nonzeros gather panel rows of Xᵀ (the panel stays in L2: n · kTile · 4 bytes,
//               512 KiB for n = 2048); 16 rows are then transposed back and added into out (one rounding).
//   spmm_t_add_ out[t, c] += Σ_k v_k · G[t, r_k]: from kGatherTokens tokens on, the support is transposed
//               (a counting sort by column, per call: no per-layer memory) and the spmm_add_ kernel runs on
//               Sᵀ; for fewer tokens, per row o, G's column o is loaded into registers once and scattered
//               into the rows c_k of an L2-resident panel for dX, added into out at the end of the tile. No
//               two tasks write the same panel (tasks own token tiles, and columns when there are more
//               threads than tiles), so there are no atomics; both ways give the same bits.
//   sddmm       dv[k] = Σ_t G[t, r_k] X[t, c_k]: per row o, G's column o in registers, one kTile-wide dot
//               with Xᵀ's panel row c_k per nonzero; each task owns rows for all token tiles, so every
//               dv[k] is summed in the same order (tile by tile) whatever the thread count.
// Products and sums are separate operations (this file is built with -ffp-contract=off, as all of csrc/cpu):
// the loops are bound by reading panel rows from L2, not by arithmetic.
//
// Vectors are GCC vector types (64-byte in the AVX-512 variant, 32-byte in the AVX2 one, 16-byte
// otherwise); cpu::kernel_variant() picks the variant, as for the other kernels.
//
// Supports. check_indices=true reads the support once (every index in range, strictly increasing) and
// checks row_ptr against it, before anything is written; a strictly increasing support runs the tiled
// kernels, any other one (unsorted, repeated) the generic loops at the end of this file, which follow
// the definition entry by entry (correct for any support, slow). check_indices=false: the caller vouches
// for a strictly increasing support and its row_ptr (SLTrainLinear checks its support once).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/spmm_checks.h"
#include "common.h"

// The 32- and 64-byte vector helpers below are always inlined into the AVX2 / AVX-512 variants, so no such
// vector ever crosses a call boundary compiled without those ISAs: GCC's ABI note does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace lowrank_optim {
namespace {

using cpu::narrow;
using cpu::widen;

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x2 __attribute__((vector_size(16)));

template <typename acc_t, int kBytes>
struct VectorOf;
template <>
struct VectorOf<float, 64> {
  using type = f32x16;
};
template <>
struct VectorOf<float, 32> {
  using type = f32x8;
};
template <>
struct VectorOf<float, 16> {
  using type = f32x4;
};
template <>
struct VectorOf<double, 64> {
  using type = f64x8;
};
template <>
struct VectorOf<double, 32> {
  using type = f64x4;
};
template <>
struct VectorOf<double, 16> {
  using type = f64x2;
};

// Vectors per token tile: 4 keep a row's accumulators (or a column of G) in registers in every variant
// and make a panel row 4 cache lines in the AVX-512 variant.
constexpr int kVectorsPerTile = 4;
// Output rows transposed back into `out` together: 16 fp32 values, one cache line per token.
constexpr int64_t kRowBlock = 16;

// The sum of a vector's lanes by halves (the upper half added to the lower, down to 16 bytes), a
// log2-deep tree of vector adds; written out so that no loop over lanes is left for the compiler.
template <typename acc_t, int kBytes>
LOWRANK_OPTIM_ALWAYS_INLINE acc_t halving_sum(typename VectorOf<acc_t, kBytes>::type v) {
  if constexpr (kBytes > 16) {
    using Half = typename VectorOf<acc_t, kBytes / 2>::type;
    Half low, high;
    std::memcpy(&low, &v, sizeof(Half));
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
    return halving_sum<acc_t, kBytes / 2>(low + high);
  } else if constexpr (sizeof(acc_t) == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    return v[0] + v[1];
  }
}

template <typename acc_t, int kBytes>
struct Lanes {
  using V = typename VectorOf<acc_t, kBytes>::type;
  static constexpr int kWidth = kBytes / static_cast<int>(sizeof(acc_t));
  static constexpr int kTile = kWidth * kVectorsPerTile;  // tokens per tile

  static LOWRANK_OPTIM_ALWAYS_INLINE V load(const acc_t* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static LOWRANK_OPTIM_ALWAYS_INLINE void store(acc_t* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // Lane 0 shuffled into every lane: one broadcast instruction (`V{} + a` would also add a zero, and a
  // loop over lanes compiles to masked inserts).
  static LOWRANK_OPTIM_ALWAYS_INLINE V broadcast(acc_t a) {
    using Mask = decltype(V{} < V{});  // the integer vector of the same shape
    V v = {};
    v[0] = a;
    return __builtin_shuffle(v, Mask{});
  }
  static LOWRANK_OPTIM_ALWAYS_INLINE acc_t sum(V v) { return halving_sum<acc_t, kBytes>(v); }
};

constexpr int kBytesPlain = 16, kBytesAvx2 = 32, kBytesAvx512 = 64;

inline int vector_bytes(cpu::Variant variant) {
  switch (variant) {
    case cpu::Variant::kFused512:
      return kBytesAvx512;
    case cpu::Variant::kFused:
      return kBytesAvx2;
    default:
      return kBytesPlain;
  }
}

template <typename acc_t>
inline int64_t tile_tokens(cpu::Variant variant) {
  return vector_bytes(variant) / static_cast<int64_t>(sizeof(acc_t)) * kVectorsPerTile;
}

// A 2-D strided view (elements).
template <typename scalar_t>
struct Matrix {
  scalar_t* data;
  int64_t rows, cols, row_stride, col_stride;
  scalar_t* at(int64_t row, int64_t col) const { return data + row * row_stride + col * col_stride; }
};

// `out` is written through it (the op's mutable argument); every other matrix is only read.
template <typename scalar_t>
Matrix<scalar_t> matrix(const at::Tensor& tensor) {
  return {const_cast<scalar_t*>(tensor.const_data_ptr<scalar_t>()), tensor.size(0), tensor.size(1), tensor.stride(0),
          tensor.stride(1)};
}

template <typename scalar_t, typename index_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  Matrix<scalar_t> out;    // spmm: T x m (forward) or T x n (transposed); unused by sddmm
  Matrix<scalar_t> dense;  // spmm_add_: X (T x n); spmm_t_add_ and sddmm: G (T x m)
  Matrix<scalar_t> input;  // sddmm: X (T x n)
  const scalar_t* values;
  const index_t* indices;
  const index_t* row_ptr;
  acc_t* result;  // sddmm: one accumulator per nonzero
  int64_t tokens, m, n;
  int64_t tiles, groups;  // task i: token tile i / groups, row (or column) group i % groups
};

// 4 x 4 blocks of fp32 are transposed with shuffles (8 per 16 values) rather than element by element: at
// SLTrain's densities the transposes into and out of the panels are a large part of the work (each output
// element receives only delta · n products).
typedef int i32x4 __attribute__((vector_size(16)));

LOWRANK_OPTIM_ALWAYS_INLINE void transpose4(f32x4& r0, f32x4& r1, f32x4& r2, f32x4& r3) {
  const f32x4 t0 = __builtin_shuffle(r0, r1, i32x4{0, 4, 1, 5});
  const f32x4 t1 = __builtin_shuffle(r0, r1, i32x4{2, 6, 3, 7});
  const f32x4 t2 = __builtin_shuffle(r2, r3, i32x4{0, 4, 1, 5});
  const f32x4 t3 = __builtin_shuffle(r2, r3, i32x4{2, 6, 3, 7});
  r0 = __builtin_shuffle(t0, t2, i32x4{0, 1, 4, 5});
  r1 = __builtin_shuffle(t0, t2, i32x4{2, 3, 6, 7});
  r2 = __builtin_shuffle(t1, t3, i32x4{0, 1, 4, 5});
  r3 = __builtin_shuffle(t1, t3, i32x4{2, 3, 6, 7});
}

// Four consecutive elements, widened to fp32.
template <typename scalar_t>
LOWRANK_OPTIM_ALWAYS_INLINE f32x4 load4(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    f32x4 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else {
    return f32x4{widen(p[0]), widen(p[1]), widen(p[2]), widen(p[3])};
  }
}

// p[0..3] += v, each rounded once to scalar_t.
template <typename scalar_t>
LOWRANK_OPTIM_ALWAYS_INLINE void add4(scalar_t* p, f32x4 v) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    f32x4 current;
    std::memcpy(&current, p, sizeof(current));
    current += v;
    std::memcpy(p, &current, sizeof(current));
  } else {
    for (int l = 0; l < 4; ++l) p[l] = narrow<scalar_t>(widen(p[l]) + v[l]);
  }
}

// panel[(f - f0) · kTile + t] = src[t0 + t, f] for f in [f0, f1), zero for t >= count (the last tile's
// padding, so that the loops always run the full tile).
template <int kTile, typename scalar_t, typename acc_t>
LOWRANK_OPTIM_ALWAYS_INLINE void pack(const Matrix<scalar_t>& src, int64_t t0, int64_t count, int64_t f0, int64_t f1,
                                      acc_t* __restrict__ panel) {
  for (int64_t fb = f0; fb < f1; fb += kRowBlock) {
    const int64_t fe = std::min(f1, fb + kRowBlock);
    int64_t t = 0;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (src.col_stride == 1) {
        for (; t + 4 <= count; t += 4) {
          int64_t f = fb;
          for (; f + 4 <= fe; f += 4) {
            f32x4 r0 = load4(src.at(t0 + t, f)), r1 = load4(src.at(t0 + t + 1, f));
            f32x4 r2 = load4(src.at(t0 + t + 2, f)), r3 = load4(src.at(t0 + t + 3, f));
            transpose4(r0, r1, r2, r3);
            acc_t* column = panel + (f - f0) * kTile + t;
            std::memcpy(column, &r0, sizeof(r0));
            std::memcpy(column + kTile, &r1, sizeof(r1));
            std::memcpy(column + 2 * kTile, &r2, sizeof(r2));
            std::memcpy(column + 3 * kTile, &r3, sizeof(r3));
          }
          for (; f < fe; ++f) {
            for (int64_t i = t; i < t + 4; ++i) panel[(f - f0) * kTile + i] = widen(*src.at(t0 + i, f));
          }
        }
      }
    }
    for (; t < count; ++t) {
      const scalar_t* row = src.at(t0 + t, 0);
      for (int64_t f = fb; f < fe; ++f) panel[(f - f0) * kTile + t] = widen(row[f * src.col_stride]);
    }
    for (int64_t f = fb; f < fe; ++f) {
      for (int64_t i = count; i < kTile; ++i) panel[(f - f0) * kTile + i] = acc_t(0);
    }
  }
}

// out[t0 + t, f] += panel[(f - f0) · kTile + t], rounded once, for t < count and f in [f0, f1).
template <int kTile, typename scalar_t, typename acc_t>
LOWRANK_OPTIM_ALWAYS_INLINE void unpack_add(const Matrix<scalar_t>& out, int64_t t0, int64_t count, int64_t f0,
                                            int64_t f1, const acc_t* __restrict__ panel) {
  for (int64_t fb = f0; fb < f1; fb += kRowBlock) {
    const int64_t fe = std::min(f1, fb + kRowBlock);
    int64_t t = 0;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (out.col_stride == 1) {
        for (; t + 4 <= count; t += 4) {
          int64_t f = fb;
          for (; f + 4 <= fe; f += 4) {
            const acc_t* column = panel + (f - f0) * kTile + t;
            f32x4 r0, r1, r2, r3;
            std::memcpy(&r0, column, sizeof(r0));
            std::memcpy(&r1, column + kTile, sizeof(r1));
            std::memcpy(&r2, column + 2 * kTile, sizeof(r2));
            std::memcpy(&r3, column + 3 * kTile, sizeof(r3));
            transpose4(r0, r1, r2, r3);
            add4(out.at(t0 + t, f), r0);
            add4(out.at(t0 + t + 1, f), r1);
            add4(out.at(t0 + t + 2, f), r2);
            add4(out.at(t0 + t + 3, f), r3);
          }
          for (; f < fe; ++f) {
            for (int64_t i = t; i < t + 4; ++i) {
              scalar_t& target = *out.at(t0 + i, f);
              target = narrow<scalar_t>(widen(target) + panel[(f - f0) * kTile + i]);
            }
          }
        }
      }
    }
    for (; t < count; ++t) {
      scalar_t* row = out.at(t0 + t, 0);
      for (int64_t f = fb; f < fe; ++f) {
        scalar_t& target = row[f * out.col_stride];
        target = narrow<scalar_t>(widen(target) + panel[(f - f0) * kTile + t]);
      }
    }
  }
}

// Every cache line of a panel row of kRowBytes bytes, for reading.
template <int kRowBytes>
LOWRANK_OPTIM_ALWAYS_INLINE void prefetch_row(const void* row) {
#if defined(__GNUC__) || defined(__clang__)
  for (int line = 0; line < kRowBytes; line += 64) __builtin_prefetch(static_cast<const char*>(row) + line, 0);
#endif
}

// How far ahead (nonzeros) a panel row is prefetched into L1: the panel is in L2, the rows are random.
constexpr int64_t kPrefetchDistance = 8;

inline std::pair<int64_t, int64_t> group_range(int64_t size, int64_t groups, int64_t group) {
  return {size * group / groups, size * (group + 1) / groups};
}

// spmm_add_, tasks [begin, end): out[tile, rows of the group] += X[tile] Sᵀ.
template <int kBytes, typename scalar_t, typename index_t>
LOWRANK_OPTIM_ALWAYS_INLINE void spmm_forward_tasks(const Problem<scalar_t, index_t>& p, int64_t begin, int64_t end,
                                                    typename Problem<scalar_t, index_t>::acc_t* __restrict__ panel,
                                                    typename Problem<scalar_t, index_t>::acc_t* __restrict__ block) {
  using acc_t = typename Problem<scalar_t, index_t>::acc_t;
  using L = Lanes<acc_t, kBytes>;
  using V = typename L::V;
  constexpr int kTile = L::kTile;
  int64_t packed_tile = -1;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t tile = task / p.groups;
    const int64_t t0 = tile * kTile;
    const int64_t count = std::min<int64_t>(kTile, p.tokens - t0);
    if (tile != packed_tile) {
      pack<kTile>(p.dense, t0, count, 0, p.n, panel);
      packed_tile = tile;
    }
    const auto [o_begin, o_end] = group_range(p.m, p.groups, task % p.groups);
    for (int64_t ob = o_begin; ob < o_end; ob += kRowBlock) {
      const int64_t oe = std::min(o_end, ob + kRowBlock);
      for (int64_t o = ob; o < oe; ++o) {
        V acc[kVectorsPerTile] = {};
        const int64_t base = o * p.n;
        const int64_t k_end = p.row_ptr[o + 1];
        for (int64_t k = p.row_ptr[o]; k < k_end; ++k) {
          if (k + kPrefetchDistance < k_end) {
            prefetch_row<kTile * sizeof(acc_t)>(panel + (static_cast<int64_t>(p.indices[k + kPrefetchDistance]) - base) * kTile);
          }
          const acc_t* row = panel + (static_cast<int64_t>(p.indices[k]) - base) * kTile;
          const V weight = L::broadcast(widen(p.values[k]));
          for (int v = 0; v < kVectorsPerTile; ++v) acc[v] += weight * L::load(row + v * L::kWidth);
        }
        for (int v = 0; v < kVectorsPerTile; ++v) L::store(block + (o - ob) * kTile + v * L::kWidth, acc[v]);
      }
      unpack_add<kTile>(p.out, t0, count, ob, oe, block);
    }
  }
}

// spmm_t_add_, tasks [begin, end): out[tile, columns of the group] += G[tile] S.
template <int kBytes, typename scalar_t, typename index_t>
LOWRANK_OPTIM_ALWAYS_INLINE void spmm_transposed_tasks(const Problem<scalar_t, index_t>& p, int64_t begin, int64_t end,
                                                       typename Problem<scalar_t, index_t>::acc_t* __restrict__ panel,
                                                       typename Problem<scalar_t, index_t>::acc_t* __restrict__ block) {
  using acc_t = typename Problem<scalar_t, index_t>::acc_t;
  using L = Lanes<acc_t, kBytes>;
  using V = typename L::V;
  constexpr int kTile = L::kTile;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t tile = task / p.groups;
    const int64_t t0 = tile * kTile;
    const int64_t count = std::min<int64_t>(kTile, p.tokens - t0);
    const auto [c_begin, c_end] = group_range(p.n, p.groups, task % p.groups);
    const bool all_columns = c_begin == 0 && c_end == p.n;
    std::fill(panel, panel + (c_end - c_begin) * kTile, acc_t(0));
    for (int64_t ob = 0; ob < p.m; ob += kRowBlock) {
      const int64_t oe = std::min(p.m, ob + kRowBlock);
      pack<kTile>(p.dense, t0, count, ob, oe, block);
      for (int64_t o = ob; o < oe; ++o) {
        int64_t k = p.row_ptr[o], k_end = p.row_ptr[o + 1];
        if (k == k_end) continue;
        const int64_t base = o * p.n + c_begin;
        if (!all_columns) {
          // A row's entries are sorted by column: the group's part of the row is one range.
          const index_t* first = p.indices + k;
          const index_t* last = p.indices + k_end;
          k = std::lower_bound(first, last, static_cast<index_t>(base)) - p.indices;
          k_end = std::lower_bound(p.indices + k, last, static_cast<index_t>(o * p.n + c_end)) - p.indices;
        }
        V column[kVectorsPerTile];
        for (int v = 0; v < kVectorsPerTile; ++v) column[v] = L::load(block + (o - ob) * kTile + v * L::kWidth);
        for (; k < k_end; ++k) {
          if (k + kPrefetchDistance < k_end) {
            prefetch_row<kTile * sizeof(acc_t)>(panel + (static_cast<int64_t>(p.indices[k + kPrefetchDistance]) - base) * kTile);
          }
          acc_t* row = panel + (static_cast<int64_t>(p.indices[k]) - base) * kTile;
          const V weight = L::broadcast(widen(p.values[k]));
          for (int v = 0; v < kVectorsPerTile; ++v) {
            L::store(row + v * L::kWidth, L::load(row + v * L::kWidth) + weight * column[v]);
          }
        }
      }
    }
    unpack_add<kTile>(p.out, t0, count, c_begin, c_end, panel);
  }
}

// sddmm, rows [o_begin, o_end) over every token tile: result[k] += Σ_t G[t, o] X[t, c_k].
template <int kBytes, typename scalar_t, typename index_t>
LOWRANK_OPTIM_ALWAYS_INLINE void sddmm_rows(const Problem<scalar_t, index_t>& p, int64_t o_begin, int64_t o_end,
                                            typename Problem<scalar_t, index_t>::acc_t* __restrict__ panel,
                                            typename Problem<scalar_t, index_t>::acc_t* __restrict__ block) {
  using acc_t = typename Problem<scalar_t, index_t>::acc_t;
  using L = Lanes<acc_t, kBytes>;
  using V = typename L::V;
  constexpr int kTile = L::kTile;
  for (int64_t tile = 0; tile < p.tiles; ++tile) {
    const int64_t t0 = tile * kTile;
    const int64_t count = std::min<int64_t>(kTile, p.tokens - t0);
    pack<kTile>(p.input, t0, count, 0, p.n, panel);
    for (int64_t ob = o_begin; ob < o_end; ob += kRowBlock) {
      const int64_t oe = std::min(o_end, ob + kRowBlock);
      pack<kTile>(p.dense, t0, count, ob, oe, block);
      for (int64_t o = ob; o < oe; ++o) {
        V column[kVectorsPerTile];
        for (int v = 0; v < kVectorsPerTile; ++v) column[v] = L::load(block + (o - ob) * kTile + v * L::kWidth);
        const int64_t base = o * p.n;
        const int64_t k_end = p.row_ptr[o + 1];
        for (int64_t k = p.row_ptr[o]; k < k_end; ++k) {
          if (k + kPrefetchDistance < k_end) {
            prefetch_row<kTile * sizeof(acc_t)>(panel + (static_cast<int64_t>(p.indices[k + kPrefetchDistance]) - base) * kTile);
          }
          const acc_t* row = panel + (static_cast<int64_t>(p.indices[k]) - base) * kTile;
          V dot = column[0] * L::load(row);
          for (int v = 1; v < kVectorsPerTile; ++v) dot += column[v] * L::load(row + v * L::kWidth);
          p.result[k] += L::sum(dot);
        }
      }
    }
  }
}

enum class Kind { kForward, kTransposed, kSddmm };

template <Kind kKind, int kBytes, typename scalar_t, typename index_t>
LOWRANK_OPTIM_ALWAYS_INLINE void run_tasks(const Problem<scalar_t, index_t>& p, int64_t begin, int64_t end,
                                           typename Problem<scalar_t, index_t>::acc_t* panel,
                                           typename Problem<scalar_t, index_t>::acc_t* block) {
  if constexpr (kKind == Kind::kForward) {
    spmm_forward_tasks<kBytes>(p, begin, end, panel, block);
  } else if constexpr (kKind == Kind::kTransposed) {
    spmm_transposed_tasks<kBytes>(p, begin, end, panel, block);
  } else {
    sddmm_rows<kBytes>(p, begin, end, panel, block);
  }
}

// One entry point per variant: the target attribute compiles the inlined loops for that instruction set.
template <Kind kKind, typename scalar_t, typename index_t>
void run_plain(const Problem<scalar_t, index_t>& p, int64_t begin, int64_t end,
               typename Problem<scalar_t, index_t>::acc_t* panel, typename Problem<scalar_t, index_t>::acc_t* block) {
  run_tasks<kKind, kBytesPlain>(p, begin, end, panel, block);
}

template <Kind kKind, typename scalar_t, typename index_t>
LOWRANK_OPTIM_FMA_TARGET void run_avx2(const Problem<scalar_t, index_t>& p, int64_t begin, int64_t end,
                                       typename Problem<scalar_t, index_t>::acc_t* panel,
                                       typename Problem<scalar_t, index_t>::acc_t* block) {
  run_tasks<kKind, kBytesAvx2>(p, begin, end, panel, block);
}

#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
template <Kind kKind, typename scalar_t, typename index_t>
LOWRANK_OPTIM_AVX512_TARGET void run_avx512(const Problem<scalar_t, index_t>& p, int64_t begin, int64_t end,
                                            typename Problem<scalar_t, index_t>::acc_t* panel,
                                            typename Problem<scalar_t, index_t>::acc_t* block) {
  run_tasks<kKind, kBytesAvx512>(p, begin, end, panel, block);
}
#endif

template <Kind kKind, typename scalar_t, typename index_t>
void run_variant(cpu::Variant variant, const Problem<scalar_t, index_t>& p, int64_t begin, int64_t end,
                 typename Problem<scalar_t, index_t>::acc_t* panel, typename Problem<scalar_t, index_t>::acc_t* block) {
#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
  if (variant == cpu::Variant::kFused512) return run_avx512<kKind>(p, begin, end, panel, block);
#endif
  if (variant == cpu::Variant::kFused) return run_avx2<kKind>(p, begin, end, panel, block);
  run_plain<kKind>(p, begin, end, panel, block);
}

// Groups per token tile: 1 when there are at least as many tiles as threads (each task one whole tile),
// else enough row (or column) groups that every thread has work.
inline int64_t groups_for(int64_t tiles, int64_t size) {
  const int64_t threads = at::get_num_threads();
  if (tiles >= threads) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(size, (threads + tiles - 1) / tiles));
}

// ---- validation -------------------------------------------------------------------------------------

// Every index in [0, m·n) (IndexError at the first that is not), and whether the support is strictly
// increasing (cpu::scan_support).
template <typename index_t>
bool validate_support(const char* op, const index_t* idx, int64_t nnz, int64_t m, int64_t n) {
  constexpr int64_t kChunk = 16384;
  return cpu::scan_support(idx, nnz, m * n, kChunk,
                           [&](int64_t i, int64_t value) { spmm::throw_out_of_range(op, i, value, m, n); });
}

// row_ptr[o] must be the number of entries in rows < o (ValueError at the first row where it is not).
template <typename index_t>
void validate_row_ptr(const char* op, const index_t* idx, int64_t nnz, const index_t* row_ptr, int64_t m, int64_t n,
                      bool increasing) {
  std::vector<int64_t> expected(m + 1, 0);
  if (increasing) {
    at::parallel_for(0, m + 1, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        expected[o] = std::lower_bound(idx, idx + nnz, static_cast<int64_t>(o) * n,
                                       [](index_t a, int64_t b) { return static_cast<int64_t>(a) < b; }) -
                      idx;
      }
    });
  } else {
    for (int64_t k = 0; k < nnz; ++k) ++expected[static_cast<int64_t>(idx[k]) / n + 1];
    for (int64_t o = 0; o < m; ++o) expected[o + 1] += expected[o];
  }
  for (int64_t o = 0; o <= m; ++o) {
    if (static_cast<int64_t>(row_ptr[o]) != expected[o]) {
      spmm::throw_bad_row_ptr(op, o, static_cast<int64_t>(row_ptr[o]), expected[o], m, n);
    }
  }
}

// Returns whether the tiled kernels may run (a strictly increasing support); checks first when asked.
template <typename index_t>
bool prepare_support(const char* op, const at::Tensor& indices, const at::Tensor& row_ptr, int64_t m, int64_t n,
                     bool check_indices) {
  if (!check_indices) return true;
  const index_t* idx = indices.const_data_ptr<index_t>();
  const bool increasing = validate_support(op, idx, indices.numel(), m, n);
  validate_row_ptr(op, idx, indices.numel(), row_ptr.const_data_ptr<index_t>(), m, n, increasing);
  return increasing;
}

// ---- any support: the definition, entry by entry ---------------------------------------------------

// out[t, target_k] += values[k] · dense[t, source_k] for every token (tasks own tokens: no races; repeats
// accumulate), summed per token row in the accumulation type and rounded once.
template <typename scalar_t, typename index_t>
void spmm_any_support(const Matrix<scalar_t>& out, const Matrix<scalar_t>& dense, const scalar_t* values,
                      const index_t* idx, int64_t nnz, int64_t n, bool transposed) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, out.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(out.cols);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(row.begin(), row.end(), acc_t(0));
      for (int64_t k = 0; k < nnz; ++k) {
        const int64_t r = static_cast<int64_t>(idx[k]) / n, c = static_cast<int64_t>(idx[k]) % n;
        row[transposed ? c : r] += widen(values[k]) * widen(*dense.at(t, transposed ? r : c));
      }
      for (int64_t f = 0; f < out.cols; ++f) {
        scalar_t* target = out.at(t, f);
        *target = narrow<scalar_t>(widen(*target) + row[f]);
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void sddmm_any_support(const Matrix<scalar_t>& grad, const Matrix<scalar_t>& input, const index_t* idx, int64_t nnz,
                       int64_t n, scalar_t* result) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, nnz, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r = static_cast<int64_t>(idx[k]) / n, c = static_cast<int64_t>(idx[k]) % n;
      acc_t total = 0;
      for (int64_t t = 0; t < grad.rows; ++t) total += widen(*grad.at(t, r)) * widen(*input.at(t, c));
      result[k] = narrow<scalar_t>(total);
    }
  });
}

// ---- ops --------------------------------------------------------------------------------------------

template <Kind kKind, typename scalar_t, typename index_t>
void run_tiled(Problem<scalar_t, index_t>& p) {
  using acc_t = typename Problem<scalar_t, index_t>::acc_t;
  const cpu::Variant variant = cpu::kernel_variant();
  const int64_t tile = tile_tokens<acc_t>(variant);
  p.tiles = (p.tokens + tile - 1) / tile;
  // Panel: the features one task gathers from (forward, sddmm: all n; transposed: its column group).
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if constexpr (kKind == Kind::kSddmm) {
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.m));
    at::parallel_for(0, p.m, (p.m + threads - 1) / threads, [&](int64_t begin, int64_t end) {
      at::Tensor panel = at::empty({p.n * tile}, options);
      at::Tensor block = at::empty({kRowBlock * tile}, options);
      run_variant<kKind>(variant, p, begin, end, panel.mutable_data_ptr<acc_t>(), block.mutable_data_ptr<acc_t>());
    });
  } else {
    const int64_t features = kKind == Kind::kForward ? p.m : p.n;  // what the groups split
    p.groups = groups_for(p.tiles, features);
    const int64_t panel_features = kKind == Kind::kForward ? p.n : (p.n + p.groups - 1) / p.groups + 1;
    at::parallel_for(0, p.tiles * p.groups, 1, [&](int64_t begin, int64_t end) {
      at::Tensor panel = at::empty({panel_features * tile}, options);
      at::Tensor block = at::empty({kRowBlock * tile}, options);
      run_variant<kKind>(variant, p, begin, end, panel.mutable_data_ptr<acc_t>(), block.mutable_data_ptr<acc_t>());
    });
  }
}

// From this many tokens on, spmm_t_add_ transposes the support (a counting sort by column, O(nnz + n),
// one thread) and runs the forward's gather kernel on Sᵀ instead of scattering into the dX panel: the
// gather reads a panel row per nonzero where the scatter reads and writes one (measured on 2 cores at
// 2048 -> 5461, 2048 tokens: 53 -> 33 ms on one thread). Below it the sort does not pay for itself. Both
// sum each output over the rows in increasing order from zero, so they give the same bits.
constexpr int64_t kGatherTokens = 256;

// out += G S as out += G (Sᵀ)ᵀ: Sᵀ is n x m, its entries sorted by column of S (then row, as the rows are
// walked in order), so the forward kernel computes out[t, c] = Σ_{k in column c} v_k G[t, r_k].
template <typename scalar_t, typename index_t>
void spmm_transposed_by_gather(const Problem<scalar_t, index_t>& p) {
  const int64_t nnz = p.row_ptr[p.m];
  std::vector<index_t> column_ptr(p.n + 1, 0), flat_t(nnz);
  std::vector<scalar_t> values_t(nnz);
  for (int64_t o = 0; o < p.m; ++o) {
    const int64_t base = o * p.n;
    for (int64_t k = p.row_ptr[o]; k < p.row_ptr[o + 1]; ++k) ++column_ptr[static_cast<int64_t>(p.indices[k]) - base + 1];
  }
  for (int64_t c = 0; c < p.n; ++c) column_ptr[c + 1] += column_ptr[c];
  std::vector<index_t> cursor(column_ptr.begin(), column_ptr.end() - 1);
  for (int64_t o = 0; o < p.m; ++o) {
    const int64_t base = o * p.n;
    for (int64_t k = p.row_ptr[o]; k < p.row_ptr[o + 1]; ++k) {
      const int64_t c = static_cast<int64_t>(p.indices[k]) - base;
      const int64_t slot = cursor[c]++;
      flat_t[slot] = static_cast<index_t>(c * p.m + o);
      values_t[slot] = p.values[k];
    }
  }
  Problem<scalar_t, index_t> t{p.out, p.dense, p.input, values_t.data(), flat_t.data(), column_ptr.data(), nullptr,
                               p.tokens, p.n, p.m, 0, 1};
  run_tiled<Kind::kForward>(t);
}

void spmm_cpu(const char* op, bool transposed, at::Tensor out, const at::Tensor& dense, const char* dense_name,
              const at::Tensor& values, const at::Tensor& flat_indices, const at::Tensor& row_ptr, bool check_indices) {
  // Named copies, not a structured binding: lambdas below capture them (C++17 forbids capturing bindings).
  const std::pair<int64_t, int64_t> shape =
      spmm::check_spmm_args(op, transposed, out, dense, dense_name, values, flat_indices, row_ptr);
  const int64_t m = shape.first, n = shape.second;
  const int64_t nnz = flat_indices.numel();
  const at::Tensor indices = flat_indices.contiguous();
  const at::Tensor pointers = row_ptr.contiguous();
  bool tiled = true;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "lowrank_optim_spmm", [&] {
    tiled = prepare_support<index_t>(op, indices, pointers, m, n, check_indices);
  });
  if (nnz == 0 || out.size(0) == 0) return;
  const at::Tensor weights = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "lowrank_optim_spmm", [&] {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "lowrank_optim_spmm", [&] {
      if (!tiled) {
        spmm_any_support(matrix<scalar_t>(out), matrix<scalar_t>(dense), weights.const_data_ptr<scalar_t>(),
                         indices.const_data_ptr<index_t>(), nnz, n, transposed);
        return;
      }
      Problem<scalar_t, index_t> p{matrix<scalar_t>(out), matrix<scalar_t>(dense), matrix<scalar_t>(dense),
                                   weights.const_data_ptr<scalar_t>(), indices.const_data_ptr<index_t>(),
                                   pointers.const_data_ptr<index_t>(), nullptr, out.size(0), m, n, 0, 1};
      if (!transposed) {
        run_tiled<Kind::kForward>(p);
      } else if (p.tokens >= kGatherTokens) {
        spmm_transposed_by_gather(p);
      } else {
        run_tiled<Kind::kTransposed>(p);
      }
    });
  });
}

void spmm_add_cpu(at::Tensor out, const at::Tensor& input, const at::Tensor& values, const at::Tensor& flat_indices,
                  const at::Tensor& row_ptr, bool check_indices) {
  spmm_cpu("spmm_add_", false, out, input, "input", values, flat_indices, row_ptr, check_indices);
}

void spmm_t_add_cpu(at::Tensor out, const at::Tensor& grad, const at::Tensor& values, const at::Tensor& flat_indices,
                    const at::Tensor& row_ptr, bool check_indices) {
  spmm_cpu("spmm_t_add_", true, out, grad, "grad", values, flat_indices, row_ptr, check_indices);
}

at::Tensor sddmm_cpu(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& flat_indices,
                     const at::Tensor& row_ptr, bool check_indices) {
  const char* op = "sddmm";
  const std::pair<int64_t, int64_t> shape = spmm::check_sddmm_args(grad, input, flat_indices, row_ptr);
  const int64_t m = shape.first, n = shape.second;
  const int64_t nnz = flat_indices.numel();
  const at::Tensor indices = flat_indices.contiguous();
  const at::Tensor pointers = row_ptr.contiguous();
  bool tiled = true;
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "lowrank_optim_spmm", [&] {
    tiled = prepare_support<index_t>(op, indices, pointers, m, n, check_indices);
  });
  at::Tensor result = at::zeros({nnz}, grad.options());
  if (nnz == 0 || grad.size(0) == 0) return result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "lowrank_optim_sddmm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "lowrank_optim_spmm", [&] {
      if (!tiled) {
        sddmm_any_support(matrix<scalar_t>(grad), matrix<scalar_t>(input), indices.const_data_ptr<index_t>(), nnz, n,
                          result.mutable_data_ptr<scalar_t>());
        return;
      }
      // Accumulated in the opmath type, rounded once into the result.
      at::Tensor sums = std::is_same_v<acc_t, scalar_t> ? result : at::zeros({nnz}, grad.options().dtype(
                                                                                   c10::CppTypeToScalarType<acc_t>::value));
      Problem<scalar_t, index_t> p{matrix<scalar_t>(grad), matrix<scalar_t>(grad), matrix<scalar_t>(input),
                                   nullptr, indices.const_data_ptr<index_t>(), pointers.const_data_ptr<index_t>(),
                                   sums.mutable_data_ptr<acc_t>(), grad.size(0), m, n, 0, 1};
      run_tiled<Kind::kSddmm>(p);
      if (!sums.is_same(result)) result.copy_(sums);
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CPU, m) {
  m.impl("spmm_add_", &spmm_add_cpu);
  m.impl("spmm_t_add_", &spmm_t_add_cpu);
  m.impl("sddmm", &sddmm_cpu);
}

}  // namespace lowrank_optim
