// CUDA kernels of lowrank_optim::fira_residual_ (math: lowrank_optim/ops/fira.py). Four launches, no
// host sync: phi per channel; pass 1 writes S = (G - subtract·B)·phi and one partial sum of squares per
// block; one block turns the partials (summed in a fixed order: deterministic) into the limiter and
// updates the state; pass 2 divides by the limiter and applies `scale`. Rounding follows csrc/cpu/fira.cpp.
#include <cstdint>

#include "common.cuh"

namespace lowrank_optim::cuda {
namespace {

constexpr int kResidualBlocks = 1024;  // pass-1 blocks at most (each owns whole rows): the partials' count
constexpr double kPhiEps = 1e-8;
constexpr double kLimiterEps = 1e-8;

// Sum over the block of one double per thread; the result is valid in thread 0.
__device__ double block_sum(double value) {
  __shared__ double shared[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = value;
  __syncthreads();
  value = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : 0.0;
  if (threadIdx.x < 32) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename U>
__device__ double phi_from_sums(double n_sq, double r_sq) {
  using u_acc = typename Acc<U>::type;
  const U numerator = from_acc<U>(static_cast<u_acc>(sqrt(n_sq)));
  const U norm_r = from_acc<U>(static_cast<u_acc>(sqrt(r_sq)));
  const U denominator = from_acc<U>(to_acc(norm_r) + static_cast<u_acc>(kPhiEps));
  return static_cast<double>(to_acc(from_acc<U>(to_acc(numerator) / to_acc(denominator))));
}

// dim=1: one block per row of the m x r moments (grid-stride over rows).
template <typename U>
__global__ void phi_rows_kernel(const U* __restrict__ n, const U* __restrict__ r, int64_t rows, int64_t rank,
                                double* __restrict__ phi) {
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    double sn = 0.0, sr = 0.0;
    for (int64_t k = threadIdx.x; k < rank; k += blockDim.x) {
      const double a = to_acc(n[i * rank + k]), b = to_acc(r[i * rank + k]);
      sn += a * a;
      sr += b * b;
    }
    sn = block_sum(sn);
    __syncthreads();
    sr = block_sum(sr);
    if (threadIdx.x == 0) phi[i] = phi_from_sums<U>(sn, sr);
    __syncthreads();
  }
}

// dim=0: one thread per column of the r x n moments (coalesced across threads).
template <typename U>
__global__ void phi_cols_kernel(const U* __restrict__ n, const U* __restrict__ r, int64_t rank, int64_t cols,
                                double* __restrict__ phi) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double sn = 0.0, sr = 0.0;
    for (int64_t k = 0; k < rank; ++k) {
      const double a = to_acc(n[k * cols + j]), b = to_acc(r[k * cols + j]);
      sn += a * a;
      sr += b * b;
    }
    phi[j] = phi_from_sums<U>(sn, sr);
  }
}

template <typename T>
__global__ void residual_kernel(const T* __restrict__ g, T* __restrict__ b, int64_t rows, int64_t cols,
                                typename Acc<T>::type alpha, const double* __restrict__ phi, bool per_row,
                                double* __restrict__ partial) {
  using acc_t = typename Acc<T>::type;
  double sum = 0.0;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const int64_t at = i * cols + j;
      const acc_t d = to_acc(from_acc<T>(fma(to_acc(b[at]), alpha, to_acc(g[at]))));
      const T s = from_acc<T>(d * static_cast<acc_t>(phi[per_row ? i : j]));
      b[at] = s;
      const double sd = to_acc(s);
      sum += sd * sd;
    }
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: the ordered partials → ||S||, the limiter (op for op as limit_norm_growth_, in the norm's
// dtype ND), the new state; the divisor goes to *limiter.
// History rules as limit_norm_growth_: no history yet (prev == 0, or NaN) stores unlimited; a zero
// residual keeps prev. `skip` (nullable device bool): keep prev and write 0 into *limiter, which tells
// rescale_kernel to zero the residual.
template <typename ND, typename P>
__global__ void limiter_kernel(const double* __restrict__ partial, int blocks, P* __restrict__ previous,
                               double gamma, bool first, const bool* __restrict__ skip, double* __restrict__ limiter) {
  double sum = 0.0;
  for (int k = threadIdx.x; k < blocks; k += blockDim.x) sum += partial[k];
  sum = block_sum(sum);
  if (threadIdx.x != 0) return;
  if (skip != nullptr && *skip) {
    *limiter = 0.0;
    return;
  }
  const ND norm = static_cast<ND>(sqrt(sum));
  if (first) {
    *previous = static_cast<P>(norm);
    *limiter = 1.0;
    return;
  }
  const P denominator = *previous + static_cast<P>(kLimiterEps);
  const ND ratio = norm / static_cast<ND>(denominator);
  const ND bound = static_cast<ND>(gamma);
  ND lim = (ratio > bound ? ratio : bound) / bound;
  if (!(*previous > P(0))) lim = ND(1);
  if (!(norm == ND(0))) *previous = static_cast<P>(norm / lim);
  *limiter = static_cast<double>(lim);
}

template <typename T>
__global__ void rescale_kernel(T* __restrict__ b, int64_t numel, const double* __restrict__ limiter, bool divide,
                               typename Acc<T>::type scale, bool multiply) {
  using acc_t = typename Acc<T>::type;
  const acc_t lim = static_cast<acc_t>(*limiter);
  if (lim == acc_t(0)) {  // a skipped update (limiter_kernel's sentinel): no residual
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      b[i] = from_acc<T>(acc_t(0));
    }
    return;
  }
  // An inactive limiter is exactly 1 and x / 1 == x: with scale 1 there is nothing to write, and
  // every thread returns before touching b (the limiter lives on the device; no host sync to decide).
  divide = divide && lim != acc_t(1);
  if (!divide && !multiply) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T value = b[i];
    if (divide) value = from_acc<T>(to_acc(value) / lim);
    if (multiply) value = from_acc<T>(to_acc(value) * scale);
    b[i] = value;
  }
}

int residual_blocks(int64_t rows) { return static_cast<int>(rows < kResidualBlocks ? (rows > 0 ? rows : 1) : kResidualBlocks); }

}  // namespace

int64_t fira_workspace_doubles(int64_t rows, int64_t cols, int dim) {
  return (dim == 1 ? rows : cols) + kResidualBlocks + 1;
}

cudaError_t fira_residual(const void* grad, void* back, ElementType element_type, int64_t rows, int64_t cols,
                          const void* normalized, const void* lowrank, ElementType lowrank_type, int64_t rank,
                          int dim, void* residual_norm, bool norm_is_double, double* workspace, double subtract,
                          double gamma, bool first, double scale, const bool* skip, cudaStream_t stream) {
  const int64_t channels = dim == 1 ? rows : cols;
  double* phi = workspace;
  double* partial = workspace + channels;
  double* limiter = partial + kResidualBlocks;
  if (channels > 0) {
    const cudaError_t status = dispatch_element(lowrank_type, [&](auto zero) {
      using U = decltype(zero);
      const auto* n = static_cast<const U*>(normalized);
      const auto* r = static_cast<const U*>(lowrank);
      if (dim == 1) {
        phi_rows_kernel<U><<<grid_size(rows * kThreads), kThreads, 0, stream>>>(n, r, rows, rank, phi);
      } else {
        phi_cols_kernel<U><<<grid_size(cols), kThreads, 0, stream>>>(n, r, rank, cols, phi);
      }
      return cudaGetLastError();
    });
    if (status != cudaSuccess) return status;
  }
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    using acc_t = typename Acc<T>::type;
    auto* b = static_cast<T*>(back);
    const int blocks = residual_blocks(rows);
    // add()'s alpha reaches the reference's kernel rounded to the tensor's dtype (bf16 only).
    const acc_t alpha = to_acc(from_acc<T>(static_cast<acc_t>(-subtract)));
    residual_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(grad), b, rows, cols, alpha, phi,
                                                         dim == 1, partial);
    // The norm's dtype is promote(T, state dtype): double when either is double.
    const bool wide = norm_is_double || sizeof(acc_t) == sizeof(double);
    if (norm_is_double) {
      limiter_kernel<double><<<1, kThreads, 0, stream>>>(partial, blocks, static_cast<double*>(residual_norm), gamma,
                                                         first, skip, limiter);
    } else if (wide) {
      limiter_kernel<double><<<1, kThreads, 0, stream>>>(partial, blocks, static_cast<float*>(residual_norm), gamma,
                                                         first, skip, limiter);
    } else {
      limiter_kernel<float><<<1, kThreads, 0, stream>>>(partial, blocks, static_cast<float*>(residual_norm), gamma,
                                                        first, skip, limiter);
    }
    const int64_t numel = rows * cols;
    // With a skip flag the rescale kernel runs whatever the other conditions: it zeroes a skipped residual.
    if (numel > 0 && (!first || scale != 1.0 || skip != nullptr)) {
      rescale_kernel<T><<<grid_size(numel), kThreads, 0, stream>>>(b, numel, limiter, !first,
                                                                   static_cast<acc_t>(scale), scale != 1.0);
    }
    return cudaGetLastError();
  });
}

}  // namespace lowrank_optim::cuda
