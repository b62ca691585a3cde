// Argument checks of lowrank_optim::sparse_scatter_add_ and lowrank_optim::sparse_gather shared by the CPU
// kernels (cpu/sparse.cpp) and the CUDA bindings (cuda/bindings.cpp). The messages and exception types
// are those of the pure-PyTorch default kernels (lowrank_optim/ops/sparse.py), so an error reads the same
// whichever kernel the dispatcher picks; tests/reliability/test_kernel_bounds.py compares them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace lowrank_optim::sparse {

// `torch.float32` etc., as Python prints a dtype.
inline std::string dtype_name(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(type);
  }
}

// `(4, 3)` / `(5,)`, as Python prints a shape tuple.
inline std::string shape_string(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t d = 0; d < sizes.size(); ++d) out << (d ? ", " : "") << sizes[d];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

inline void check_support(const char* op, const at::Tensor& dense, const at::Tensor& flat_indices) {
  TORCH_CHECK_TYPE(flat_indices.scalar_type() == at::kInt || flat_indices.scalar_type() == at::kLong, op,
                   ": flat_indices.dtype=", dtype_name(flat_indices.scalar_type()),
                   "; allowed: torch.int32, torch.int64");
  TORCH_CHECK_VALUE(flat_indices.dim() == 1, op, ": flat_indices.shape=", shape_string(flat_indices.sizes()),
                    "; must be 1-D");
  TORCH_CHECK_VALUE(flat_indices.device() == dense.device(), op, ": flat_indices.device=", flat_indices.device(),
                    " differs from dense.device=", dense.device());
}

inline void check_scatter_args(const at::Tensor& dense, const at::Tensor& flat_indices, const at::Tensor& values) {
  const char* op = "sparse_scatter_add_";
  check_support(op, dense, flat_indices);
  TORCH_CHECK_VALUE(values.sizes() == flat_indices.sizes(), op, ": values.shape=", shape_string(values.sizes()),
                    " must equal flat_indices.shape=", shape_string(flat_indices.sizes()));
  TORCH_CHECK_TYPE(values.scalar_type() == dense.scalar_type(), op, ": values.dtype=",
                   dtype_name(values.scalar_type()), " must equal dense.dtype=", dtype_name(dense.scalar_type()));
  TORCH_CHECK_VALUE(values.device() == dense.device(), op, ": values.device=", values.device(),
                    " differs from dense.device=", dense.device());
  TORCH_CHECK_VALUE(dense.is_contiguous(), op, ": dense (shape ", shape_string(dense.sizes()),
                    ") must be contiguous to be updated in place");
  // Written while read: index_add_ (the default kernel) refuses it with this same check and message.
  at::assert_no_overlap(dense, values);
  at::assert_no_overlap(dense, flat_indices);
}

// The first entry of the support that does not address an element of `dense`.
inline void throw_out_of_range(const char* op, int64_t position, int64_t value, const at::Tensor& dense) {
  TORCH_CHECK_INDEX(false, op, ": flat_indices[", position, "]=", value, " is out of range for dense of shape ",
                    shape_string(dense.sizes()), " (", dense.numel(), " elements); allowed: 0 <= index < ",
                    dense.numel());
}

}  // namespace lowrank_optim::sparse
