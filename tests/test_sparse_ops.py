"""lowrank_optim::sparse_scatter_add_ and lowrank_optim::sparse_gather: schemas, fake kernels, values."""

from __future__ import annotations

import re

import pytest
import torch

from lowrank_optim.ops import sparse_gather, sparse_scatter_add_

INDEX_DTYPES = [torch.int32, torch.int64]
VALUE_DTYPES = [torch.float32, torch.bfloat16]


def _support(numel: int, nnz: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=generator)[:nnz].sort().values.to(dtype)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_opcheck(index_dtype: torch.dtype, value_dtype: torch.dtype) -> None:
    indices = _support(6 * 7, 9, index_dtype)
    dense = torch.randn(6, 7, dtype=value_dtype)
    values = torch.randn(9, dtype=value_dtype)
    torch.library.opcheck(torch.ops.lowrank_optim.sparse_scatter_add_.default, (dense, indices, values, 0.5))
    torch.library.opcheck(torch.ops.lowrank_optim.sparse_gather.default, (dense, indices))
    torch.library.opcheck(
        torch.ops.lowrank_optim.sparse_gather.default, (dense.clone().requires_grad_(), indices)
    )
    torch.library.opcheck(torch.ops.lowrank_optim.sparse_gather.default, (dense.t(), indices))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_scatter_add_matches_loop(index_dtype: torch.dtype, value_dtype: torch.dtype) -> None:
    dense = torch.randn(5, 8, dtype=value_dtype)
    indices = _support(40, 13, index_dtype)
    values = torch.randn(13, dtype=value_dtype)
    expected = dense.clone()
    for index, value in zip(indices.tolist(), values):
        expected.view(-1)[index] += -2.0 * value
    sparse_scatter_add_(dense, indices, values, alpha=-2.0)
    torch.testing.assert_close(dense, expected, rtol=0, atol=0)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_gather_matches_loop_and_handles_non_contiguous(index_dtype: torch.dtype, value_dtype: torch.dtype) -> None:
    base = torch.randn(8, 12, dtype=value_dtype)
    for dense in (base, base.t(), base[::2, 1::3]):
        indices = _support(dense.numel(), dense.numel() // 3, index_dtype)
        expected = torch.stack([dense.reshape(-1)[index] for index in indices.tolist()])
        gathered = sparse_gather(dense, indices)
        assert gathered.dtype == value_dtype
        torch.testing.assert_close(gathered, expected, rtol=0, atol=0)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_empty_support(index_dtype: torch.dtype) -> None:
    dense = torch.randn(3, 4)
    before = dense.clone()
    empty = torch.empty(0, dtype=index_dtype)
    sparse_scatter_add_(dense, empty, torch.empty(0), alpha=3.0)
    assert torch.equal(dense, before)
    assert sparse_gather(dense, empty).shape == (0,)


def test_gather_gradient_is_scatter() -> None:
    dense = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    indices = _support(24, 7, torch.int32)
    assert torch.autograd.gradcheck(lambda d: sparse_gather(d, indices), (dense,))
    assert torch.autograd.gradcheck(lambda d: sparse_gather(d.t(), indices), (dense,))


def test_errors_name_the_bad_argument() -> None:
    dense = torch.zeros(3, 4)
    indices = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match=re.escape("flat_indices.dtype=torch.float32; allowed: torch.int32, torch.int64")):
        sparse_gather(dense, indices.float())
    with pytest.raises(ValueError, match=re.escape("flat_indices.shape=(1, 2); must be 1-D")):
        sparse_gather(dense, indices.view(1, 2))
    with pytest.raises(ValueError, match=re.escape("values.shape=(3,) must equal flat_indices.shape=(2,)")):
        sparse_scatter_add_(dense, indices, torch.zeros(3))
    with pytest.raises(TypeError, match=re.escape("values.dtype=torch.float64 must equal dense.dtype=torch.float32")):
        sparse_scatter_add_(dense, indices, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=re.escape("dense (shape (4, 3)) must be contiguous to be updated in place")):
        sparse_scatter_add_(dense.t(), indices, torch.zeros(2))
