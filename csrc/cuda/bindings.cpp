// Torch bindings of the CUDA kernels: argument checks, dtype mapping and the current stream, then a
// call into the plain launchers of launchers.h. Built only against a CUDA build of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launchers.h"

namespace lowrank_optim {
namespace {

cuda::ElementType element_type(const at::Tensor& tensor, const char* op, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return cuda::ElementType::kFloat32;
    case at::kDouble:
      return cuda::ElementType::kFloat64;
    case at::kHalf:
      return cuda::ElementType::kFloat16;
    case at::kBFloat16:
      return cuda::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, ".dtype=", tensor.scalar_type(),
                  "; allowed: float32, float64, float16, bfloat16");
  }
}

cuda::IndexType index_type(const at::Tensor& flat_indices, const char* op) {
  TORCH_CHECK(flat_indices.scalar_type() == at::kInt || flat_indices.scalar_type() == at::kLong, op,
              ": flat_indices.dtype=", flat_indices.scalar_type(), "; allowed: int32, int64");
  return flat_indices.scalar_type() == at::kInt ? cuda::IndexType::kInt32 : cuda::IndexType::kInt64;
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

void check_support(const char* op, const at::Tensor& dense, const at::Tensor& flat_indices) {
  TORCH_CHECK(flat_indices.dim() == 1, op, ": flat_indices.dim()=", flat_indices.dim(), "; must be 1");
  TORCH_CHECK(dense.device() == flat_indices.device(), op, ": flat_indices.device=", flat_indices.device(),
              " differs from dense.device=", dense.device());
}

void sparse_scatter_add_cuda(at::Tensor dense, const at::Tensor& flat_indices, const at::Tensor& values,
                             double alpha) {
  const char* op = "sparse_scatter_add_";
  check_support(op, dense, flat_indices);
  TORCH_CHECK(dense.is_contiguous(), op, ": dense (shape ", dense.sizes(), ") must be contiguous to be updated in place");
  TORCH_CHECK(values.sizes() == flat_indices.sizes(), op, ": values.shape=", values.sizes(),
              " must equal flat_indices.shape=", flat_indices.sizes());
  TORCH_CHECK(values.scalar_type() == dense.scalar_type(), op, ": values.dtype=", values.scalar_type(),
              " must equal dense.dtype=", dense.scalar_type());
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor indices = flat_indices.contiguous();
  const at::Tensor source = values.contiguous();
  check_launch(cuda::sparse_scatter_add(dense.data_ptr(), indices.const_data_ptr(), index_type(indices, op),
                                        source.const_data_ptr(), element_type(dense, op, "dense"), indices.numel(),
                                        alpha, c10::cuda::getCurrentCUDAStream()),
               op);
}

at::Tensor sparse_gather_cuda(const at::Tensor& dense, const at::Tensor& flat_indices) {
  const char* op = "sparse_gather";
  check_support(op, dense, flat_indices);
  TORCH_CHECK(dense.dim() <= cuda::kMaxDims, op, ": dense.dim()=", dense.dim(), "; at most ", cuda::kMaxDims);
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor indices = flat_indices.contiguous();
  at::Tensor result = at::empty({indices.numel()}, dense.options());
  cuda::StridedLayout layout{};
  layout.ndim = static_cast<int>(dense.dim());
  for (int64_t d = 0; d < dense.dim(); ++d) {
    layout.sizes[d] = dense.size(d);
    layout.strides[d] = dense.stride(d);
  }
  check_launch(cuda::sparse_gather(dense.const_data_ptr(), layout, dense.is_contiguous(), indices.const_data_ptr(),
                                   index_type(indices, op), result.data_ptr(), element_type(dense, op, "dense"),
                                   indices.numel(), c10::cuda::getCurrentCUDAStream()),
               op);
  return result;
}

void lowrank_adam_cuda(const at::Tensor& lowrank, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor normalized,
                       double beta1, double beta2, double eps) {
  const char* op = "lowrank_adam_";
  for (const at::Tensor* t : {&exp_avg, &exp_avg_sq, &normalized}) {
    TORCH_CHECK(t->sizes() == lowrank.sizes(), op, ": shape ", t->sizes(), " must equal lowrank.shape=", lowrank.sizes());
    TORCH_CHECK(t->scalar_type() == lowrank.scalar_type(), op, ": dtype ", t->scalar_type(),
                " must equal lowrank.dtype=", lowrank.scalar_type());
    TORCH_CHECK(t->device() == lowrank.device(), op, ": device ", t->device(), " must equal lowrank.device=",
                lowrank.device());
  }
  const c10::cuda::CUDAGuard guard(lowrank.device());
  // Outputs that are not contiguous are computed in contiguous buffers and copied back.
  const at::Tensor r = lowrank.contiguous();
  at::Tensor m = exp_avg.contiguous();
  at::Tensor v = exp_avg_sq.contiguous();
  at::Tensor n = normalized.is_contiguous() ? normalized : at::empty_like(normalized, at::MemoryFormat::Contiguous);
  check_launch(cuda::lowrank_adam(r.const_data_ptr(), m.data_ptr(), v.data_ptr(), n.data_ptr(),
                                  element_type(lowrank, op, "lowrank"), r.numel(), beta1, beta2, eps,
                                  c10::cuda::getCurrentCUDAStream()),
               op);
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
  if (!n.is_same(normalized)) normalized.copy_(n);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CUDA, m) {
  m.impl("sparse_scatter_add_", &sparse_scatter_add_cuda);
  m.impl("sparse_gather", &sparse_gather_cuda);
  m.impl("lowrank_adam_", &lowrank_adam_cuda);
}

}  // namespace lowrank_optim
