// Torch bindings of the CUDA kernels: argument checks, dtype mapping and the current stream, then a
// call into the plain launchers of launchers.h. Built only against a CUDA build of torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../common/quant_checks.h"
#include "../common/sparse_checks.h"
#include "../common/spmm_checks.h"
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

cuda::IndexType index_type(const at::Tensor& flat_indices) {
  return flat_indices.scalar_type() == at::kInt ? cuda::IndexType::kInt32 : cuda::IndexType::kInt64;
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

// Runs the validation kernel and reads its two results back (one small device-to-host copy, which
// synchronizes: an error must be raised before the scatter or gather touches memory). Raises IndexError
// at the first out-of-range index; returns whether the support is strictly increasing.
bool validate_support(const char* op, const at::Tensor& indices, const at::Tensor& dense) {
  const int64_t nnz = indices.numel();
  at::Tensor result = at::full({2}, 0, indices.options().dtype(at::kLong));
  result[0].fill_(nnz);
  check_launch(cuda::validate_support(indices.const_data_ptr(), index_type(indices), nnz, dense.numel(),
                                      reinterpret_cast<unsigned long long*>(result.data_ptr<int64_t>()),
                                      c10::cuda::getCurrentCUDAStream()),
               op);
  const at::Tensor host = result.cpu();
  const int64_t first_bad = host[0].item<int64_t>();
  if (first_bad < nnz) sparse::throw_out_of_range(op, first_bad, indices[first_bad].item<int64_t>(), dense);
  return host[1].item<int64_t>() == 0;
}

void sparse_scatter_add_cuda(at::Tensor dense, const at::Tensor& flat_indices, const at::Tensor& values,
                             double alpha, bool check_indices) {
  const char* op = "sparse_scatter_add_";
  sparse::check_scatter_args(dense, flat_indices, values);
  if (flat_indices.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor indices = flat_indices.contiguous();
  // check_indices=false: the caller vouches for a strictly increasing support within dense (no sync).
  if (check_indices && !validate_support(op, indices, dense)) {
    // Repeated or unordered indices would race in the kernel; index_add_ accumulates them with atomics.
    dense.view(-1).index_add_(0, indices, values, alpha);
    return;
  }
  const at::Tensor source = values.contiguous();
  check_launch(cuda::sparse_scatter_add(dense.data_ptr(), indices.const_data_ptr(), index_type(indices),
                                        source.const_data_ptr(), element_type(dense, op, "dense"), indices.numel(),
                                        alpha, c10::cuda::getCurrentCUDAStream()),
               op);
}

at::Tensor sparse_gather_cuda(const at::Tensor& dense, const at::Tensor& flat_indices, bool check_indices) {
  const char* op = "sparse_gather";
  sparse::check_support(op, dense, flat_indices);
  TORCH_CHECK_VALUE(dense.dim() <= cuda::kMaxDims, op, ": dense.dim()=", dense.dim(), "; at most ", cuda::kMaxDims);
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor indices = flat_indices.contiguous();
  at::Tensor result = at::empty({indices.numel()}, dense.options());
  if (indices.numel() == 0) return result;
  if (check_indices) validate_support(op, indices, dense);  // reads need no order
  cuda::StridedLayout layout{};
  layout.ndim = static_cast<int>(dense.dim());
  for (int64_t d = 0; d < dense.dim(); ++d) {
    layout.sizes[d] = dense.size(d);
    layout.strides[d] = dense.stride(d);
  }
  check_launch(cuda::sparse_gather(dense.const_data_ptr(), layout, dense.is_contiguous(), indices.const_data_ptr(),
                                   index_type(indices), result.data_ptr(), element_type(dense, op, "dense"),
                                   indices.numel(), c10::cuda::getCurrentCUDAStream()),
               op);
  return result;
}

// The optional `skip` argument (lowrank_optim/ops/_library.py, check_skip) as a device pointer for the
// kernels, which read it on the device (nullptr: none).
const bool* skip_pointer(const char* op, const std::optional<at::Tensor>& skip, const c10::Device& device) {
  if (!skip.has_value()) return nullptr;
  TORCH_CHECK_VALUE(skip->dim() == 0 && skip->scalar_type() == at::kBool && skip->device() == device, op,
                    ": skip is a ", skip->dim(), "-dim ", skip->scalar_type(), " tensor on ", skip->device(),
                    "; allowed: None or a 0-dim torch.bool tensor on ", device);
  return skip->const_data_ptr<bool>();
}

void lowrank_adam_cuda(const at::Tensor& lowrank, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor normalized,
                       double beta1, double beta2, double eps, const std::optional<at::Tensor>& skip) {
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
                                  skip_pointer(op, skip, lowrank.device()), c10::cuda::getCurrentCUDAStream()),
               op);
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
  if (!n.is_same(normalized)) normalized.copy_(n);
}

void fira_residual_cuda(const at::Tensor& grad, at::Tensor back, const at::Tensor& normalized,
                        const at::Tensor& lowrank, at::Tensor residual_norm, int64_t dim, double subtract,
                        double gamma, bool first, double scale, const std::optional<at::Tensor>& skip) {
  const char* op = "fira_residual_";
  TORCH_CHECK(grad.dim() == 2, op, ": grad.shape=", grad.sizes(), "; must be 2-D");
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim=", dim, "; allowed: 0, 1");
  TORCH_CHECK(back.sizes() == grad.sizes() && back.scalar_type() == grad.scalar_type(), op,
              ": back must match grad's shape ", grad.sizes(), " and dtype ", grad.scalar_type());
  TORCH_CHECK(lowrank.dim() == 2 && lowrank.size(1 - dim) == grad.size(1 - dim), op, ": lowrank.shape=",
              lowrank.sizes(), " with dim=", dim, " must have size ", grad.size(1 - dim), " in dimension ", 1 - dim);
  TORCH_CHECK(normalized.sizes() == lowrank.sizes() && normalized.scalar_type() == lowrank.scalar_type(), op,
              ": normalized must match lowrank's shape ", lowrank.sizes(), " and dtype ", lowrank.scalar_type());
  TORCH_CHECK(lowrank.scalar_type() == grad.scalar_type() || lowrank.scalar_type() == at::kFloat, op,
              ": lowrank.dtype=", lowrank.scalar_type(), "; allowed: grad.dtype or float32");
  TORCH_CHECK(residual_norm.dim() == 0 &&
                  (residual_norm.scalar_type() == at::kFloat || residual_norm.scalar_type() == at::kDouble),
              op, ": residual_norm must be a 0-dim float32 or float64 tensor");
  for (const at::Tensor& t : {back, normalized, lowrank, residual_norm}) {
    TORCH_CHECK(t.device() == grad.device(), op, ": device ", t.device(), " must equal grad.device=", grad.device());
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  const at::Tensor n = normalized.contiguous();
  const at::Tensor r = lowrank.contiguous();
  at::Tensor b = back.is_contiguous() ? back : back.contiguous();
  const int64_t rows = grad.size(0);
  const int64_t cols = grad.size(1);
  at::Tensor workspace = at::empty({cuda::fira_workspace_doubles(rows, cols, static_cast<int>(dim))},
                                   grad.options().dtype(at::kDouble));
  check_launch(cuda::fira_residual(g.const_data_ptr(), b.data_ptr(), element_type(grad, op, "grad"), rows, cols,
                                   n.const_data_ptr(), r.const_data_ptr(), element_type(lowrank, op, "lowrank"),
                                   lowrank.size(static_cast<int64_t>(dim)), static_cast<int>(dim),
                                   residual_norm.data_ptr(), residual_norm.scalar_type() == at::kDouble,
                                   workspace.data_ptr<double>(), subtract, gamma, first, scale,
                                   skip_pointer(op, skip, grad.device()), c10::cuda::getCurrentCUDAStream()),
               op);
  if (!b.is_same(back)) back.copy_(b);
}

at::Tensor dct_topk_cuda(const at::Tensor& transformed, int64_t rank, int64_t dim) {
  const char* op = "dct_topk";
  TORCH_CHECK(transformed.dim() == 2, op, ": transformed.shape=", transformed.sizes(), "; must be 2-D");
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim=", dim, "; allowed: 0, 1");
  const int64_t size = transformed.size(1 - dim);
  TORCH_CHECK(rank >= 0 && rank <= size, op, ": rank=", rank, "; allowed: 0..", size);
  const c10::cuda::CUDAGuard guard(transformed.device());
  // A transposed view is read in place as its contiguous transpose, scored along the other dimension.
  const bool transposed = !transformed.is_contiguous() && transformed.t().is_contiguous();
  const at::Tensor x = transposed ? transformed.t() : transformed.contiguous();
  const int reduce_dim = static_cast<int>(transposed ? 1 - dim : dim);
  const bool wide = transformed.scalar_type() == at::kDouble;
  at::Tensor scores = at::empty({size}, transformed.options().dtype(wide ? at::kDouble : at::kFloat));
  at::Tensor workspace = at::empty({cuda::dct_workspace_doubles(x.size(0), x.size(1), reduce_dim)},
                                   transformed.options().dtype(at::kDouble));
  check_launch(cuda::dct_scores(x.const_data_ptr(), element_type(transformed, op, "transformed"), x.size(0), x.size(1),
                                reduce_dim, workspace.data_ptr<double>(), scores.data_ptr(), wide,
                                c10::cuda::getCurrentCUDAStream()),
               op);
  return std::get<0>(std::get<1>(at::topk(scores, rank, 0, /*largest=*/true, /*sorted=*/false)).sort());
}

// ---- SLTrain's sparse products (lowrank_optim/ops/spmm.py) ----------------------------------------

// check_indices: every index in [0, m·n) (IndexError at the first that is not; the validation kernel of the
// sparse ops, one synchronization) and row_ptr the support's (ValueError at the first row where it is
// not). Returns whether the support is strictly increasing (spmm_add_'s CSR kernel needs that).
bool validate_spmm_support(const char* op, const at::Tensor& indices, const at::Tensor& row_ptr, int64_t m,
                           int64_t n) {
  const int64_t nnz = indices.numel();
  bool increasing = true;
  if (nnz > 0) {
    at::Tensor result = at::full({2}, 0, indices.options().dtype(at::kLong));
    result[0].fill_(nnz);
    check_launch(cuda::validate_support(indices.const_data_ptr(), index_type(indices), nnz, m * n,
                                        reinterpret_cast<unsigned long long*>(result.data_ptr<int64_t>()),
                                        c10::cuda::getCurrentCUDAStream()),
                 op);
    const at::Tensor host = result.cpu();
    const int64_t first_bad = host[0].item<int64_t>();
    if (first_bad < nnz) spmm::throw_out_of_range(op, first_bad, indices[first_bad].item<int64_t>(), m, n);
    increasing = host[1].item<int64_t>() == 0;
  }
  // The entries per row, prefix-summed: the definition of row_ptr for any order (lowrank_optim/ops/spmm.py).
  at::Tensor expected = at::zeros({m + 1}, row_ptr.options());
  if (nnz > 0) {
    expected.slice(0, 1).copy_(at::bincount(indices.floor_divide(n).to(at::kLong), {}, m).cumsum(0));
  }
  const at::Tensor differs = expected.ne(row_ptr).nonzero();
  if (differs.size(0) > 0) {
    const int64_t row = differs[0][0].item<int64_t>();
    spmm::throw_bad_row_ptr(op, row, row_ptr[row].item<int64_t>(), expected[row].item<int64_t>(), m, n);
  }
  return increasing;
}

at::ScalarType accumulate_type(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void spmm_cuda(const char* op, bool transposed, at::Tensor out, const at::Tensor& dense, const char* dense_name,
               const at::Tensor& values, const at::Tensor& flat_indices, const at::Tensor& row_ptr,
               bool check_indices) {
  const std::pair<int64_t, int64_t> shape =
      spmm::check_spmm_args(op, transposed, out, dense, dense_name, values, flat_indices, row_ptr);
  const int64_t m = shape.first, n = shape.second;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor indices = flat_indices.contiguous();
  const at::Tensor pointers = row_ptr.contiguous();
  // check_indices=false: the caller vouches for a strictly increasing support and its row_ptr (no sync).
  const bool increasing = !check_indices || validate_spmm_support(op, indices, pointers, m, n);
  const int64_t tokens = out.size(0);
  if (indices.numel() == 0 || tokens == 0) return;
  const at::Tensor weights = values.contiguous();
  const at::Tensor dense_t = dense.t().contiguous();  // features x tokens: coalesced reads over tokens
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cuda::ElementType type = element_type(out, op, "out");
  if (!transposed && increasing) {
    check_launch(cuda::spmm_csr_add(out.data_ptr(), out.stride(0), out.stride(1), dense_t.const_data_ptr(),
                                    weights.const_data_ptr(), indices.const_data_ptr(), pointers.const_data_ptr(),
                                    index_type(indices), type, tokens, m, n, stream),
                 op);
    return;
  }
  const int64_t features = out.size(1);
  at::Tensor buffer = at::zeros({features, tokens}, out.options().dtype(accumulate_type(out)));
  check_launch(cuda::spmm_coo_accumulate(buffer.data_ptr(), dense_t.const_data_ptr(), weights.const_data_ptr(),
                                         indices.const_data_ptr(), index_type(indices), type, indices.numel(), tokens,
                                         n, transposed, stream),
               op);
  check_launch(cuda::spmm_finish(out.data_ptr(), out.stride(0), out.stride(1), buffer.const_data_ptr(), type, tokens,
                                 features, stream),
               op);
}

void spmm_add_cuda(at::Tensor out, const at::Tensor& input, const at::Tensor& values, const at::Tensor& flat_indices,
                   const at::Tensor& row_ptr, bool check_indices) {
  spmm_cuda("spmm_add_", false, out, input, "input", values, flat_indices, row_ptr, check_indices);
}

void spmm_t_add_cuda(at::Tensor out, const at::Tensor& grad, const at::Tensor& values,
                     const at::Tensor& flat_indices, const at::Tensor& row_ptr, bool check_indices) {
  spmm_cuda("spmm_t_add_", true, out, grad, "grad", values, flat_indices, row_ptr, check_indices);
}

at::Tensor sddmm_cuda(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& flat_indices,
                      const at::Tensor& row_ptr, bool check_indices) {
  const char* op = "sddmm";
  const std::pair<int64_t, int64_t> shape = spmm::check_sddmm_args(grad, input, flat_indices, row_ptr);
  const int64_t m = shape.first, n = shape.second;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor indices = flat_indices.contiguous();
  if (check_indices) validate_spmm_support(op, indices, row_ptr.contiguous(), m, n);  // any order is fine
  at::Tensor result = at::zeros({indices.numel()}, grad.options());
  if (indices.numel() == 0 || grad.size(0) == 0) return result;
  const at::Tensor grad_t = grad.t().contiguous();
  const at::Tensor input_t = input.t().contiguous();
  check_launch(cuda::sddmm(result.data_ptr(), grad_t.const_data_ptr(), input_t.const_data_ptr(),
                           indices.const_data_ptr(), index_type(indices), element_type(grad, op, "grad"),
                           indices.numel(), grad.size(0), n, c10::cuda::getCurrentCUDAStream()),
               op);
  return result;
}


// ---- blockwise 8-bit state (lowrank_optim/ops/quant.py) ----------------------------------------------

// The argument checks are common/quant_checks.h's, shared with cpu/quant.cpp.

// Rows of a tensor whose last dimension holds the blocks (0 for an empty tensor).
int64_t quant_rows(const at::Tensor& tensor) { return tensor.size(-1) == 0 ? 0 : tensor.numel() / tensor.size(-1); }

void quantize_blockwise_cuda(const at::Tensor& x, const at::Tensor& code_map, int64_t block_size, at::Tensor codes,
                             at::Tensor absmax) {
  const char* op = "quantize_blockwise_";
  quant::check_quantize_args(x, code_map, block_size, codes, absmax);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(cuda::quantize_blockwise(x.const_data_ptr<float>(), code_map.const_data_ptr<float>(),
                                        static_cast<int>(code_map.numel()), quant_rows(x), x.size(-1),
                                        static_cast<int>(block_size), codes.data_ptr<uint8_t>(),
                                        absmax.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               op);
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code_map,
                                     int64_t block_size) {
  const char* op = "dequantize_blockwise";
  quant::check_dequantize_args(codes, absmax, code_map, block_size);
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  check_launch(cuda::dequantize_blockwise(codes.const_data_ptr<uint8_t>(), absmax.const_data_ptr<float>(),
                                          code_map.const_data_ptr<float>(), static_cast<int>(code_map.numel()),
                                          quant_rows(codes), codes.size(-1), static_cast<int>(block_size),
                                          out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

void blockwise_adam_cuda(const at::Tensor& lowrank, at::Tensor exp_avg, at::Tensor exp_avg_absmax,
                         at::Tensor exp_avg_sq, at::Tensor exp_avg_sq_absmax, at::Tensor normalized,
                         const at::Tensor& signed_map, const at::Tensor& unsigned_map, double beta1, double beta2,
                         double eps, int64_t block_size, const std::optional<at::Tensor>& skip) {
  const char* op = "blockwise_adam_";
  quant::check_adam_args(lowrank, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, normalized, signed_map,
                         unsigned_map, block_size, skip);
  const c10::Device device = lowrank.device();
  const c10::cuda::CUDAGuard guard(device);
  check_launch(cuda::blockwise_adam(lowrank.const_data_ptr<float>(), exp_avg.data_ptr<uint8_t>(),
                                    exp_avg_absmax.data_ptr<float>(), exp_avg_sq.data_ptr<uint8_t>(),
                                    exp_avg_sq_absmax.data_ptr<float>(), normalized.data_ptr<float>(),
                                    signed_map.const_data_ptr<float>(), static_cast<int>(signed_map.numel()),
                                    unsigned_map.const_data_ptr<float>(), static_cast<int>(unsigned_map.numel()),
                                    quant_rows(lowrank), lowrank.size(-1), static_cast<int>(block_size), beta1,
                                    beta2, eps, skip_pointer(op, skip, device), c10::cuda::getCurrentCUDAStream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CUDA, m) {
  m.impl("sparse_scatter_add_", &sparse_scatter_add_cuda);
  m.impl("sparse_gather", &sparse_gather_cuda);
  m.impl("lowrank_adam_", &lowrank_adam_cuda);
  m.impl("fira_residual_", &fira_residual_cuda);
  m.impl("dct_topk", &dct_topk_cuda);
  m.impl("spmm_add_", &spmm_add_cuda);
  m.impl("spmm_t_add_", &spmm_t_add_cuda);
  m.impl("sddmm", &sddmm_cuda);
  m.impl("quantize_blockwise_", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
  m.impl("blockwise_adam_", &blockwise_adam_cuda);
}

}  // namespace lowrank_optim
