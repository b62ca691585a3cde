// CPU kernels of lowrank_optim::sparse_scatter_add_ and lowrank_optim::sparse_gather
// (schemas: lowrank_optim/ops/sparse.py).
//
// Safety first: one read-only pass over the support checks every index against dense before anything
// is read from or written to dense (an out-of-range index raises IndexError naming it, as the default
// kernel does), and finds out whether the support is strictly increasing. A strictly increasing (sorted,
// unique) support lets every thread own a contiguous range of it and write elements no other thread
// touches: no atomics, and each thread walks the dense tensor forwards (prefetch-friendly). Any other
// support (unsorted, or with duplicates, which must accumulate) goes to ATen's index_add_, the default
// kernel's own arithmetic. The check reads the 4 or 8 index bytes per nonzero once more; the scatter
// itself touches a cache line of dense per nonzero, so the check costs a small fraction of it
// (bench/bench_kernels.py measures both).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/sparse_checks.h"
#include "common.h"

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

// Checks that every index addresses an element of `dense` (IndexError at the first that does not) and
// returns whether the support is strictly increasing (cpu::scan_support).
template <typename index_t>
bool validate_support(const char* op, const index_t* idx, int64_t nnz, const at::Tensor& dense) {
  return cpu::scan_support(idx, nnz, dense.numel(), kGrain,
                           [&](int64_t i, int64_t value) { sparse::throw_out_of_range(op, i, value, dense); });
}

void sparse_scatter_add_cpu(at::Tensor dense, const at::Tensor& flat_indices, const at::Tensor& values,
                            double alpha, bool check_indices) {
  sparse::check_scatter_args(dense, flat_indices, values);
  const int64_t nnz = flat_indices.numel();
  if (nnz == 0) return;
  const at::Tensor indices = flat_indices.contiguous();
  // check_indices=false: the caller vouches for a strictly increasing support within dense.
  bool strictly_increasing = true;
  if (check_indices) {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_scatter_add_", [&] {
      strictly_increasing = validate_support("sparse_scatter_add_", indices.const_data_ptr<index_t>(), nnz, dense);
    });
  }
  if (!strictly_increasing) {
    // Repeated or unordered indices would race between threads below; index_add_ accumulates them.
    dense.view(-1).index_add_(0, indices, values, alpha);
    return;
  }
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

at::Tensor sparse_gather_cpu(const at::Tensor& dense, const at::Tensor& flat_indices, bool check_indices) {
  sparse::check_support("sparse_gather", dense, flat_indices);
  const int64_t nnz = flat_indices.numel();
  at::Tensor result = at::empty({nnz}, dense.options());
  if (nnz == 0) return result;
  const at::Tensor indices = flat_indices.contiguous();
  // Reads need no order: any in-range support is gathered correctly.
  if (check_indices) {
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_gather", [&] {
      validate_support("sparse_gather", indices.const_data_ptr<index_t>(), nnz, dense);
    });
  }
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
