// CPU kernel of lowrank_optim::fira_residual_ (schema and math: lowrank_optim/ops/fira.py). Two passes
// over the m x n residual instead of the reference's seven: pass 1 writes S = (G - subtract·B)·phi
// and sums its squares per block of rows; the limiter is computed from the ordered block sums (so the
// result does not depend on the thread count); pass 2 divides by it and applies `scale`. (A read-only
// pass 1 with S recomputed in pass 2 moves the same bytes; measured 15-20 % slower.)
//
// Rounding follows the reference op by op (csrc/README.md): G - subtract·B is ATen's add(alpha) (fma
// on a vectorized ATen, g + round(alpha·b) on a DEFAULT one; alpha rounded to the tensor's dtype), each
// product/quotient is rounded to the residual's dtype where the reference stores it, and phi to the
// moments' dtype. Sums of squares run in float lanes over runs of 256 elements and in double across
// runs: at least as accurate as ATen's norms, which may differ from them in the last bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace lowrank_optim {
namespace {

using cpu::narrow;
using cpu::round_to;
using cpu::widen;

// The reference's constants (lowrank_optim/projection/fira.py).
constexpr double kPhiEps = 1e-8;
constexpr double kLimiterEps = 1e-8;
// Elements per task of the row passes: large enough that scheduling is negligible, small enough that
// a block's output is still in cache when its squares are summed.
constexpr int64_t kBlockElements = 32768;

// Sums of squares over kLanes independent double partial sums: one running sum would be bound by the
// latency of each addition, and a strict (unreassociated) reduction never vectorizes. Lanes are combined
// in a fixed order, so results do not depend on the thread count or on which variant (plain, AVX2,
// AVX-512) runs: every variant performs the same operations per lane.
constexpr int kLanes = 8;
using Lanes = double[kLanes];

#if defined(__GNUC__) || defined(__clang__)
// The helpers below are always inlined, so the ABI note GCC gives for wide vector arguments is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC/clang vector types, because the auto-vectorizer leaves such lanes scalar. fp32/bf16 values are
// squared and summed in 16 float lanes over runs of at most kFloatRun elements (16 terms per lane:
// error ~16 ulp of float, far below what the limiter can resolve), and each run's lanes are added into
// the double lanes: no float-to-double conversion per element. One 16-lane vector is one AVX-512
// register, or two AVX2 / four SSE2 registers in the other variants; the same sums either way.
using Double4 = double __attribute__((vector_size(32)));
// 8-float halves, not one 16-float type: GCC keeps a 64-byte vector in memory when it has no 64-byte
// registers (the AVX2 variant), with a store and reload per iteration.
using Float8 = float __attribute__((vector_size(32)));
using Bits8 = uint32_t __attribute__((vector_size(32)));
using Half8 = uint16_t __attribute__((vector_size(16)));
constexpr int64_t kFloatLanes = 16;
constexpr int64_t kFloatRun = 256;

LOWRANK_OPTIM_ALWAYS_INLINE Float8 load8(const float* x) {
  Float8 v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}
LOWRANK_OPTIM_ALWAYS_INLINE Float8 load8(const c10::BFloat16* x) {
  Half8 v;
  std::memcpy(&v, x, sizeof(v));
  const Bits8 bits = __builtin_convertvector(v, Bits8) << 16;  // bf16 is the high half of a float
  Float8 f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename U>
LOWRANK_OPTIM_ALWAYS_INLINE void add_squares(const U* __restrict__ row, int64_t length, Lanes& lanes) {
  int64_t k = 0;
  if constexpr (std::is_same_v<U, double>) {
    Double4 low, high;
    std::memcpy(&low, lanes, sizeof(low));
    std::memcpy(&high, lanes + 4, sizeof(high));
    for (; k + kLanes <= length; k += kLanes) {
      Double4 a, b;
      std::memcpy(&a, row + k, sizeof(a));
      std::memcpy(&b, row + k + 4, sizeof(b));
      low += a * a;
      high += b * b;
    }
    std::memcpy(lanes, &low, sizeof(low));
    std::memcpy(lanes + 4, &high, sizeof(high));
  } else {
    while (k + kFloatLanes <= length) {
      const int64_t run_end = std::min(length, k + kFloatRun);
      Float8 low = {}, high = {};  // float lanes 0-7 and 8-15
      for (; k + kFloatLanes <= run_end; k += kFloatLanes) {
        const Float8 x = load8(row + k), y = load8(row + k + 8);
        low += x * x;
        high += y * y;
      }
      for (int lane = 0; lane < kLanes; ++lane) {
        lanes[lane] += static_cast<double>(low[lane]) + static_cast<double>(high[lane]);
      }
    }
  }
  for (; k < length; ++k) {
    const double x = widen(row[k]);
    lanes[0] += x * x;
  }
}
#else
template <typename U>
LOWRANK_OPTIM_ALWAYS_INLINE void add_squares(const U* __restrict__ row, int64_t length, Lanes& lanes) {
  int64_t k = 0;
  for (; k + kLanes <= length; k += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const double x = widen(row[k + lane]);
      lanes[lane] += x * x;
    }
  }
  for (; k < length; ++k) {
    const double x = widen(row[k]);
    lanes[0] += x * x;
  }
}
#endif

LOWRANK_OPTIM_ALWAYS_INLINE double combine(const Lanes& lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Σ x² per channel of a row-major rows x cols tensor, for rows [begin, end) (per_row: one sum per row) or
// for columns [begin, end) over all rows. Compiled plain and for AVX2 (below); a memory-bound read, so
// no AVX-512 variant.
template <typename U>
LOWRANK_OPTIM_ALWAYS_INLINE void channel_squares(const U* __restrict__ x, int64_t rows, int64_t cols, bool per_row,
                                                 int64_t begin, int64_t end, double* __restrict__ out) {
  if (per_row) {
    for (int64_t i = begin; i < end; ++i) {
      Lanes lanes = {};
      add_squares(x + i * cols, cols, lanes);
      out[i] = combine(lanes);
    }
    return;
  }
  for (int64_t k = 0; k < rows; ++k) {
    const U* row = x + k * cols;
    for (int64_t j = begin; j < end; ++j) {
      const double a = widen(row[j]);
      out[j] += a * a;
    }
  }
}

template <typename U>
void channel_squares_plain(const U* x, int64_t rows, int64_t cols, bool per_row, int64_t begin, int64_t end,
                           double* out) {
  channel_squares(x, rows, cols, per_row, begin, end, out);
}

template <typename U>
LOWRANK_OPTIM_FMA_TARGET void channel_squares_avx2(const U* x, int64_t rows, int64_t cols, bool per_row,
                                                   int64_t begin, int64_t end, double* out) {
  channel_squares(x, rows, cols, per_row, begin, end, out);
}

// phi per channel: ||N||₂ / (||R||₂ + 1e-8), each step rounded to the moments' dtype U as the reference's
// vector_norm / add_ / div_ store it. dim=1: channels are rows of the m x r tensors, dim=0: columns of r x n.
// compute(begin, end) fills phi[begin, end) (channels); for dim=1 the residual pass calls it per row block,
// just before those rows need it, so N and R are read interleaved with G and B instead of in a pass of
// their own; for dim=0 every row needs every column's phi, so it runs once, parallel, up front.
template <typename U, typename acc_t>
class FiraPhi {
 public:
  FiraPhi(const at::Tensor& normalized, const at::Tensor& lowrank, int64_t dim, bool simd)
      : n_(normalized.contiguous()),
        r_(lowrank.contiguous()),
        rows_(n_.size(0)),
        cols_(n_.size(1)),
        per_row_(dim == 1),
        simd_(simd),
        n_sq_(per_row_ ? rows_ : cols_, 0.0),
        r_sq_(per_row_ ? rows_ : cols_, 0.0),
        phi_(per_row_ ? rows_ : cols_) {}

  int64_t channels() const { return static_cast<int64_t>(phi_.size()); }
  const acc_t* data() const { return phi_.data(); }
  // ||R||² per channel, unrounded (double): the folded update's norm identity (fira_folded_cpu).
  const double* lowrank_squares() const { return r_sq_.data(); }

  // Channels [begin, end); tasks own whole channels (rows, or column ranges that walk every row).
  void compute(int64_t begin, int64_t end) {
    using u_acc = at::opmath_type<U>;
    const auto squares = simd_ ? channel_squares_avx2<U> : channel_squares_plain<U>;
    squares(n_.const_data_ptr<U>(), rows_, cols_, per_row_, begin, end, n_sq_.data());
    squares(r_.const_data_ptr<U>(), rows_, cols_, per_row_, begin, end, r_sq_.data());
    for (int64_t c = begin; c < end; ++c) {
      const U numerator = static_cast<U>(static_cast<u_acc>(std::sqrt(n_sq_[c])));
      const U norm_r = static_cast<U>(static_cast<u_acc>(std::sqrt(r_sq_[c])));
      const U denominator = static_cast<U>(static_cast<u_acc>(norm_r) + static_cast<u_acc>(kPhiEps));
      phi_[c] = static_cast<acc_t>(static_cast<U>(static_cast<u_acc>(numerator) / static_cast<u_acc>(denominator)));
    }
  }

 private:
  const at::Tensor n_, r_;
  const int64_t rows_, cols_;
  const bool per_row_, simd_;
  std::vector<double> n_sq_, r_sq_;
  std::vector<acc_t> phi_;
};

// S's element at (i, j): (g + alpha·b) rounded to T (ATen's add with alpha: fma where ATen fuses), times
// its channel's phi, rounded to T (kept in the opmath type).
template <bool Fused, typename T>
LOWRANK_OPTIM_ALWAYS_INLINE at::opmath_type<T> residual_value(T g, T b, at::opmath_type<T> alpha,
                                                              at::opmath_type<T> phi) {
  // ATen's DEFAULT build rounds alpha·b to T before adding (bf16; a no-op for fp32/fp64), as in adam.cpp.
  const at::opmath_type<T> d =
      round_to<T>(Fused ? std::fma(widen(b), alpha, widen(g)) : widen(g) + round_to<T>(widen(b) * alpha));
  return round_to<T>(d * phi);
}

// Pass 1 on rows [row_begin, row_end): b = S in place; returns Σ S². Each row goes in chunks whose
// squares are summed right after they are written (from L1), so the conversions and adds overlap the
// next chunk's loads (summing a whole row afterwards stalled them). Chunks start at fixed offsets of
// each row, so the sums do not depend on how rows are split among threads. PerRow: phi per row
// (dim=1), else per column.
constexpr int64_t kChunk = 256;

template <bool Fused, bool PerRow, typename T>
LOWRANK_OPTIM_ALWAYS_INLINE double residual_rows(const T* __restrict__ g, T* __restrict__ b, int64_t row_begin,
                                                 int64_t row_end, int64_t cols, at::opmath_type<T> alpha,
                                                 const at::opmath_type<T>* __restrict__ phi) {
  Lanes lanes = {};
  for (int64_t i = row_begin; i < row_end; ++i) {
    for (int64_t chunk = 0; chunk < cols; chunk += kChunk) {
      const int64_t length = std::min(kChunk, cols - chunk);
      const T* gc = g + i * cols + chunk;
      T* bc = b + i * cols + chunk;
      const at::opmath_type<T>* pc = PerRow ? phi + i : phi + chunk;
      for (int64_t j = 0; j < length; ++j) {
        bc[j] = narrow<T>(residual_value<Fused>(gc[j], bc[j], alpha, PerRow ? pc[0] : pc[j]));
      }
      add_squares(bc, length, lanes);
    }
  }
  return combine(lanes);
}

// Pass 2 on [begin, end): b = b / limiter (Divide) · scale (Multiply), each step rounded to T as the
// reference's div_ and mul_ store it (a division: a reciprocal multiply would round otherwise).
template <bool Divide, bool Multiply, typename T>
LOWRANK_OPTIM_ALWAYS_INLINE void rescale_range(T* __restrict__ b, int64_t begin, int64_t end,
                                               at::opmath_type<T> limiter, at::opmath_type<T> scale) {
  for (int64_t i = begin; i < end; ++i) {
    at::opmath_type<T> value = widen(b[i]);
    if constexpr (Divide) value = round_to<T>(value / limiter);
    if constexpr (Multiply) value = value * scale;
    b[i] = narrow<T>(value);
  }
}

// The two passes' range functions with their loop-invariant choices made outside the loops; compiled
// twice below: plain, and for AVX2+FMA (ATen's fused rounding; picked when ATen fuses).
template <bool Fused, typename T>
LOWRANK_OPTIM_ALWAYS_INLINE double residual_block(const T* g, T* b, int64_t row_begin, int64_t row_end, int64_t cols,
                                                  at::opmath_type<T> alpha, const at::opmath_type<T>* phi,
                                                  bool per_row) {
  return per_row ? residual_rows<Fused, true>(g, b, row_begin, row_end, cols, alpha, phi)
                 : residual_rows<Fused, false>(g, b, row_begin, row_end, cols, alpha, phi);
}

template <typename T>
LOWRANK_OPTIM_ALWAYS_INLINE void rescale_block(T* b, int64_t begin, int64_t end, at::opmath_type<T> limiter,
                                               bool divide, at::opmath_type<T> scale, bool multiply) {
  if (divide) {
    multiply ? rescale_range<true, true>(b, begin, end, limiter, scale)
             : rescale_range<true, false>(b, begin, end, limiter, scale);
  } else if (multiply) {
    rescale_range<false, true>(b, begin, end, limiter, scale);
  }
}

template <typename T>
double residual_block_plain(const T* g, T* b, int64_t row_begin, int64_t row_end, int64_t cols,
                            at::opmath_type<T> alpha, const at::opmath_type<T>* phi, bool per_row) {
  return residual_block<false>(g, b, row_begin, row_end, cols, alpha, phi, per_row);
}

template <typename T>
LOWRANK_OPTIM_FMA_TARGET double residual_block_fused(const T* g, T* b, int64_t row_begin, int64_t row_end,
                                                     int64_t cols, at::opmath_type<T> alpha,
                                                     const at::opmath_type<T>* phi, bool per_row) {
  return residual_block<true>(g, b, row_begin, row_end, cols, alpha, phi, per_row);
}

#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
template <typename T>
LOWRANK_OPTIM_AVX512_TARGET double residual_block_fused512(const T* g, T* b, int64_t row_begin, int64_t row_end,
                                                           int64_t cols, at::opmath_type<T> alpha,
                                                           const at::opmath_type<T>* phi, bool per_row) {
  return residual_block<true>(g, b, row_begin, row_end, cols, alpha, phi, per_row);
}

template <typename T>
LOWRANK_OPTIM_AVX512_TARGET void rescale_block_avx512(T* b, int64_t begin, int64_t end, at::opmath_type<T> limiter,
                                                      bool divide, at::opmath_type<T> scale, bool multiply) {
  rescale_block(b, begin, end, limiter, divide, scale, multiply);
}
#endif

template <typename T>
void rescale_block_plain(T* b, int64_t begin, int64_t end, at::opmath_type<T> limiter, bool divide,
                         at::opmath_type<T> scale, bool multiply) {
  rescale_block(b, begin, end, limiter, divide, scale, multiply);
}

// No multiply-adds here: AVX2 only widens the divisions, the slowest part of this pass 4 wide.
template <typename T>
LOWRANK_OPTIM_FMA_TARGET void rescale_block_avx2(T* b, int64_t begin, int64_t end, at::opmath_type<T> limiter,
                                                 bool divide, at::opmath_type<T> scale, bool multiply) {
  rescale_block(b, begin, end, limiter, divide, scale, multiply);
}

// The limiter on the state `residual_norm` (dtype P) in the norm's dtype ND = promote(T, P), op for op as
// limit_norm_growth_ (history rules included: no history yet, prev == 0 (or NaN), stores unlimited; a zero
// residual keeps prev): returns the divisor (1: nothing to divide).
template <typename ND, typename P>
ND update_limiter(double sum_of_squares, P* previous, double gamma, bool first) {
  const ND norm = static_cast<ND>(std::sqrt(sum_of_squares));
  if (first) {
    *previous = static_cast<P>(norm);
    return ND(1);
  }
  const P denominator = static_cast<P>(*previous + static_cast<P>(kLimiterEps));
  const ND ratio = norm / static_cast<ND>(denominator);
  ND limiter = std::max(ratio, static_cast<ND>(gamma)) / static_cast<ND>(gamma);
  if (!(*previous > P(0))) limiter = ND(1);
  if (!(norm == ND(0))) *previous = static_cast<P>(norm / limiter);
  return limiter;
}

void fira_residual_cpu(const at::Tensor& grad, at::Tensor back, const at::Tensor& normalized,
                       const at::Tensor& lowrank, at::Tensor residual_norm, int64_t dim, double subtract,
                       double gamma, bool first, double scale, const std::optional<at::Tensor>& skip) {
  const char* op = "fira_residual_";
  TORCH_CHECK(grad.dim() == 2, op, ": grad.shape=", grad.sizes(), "; must be 2-D");
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim=", dim, "; allowed: 0, 1");
  TORCH_CHECK(back.sizes() == grad.sizes() && back.scalar_type() == grad.scalar_type(), op,
              ": back must match grad's shape ", grad.sizes(), " and dtype ", grad.scalar_type());
  TORCH_CHECK(lowrank.dim() == 2 && lowrank.size(1 - dim) == grad.size(1 - dim), op, ": lowrank.shape=",
              lowrank.sizes(), " with dim=", dim, " must have size ", grad.size(1 - dim), " in dimension ", 1 - dim);
  TORCH_CHECK(normalized.sizes() == lowrank.sizes() && normalized.scalar_type() == lowrank.scalar_type(), op,
              ": normalized must match lowrank's shape ", lowrank.sizes(), " and dtype ", lowrank.scalar_type());
  TORCH_CHECK(lowrank.scalar_type() == grad.scalar_type() || lowrank.scalar_type() == at::kFloat, op,
              ": lowrank.dtype=", lowrank.scalar_type(), "; allowed: grad.dtype or float32");
  TORCH_CHECK(residual_norm.dim() == 0 &&
                  (residual_norm.scalar_type() == at::kFloat || residual_norm.scalar_type() == at::kDouble),
              op, ": residual_norm must be a 0-dim float32 or float64 tensor");
  // A skipped update: no residual, and the limiter's state stays as it was.
  if (cpu::skipped(op, skip, grad.device())) {
    back.zero_();
    return;
  }
  const int64_t rows = grad.size(0);
  const int64_t cols = grad.size(1);
  const at::Tensor g = grad.contiguous();
  at::Tensor b = back.is_contiguous() ? back : back.contiguous();
  // The variant matching ATen's capability (cpu::kernel_variant): the same rounding as the reference.
  const cpu::Variant variant = cpu::kernel_variant();
  const bool simd = variant != cpu::Variant::kPlain;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "fira_residual_", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    // add()'s alpha reaches ATen's kernel rounded to the tensor's dtype (visible for bf16 only).
    const acc_t alpha = static_cast<acc_t>(static_cast<T>(-subtract));
    const T* g_ptr = g.const_data_ptr<T>();
    T* b_ptr = b.data_ptr<T>();
    const int64_t rows_per_block = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(cols, 1));
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    const bool per_row = dim == 1;
    auto residual_pass = simd ? residual_block_fused<T> : residual_block_plain<T>;
    auto rescale_pass = simd ? rescale_block_avx2<T> : rescale_block_plain<T>;
#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
    if (variant == cpu::Variant::kFused512) {
      residual_pass = residual_block_fused512<T>;
      rescale_pass = rescale_block_avx512<T>;
    }
#endif
    std::vector<double> partial(blocks, 0.0);
    const auto first_pass = [&](auto& phi) {
      if (!per_row) at::parallel_for(0, phi.channels(), 1024, [&](int64_t begin, int64_t end) { phi.compute(begin, end); });
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t block = begin; block < end; ++block) {
          const int64_t row_begin = block * rows_per_block;
          const int64_t row_end = std::min(rows, row_begin + rows_per_block);
          if (per_row) phi.compute(row_begin, row_end);
          partial[block] = residual_pass(g_ptr, b_ptr, row_begin, row_end, cols, alpha, phi.data(), per_row);
        }
      });
    };
    if (lowrank.scalar_type() == grad.scalar_type()) {
      FiraPhi<T, acc_t> phi(normalized, lowrank, dim, simd);
      first_pass(phi);
    } else {
      FiraPhi<float, acc_t> phi(normalized, lowrank, dim, simd);
      first_pass(phi);
    }
    double sum_of_squares = 0.0;  // in block order: the same for any thread count
    for (const double value : partial) sum_of_squares += value;
    acc_t limiter;
    const bool wide = grad.scalar_type() == at::kDouble || residual_norm.scalar_type() == at::kDouble;
    if (residual_norm.scalar_type() == at::kDouble) {
      limiter = static_cast<acc_t>(update_limiter<double>(sum_of_squares, residual_norm.data_ptr<double>(), gamma, first));
    } else if (wide) {
      limiter = static_cast<acc_t>(update_limiter<double>(sum_of_squares, residual_norm.data_ptr<float>(), gamma, first));
    } else {
      limiter = static_cast<acc_t>(update_limiter<float>(sum_of_squares, residual_norm.data_ptr<float>(), gamma, first));
    }
    // The reference divides only after its first step (it returns early there), then multiplies by scale.
    // An inactive limiter is exactly 1 (max(ratio, gamma) / gamma = gamma / gamma), and x / 1 == x, so
    // then the division, and when scale is 1 the whole second pass, changes nothing and is skipped.
    const bool divide = !first && limiter != acc_t(1);
    const bool multiply = scale != 1.0;
    if (divide || multiply) {
      at::parallel_for(0, b.numel(), kBlockElements, [&](int64_t begin, int64_t end) {
        rescale_pass(b_ptr, begin, end, limiter, divide, static_cast<acc_t>(scale), multiply);
      });
    }
  });
  if (!b.is_same(back)) back.copy_(b);
}

// Fira's folded update (lowrank_optim/ops/fira.py, fira_folded_; the math in projection/fira.py,
// fira_folded_update_): W -= step·(A B + c∘G) with ||S|| from channel norms, no m x n residual. Why a
// kernel: the default's ~20 small ops per matrix cost more in dispatch than their arithmetic (about
// 0.2 ms per matrix from Python, a third of Fira's step on the LLaMA-60M shapes), and its skip flag costs
// a temporary and a where over W; here the flag is read directly and the small terms are loops.
//
// Passes over m x n data: G's channel sums of squares (one read), then the default's addmm_ and addcmul_
// on W. phi has the explicit kernel's rounding (FiraPhi); the norms are summed in double, so ||S||, the
// limiter and W agree with the default kernel to a few ulps, not bit for bit (tests/test_kernels.py).
void fira_folded_cpu(at::Tensor param, const at::Tensor& grad, const at::Tensor& lowrank,
                     const at::Tensor& normalized, const at::Tensor& basis, at::Tensor residual_norm, int64_t dim,
                     double subtract, double scale, double residual_scale, double gamma, bool first,
                     double step_size, const std::optional<at::Tensor>& skip) {
  const char* op = "fira_folded_";
  TORCH_CHECK(param.dim() == 2 && grad.sizes() == param.sizes() && grad.scalar_type() == param.scalar_type(), op,
              ": grad must match param's shape ", param.sizes(), " and dtype ", param.scalar_type());
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim=", dim, "; allowed: 0, 1");
  TORCH_CHECK(lowrank.dim() == 2 && lowrank.size(1 - dim) == grad.size(1 - dim), op, ": lowrank.shape=",
              lowrank.sizes(), " with dim=", dim, " must have size ", grad.size(1 - dim), " in dimension ", 1 - dim);
  TORCH_CHECK(normalized.sizes() == lowrank.sizes() && normalized.scalar_type() == lowrank.scalar_type(), op,
              ": normalized must match lowrank's shape ", lowrank.sizes(), " and dtype ", lowrank.scalar_type());
  TORCH_CHECK(residual_norm.dim() == 0 &&
                  (residual_norm.scalar_type() == at::kFloat || residual_norm.scalar_type() == at::kDouble),
              op, ": residual_norm must be a 0-dim float32 or float64 tensor");
  // A skipped update: W and the limiter's state keep their bits.
  if (cpu::skipped(op, skip, param.device())) return;
  const bool per_row = dim == 1;  // right side: channels are the rows of W; left side: its columns
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const int64_t channels = per_row ? rows : cols;
  const at::Tensor g = grad.contiguous();
  const cpu::Variant variant = cpu::kernel_variant();
  const bool simd = variant != cpu::Variant::kPlain;
  const double overlap = 2.0 * subtract - subtract * subtract;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fira_folded_", [&] {
    using T = scalar_t;
    std::vector<double> g_sq(channels, 0.0), phi(channels);
    const auto squares = simd ? channel_squares_avx2<T> : channel_squares_plain<T>;
    const auto norms = [&](auto& phi_of) {
      at::parallel_for(0, channels, per_row ? 64 : 1024, [&](int64_t begin, int64_t end) {
        phi_of.compute(begin, end);
        squares(g.const_data_ptr<T>(), rows, cols, per_row, begin, end, g_sq.data());
      });
      const double* r_sq = phi_of.lowrank_squares();
      double sum_of_squares = 0.0;  // in channel order: the same for any thread count
      for (int64_t k = 0; k < channels; ++k) {
        phi[k] = phi_of.data()[k];
        // ||G_k - s·back(R)_k||² = ||G_k||² - (2s - s²)·||R_k||² for an orthonormal basis; clamped at 0
        // against the cancellation when G_k lies almost in the subspace (projection/fira.py).
        sum_of_squares += std::max(g_sq[k] - overlap * r_sq[k], 0.0) * phi[k] * phi[k];
      }
      return sum_of_squares;
    };
    double sum_of_squares;
    if (lowrank.scalar_type() == param.scalar_type()) {
      FiraPhi<T, double> phi_of(normalized, lowrank, dim, simd);
      sum_of_squares = norms(phi_of);
    } else {
      TORCH_CHECK(lowrank.scalar_type() == at::kFloat, op, ": lowrank.dtype=", lowrank.scalar_type(),
                  "; allowed: param.dtype or float32");
      FiraPhi<float, double> phi_of(normalized, lowrank, dim, simd);
      sum_of_squares = norms(phi_of);
    }
    const double limiter = residual_norm.scalar_type() == at::kDouble
                               ? update_limiter<double>(sum_of_squares, residual_norm.data_ptr<double>(), gamma, first)
                               : update_limiter<double>(sum_of_squares, residual_norm.data_ptr<float>(), gamma, first);
    // c = residual_scale · phi / lim per channel; the r-sized term scale·N - subtract·c∘R; both in T.
    at::Tensor coefficient = at::empty(per_row ? at::IntArrayRef{rows, 1} : at::IntArrayRef{1, cols}, param.options());
    T* c_ptr = coefficient.data_ptr<T>();
    for (int64_t k = 0; k < channels; ++k) c_ptr[k] = static_cast<T>(residual_scale * phi[k] / limiter);
    const at::Tensor n_t = normalized.to(param.scalar_type()).contiguous();
    const at::Tensor r_t = lowrank.to(param.scalar_type()).contiguous();
    at::Tensor combined = at::empty(lowrank.sizes(), param.options());
    const T* n_ptr = n_t.const_data_ptr<T>();
    const T* r_ptr = r_t.const_data_ptr<T>();
    T* m_ptr = combined.data_ptr<T>();
    const int64_t low_rows = lowrank.size(0), low_cols = lowrank.size(1);
    const T t_scale = static_cast<T>(scale), t_subtract = static_cast<T>(subtract);
    at::parallel_for(0, low_rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(low_cols, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < low_cols; ++j) {
          const T c = c_ptr[per_row ? i : j];
          m_ptr[i * low_cols + j] = t_scale * n_ptr[i * low_cols + j] - t_subtract * (c * r_ptr[i * low_cols + j]);
        }
      }
    });
    const at::Tensor b = basis.to(param.scalar_type());
    if (per_row) {
      param.addmm_(combined, b, /*beta=*/1, /*alpha=*/-step_size);
    } else {
      param.addmm_(b, combined, /*beta=*/1, /*alpha=*/-step_size);
    }
    param.addcmul_(grad, coefficient, -step_size);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CPU, m) {
  m.impl("fira_residual_", &fira_residual_cpu);
  m.impl("fira_folded_", &fira_folded_cpu);
}

}  // namespace lowrank_optim
