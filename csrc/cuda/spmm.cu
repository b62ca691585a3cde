// CUDA kernels of lowrank_optim::spmm_add_, spmm_t_add_ and sddmm (schemas and the math:
// lowrank_optim/ops/spmm.py). bindings.cpp hands them the dense operands transposed (features x tokens,
// contiguous: x_t, g_t), so that the 32 lanes of a warp read 32 consecutive tokens of one feature
// (coalesced) while the warp walks the support.
//   spmm_csr_add:        out[t, o] += Σ_{k in row o} v_k · x_t[c_k, t]; a warp per (row, 32 tokens), the
//                        sum in the accumulation type in a register, added into out once. Needs a strictly
//                        increasing support (row o = entries row_ptr[o] .. row_ptr[o + 1] - 1): no atomics.
//   spmm_coo_accumulate: buffer[target_k, t] += v_k · dense_t[source_k, t] with atomics into an fp32 (fp64)
//                        buffer, a warp per nonzero: correct for any support (spmm_t_add_ always, spmm_add_
//                        for a support that is not strictly increasing); spmm_finish adds the buffer into
//                        out, rounding once. The atomics make the order of the sum, hence its last bits,
//                        run-dependent.
//   sddmm:               result[k] = Σ_t g_t[r_k, t] · x_t[c_k, t], a warp per nonzero (a shuffle reduction);
//                        any support.
#include <cstdint>

#include "common.cuh"

namespace lowrank_optim::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;

// Grid of warps, each covering work item `w` for w = warp id, warp id + total warps, ...
inline int warp_grid(int64_t warps) { return grid_size(warps * kWarp); }

template <typename T, typename Index>
__global__ void spmm_csr_kernel(T* __restrict__ out, int64_t out_row_stride, int64_t out_col_stride,
                                const T* __restrict__ x_t, const T* __restrict__ values,
                                const Index* __restrict__ indices, const Index* __restrict__ row_ptr, int64_t tokens,
                                int64_t m, int64_t n) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t chunks = (tokens + kWarp - 1) / kWarp;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; w < m * chunks;
       w += total_warps) {
    const int64_t o = w / chunks;
    const int64_t t = (w % chunks) * kWarp + lane;
    if (t >= tokens) continue;
    const int64_t base = o * n;
    acc_t total = acc_t(0);
    const int64_t k_end = static_cast<int64_t>(row_ptr[o + 1]);
    for (int64_t k = static_cast<int64_t>(row_ptr[o]); k < k_end; ++k) {
      const int64_t c = static_cast<int64_t>(indices[k]) - base;
      total += to_acc(values[k]) * to_acc(x_t[c * tokens + t]);
    }
    T& target = out[t * out_row_stride + o * out_col_stride];
    target = from_acc<T>(to_acc(target) + total);
  }
}

template <typename T, typename Index>
__global__ void spmm_coo_kernel(typename Acc<T>::type* __restrict__ buffer, const T* __restrict__ dense_t,
                                const T* __restrict__ values, const Index* __restrict__ indices, int64_t nnz,
                                int64_t tokens, int64_t n, bool transposed) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; k < nnz;
       k += total_warps) {
    const int64_t flat = static_cast<int64_t>(indices[k]);
    const int64_t r = flat / n, c = flat % n;
    const int64_t source = transposed ? r : c, target = transposed ? c : r;
    const acc_t weight = to_acc(values[k]);
    for (int64_t t = lane; t < tokens; t += kWarp) {
      atomicAdd(buffer + target * tokens + t, weight * to_acc(dense_t[source * tokens + t]));
    }
  }
}

template <typename T>
__global__ void spmm_finish_kernel(T* __restrict__ out, int64_t row_stride, int64_t col_stride,
                                   const typename Acc<T>::type* __restrict__ buffer, int64_t tokens,
                                   int64_t features) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < tokens * features; i += stride) {
    const int64_t f = i / tokens, t = i % tokens;  // buffer is features x tokens: coalesced reads
    T& target = out[t * row_stride + f * col_stride];
    target = from_acc<T>(to_acc(target) + buffer[i]);
  }
}

template <typename T, typename Index>
__global__ void sddmm_kernel(T* __restrict__ result, const T* __restrict__ grad_t, const T* __restrict__ input_t,
                             const Index* __restrict__ indices, int64_t nnz, int64_t tokens, int64_t n) {
  using acc_t = typename Acc<T>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t total_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; k < nnz;
       k += total_warps) {
    const int64_t flat = static_cast<int64_t>(indices[k]);
    const T* g = grad_t + (flat / n) * tokens;
    const T* x = input_t + (flat % n) * tokens;
    acc_t total = acc_t(0);
    for (int64_t t = lane; t < tokens; t += kWarp) total += to_acc(g[t]) * to_acc(x[t]);
    for (int offset = kWarp / 2; offset > 0; offset /= 2) total += __shfl_down_sync(0xffffffffu, total, offset);
    if (lane == 0) result[k] = from_acc<T>(total);
  }
}

}  // namespace

cudaError_t spmm_csr_add(void* out, int64_t out_row_stride, int64_t out_col_stride, const void* input_t,
                         const void* values, const void* indices, const void* row_ptr, IndexType index_type,
                         ElementType element_type, int64_t tokens, int64_t m, int64_t n, cudaStream_t stream) {
  if (tokens == 0 || m == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_index(index_type, [&](auto index_zero) {
      using Index = decltype(index_zero);
      const int64_t warps = m * ((tokens + kWarp - 1) / kWarp);
      spmm_csr_kernel<T, Index><<<warp_grid(warps), kThreads, 0, stream>>>(
          static_cast<T*>(out), out_row_stride, out_col_stride, static_cast<const T*>(input_t),
          static_cast<const T*>(values), static_cast<const Index*>(indices), static_cast<const Index*>(row_ptr),
          tokens, m, n);
      return cudaGetLastError();
    });
  });
}

cudaError_t spmm_coo_accumulate(void* buffer, const void* dense_t, const void* values, const void* indices,
                                IndexType index_type, ElementType element_type, int64_t nnz, int64_t tokens,
                                int64_t n, bool transposed, cudaStream_t stream) {
  if (nnz == 0 || tokens == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_index(index_type, [&](auto index_zero) {
      using Index = decltype(index_zero);
      spmm_coo_kernel<T, Index><<<warp_grid(nnz), kThreads, 0, stream>>>(
          static_cast<typename Acc<T>::type*>(buffer), static_cast<const T*>(dense_t), static_cast<const T*>(values),
          static_cast<const Index*>(indices), nnz, tokens, n, transposed);
      return cudaGetLastError();
    });
  });
}

cudaError_t spmm_finish(void* out, int64_t row_stride, int64_t col_stride, const void* buffer,
                        ElementType element_type, int64_t tokens, int64_t features, cudaStream_t stream) {
  if (tokens == 0 || features == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    spmm_finish_kernel<T><<<grid_size(tokens * features), kThreads, 0, stream>>>(
        static_cast<T*>(out), row_stride, col_stride, static_cast<const typename Acc<T>::type*>(buffer), tokens,
        features);
    return cudaGetLastError();
  });
}

cudaError_t sddmm(void* result, const void* grad_t, const void* input_t, const void* indices, IndexType index_type,
                  ElementType element_type, int64_t nnz, int64_t tokens, int64_t n, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_index(index_type, [&](auto index_zero) {
      using Index = decltype(index_zero);
      sddmm_kernel<T, Index><<<warp_grid(nnz), kThreads, 0, stream>>>(
          static_cast<T*>(result), static_cast<const T*>(grad_t), static_cast<const T*>(input_t),
          static_cast<const Index*>(indices), nnz, tokens, n);
      return cudaGetLastError();
    });
  });
}

}  // namespace lowrank_optim::cuda
