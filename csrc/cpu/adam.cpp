// CPU kernel of lowrank_optim::lowrank_adam_ (schema: lowrank_optim/ops/adam.py): one pass over
// R, M, V, N instead of the six the reference's separate ops make.
//
// Bitwise parity with the reference: every value the reference stores is rounded here at the same
// point, in the same dtype, and multiply-adds are fused exactly where ATen's vectorized kernels fuse
// them. ATen's AVX2/AVX512 kernels compute `add_(R, alpha=a)` as fma(R, a, M) and
// `addcmul_(R, R, value=s)` as fma(s*R, R, V); its DEFAULT (no-FMA) build rounds the product first.
// So the fused variant is compiled for AVX2+FMA and chosen when ATen runs its AVX2/AVX512 kernels,
// and the whole file is built with -ffp-contract=off so that the compiler never fuses on its own.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lowrank_optim {
namespace {

constexpr int64_t kGrain = 32768;

template <typename scalar_t>
struct AdamCoefficients {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// Loads and stores in the opmath type. bf16 is converted with integer arithmetic (the same
// round-to-nearest-even, NaN-preserving rule as c10::BFloat16) because that vectorizes, while
// c10's branchy conversion keeps the loop scalar.
template <typename scalar_t>
inline at::opmath_type<scalar_t> widen(scalar_t x) {
  return static_cast<at::opmath_type<scalar_t>>(x);
}
template <typename scalar_t>
inline scalar_t narrow(at::opmath_type<scalar_t> x) {
  return static_cast<scalar_t>(x);
}
template <>
inline float widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}
template <>
inline c10::BFloat16 narrow(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// One element; `Fused` selects fma vs. rounded product + sum for the two multiply-adds.
template <bool Fused, typename scalar_t>
inline void adam_element(const scalar_t* __restrict__ lowrank, scalar_t* __restrict__ exp_avg,
                         scalar_t* __restrict__ exp_avg_sq, scalar_t* __restrict__ normalized, int64_t i,
                         const AdamCoefficients<scalar_t>& c) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t r = widen(lowrank[i]);
  // Each line stores what one reference op stores: M·b1, then + (1-b1)·R, and so on.
  const acc_t m_decayed = widen(narrow<scalar_t>(widen(exp_avg[i]) * c.beta1));
  const acc_t v_decayed = widen(narrow<scalar_t>(widen(exp_avg_sq[i]) * c.beta2));
  const acc_t weighted_r = c.one_minus_beta2 * r;
  const scalar_t m = narrow<scalar_t>(Fused ? std::fma(r, c.one_minus_beta1, m_decayed)
                                            : m_decayed + r * c.one_minus_beta1);
  const scalar_t v = narrow<scalar_t>(Fused ? std::fma(weighted_r, r, v_decayed) : v_decayed + weighted_r * r);
  exp_avg[i] = m;
  exp_avg_sq[i] = v;
  const scalar_t root = narrow<scalar_t>(std::sqrt(widen(v)));
  const scalar_t denominator = narrow<scalar_t>(widen(root) + c.eps);
  normalized[i] = narrow<scalar_t>(widen(m) / widen(denominator));
}

template <typename scalar_t>
void adam_range_plain(const scalar_t* lowrank, scalar_t* exp_avg, scalar_t* exp_avg_sq, scalar_t* normalized,
                      int64_t begin, int64_t end, const AdamCoefficients<scalar_t>& c) {
  for (int64_t i = begin; i < end; ++i) adam_element<false>(lowrank, exp_avg, exp_avg_sq, normalized, i, c);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Compiled for AVX2+FMA so that std::fma is one instruction and the loop vectorizes.
template <typename scalar_t>
__attribute__((target("avx2,fma"))) void adam_range_fused(const scalar_t* lowrank, scalar_t* exp_avg,
                                                          scalar_t* exp_avg_sq, scalar_t* normalized,
                                                          int64_t begin, int64_t end,
                                                          const AdamCoefficients<scalar_t>& c) {
  for (int64_t i = begin; i < end; ++i) adam_element<true>(lowrank, exp_avg, exp_avg_sq, normalized, i, c);
}

bool aten_fuses_multiply_add() {
  static const bool fused = at::get_cpu_capability() != "DEFAULT";
  return fused;
}
#else
// Other architectures' ATen vector kernels (NEON, VSX, SVE) fuse too; std::fma is native there.
template <typename scalar_t>
void adam_range_fused(const scalar_t* lowrank, scalar_t* exp_avg, scalar_t* exp_avg_sq, scalar_t* normalized,
                      int64_t begin, int64_t end, const AdamCoefficients<scalar_t>& c) {
  for (int64_t i = begin; i < end; ++i) adam_element<true>(lowrank, exp_avg, exp_avg_sq, normalized, i, c);
}

bool aten_fuses_multiply_add() { return true; }
#endif

void lowrank_adam_cpu(const at::Tensor& lowrank, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor normalized,
                      double beta1, double beta2, double eps) {
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &normalized}) {
    TORCH_CHECK(t->sizes() == lowrank.sizes(), "lowrank_adam_: shape ", t->sizes(), " must equal lowrank.shape=",
                lowrank.sizes());
    TORCH_CHECK(t->scalar_type() == lowrank.scalar_type(), "lowrank_adam_: dtype ", t->scalar_type(),
                " must equal lowrank.dtype=", lowrank.scalar_type());
  }
  const int64_t numel = lowrank.numel();
  if (numel == 0) return;
  // Outputs that are not contiguous are computed in contiguous buffers and copied back.
  const at::Tensor r = lowrank.contiguous();
  at::Tensor m = exp_avg.contiguous();
  at::Tensor v = exp_avg_sq.contiguous();
  at::Tensor n = normalized.is_contiguous() ? normalized : at::empty_like(normalized, at::MemoryFormat::Contiguous);
  const bool fused = aten_fuses_multiply_add();
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
      if (fused) {
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
