"""Low-rank gradient subspaces: side rules, projection and back-projection.

GaLore (Zhao et al., 2024, arXiv 2403.03507) keeps Adam's moments of an ``m x n`` gradient ``G`` in a
rank-``r`` subspace. With a *right* basis ``P`` (``r x n``, orthonormal rows) the projected gradient is
``R = G Pᵀ`` (``m x r``) and an update ``N`` goes back as ``N P``; with a *left* basis ``P`` (``m x r``,
orthonormal columns) it is ``R = Pᵀ G`` (``r x n``) and ``P N``; a *full* projection uses both,
``R = Pₗᵀ G Pᵣᵀ`` (``r x r``) and ``Pₗ N Pᵣ``.

Everything here is a pure function on tensors: the optimizers, their distributed variants and the
kernels' tests share them. Bases are plain tensors ``left`` (``m x r``) and ``right`` (``r x n``);
whichever the side does not use is ``None``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "PROJ_TYPES",
    "Side",
    "Subspace",
    "add_project_back_",
    "all_finite",
    "basis_shapes",
    "effective_rank",
    "lowrank_shape",
    "nonfinite_flag",
    "project",
    "project_back",
    "resolve_side",
]

#: The ``proj_type`` values of the reference package ``galore-torch`` 1.0.
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")


class Side(str, enum.Enum):
    """Which side of ``G`` (``m x n``) the basis multiplies."""

    LEFT = "left"  # R = Pᵀ G, basis m x r
    RIGHT = "right"  # R = G Pᵀ, basis r x n
    FULL = "full"  # R = Pₗᵀ G Pᵣᵀ, both bases


class Subspace(NamedTuple):
    """A transient view of one parameter's projection: the side and its basis tensors.

    Built from optimizer state on every step; never stored itself, so state stays plain tensors.
    """

    side: Side
    left: Tensor | None  # m x r, orthonormal columns; present for LEFT and FULL
    right: Tensor | None  # r x n, orthonormal rows; present for RIGHT and FULL


def resolve_side(proj_type: str, shape: tuple[int, ...] | torch.Size) -> Side:
    """The side a ``proj_type`` picks for a matrix of ``shape``, decided once from the full shape.

    ``std`` projects the smaller dimension (right for ``m >= n``), ``reverse_std`` the larger one.
    The reference infers the side again at back-projection from the *low-rank* tensor's shape,
    which breaks for ``reverse_std`` when that tensor is square; deciding it here avoids that.
    """
    m, n = shape
    if proj_type == "std":
        return Side.RIGHT if m >= n else Side.LEFT
    if proj_type == "reverse_std":
        return Side.LEFT if m >= n else Side.RIGHT
    if proj_type in ("left", "right", "full"):
        return Side(proj_type)
    raise ValueError(f"Invalid proj_type: {proj_type!r}. Must be one of {', '.join(PROJ_TYPES)}.")


def effective_rank(rank: int, shape: tuple[int, ...] | torch.Size) -> int:
    """``min(rank, m, n)``: a truncated SVD cannot return more directions than the smaller side."""
    return min(rank, shape[0], shape[1])


def basis_shapes(
    shape: tuple[int, ...] | torch.Size, rank: int, side: Side
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Shapes of the ``(left, right)`` bases for an ``m x n`` matrix at (effective) ``rank``."""
    m, n = shape
    left = (m, rank) if side in (Side.LEFT, Side.FULL) else None
    right = (rank, n) if side in (Side.RIGHT, Side.FULL) else None
    return left, right


def lowrank_shape(shape: tuple[int, ...] | torch.Size, rank: int, side: Side) -> tuple[int, int]:
    """Shape of the projected gradient (and of the Adam moments kept for it)."""
    m, n = shape
    if side is Side.RIGHT:
        return (m, rank)
    if side is Side.LEFT:
        return (rank, n)
    return (rank, rank)


def project(grad: Tensor, subspace: Subspace) -> Tensor:
    """``R``: the gradient expressed in the subspace's coordinates."""
    side, left, right = subspace
    if side is Side.RIGHT:
        assert right is not None  # a RIGHT subspace carries its right basis
        return grad @ right.T
    assert left is not None  # a LEFT or FULL subspace carries its left basis
    if side is Side.LEFT:
        return left.T @ grad
    assert right is not None  # a FULL subspace carries both bases
    return (left.T @ grad) @ right.T


def project_back(lowrank: Tensor, subspace: Subspace) -> Tensor:
    """The ``m x n`` matrix whose projection is ``lowrank`` (the basis maps it back)."""
    side, left, right = subspace
    if side is Side.RIGHT:
        assert right is not None  # a RIGHT subspace carries its right basis
        return lowrank @ right
    assert left is not None  # a LEFT or FULL subspace carries its left basis
    if side is Side.LEFT:
        return left @ lowrank
    assert right is not None  # a FULL subspace carries both bases
    return (left @ lowrank) @ right


def add_project_back_(weight: Tensor, lowrank: Tensor, subspace: Subspace, alpha: float) -> Tensor:
    """``weight += alpha * project_back(lowrank)`` without an ``m x n`` temporary (one ``addmm_``).

    ``lowrank`` is cast to the weight's dtype first, which costs only an ``r``-sized copy when the
    moments are kept in a wider dtype than the weight.
    """
    side, left, right = subspace
    lowrank = lowrank.to(weight.dtype)
    if side is Side.RIGHT:
        assert right is not None  # a RIGHT subspace carries its right basis
        return weight.addmm_(lowrank, right, alpha=alpha)
    assert left is not None  # a LEFT or FULL subspace carries its left basis
    if side is Side.LEFT:
        return weight.addmm_(left, lowrank, alpha=alpha)
    assert right is not None  # a FULL subspace carries both bases
    return weight.addmm_(left @ lowrank, right, alpha=alpha)


def all_finite(grad: Tensor) -> bool:
    """Whether ``grad`` has no NaN/Inf: a refresh must not build its subspace from such a gradient
    (fp16 loss scaling produces them in its first steps, GaLore issue #26). This is the one host sync
    of a refresh step; the SVD or the top-r selection would synchronize anyway."""
    return bool(torch.isfinite(grad).all())


def nonfinite_flag(lowrank: Tensor) -> Tensor:
    """A 0-dim bool tensor on ``lowrank``'s device: whether it holds a NaN or an Inf. No host sync.

    Read off the sum, accumulated in at least fp32: one reduction pass and no temporary the size of the
    input. A NaN or an Inf entry makes the sum NaN or infinite; a sum of finite entries overflows only
    when they average about 3e38 / numel, far beyond any usable gradient. For a projected parameter
    ``lowrank`` is ``R = project(G)``: IEEE arithmetic carries a NaN/Inf of ``G`` into ``R`` (Inf·0 is
    NaN), so checking the ``r``-sized ``R`` checks ``G``.
    """
    return torch.isfinite(lowrank.sum(dtype=torch.promote_types(lowrank.dtype, torch.float32))).logical_not_()
