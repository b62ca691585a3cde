// Helpers shared by the CPU kernels: loads/stores in ATen's opmath type with its rounding, and whether
// ATen's vector kernels fuse multiply-adds (see csrc/README.md, "Rounding rules").
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <optional>
#include <string>

namespace lowrank_optim::cpu {

// bf16 is converted with integer arithmetic (the same round-to-nearest-even, NaN-preserving rule as
// c10::BFloat16) because that vectorizes, while c10's branchy conversion keeps a loop scalar.
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

// `widen(narrow<scalar_t>(x))`: x rounded to scalar_t, kept in the opmath type. For bf16 this stays in
// 32-bit lanes (no 16-bit values in the loop), which lets a loop of float arithmetic vectorize.
template <typename scalar_t>
inline at::opmath_type<scalar_t> round_to(at::opmath_type<scalar_t> x) {
  return widen(narrow<scalar_t>(x));
}
template <>
inline float round_to<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  const uint32_t result_bits = x != x ? 0x7fc00000u : rounded;
  float result;
  std::memcpy(&result, &result_bits, sizeof(result));
  return result;
}

// ATen's AVX2/AVX512 kernels fuse `add(x, alpha=a)` into fma(x, a, self); its DEFAULT (no-SIMD) build
// rounds the product first. Kernels that reproduce such an op compile a fused variant for AVX2+FMA
// (LOWRANK_OPTIM_FMA_TARGET), some also one for AVX-512 (LOWRANK_OPTIM_AVX512_TARGET: 16 float lanes,
// the same arithmetic, so the same bits), and run the one kernel_variant() names.
//
// Code that such a function calls must be inlined into it to be compiled for its target (else std::fma
// becomes a libm call): LOWRANK_OPTIM_ALWAYS_INLINE forces that.
#if defined(__GNUC__) || defined(__clang__)
#define LOWRANK_OPTIM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define LOWRANK_OPTIM_ALWAYS_INLINE inline
#endif

// kPlain: rounds every product (ATen DEFAULT); kFused: fused multiply-adds (AVX2+FMA on x86, native
// elsewhere); kFused512: kFused compiled for AVX-512.
enum class Variant { kPlain, kFused, kFused512 };

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWRANK_OPTIM_FMA_TARGET __attribute__((target("avx2,fma")))
#define LOWRANK_OPTIM_HAVE_AVX512_VARIANT 1
#define LOWRANK_OPTIM_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
// Follows ATen's own capability, so ATEN_CPU_CAPABILITY=avx2|default selects the narrower variants too
// (which is how the tests run all three on one machine).
inline Variant kernel_variant() {
  static const Variant variant = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "DEFAULT") return Variant::kPlain;
    const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return capability == "AVX512" && has_avx512 ? Variant::kFused512 : Variant::kFused;
  }();
  return variant;
}
#else
// Other architectures' ATen vector kernels (NEON, VSX, SVE) fuse too; std::fma is native there.
#define LOWRANK_OPTIM_FMA_TARGET
inline Variant kernel_variant() { return Variant::kFused; }
#endif

// The optional `skip` argument of the optimizer ops (lowrank_optim/ops/_library.py, check_skip): a 0-dim
// bool tensor on the op's device; whether it is set.
inline bool skipped(const char* op, const std::optional<at::Tensor>& skip, const c10::Device& device) {
  if (!skip.has_value()) return false;
  TORCH_CHECK_VALUE(skip->dim() == 0 && skip->scalar_type() == at::kBool && skip->device() == device, op,
                    ": skip is a ", skip->dim(), "-dim ", skip->scalar_type(), " tensor on ", skip->device(),
                    "; allowed: None or a 0-dim torch.bool tensor on ", device);
  return skip->item<bool>();
}

// One pass over a support of flat indices into an `numel`-element tensor: calls `out_of_range(i, value)`
// (which must throw) at the first index outside [0, numel), and returns whether the support is strictly
// increasing. Each chunk of `grain` indices is reduced to its minimum, its maximum and its number of
// non-increasing steps: branch-free integer reductions that vectorize, in parallel; only an error is
// located by a second, serial scan. Shared by every kernel that takes a support (sparse.cpp, spmm.cpp).
template <typename index_t, typename OutOfRange>
bool scan_support(const index_t* idx, int64_t nnz, int64_t numel, int64_t grain, OutOfRange&& out_of_range) {
  const int64_t chunks = (nnz + grain - 1) / grain;
  std::vector<uint8_t> outside(chunks, 0), unordered(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t lo = chunk * grain;
      const int64_t hi = std::min(nnz, lo + grain);
      index_t smallest = idx[lo], largest = idx[lo];
      int64_t descents = lo > 0 && idx[lo - 1] >= idx[lo];  // across the boundary with the previous chunk
      for (int64_t i = lo + 1; i < hi; ++i) {
        smallest = std::min(smallest, idx[i]);
        largest = std::max(largest, idx[i]);
        descents += idx[i - 1] >= idx[i];
      }
      outside[chunk] = static_cast<int64_t>(smallest) < 0 || static_cast<int64_t>(largest) >= numel;
      unordered[chunk] = descents != 0;
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    if (!outside[chunk]) continue;
    for (int64_t i = chunk * grain; i < nnz; ++i) {
      const int64_t value = static_cast<int64_t>(idx[i]);
      if (value < 0 || value >= numel) out_of_range(i, value);
    }
  }
  return std::none_of(unordered.begin(), unordered.end(), [](uint8_t flag) { return flag != 0; });
}

}  // namespace lowrank_optim::cpu
