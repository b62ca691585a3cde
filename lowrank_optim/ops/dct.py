"""DCT frequency selection after the transform: L1 scores and the sorted top-``rank`` (arXiv 2505.17967).

``lowrank_optim::dct_topk(Tensor transformed, int rank, int dim) -> Tensor``::

    scores_k = Σ_dim |X[..., k]|        # dim=0: one score per column of X, dim=1: one per row
    result   = sorted(top-rank indices of scores)     # int64, ascending

``X`` is the transformed gradient (``G Qᵀ`` or ``Q G``, :mod:`lowrank_optim.projection.dct`). The
reference ``(X).abs_().sum(dim)`` writes and re-reads an ``|X|`` the size of the gradient; a kernel reads
``X`` once. Scores accumulate in fp32 (fp64 for fp64 input), so bf16 input is scored as finely as the
reference's fp32 scoring. Among equal scores which index is kept is unspecified, as for ``torch.topk``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..projection.dct import top_indices
from . import _library
from ._library import define_op

__all__ = ["dct_topk"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _check_dct_args(transformed: Tensor, rank: int, dim: int) -> None:
    op_name = "dct_topk"
    if transformed.dim() != 2:
        raise ValueError(f"{op_name}: transformed.shape={tuple(transformed.shape)}; must be 2-D")
    if transformed.dtype not in _DTYPES:
        raise TypeError(f"{op_name}: transformed.dtype={transformed.dtype}; allowed: {', '.join(map(str, _DTYPES))}")
    if dim not in (0, 1):
        raise ValueError(f"{op_name}: dim={dim}; allowed: 0 (score columns), 1 (score rows)")
    size = transformed.shape[1 - dim]
    if not 0 <= rank <= size:
        raise ValueError(f"{op_name}: rank={rank}; allowed: 0..{size} (transformed.shape[{1 - dim}])")


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dct_topk_default(transformed: Tensor, rank: int, dim: int) -> Tensor:
    _check_dct_args(transformed, rank, dim)
    return top_indices(transformed.abs().sum(dim=dim, dtype=_score_dtype(transformed.dtype)), rank)


def _dct_topk_fake(transformed: Tensor, rank: int, dim: int) -> Tensor:
    _check_dct_args(transformed, rank, dim)
    return transformed.new_empty((rank,), dtype=torch.int64)


define_op("dct_topk(Tensor transformed, int rank, int dim) -> Tensor", _dct_topk_default, _dct_topk_fake)


def dct_topk(transformed: Tensor, rank: int, dim: int = 0, *, fused: bool = True) -> Tensor:
    """The ``rank`` indices (int64, ascending) of the largest ``Σ_dim |transformed|``; see the module
    docstring. ``fused=False`` runs the default kernel (:func:`lowrank_optim.ops._library.run`)."""
    _check_dct_args(transformed, rank, dim)
    return _library.run("dct_topk", fused, transformed, int(rank), int(dim))
