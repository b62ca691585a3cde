// CPU kernel of lowrank_optim::fira_residual_ (schema and math: lowrank_optim/ops/fira.py). Two passes
// over the m x n residual instead of the reference's seven: pass 1 writes S = (G - subtract·B)·phi
// and sums its squares per block of rows; the limiter is computed from the ordered block sums (so the
// result does not depend on the thread count); pass 2 divides by it and applies `scale`.
//
// Rounding follows the reference op by op (csrc/README.md): G - subtract·B is ATen's vectorized
// add(alpha) (fma, alpha rounded to the tensor's dtype), each product/quotient is rounded to the
// residual's dtype where the reference stores it, and phi to the moments' dtype. Norms accumulate in
// double, so they are at least as accurate as ATen's (which may differ in the last bits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace lowrank_optim {
namespace {

using cpu::narrow;
using cpu::widen;

// The reference's constants (lowrank_optim/projection/fira.py).
constexpr double kPhiEps = 1e-8;
constexpr double kLimiterEps = 1e-8;
// Elements per task of the row passes: large enough that scheduling is negligible, small enough that
// a block's output is still in cache when its squares are summed.
constexpr int64_t kBlockElements = 32768;

// phi per channel: ||N||₂ / (||R||₂ + 1e-8), each step rounded to the moments' dtype U as the reference's
// vector_norm / add_ / div_ store it. dim=1: channels are rows of the m x r tensors, dim=0: columns of r x n.
template <typename U, typename acc_t>
std::vector<acc_t> fira_phi(const at::Tensor& normalized, const at::Tensor& lowrank, int64_t dim) {
  using u_acc = at::opmath_type<U>;
  const at::Tensor n_c = normalized.contiguous();
  const at::Tensor r_c = lowrank.contiguous();
  const U* n_ptr = n_c.const_data_ptr<U>();
  const U* r_ptr = r_c.const_data_ptr<U>();
  const int64_t rows = n_c.size(0);
  const int64_t cols = n_c.size(1);
  const int64_t channels = dim == 1 ? rows : cols;
  std::vector<double> n_sq(channels, 0.0), r_sq(channels, 0.0);
  if (dim == 1) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kBlockElements / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t i = begin; i < end; ++i) {
                         double sn = 0.0, sr = 0.0;
                         for (int64_t k = 0; k < cols; ++k) {
                           const double a = widen(n_ptr[i * cols + k]);
                           const double b = widen(r_ptr[i * cols + k]);
                           sn += a * a;
                           sr += b * b;
                         }
                         n_sq[i] = sn;
                         r_sq[i] = sr;
                       }
                     });
  } else {
    // Column sums of a row-major r x n tensor: each task owns a range of columns and walks the rows.
    at::parallel_for(0, cols, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t k = 0; k < rows; ++k) {
        for (int64_t j = begin; j < end; ++j) {
          const double a = widen(n_ptr[k * cols + j]);
          const double b = widen(r_ptr[k * cols + j]);
          n_sq[j] += a * a;
          r_sq[j] += b * b;
        }
      }
    });
  }
  std::vector<acc_t> phi(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const U numerator = static_cast<U>(static_cast<u_acc>(std::sqrt(n_sq[c])));
    const U norm_r = static_cast<U>(static_cast<u_acc>(std::sqrt(r_sq[c])));
    const U denominator = static_cast<U>(static_cast<u_acc>(norm_r) + static_cast<u_acc>(kPhiEps));
    phi[c] = static_cast<acc_t>(static_cast<U>(static_cast<u_acc>(numerator) / static_cast<u_acc>(denominator)));
  }
  return phi;
}

// Pass 1 on rows [row_begin, row_end): b = (g + alpha·b)·phi in place; returns Σ b² of the new values.
template <bool Fused, typename T>
inline double residual_rows(const T* __restrict__ g, T* __restrict__ b, int64_t row_begin, int64_t row_end,
                            int64_t cols, at::opmath_type<T> alpha, const at::opmath_type<T>* __restrict__ phi,
                            bool per_row) {
  using acc_t = at::opmath_type<T>;
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: the reduction pipelines
  for (int64_t i = row_begin; i < row_end; ++i) {
    const T* gi = g + i * cols;
    T* bi = b + i * cols;
    if (per_row) {
      const acc_t p = phi[i];
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t d = widen(narrow<T>(Fused ? std::fma(widen(bi[j]), alpha, widen(gi[j]))
                                              : widen(gi[j]) + widen(bi[j]) * alpha));
        bi[j] = narrow<T>(d * p);
      }
    } else {
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t d = widen(narrow<T>(Fused ? std::fma(widen(bi[j]), alpha, widen(gi[j]))
                                              : widen(gi[j]) + widen(bi[j]) * alpha));
        bi[j] = narrow<T>(d * phi[j]);
      }
    }
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      for (int k = 0; k < 8; ++k) {
        const double s = widen(bi[j + k]);
        lanes[k] += s * s;
      }
    }
    for (; j < cols; ++j) {
      const double s = widen(bi[j]);
      lanes[0] += s * s;
    }
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename T>
double residual_rows_plain(const T* g, T* b, int64_t row_begin, int64_t row_end, int64_t cols,
                           at::opmath_type<T> alpha, const at::opmath_type<T>* phi, bool per_row) {
  return residual_rows<false>(g, b, row_begin, row_end, cols, alpha, phi, per_row);
}

template <typename T>
LOWRANK_OPTIM_FMA_TARGET double residual_rows_fused(const T* g, T* b, int64_t row_begin, int64_t row_end,
                                                    int64_t cols, at::opmath_type<T> alpha,
                                                    const at::opmath_type<T>* phi, bool per_row) {
  return residual_rows<true>(g, b, row_begin, row_end, cols, alpha, phi, per_row);
}

// Pass 2: b = b / limiter (skipped on the first step, as the reference returns early), then b·scale.
template <typename T>
void rescale(T* __restrict__ b, int64_t numel, at::opmath_type<T> limiter, bool divide, at::opmath_type<T> scale,
             bool multiply) {
  at::parallel_for(0, numel, kBlockElements, [&](int64_t begin, int64_t end) {
    if (divide) {
      for (int64_t i = begin; i < end; ++i) b[i] = narrow<T>(widen(b[i]) / limiter);
    }
    if (multiply) {
      for (int64_t i = begin; i < end; ++i) b[i] = narrow<T>(widen(b[i]) * scale);
    }
  });
}

// The limiter on the state `residual_norm` (dtype P) in the norm's dtype ND = promote(T, P), op for op as
// limit_norm_growth_: returns 1/limiter's divisor and whether to divide at all.
template <typename ND, typename P>
ND update_limiter(double sum_of_squares, P* previous, double gamma, bool first) {
  const ND norm = static_cast<ND>(std::sqrt(sum_of_squares));
  if (first) {
    *previous = static_cast<P>(norm);
    return ND(1);
  }
  const P denominator = static_cast<P>(*previous + static_cast<P>(kLimiterEps));
  const ND ratio = norm / static_cast<ND>(denominator);
  const ND limiter = std::max(ratio, static_cast<ND>(gamma)) / static_cast<ND>(gamma);
  *previous = static_cast<P>(norm / limiter);
  return limiter;
}

void fira_residual_cpu(const at::Tensor& grad, at::Tensor back, const at::Tensor& normalized,
                       const at::Tensor& lowrank, at::Tensor residual_norm, int64_t dim, double subtract,
                       double gamma, bool first, double scale) {
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
  const int64_t rows = grad.size(0);
  const int64_t cols = grad.size(1);
  const at::Tensor g = grad.contiguous();
  at::Tensor b = back.is_contiguous() ? back : back.contiguous();
  const bool fused = cpu::aten_fuses_multiply_add();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "fira_residual_", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const std::vector<acc_t> phi = lowrank.scalar_type() == grad.scalar_type()
                                       ? fira_phi<T, acc_t>(normalized, lowrank, dim)
                                       : fira_phi<float, acc_t>(normalized, lowrank, dim);
    // add()'s alpha reaches ATen's kernel rounded to the tensor's dtype (visible for bf16 only).
    const acc_t alpha = static_cast<acc_t>(static_cast<T>(-subtract));
    const T* g_ptr = g.const_data_ptr<T>();
    T* b_ptr = b.data_ptr<T>();
    const int64_t rows_per_block = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(cols, 1));
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    std::vector<double> partial(blocks, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t row_begin = block * rows_per_block;
        const int64_t row_end = std::min(rows, row_begin + rows_per_block);
        partial[block] = fused ? residual_rows_fused(g_ptr, b_ptr, row_begin, row_end, cols, alpha, phi.data(), dim == 1)
                               : residual_rows_plain(g_ptr, b_ptr, row_begin, row_end, cols, alpha, phi.data(), dim == 1);
      }
    });
    double sum_of_squares = 0.0;
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
    if (!first || scale != 1.0) rescale(b_ptr, b.numel(), limiter, !first, static_cast<acc_t>(scale), scale != 1.0);
  });
  if (!b.is_same(back)) back.copy_(b);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CPU, m) { m.impl("fira_residual_", &fira_residual_cpu); }

}  // namespace lowrank_optim
