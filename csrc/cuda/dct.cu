// CUDA kernels of lowrank_optim::dct_topk's scoring (math: lowrank_optim/ops/dct.py): L1 sums of the
// transformed gradient in one read of it, in double, rounded once to the score dtype. The top-rank
// selection itself is torch.topk + sort, called by bindings.cpp on these scores.
#include <cstdint>

#include "common.cuh"

namespace lowrank_optim::cuda {
namespace {

// Column sums are split into this many row chunks so that a wide-but-short matrix still fills the GPU;
// the chunks' partials are added in order by a second kernel (deterministic, no atomics).
constexpr int kRowChunks = 32;

template <typename T>
__global__ void column_partials_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t chunk_rows,
                                       double* __restrict__ partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const int64_t begin = blockIdx.y * chunk_rows;
  const int64_t end = begin + chunk_rows < rows ? begin + chunk_rows : rows;
  double sum = 0.0;
  for (int64_t i = begin; i < end; ++i) sum += fabs(static_cast<double>(to_acc(x[i * cols + j])));
  partial[blockIdx.y * cols + j] = sum;
}

template <typename S>
__global__ void column_finish_kernel(const double* __restrict__ partial, int chunks, int64_t cols, S* __restrict__ scores) {
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double sum = 0.0;
    for (int c = 0; c < chunks; ++c) sum += partial[c * cols + j];
    scores[j] = static_cast<S>(sum);
  }
}

// One block per row (grid-stride), tree-reduced in shared memory.
template <typename T, typename S>
__global__ void row_scores_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, S* __restrict__ scores) {
  __shared__ double shared[kThreads];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) sum += fabs(static_cast<double>(to_acc(x[i * cols + j])));
    shared[threadIdx.x] = sum;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) shared[threadIdx.x] += shared[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) scores[i] = static_cast<S>(shared[0]);
    __syncthreads();
  }
}

template <typename T, typename S>
cudaError_t launch_scores(const T* x, int64_t rows, int64_t cols, int reduce_dim, double* workspace, S* scores,
                          cudaStream_t stream) {
  if (reduce_dim == 1) {
    row_scores_kernel<T, S><<<grid_size(rows * kThreads), kThreads, 0, stream>>>(x, rows, cols, scores);
    return cudaGetLastError();
  }
  const int64_t chunk_rows = (rows + kRowChunks - 1) / kRowChunks;
  const int chunks = static_cast<int>(chunk_rows > 0 ? (rows + chunk_rows - 1) / chunk_rows : 0);
  if (chunks > 0) {
    const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(chunks));
    column_partials_kernel<T><<<grid, kThreads, 0, stream>>>(x, rows, cols, chunk_rows, workspace);
  }
  column_finish_kernel<S><<<grid_size(cols), kThreads, 0, stream>>>(workspace, chunks, cols, scores);
  return cudaGetLastError();
}

}  // namespace

int64_t dct_workspace_doubles(int64_t rows, int64_t cols, int reduce_dim) {
  return reduce_dim == 0 ? static_cast<int64_t>(kRowChunks) * cols : 0;
}

cudaError_t dct_scores(const void* x, ElementType element_type, int64_t rows, int64_t cols, int reduce_dim,
                       double* workspace, void* scores, bool scores_are_double, cudaStream_t stream) {
  if ((reduce_dim == 0 ? cols : rows) == 0) return cudaSuccess;
  return dispatch_element(element_type, [&](auto zero) {
    using T = decltype(zero);
    const auto* data = static_cast<const T*>(x);
    if (scores_are_double) return launch_scores(data, rows, cols, reduce_dim, workspace, static_cast<double*>(scores), stream);
    return launch_scores(data, rows, cols, reduce_dim, workspace, static_cast<float*>(scores), stream);
  });
}

}  // namespace lowrank_optim::cuda
