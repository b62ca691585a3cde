// CUDA kernels of lowrank_optim::sparse_scatter_add_ and lowrank_optim::sparse_gather. bindings.cpp runs
// validate_kernel first (every index in range, and whether the support is strictly increasing) and calls
// the scatter only for a strictly increasing support: unique, so each nonzero has one owner thread and
// needs no atomics; sorted, so neighbouring threads touch neighbouring addresses (coalescing where the
// support is dense). Other supports go to ATen's index_add_.
#include <cstdint>

#include "common.cuh"

namespace lowrank_optim::cuda {
namespace {

// result[0]: the lowest position of an index outside [0, numel) (stays nnz when there is none);
// result[1]: nonzero when some index is not greater than its predecessor.
template <typename Index>
__global__ void validate_kernel(const Index* __restrict__ indices, int64_t nnz, int64_t numel,
                                unsigned long long* __restrict__ result) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nnz; i += stride) {
    const int64_t value = static_cast<int64_t>(indices[i]);
    if (value < 0 || value >= numel) atomicMin(result, static_cast<unsigned long long>(i));
    if (i > 0 && static_cast<int64_t>(indices[i - 1]) >= value) atomicOr(result + 1, 1ull);
  }
}

template <typename T, typename Index>
__global__ void scatter_add_kernel(T* __restrict__ dense, const Index* __restrict__ indices,
                                   const T* __restrict__ values, int64_t nnz, typename Acc<T>::type alpha) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nnz; i += stride) {
    T& target = dense[indices[i]];
    target = from_acc<T>(to_acc(target) + alpha * to_acc(values[i]));
  }
}

template <typename T, typename Index, bool Contiguous>
__global__ void gather_kernel(const T* __restrict__ dense, StridedLayout layout, const Index* __restrict__ indices,
                              T* __restrict__ out, int64_t nnz) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nnz; i += stride) {
    int64_t flat = indices[i];
    if (Contiguous) {
      out[i] = dense[flat];
      continue;
    }
    // Unravel the row-major flat index and re-ravel it with the input's own strides.
    int64_t offset = 0;
    for (int d = layout.ndim - 1; d >= 0; --d) {
      offset += (flat % layout.sizes[d]) * layout.strides[d];
      flat /= layout.sizes[d];
    }
    out[i] = dense[offset];
  }
}

}  // namespace

cudaError_t validate_support(const void* indices, IndexType index_type, int64_t nnz, int64_t numel,
                             unsigned long long* result, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  return dispatch_index(index_type, [&](auto index_zero) {
    using Index = decltype(index_zero);
    validate_kernel<Index><<<grid_size(nnz), kThreads, 0, stream>>>(static_cast<const Index*>(indices), nnz, numel,
                                                                    result);
    return cudaGetLastError();
  });
}

cudaError_t sparse_scatter_add(void* dense, const void* indices, IndexType index_type, const void* values,
                               ElementType element_type, int64_t nnz, double alpha, cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_index(index_type, [&](auto index_zero) {
      using Index = decltype(index_zero);
      scatter_add_kernel<T, Index><<<grid_size(nnz), kThreads, 0, stream>>>(
          static_cast<T*>(dense), static_cast<const Index*>(indices), static_cast<const T*>(values), nnz,
          static_cast<typename Acc<T>::type>(alpha));
      return cudaGetLastError();
    });
  });
}

cudaError_t sparse_gather(const void* dense, const StridedLayout& layout, bool contiguous, const void* indices,
                          IndexType index_type, void* out, ElementType element_type, int64_t nnz,
                          cudaStream_t stream) {
  if (nnz == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_index(index_type, [&](auto index_zero) {
      using Index = decltype(index_zero);
      const auto* in = static_cast<const T*>(dense);
      const auto* idx = static_cast<const Index*>(indices);
      auto* result = static_cast<T*>(out);
      if (contiguous) {
        gather_kernel<T, Index, true><<<grid_size(nnz), kThreads, 0, stream>>>(in, layout, idx, result, nnz);
      } else {
        gather_kernel<T, Index, false><<<grid_size(nnz), kThreads, 0, stream>>>(in, layout, idx, result, nnz);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace lowrank_optim::cuda
