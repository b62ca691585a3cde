// CPU kernels of lowrank_optim::sparse_scatter_add_ and lowrank_optim::sparse_gather
// (schemas: lowrank_optim/ops/sparse.py). The support is sorted and unique, so every thread owns a
// contiguous range of it and writes elements no other thread touches: no atomics, and each thread
// walks the dense tensor forwards (prefetch-friendly).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace lowrank_optim {
namespace {

// Enough nonzeros per task that scheduling costs stay small next to the memory traffic.
constexpr int64_t kGrain = 16384;
// How many nonzeros ahead the dense element is prefetched. At a 3 % support consecutive nonzeros are
// ~33 elements apart, so the hardware prefetcher (which follows cache-line strides) misses most of
// them; a software prefetch this far ahead hides the memory latency.
constexpr int64_t kPrefetchDistance = 64;

template <typename T>
inline void prefetch(const T* address, bool write) {
#if defined(__GNUC__) || defined(__clang__)
  if (write) {
    __builtin_prefetch(address, 1);
  } else {
    __builtin_prefetch(address, 0);
  }
#endif
}

void check_support(const char* op, const at::Tensor& dense, const at::Tensor& flat_indices) {
  TORCH_CHECK(flat_indices.scalar_type() == at::kInt || flat_indices.scalar_type() == at::kLong, op,
              ": flat_indices.dtype=", flat_indices.scalar_type(), "; allowed: int32, int64");
  TORCH_CHECK(flat_indices.dim() == 1, op, ": flat_indices.dim()=", flat_indices.dim(), "; must be 1");
  TORCH_CHECK(dense.device() == flat_indices.device(), op, ": flat_indices.device=", flat_indices.device(),
              " differs from dense.device=", dense.device());
}

void sparse_scatter_add_cpu(at::Tensor dense, const at::Tensor& flat_indices, const at::Tensor& values,
                            double alpha) {
  check_support("sparse_scatter_add_", dense, flat_indices);
  TORCH_CHECK(dense.is_contiguous(), "sparse_scatter_add_: dense (shape ", dense.sizes(),
              ") must be contiguous to be updated in place");
  TORCH_CHECK(values.sizes() == flat_indices.sizes(), "sparse_scatter_add_: values.shape=", values.sizes(),
              " must equal flat_indices.shape=", flat_indices.sizes());
  TORCH_CHECK(values.scalar_type() == dense.scalar_type(), "sparse_scatter_add_: values.dtype=",
              values.scalar_type(), " must equal dense.dtype=", dense.scalar_type());
  const int64_t nnz = flat_indices.numel();
  if (nnz == 0) return;
  const at::Tensor indices = flat_indices.contiguous();
  const at::Tensor source = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dense.scalar_type(), "sparse_scatter_add_", [&] {
    // Reduced precision adds in float and rounds once, as index_add_ does.
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(alpha);
    scalar_t* out = dense.data_ptr<scalar_t>();
    const scalar_t* in = source.const_data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_scatter_add_", [&] {
      const index_t* idx = indices.const_data_ptr<index_t>();
      at::parallel_for(0, nnz, kGrain, [&](int64_t begin, int64_t end) {
        const int64_t prefetched = std::max(begin, end - kPrefetchDistance);
        for (int64_t i = begin; i < end; ++i) {
          if (i < prefetched) prefetch(out + idx[i + kPrefetchDistance], /*write=*/true);
          scalar_t& target = out[idx[i]];
          target = static_cast<scalar_t>(static_cast<acc_t>(target) + scale * static_cast<acc_t>(in[i]));
        }
      });
    });
  });
}

at::Tensor sparse_gather_cpu(const at::Tensor& dense, const at::Tensor& flat_indices) {
  check_support("sparse_gather", dense, flat_indices);
  const int64_t nnz = flat_indices.numel();
  at::Tensor result = at::empty({nnz}, dense.options());
  if (nnz == 0) return result;
  const at::Tensor indices = flat_indices.contiguous();
  const int64_t ndim = dense.dim();
  const bool contiguous = dense.is_contiguous();
  // Strided reads: a flat row-major index is unravelled into an offset with the input's own strides,
  // so a transposed or sliced dense tensor is read in place instead of copied whole.
  const std::vector<int64_t> sizes(dense.sizes().begin(), dense.sizes().end());
  const std::vector<int64_t> strides(dense.strides().begin(), dense.strides().end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dense.scalar_type(), "sparse_gather", [&] {
    const scalar_t* in = dense.const_data_ptr<scalar_t>();
    scalar_t* out = result.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_gather", [&] {
      const index_t* idx = indices.const_data_ptr<index_t>();
      at::parallel_for(0, nnz, kGrain, [&](int64_t begin, int64_t end) {
        if (contiguous) {
          const int64_t prefetched = std::max(begin, end - kPrefetchDistance);
          for (int64_t i = begin; i < prefetched; ++i) {
            prefetch(in + idx[i + kPrefetchDistance], /*write=*/false);
            out[i] = in[idx[i]];
          }
          for (int64_t i = prefetched; i < end; ++i) out[i] = in[idx[i]];
          return;
        }
        for (int64_t i = begin; i < end; ++i) {
          int64_t flat = idx[i];
          int64_t offset = 0;
          for (int64_t d = ndim - 1; d >= 0; --d) {
            offset += (flat % sizes[d]) * strides[d];
            flat /= sizes[d];
          }
          out[i] = in[offset];
        }
      });
    });
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CPU, m) {
  m.impl("sparse_scatter_add_", &sparse_scatter_add_cpu);
  m.impl("sparse_gather", &sparse_gather_cpu);
}

}  // namespace lowrank_optim
