// CUDA kernel of lowrank_optim::lowrank_adam_: one pass over R, M, V, N with 16-byte vector loads.
// Rounding follows csrc/cpu/adam.cpp (each value the reference stores is rounded where it stores it;
// the two multiply-adds are explicit fmas, the file is built with -fmad=false so nothing else fuses).
#include <cstdint>

#include "common.cuh"

namespace lowrank_optim::cuda {
namespace {

template <typename T>
struct AdamScalars {
  using acc_t = typename Acc<T>::type;
  acc_t beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

template <typename T>
__device__ __forceinline__ void adam_element(T r_in, T& m_io, T& v_io, T& n_out, const AdamScalars<T>& s) {
  using acc_t = typename Acc<T>::type;
  const acc_t r = to_acc(r_in);
  const acc_t m_decayed = to_acc(from_acc<T>(to_acc(m_io) * s.beta1));
  const acc_t v_decayed = to_acc(from_acc<T>(to_acc(v_io) * s.beta2));
  const T m = from_acc<T>(fma(r, s.one_minus_beta1, m_decayed));
  const T v = from_acc<T>(fma(s.one_minus_beta2 * r, r, v_decayed));
  m_io = m;
  v_io = v;
  const T root = from_acc<T>(sqrt(to_acc(v)));
  const T denominator = from_acc<T>(to_acc(root) + s.eps);
  n_out = from_acc<T>(to_acc(m) / to_acc(denominator));
}

template <typename T, int Vec>
struct alignas(sizeof(T) * Vec) Pack {
  T values[Vec];
};

// Vec elements per thread per iteration (16 bytes when all four pointers are 16-byte aligned). `skip`
// (nullable, a device bool): when set, the moments keep their values and N is zero, decided here on the
// device so that the host never waits for the flag.
template <typename T, int Vec>
__global__ void adam_kernel(const T* __restrict__ lowrank, T* __restrict__ exp_avg, T* __restrict__ exp_avg_sq,
                            T* __restrict__ normalized, int64_t numel, AdamScalars<T> s,
                            const bool* __restrict__ skip) {
  using P = Pack<T, Vec>;
  const int64_t packs = numel / Vec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (skip != nullptr && *skip) {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
      normalized[i] = from_acc<T>(typename Acc<T>::type(0));
    }
    return;
  }
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const P r = reinterpret_cast<const P*>(lowrank)[p];
    P m = reinterpret_cast<const P*>(exp_avg)[p];
    P v = reinterpret_cast<const P*>(exp_avg_sq)[p];
    P n;
#pragma unroll
    for (int k = 0; k < Vec; ++k) adam_element(r.values[k], m.values[k], v.values[k], n.values[k], s);
    reinterpret_cast<P*>(exp_avg)[p] = m;
    reinterpret_cast<P*>(exp_avg_sq)[p] = v;
    reinterpret_cast<P*>(normalized)[p] = n;
  }
  // The numel % Vec trailing elements, one each for the first global threads.
  const int64_t tail = packs * Vec + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tail < numel) {
    adam_element(lowrank[tail], exp_avg[tail], exp_avg_sq[tail], normalized[tail], s);
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

}  // namespace

cudaError_t lowrank_adam(const void* lowrank, void* exp_avg, void* exp_avg_sq, void* normalized,
                         ElementType element_type, int64_t numel, double beta1, double beta2, double eps,
                         const bool* skip, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    using acc_t = typename Acc<T>::type;
    constexpr int kVec = 16 / sizeof(T);
    // add_'s alpha reaches ATen's kernel rounded to the tensor's dtype (matters for bf16/fp16 only), via
    // float as c10::BFloat16/Half convert a double.
    const AdamScalars<T> s{static_cast<acc_t>(beta1), to_acc(from_acc<T>(static_cast<acc_t>(1.0 - beta1))),
                           static_cast<acc_t>(beta2), static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(eps)};
    const auto* r = static_cast<const T*>(lowrank);
    auto* m = static_cast<T*>(exp_avg);
    auto* v = static_cast<T*>(exp_avg_sq);
    auto* n = static_cast<T*>(normalized);
    if (aligned16(r) && aligned16(m) && aligned16(v) && aligned16(n)) {
      adam_kernel<T, kVec><<<grid_size(numel / kVec + 1), kThreads, 0, stream>>>(r, m, v, n, numel, s, skip);
    } else {
      adam_kernel<T, 1><<<grid_size(numel), kThreads, 0, stream>>>(r, m, v, n, numel, s, skip);
    }
    return cudaGetLastError();
  });
}

}  // namespace lowrank_optim::cuda
