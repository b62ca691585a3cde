// Argument checks of lowrank_optim::spmm_add_, spmm_t_add_ and sddmm shared by the CPU kernels
// (cpu/spmm.cpp) and the CUDA bindings (cuda/bindings.cpp). Same order, exception types and messages as
// the pure-PyTorch defaults (lowrank_optim/ops/spmm.py), so an error reads the same whichever kernel the
// dispatcher picks (tests/test_sltrain_factored.py compares them).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>

#include "sparse_checks.h"

namespace lowrank_optim::spmm {

using sparse::dtype_name;
using sparse::shape_string;

inline void check_dense(const char* op, const char* name, const at::Tensor& tensor) {
  TORCH_CHECK_VALUE(tensor.dim() == 2, op, ": ", name, ".shape=", shape_string(tensor.sizes()),
                    "; must be 2-D (tokens x features)");
  const at::ScalarType type = tensor.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kBFloat16 || type == at::kHalf, op, ": ",
                   name, ".dtype=", dtype_name(type),
                   "; allowed: torch.float32, torch.float64, torch.bfloat16, torch.float16");
}

inline void check_same(const char* op, const char* reference_name, const at::Tensor& reference, const char* name,
                       const at::Tensor& tensor) {
  TORCH_CHECK_TYPE(tensor.scalar_type() == reference.scalar_type(), op, ": ", name, ".dtype=",
                   dtype_name(tensor.scalar_type()), " must equal ", reference_name, ".dtype=",
                   dtype_name(reference.scalar_type()));
  TORCH_CHECK_VALUE(tensor.device() == reference.device(), op, ": ", name, ".device=", tensor.device(),
                    " differs from ", reference_name, ".device=", reference.device());
}

inline void check_support_args(const char* op, const at::Tensor& flat_indices, const at::Tensor& row_ptr,
                               const c10::Device& device) {
  TORCH_CHECK_TYPE(flat_indices.scalar_type() == at::kInt || flat_indices.scalar_type() == at::kLong, op,
                   ": flat_indices.dtype=", dtype_name(flat_indices.scalar_type()),
                   "; allowed: torch.int32, torch.int64");
  TORCH_CHECK_VALUE(flat_indices.dim() == 1, op, ": flat_indices.shape=", shape_string(flat_indices.sizes()),
                    "; must be 1-D");
  TORCH_CHECK_TYPE(row_ptr.scalar_type() == flat_indices.scalar_type(), op, ": row_ptr.dtype=",
                   dtype_name(row_ptr.scalar_type()), " must equal flat_indices.dtype=",
                   dtype_name(flat_indices.scalar_type()));
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.numel() > 0, op, ": row_ptr.shape=", shape_string(row_ptr.sizes()),
                    "; must be 1-D with m + 1 >= 1 entries (m: the rows of S)");
  TORCH_CHECK_VALUE(flat_indices.device() == device, op, ": flat_indices.device=", flat_indices.device(),
                    " differs from the dense operands' device=", device);
  TORCH_CHECK_VALUE(row_ptr.device() == device, op, ": row_ptr.device=", row_ptr.device(),
                    " differs from the dense operands' device=", device);
}

// Any shared storage is refused (the kernels read these while they write `out`).
inline void check_no_alias(const char* op, const at::Tensor& out, const char* name, const at::Tensor& tensor) {
  if (out.numel() == 0 || tensor.numel() == 0) return;
  TORCH_CHECK_VALUE(out.storage().data() != tensor.storage().data(), op, ": out shares memory with ", name,
                    "; out must be a separate tensor");
}

// spmm_add_ (`dense` = input, T x n, into out, T x m) and spmm_t_add_ (`dense` = grad, T x m, into out,
// T x n). Returns {m, n}, the shape of S.
inline std::pair<int64_t, int64_t> check_spmm_args(const char* op, bool transposed, const at::Tensor& out,
                                                   const at::Tensor& dense, const char* dense_name,
                                                   const at::Tensor& values, const at::Tensor& flat_indices,
                                                   const at::Tensor& row_ptr) {
  check_dense(op, "out", out);
  check_dense(op, dense_name, dense);
  check_same(op, "out", out, dense_name, dense);
  check_same(op, "out", out, "values", values);
  check_support_args(op, flat_indices, row_ptr, out.device());
  TORCH_CHECK_VALUE(values.sizes() == flat_indices.sizes(), op, ": values.shape=", shape_string(values.sizes()),
                    " must equal flat_indices.shape=", shape_string(flat_indices.sizes()));
  TORCH_CHECK_VALUE(out.size(0) == dense.size(0), op, ": out.shape=", shape_string(out.sizes()), " and ", dense_name,
                    ".shape=", shape_string(dense.sizes()), " must have the same number of rows (tokens)");
  const int64_t m = row_ptr.numel() - 1;
  const at::Tensor& rows_of_s = transposed ? dense : out;
  TORCH_CHECK_VALUE(rows_of_s.size(1) == m, op, ": ", transposed ? dense_name : "out", ".shape[1]=", rows_of_s.size(1),
                    " must equal row_ptr.numel() - 1 = ", m, " (the rows of S)");
  check_no_alias(op, out, dense_name, dense);
  check_no_alias(op, out, "values", values);
  check_no_alias(op, out, "flat_indices", flat_indices);
  check_no_alias(op, out, "row_ptr", row_ptr);
  return {m, (transposed ? out : dense).size(1)};
}

inline std::pair<int64_t, int64_t> check_sddmm_args(const at::Tensor& grad, const at::Tensor& input,
                                                    const at::Tensor& flat_indices, const at::Tensor& row_ptr) {
  const char* op = "sddmm";
  check_dense(op, "grad", grad);
  check_dense(op, "input", input);
  check_same(op, "grad", grad, "input", input);
  check_support_args(op, flat_indices, row_ptr, grad.device());
  TORCH_CHECK_VALUE(grad.size(0) == input.size(0), op, ": grad.shape=", shape_string(grad.sizes()), " and input.shape=",
                    shape_string(input.sizes()), " must have the same number of rows (tokens)");
  const int64_t m = row_ptr.numel() - 1;
  TORCH_CHECK_VALUE(grad.size(1) == m, op, ": grad.shape[1]=", grad.size(1), " must equal row_ptr.numel() - 1 = ", m,
                    " (the rows of S)");
  return {m, input.size(1)};
}

inline void throw_out_of_range(const char* op, int64_t position, int64_t value, int64_t m, int64_t n) {
  TORCH_CHECK_INDEX(false, op, ": flat_indices[", position, "]=", value, " is out of range for S of shape (", m, ", ",
                    n, ") (", m * n, " elements); allowed: 0 <= index < ", m * n);
}

inline void throw_bad_row_ptr(const char* op, int64_t row, int64_t given, int64_t expected, int64_t m, int64_t n) {
  TORCH_CHECK_VALUE(false, op, ": row_ptr[", row, "]=", given, ", but the support has ", expected,
                    " entries in rows < ", row, "; row_ptr must be sparse_row_pointers(flat_indices, ", m, ", ", n,
                    ")");
}

}  // namespace lowrank_optim::spmm
