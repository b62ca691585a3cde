// Plain C++ interface between the CUDA kernels (*.cu, CUDA headers only) and the torch bindings
// (bindings.cpp). Pointers are device pointers; every launcher enqueues on `stream` and returns the
// launch status (cudaSuccess when nothing needed launching).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lowrank_optim::cuda {

enum class ElementType { kFloat32, kFloat64, kFloat16, kBFloat16 };
enum class IndexType { kInt32, kInt64 };

// Enough for any tensor the ops meet (SLTrain's are 2-D); bindings.cpp checks the bound.
constexpr int kMaxDims = 8;

struct StridedLayout {
  int ndim;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxDims];  // in elements
};

// Checks a support of nnz indices against a dense tensor of numel elements. `result` (device, two values,
// set to {nnz, 0} by the caller) receives the lowest position of an out-of-range index (nnz if none) and a
// nonzero flag when the support is not strictly increasing.
cudaError_t validate_support(const void* indices, IndexType index_type, int64_t nnz, int64_t numel,
                             unsigned long long* result, cudaStream_t stream);

// dense.view(-1)[indices[i]] += alpha * values[i]; indices validated and strictly increasing (no atomics).
cudaError_t sparse_scatter_add(void* dense, const void* indices, IndexType index_type, const void* values,
                               ElementType element_type, int64_t nnz, double alpha, cudaStream_t stream);

// out[i] = dense[unravel(indices[i])]; indices validated; `layout` describes dense (contiguous: strides
// row-major).
cudaError_t sparse_gather(const void* dense, const StridedLayout& layout, bool contiguous, const void* indices,
                          IndexType index_type, void* out, ElementType element_type, int64_t nnz,
                          cudaStream_t stream);

// M = b1 M + (1-b1) R; V = b2 V + (1-b2) R²; N = M / (sqrt(V) + eps), all contiguous, `numel` each.
// `skip`: nullptr, or a device bool that, when set, keeps M and V and makes N zero.
cudaError_t lowrank_adam(const void* lowrank, void* exp_avg, void* exp_avg_sq, void* normalized,
                         ElementType element_type, int64_t numel, double beta1, double beta2, double eps,
                         const bool* skip, cudaStream_t stream);

// Fira's residual (lowrank_optim/ops/fira.py): back = scale · limited((grad - subtract·back) · phi), phi from
// the row (dim=1, m x r) or column (dim=0, r x n) norms of normalized/lowrank; residual_norm (0-dim, float
// or double) is the limiter's state. All contiguous; `workspace` holds fira_workspace_doubles(...) doubles.
// `skip`: nullptr, or a device bool that, when set, makes back zero and keeps residual_norm.
int64_t fira_workspace_doubles(int64_t rows, int64_t cols, int dim);
cudaError_t fira_residual(const void* grad, void* back, ElementType element_type, int64_t rows, int64_t cols,
                          const void* normalized, const void* lowrank, ElementType lowrank_type, int64_t rank,
                          int dim, void* residual_norm, bool norm_is_double, double* workspace, double subtract,
                          double gamma, bool first, double scale, const bool* skip, cudaStream_t stream);

// DCT scores (lowrank_optim/ops/dct.py): scores[k] = Σ |x| over dimension `reduce_dim` of the contiguous
// rows x cols matrix x, written as float (or double when scores_are_double); `workspace` holds
// dct_workspace_doubles(...) doubles.
int64_t dct_workspace_doubles(int64_t rows, int64_t cols, int reduce_dim);
cudaError_t dct_scores(const void* x, ElementType element_type, int64_t rows, int64_t cols, int reduce_dim,
                       double* workspace, void* scores, bool scores_are_double, cudaStream_t stream);

// SLTrain's sparse products (spmm.cu; lowrank_optim/ops/spmm.py), S m x n at `indices` (flat row-major).
// `input_t`, `dense_t`, `grad_t`: the dense operand transposed, features x tokens, contiguous; `out`
// tokens x features with the given strides (elements); `buffer`: features x tokens in the accumulation
// type (float, double for double), zeroed by the caller.
// out[t, o] += Σ_{k in row o} values[k] · input_t[c_k, t]; indices strictly increasing, row_ptr its CSR rows.
cudaError_t spmm_csr_add(void* out, int64_t out_row_stride, int64_t out_col_stride, const void* input_t,
                         const void* values, const void* indices, const void* row_ptr, IndexType index_type,
                         ElementType element_type, int64_t tokens, int64_t m, int64_t n, cudaStream_t stream);
// buffer[target_k, t] += values[k] · dense_t[source_k, t] (atomics; any support): source = column, target =
// row of entry k, or the reverse when `transposed`.
cudaError_t spmm_coo_accumulate(void* buffer, const void* dense_t, const void* values, const void* indices,
                                IndexType index_type, ElementType element_type, int64_t nnz, int64_t tokens,
                                int64_t n, bool transposed, cudaStream_t stream);
// out[t, f] += buffer[f, t], rounded once.
cudaError_t spmm_finish(void* out, int64_t row_stride, int64_t col_stride, const void* buffer,
                        ElementType element_type, int64_t tokens, int64_t features, cudaStream_t stream);
// result[k] = Σ_t grad_t[r_k, t] · input_t[c_k, t] (any support).
cudaError_t sddmm(void* result, const void* grad_t, const void* input_t, const void* indices, IndexType index_type,
                  ElementType element_type, int64_t nnz, int64_t tokens, int64_t n, cudaStream_t stream);

// Blockwise 8-bit state (quant.cu; lowrank_optim/ops/quant.py): contiguous tensors of `rows` rows of `n`
// elements, blocks of `block_size` (1..4096) along each row, one fp32 absmax per block (rows x
// ceil(n / block_size)); maps: `*_length` (2..256) ascending fp32 values.
// codes = the code of each x / (absmax if absmax > 0 else 1), absmax = max |x| per block (NaN-propagating).
cudaError_t quantize_blockwise(const float* x, const float* code_map, int map_length, int64_t rows, int64_t n,
                               int block_size, uint8_t* codes, float* absmax, cudaStream_t stream);
// out = code_map[codes] · absmax per block (codes past the map's end: NaN).
cudaError_t dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* code_map, int map_length,
                                 int64_t rows, int64_t n, int block_size, float* out, cudaStream_t stream);
// lowrank_adam_ on moments stored as codes and maxima (signed map for M, unsigned for V), requantized in
// place; N = M / (sqrt(V) + eps). `skip`: nullptr, or a device bool that, when set, keeps the state and
// makes N zero.
cudaError_t blockwise_adam(const float* lowrank, uint8_t* exp_avg, float* exp_avg_absmax, uint8_t* exp_avg_sq,
                           float* exp_avg_sq_absmax, float* normalized, const float* signed_map, int signed_length,
                           const float* unsigned_map, int unsigned_length, int64_t rows, int64_t n, int block_size,
                           double beta1, double beta2, double eps, const bool* skip, cudaStream_t stream);

}  // namespace lowrank_optim::cuda
