// CPU kernel of lowrank_optim::dct_topk (schema and math: lowrank_optim/ops/dct.py): the L1 score of
// every column (dim=0) or row (dim=1) of the transformed gradient in one read of it, then the top-rank
// by partial selection and the chosen indices sorted. Scores accumulate in double and are rounded to
// the score dtype (fp32, fp64 for fp64 input) before ranking, as the reference ranks its rounded sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common.h"

namespace lowrank_optim {
namespace {

using cpu::widen;

constexpr int64_t kColumnBlock = 512;  // columns per task of the column sums (4 KiB of double accumulators)

// Sums of |x| over the rows of a row-major rows x cols matrix: one per column.
template <typename T>
void column_scores(const T* x, int64_t rows, int64_t cols, double* scores) {
  at::parallel_for(0, cols, kColumnBlock, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) scores[j] = 0.0;
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = x + i * cols;
      for (int64_t j = begin; j < end; ++j) scores[j] += std::abs(static_cast<double>(widen(row[j])));
    }
  });
}

// Sums of |x| along each row of a row-major rows x cols matrix.
template <typename T>
void row_scores(const T* x, int64_t rows, int64_t cols, double* scores) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = x + i * cols;
      double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: the reduction pipelines
      int64_t j = 0;
      for (; j + 8 <= cols; j += 8) {
        for (int k = 0; k < 8; ++k) lanes[k] += std::abs(static_cast<double>(widen(row[j + k])));
      }
      for (; j < cols; ++j) lanes[0] += std::abs(static_cast<double>(widen(row[j])));
      scores[i] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
  });
}

// The `rank` largest entries of `scores` (NaN ranks highest, as in torch.topk; ties go to the lower
// index), returned as ascending indices.
template <typename S>
at::Tensor top_indices(const std::vector<S>& scores, int64_t rank) {
  std::vector<int64_t> order(scores.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  auto before = [&](int64_t a, int64_t b) {
    const S sa = scores[a], sb = scores[b];
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return na;
    if (!na && sa != sb) return sa > sb;
    return a < b;
  };
  std::nth_element(order.begin(), order.begin() + rank, order.end(), before);
  std::sort(order.begin(), order.begin() + rank);
  at::Tensor result = at::empty({rank}, at::TensorOptions().dtype(at::kLong));
  std::copy(order.begin(), order.begin() + rank, result.data_ptr<int64_t>());
  return result;
}

at::Tensor dct_topk_cpu(const at::Tensor& transformed, int64_t rank, int64_t dim) {
  const char* op = "dct_topk";
  TORCH_CHECK(transformed.dim() == 2, op, ": transformed.shape=", transformed.sizes(), "; must be 2-D");
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim=", dim, "; allowed: 0, 1");
  const int64_t size = transformed.size(1 - dim);
  TORCH_CHECK(rank >= 0 && rank <= size, op, ": rank=", rank, "; allowed: 0..", size);
  // A transposed view is read in place as its contiguous transpose, scored along the other dimension.
  const bool transposed = !transformed.is_contiguous() && transformed.t().is_contiguous();
  const at::Tensor x = transposed ? transformed.t() : transformed.contiguous();
  const int64_t reduce_dim = transposed ? 1 - dim : dim;
  std::vector<double> sums(size);
  if (size > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dct_topk", [&] {
      const scalar_t* data = x.const_data_ptr<scalar_t>();
      if (reduce_dim == 0) {
        column_scores(data, x.size(0), x.size(1), sums.data());
      } else {
        row_scores(data, x.size(0), x.size(1), sums.data());
      }
    });
  }
  if (transformed.scalar_type() == at::kDouble) return top_indices(sums, rank);
  return top_indices(std::vector<float>(sums.begin(), sums.end()), rank);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CPU, m) { m.impl("dct_topk", &dct_topk_cpu); }

}  // namespace lowrank_optim
