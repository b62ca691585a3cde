// Argument checks of lowrank_optim::quantize_blockwise_, dequantize_blockwise and blockwise_adam_ shared by
// the CPU kernels (cpu/quant.cpp) and the CUDA bindings (cuda/bindings.cpp). Same order, exception types and
// messages as the pure-PyTorch defaults' checks (lowrank_optim/ops/quant.py: _check_quantize_args,
// _check_dequantize_args, _check_adam_args), so an error reads the same whichever kernel the dispatcher
// picks (tests/test_quant_ops.py::test_ops_refuse_bad_arguments_themselves compares them).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "sparse_checks.h"

namespace lowrank_optim::quant {

using sparse::dtype_name;
using sparse::shape_string;

// The limits of ops/quant.py (MAX_BLOCK_SIZE, _MAP_LENGTHS). cpu/quant.cpp sizes its buffers and tables
// with them.
constexpr int64_t kMaxBlockSize = 4096;
constexpr int64_t kMinMapLength = 2;
constexpr int64_t kMaxMapLength = 256;

inline void check_block_size(const char* op, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size >= 1 && block_size <= kMaxBlockSize, op, ": block_size=", block_size,
                    "; allowed: an int in [1, ", kMaxBlockSize, "]");
}

// The shape of the block maxima of a tensor of shape `sizes` (dim >= 1): (..., ceil(n / block_size)).
inline std::vector<int64_t> absmax_sizes(at::IntArrayRef sizes, int64_t block_size) {
  std::vector<int64_t> result(sizes.begin(), sizes.end());
  result.back() = (result.back() + block_size - 1) / block_size;
  return result;
}

// `tensor` has `dtype`, `sizes` (nullptr: any of dim >= 1), `device`, and is contiguous.
inline void check_tensor(const char* op, const char* name, const at::Tensor& tensor, at::ScalarType dtype,
                         const std::vector<int64_t>* sizes, const c10::Device& device) {
  TORCH_CHECK_TYPE(tensor.scalar_type() == dtype, op, ": ", name, ".dtype=", dtype_name(tensor.scalar_type()),
                   "; allowed: ", dtype_name(dtype));
  if (sizes == nullptr) {
    TORCH_CHECK_VALUE(tensor.dim() >= 1, op, ": ", name, ".shape=", shape_string(tensor.sizes()),
                      "; must have dim >= 1 (blocks run along the last)");
  } else {
    TORCH_CHECK_VALUE(tensor.sizes() == at::IntArrayRef(*sizes), op, ": ", name, ".shape=",
                      shape_string(tensor.sizes()), "; must be ", shape_string(*sizes));
  }
  TORCH_CHECK_VALUE(tensor.device() == device, op, ": ", name, ".device=", tensor.device(),
                    " must equal the tensors' device=", device);
  TORCH_CHECK_VALUE(tensor.is_contiguous(), op, ": ", name, " must be contiguous (strides ",
                    shape_string(tensor.strides()), " for shape ", shape_string(tensor.sizes()), ")");
}

inline void check_map(const char* op, const char* name, const at::Tensor& code_map, const c10::Device& device) {
  TORCH_CHECK_TYPE(code_map.scalar_type() == at::kFloat, op, ": ", name, ".dtype=",
                   dtype_name(code_map.scalar_type()), "; allowed: torch.float32");
  TORCH_CHECK_VALUE(code_map.dim() == 1 && code_map.numel() >= kMinMapLength && code_map.numel() <= kMaxMapLength, op,
                    ": ", name, ".shape=", shape_string(code_map.sizes()), "; allowed: 1-D with ", kMinMapLength,
                    "..", kMaxMapLength, " values");
  TORCH_CHECK_VALUE(code_map.device() == device, op, ": ", name, ".device=", code_map.device(),
                    " must equal the tensors' device=", device);
  TORCH_CHECK_VALUE(code_map.is_contiguous(), op, ": ", name, " must be contiguous");
}

// check_skip's message (ops/_library.py), with Python's dtype names. The kernels read the flag afterwards
// (cpu::skipped, the CUDA bindings' skip_pointer); their own checks, with C++'s dtype names, then pass.
inline void check_skip(const char* op, const std::optional<at::Tensor>& skip, const c10::Device& device) {
  if (!skip.has_value()) return;
  TORCH_CHECK_VALUE(skip->dim() == 0 && skip->scalar_type() == at::kBool && skip->device() == device, op,
                    ": skip is a ", skip->dim(), "-dim ", dtype_name(skip->scalar_type()), " tensor on ",
                    skip->device(), "; allowed: None or a 0-dim torch.bool tensor on ", device);
}

// ---- the ops' checks, in the defaults' order -------------------------------------------------------

inline void check_quantize_args(const at::Tensor& x, const at::Tensor& code_map, int64_t block_size,
                                const at::Tensor& codes, const at::Tensor& absmax) {
  const char* op = "quantize_blockwise_";
  check_block_size(op, block_size);
  check_tensor(op, "x", x, at::kFloat, nullptr, x.device());
  check_map(op, "code_map", code_map, x.device());
  const std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const std::vector<int64_t> blocks = absmax_sizes(x.sizes(), block_size);
  check_tensor(op, "codes", codes, at::kByte, &shape, x.device());
  check_tensor(op, "absmax", absmax, at::kFloat, &blocks, x.device());
}

inline void check_dequantize_args(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code_map,
                                  int64_t block_size) {
  const char* op = "dequantize_blockwise";
  check_block_size(op, block_size);
  check_tensor(op, "codes", codes, at::kByte, nullptr, codes.device());
  check_map(op, "code_map", code_map, codes.device());
  const std::vector<int64_t> blocks = absmax_sizes(codes.sizes(), block_size);
  check_tensor(op, "absmax", absmax, at::kFloat, &blocks, codes.device());
}

inline void check_adam_args(const at::Tensor& lowrank, const at::Tensor& exp_avg, const at::Tensor& exp_avg_absmax,
                            const at::Tensor& exp_avg_sq, const at::Tensor& exp_avg_sq_absmax,
                            const at::Tensor& normalized, const at::Tensor& signed_map,
                            const at::Tensor& unsigned_map, int64_t block_size,
                            const std::optional<at::Tensor>& skip) {
  const char* op = "blockwise_adam_";
  check_block_size(op, block_size);
  const c10::Device device = lowrank.device();
  check_tensor(op, "lowrank", lowrank, at::kFloat, nullptr, device);
  const std::vector<int64_t> shape(lowrank.sizes().begin(), lowrank.sizes().end());
  const std::vector<int64_t> blocks = absmax_sizes(lowrank.sizes(), block_size);
  check_tensor(op, "normalized", normalized, at::kFloat, &shape, device);
  check_tensor(op, "exp_avg", exp_avg, at::kByte, &shape, device);
  check_tensor(op, "exp_avg_absmax", exp_avg_absmax, at::kFloat, &blocks, device);
  check_tensor(op, "exp_avg_sq", exp_avg_sq, at::kByte, &shape, device);
  check_tensor(op, "exp_avg_sq_absmax", exp_avg_sq_absmax, at::kFloat, &blocks, device);
  check_map(op, "signed_map", signed_map, device);
  check_map(op, "unsigned_map", unsigned_map, device);
  check_skip(op, skip, device);
}

}  // namespace lowrank_optim::quant
