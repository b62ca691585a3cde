// CPU kernel of lowrank_optim::lowrank_adam_ (schema: lowrank_optim/ops/adam.py): one pass over
// R, M, V, N instead of the six the reference's separate ops make.
//
// Parity with the reference: every value the reference stores is rounded here at the same point, in
// the same dtype, and multiply-adds are fused exactly where ATen's vectorized kernels fuse them
// (`add_(R, alpha=a)` as fma(R, a, M), `addcmul_(R, R, value=s)` as fma(s*R, R, V); its DEFAULT build
// rounds the product first). See csrc/README.md, "Rounding rules".
//
// Vectorization: the arithmetic runs on opmath-typed arrays with the intermediate roundings done by
// cpu::round_to (32-bit lanes for bf16), so the loop has no 16-bit values in it. Reduced-precision
// tensors are widened into small stack buffers, updated there, and narrowed back (each of those three
// loops vectorizes on its own, where one loop mixing 16- and 32-bit values stays scalar).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"

namespace lowrank_optim {
namespace {

using cpu::narrow;
using cpu::round_to;
using cpu::widen;

constexpr int64_t kGrain = 32768;
// Elements per stack buffer of the reduced-precision path: 4 float buffers of 2 KiB stay in L1 (512
// measured faster than 1024 with the AVX-512 variant).
constexpr int64_t kBufferElements = 512;

template <typename scalar_t>
struct AdamCoefficients {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// The update on opmath arrays; `scalar_t` says where to round, `Fused` whether the two multiply-adds
// are fused. Each line rounds what one reference op stores: M·b1, then + (1-b1)·R, and so on.
template <bool Fused, typename scalar_t>
LOWRANK_OPTIM_ALWAYS_INLINE void adam_arrays(const at::opmath_type<scalar_t>* __restrict__ r, at::opmath_type<scalar_t>* __restrict__ m,
                        at::opmath_type<scalar_t>* __restrict__ v, at::opmath_type<scalar_t>* __restrict__ n,
                        int64_t count, const AdamCoefficients<scalar_t>& c) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < count; ++i) {
    const acc_t ri = r[i];
    const acc_t m_decayed = round_to<scalar_t>(m[i] * c.beta1);
    const acc_t v_decayed = round_to<scalar_t>(v[i] * c.beta2);
    const acc_t weighted_r = c.one_minus_beta2 * ri;
    // ATen's DEFAULT build computes add(alpha) on bf16/fp16 vectors as a + round(alpha·b): the product is
    // rounded to the tensor's dtype first (a no-op for fp32/fp64).
    const acc_t mi = round_to<scalar_t>(Fused ? std::fma(ri, c.one_minus_beta1, m_decayed)
                                              : m_decayed + round_to<scalar_t>(ri * c.one_minus_beta1));
    const acc_t vi = round_to<scalar_t>(Fused ? std::fma(weighted_r, ri, v_decayed) : v_decayed + weighted_r * ri);
    m[i] = mi;
    v[i] = vi;
    const acc_t denominator = round_to<scalar_t>(round_to<scalar_t>(std::sqrt(vi)) + c.eps);
    n[i] = round_to<scalar_t>(mi / denominator);
  }
}

template <bool Fused, typename scalar_t>
LOWRANK_OPTIM_ALWAYS_INLINE void adam_range(const scalar_t* lowrank, scalar_t* exp_avg, scalar_t* exp_avg_sq, scalar_t* normalized,
                       int64_t begin, int64_t end, const AdamCoefficients<scalar_t>& c) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    adam_arrays<Fused, scalar_t>(lowrank + begin, exp_avg + begin, exp_avg_sq + begin, normalized + begin,
                                 end - begin, c);
  } else {
    acc_t r[kBufferElements], m[kBufferElements], v[kBufferElements], n[kBufferElements];
    for (int64_t start = begin; start < end; start += kBufferElements) {
      const int64_t count = std::min(kBufferElements, end - start);
      for (int64_t i = 0; i < count; ++i) r[i] = widen(lowrank[start + i]);
      for (int64_t i = 0; i < count; ++i) m[i] = widen(exp_avg[start + i]);
      for (int64_t i = 0; i < count; ++i) v[i] = widen(exp_avg_sq[start + i]);
      adam_arrays<Fused, scalar_t>(r, m, v, n, count, c);
      // The values are already rounded to scalar_t: narrowing them is exact.
      for (int64_t i = 0; i < count; ++i) exp_avg[start + i] = narrow<scalar_t>(m[i]);
      for (int64_t i = 0; i < count; ++i) exp_avg_sq[start + i] = narrow<scalar_t>(v[i]);
      for (int64_t i = 0; i < count; ++i) normalized[start + i] = narrow<scalar_t>(n[i]);
    }
  }
}

template <typename scalar_t>
void adam_range_plain(const scalar_t* lowrank, scalar_t* exp_avg, scalar_t* exp_avg_sq, scalar_t* normalized,
                      int64_t begin, int64_t end, const AdamCoefficients<scalar_t>& c) {
  adam_range<false>(lowrank, exp_avg, exp_avg_sq, normalized, begin, end, c);
}

// Compiled for AVX2+FMA on x86 so that std::fma is one instruction and the loops vectorize 8-wide.
template <typename scalar_t>
LOWRANK_OPTIM_FMA_TARGET void adam_range_fused(const scalar_t* lowrank, scalar_t* exp_avg, scalar_t* exp_avg_sq,
                                               scalar_t* normalized, int64_t begin, int64_t end,
                                               const AdamCoefficients<scalar_t>& c) {
  adam_range<true>(lowrank, exp_avg, exp_avg_sq, normalized, begin, end, c);
}

#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
// The same fused update compiled for AVX-512 (16 lanes): halves the loads, stores and conversions per
// element of the bf16/fp16 path. Identical arithmetic (fma is fma), so identical results.
template <typename scalar_t>
LOWRANK_OPTIM_AVX512_TARGET void adam_range_fused512(const scalar_t* lowrank, scalar_t* exp_avg, scalar_t* exp_avg_sq,
                                                     scalar_t* normalized, int64_t begin, int64_t end,
                                                     const AdamCoefficients<scalar_t>& c) {
  adam_range<true>(lowrank, exp_avg, exp_avg_sq, normalized, begin, end, c);
}
#endif

void lowrank_adam_cpu(const at::Tensor& lowrank, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor normalized,
                      double beta1, double beta2, double eps, const std::optional<at::Tensor>& skip) {
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &normalized}) {
    TORCH_CHECK(t->sizes() == lowrank.sizes(), "lowrank_adam_: shape ", t->sizes(), " must equal lowrank.shape=",
                lowrank.sizes());
    TORCH_CHECK(t->scalar_type() == lowrank.scalar_type(), "lowrank_adam_: dtype ", t->scalar_type(),
                " must equal lowrank.dtype=", lowrank.scalar_type());
  }
  // A skipped update (the optimizer found a NaN/Inf): the moments keep their values and N is zero. On
  // the CPU reading the flag costs nothing; the CUDA kernel reads it on the device.
  if (cpu::skipped("lowrank_adam_", skip, lowrank.device())) {
    normalized.zero_();
    return;
  }
  const int64_t numel = lowrank.numel();
  if (numel == 0) return;
  // Outputs that are not contiguous are computed in contiguous buffers and copied back.
  const at::Tensor r = lowrank.contiguous();
  at::Tensor m = exp_avg.contiguous();
  at::Tensor v = exp_avg_sq.contiguous();
  at::Tensor n = normalized.is_contiguous() ? normalized : at::empty_like(normalized, at::MemoryFormat::Contiguous);
  const cpu::Variant variant = cpu::kernel_variant();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lowrank.scalar_type(), "lowrank_adam_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The reference's scalars reach its kernels in the opmath type, with 1 - beta formed in double
    // first; add_'s alpha is rounded to the tensor's dtype on the way (visible for bf16 only).
    const AdamCoefficients<scalar_t> c{static_cast<acc_t>(beta1),
                                       static_cast<acc_t>(static_cast<scalar_t>(1.0 - beta1)),
                                       static_cast<acc_t>(beta2), static_cast<acc_t>(1.0 - beta2),
                                       static_cast<acc_t>(eps)};
    const scalar_t* r_ptr = r.const_data_ptr<scalar_t>();
    scalar_t* m_ptr = m.data_ptr<scalar_t>();
    scalar_t* v_ptr = v.data_ptr<scalar_t>();
    scalar_t* n_ptr = n.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
#ifdef LOWRANK_OPTIM_HAVE_AVX512_VARIANT
      if (variant == cpu::Variant::kFused512) {
        adam_range_fused512(r_ptr, m_ptr, v_ptr, n_ptr, begin, end, c);
        return;
      }
#endif
      if (variant != cpu::Variant::kPlain) {
        adam_range_fused(r_ptr, m_ptr, v_ptr, n_ptr, begin, end, c);
      } else {
        adam_range_plain(r_ptr, m_ptr, v_ptr, n_ptr, begin, end, c);
      }
    });
  });
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
  if (!n.is_same(normalized)) normalized.copy_(n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CPU, m) { m.impl("lowrank_adam_", &lowrank_adam_cpu); }

}  // namespace lowrank_optim
