"""GaLore's SVD basis: the top-``r`` singular vectors of the current gradient, with a canonical sign.

The reference (``galore-torch`` 1.0) takes ``torch.linalg.svd(G.float(), full_matrices=False)`` and keeps
``Vh[:r]`` (right), ``U[:, :r]`` (left) or both (full), cast to the gradient's dtype. A singular vector is
only defined up to its sign, and LAPACK's choice depends on the library, the thread count, the precision
and the device: a 1e-9 difference in the gradient can flip it. Because the moments carry over a refresh,
a flipped basis vector changes the run (by 1e-3–1e-2 in loss, measured against galore-torch). So by
default every basis vector gets a canonical sign:

    the entry of largest magnitude of each stored basis vector (a column of ``U[:, :r]``, a row of
    ``Vh[:r]``) is made positive; among entries of exactly equal magnitude the first one counts.

This is the rule of scikit-learn's ``svd_flip`` applied per stored side. The same gradient then gives the
same basis on every device, thread count, process count and compile mode, except where the basis itself
is ill-determined: two singular values that (nearly) coincide (any rotation of their vectors is valid),
or a vector whose two largest-magnitude entries are equal to within rounding and of opposite sign.
``SVDProjector(sign="lapack")`` keeps LAPACK's signs (bit parity with galore-torch).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence, cast

import torch
from torch import Tensor

from ..state_keys import BASIS_LEFT, BASIS_RIGHT
from .projector import Projector, ProjectorTensor, register_projector
from .subspace import Side, Subspace, all_finite, basis_shapes

__all__ = ["SIGN_RULES", "SVDProjector", "canonical_signs_", "refresh_svd_basis_", "svd_basis"]

#: The sign conventions of SVD bases: ``canonical`` (module docstring) or ``lapack`` (as returned).
SIGN_RULES: tuple[str, ...] = ("canonical", "lapack")


def svd_basis(grad: Tensor, rank: int, side: Side) -> tuple[Tensor | None, Tensor | None]:
    """``(U[:, :r], Vh[:r])`` of ``grad`` in fp32 with LAPACK's signs, the unused side ``None``.

    ``torch.linalg.svd`` has no bf16/fp16 kernels and is the reference's precision anyway. If the fp32
    SVD fails to converge (ill-conditioned gradients, GaLore issue #58) it is retried in fp64.
    """
    try:
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    except torch.linalg.LinAlgError:
        u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    left = u[:, :rank] if side in (Side.LEFT, Side.FULL) else None
    right = vh[:rank] if side in (Side.RIGHT, Side.FULL) else None
    return left, right


def canonical_signs_(basis: Tensor, dim: int) -> Tensor:
    """Flip, in place, each basis vector (the slices along ``dim``: ``0`` for the columns of an ``m x r``
    left basis, ``1`` for the rows of an ``r x n`` right basis) so that its entry of largest magnitude is
    positive (the first such entry where magnitudes tie exactly). Returns ``basis``."""
    if basis.numel() == 0:
        return basis
    position = basis.abs().argmax(dim=dim, keepdim=True)
    signs = torch.gather(basis, dim, position).sign()
    signs[signs == 0] = 1  # an all-zero vector keeps its sign
    return basis.mul_(signs)


def refresh_svd_basis_(grad: Tensor, subspace: Subspace, sign: str = "canonical") -> bool:
    """Recompute ``subspace``'s bases in place from ``grad``; return whether they were replaced.

    A gradient with NaN/Inf would make the SVD fail or return garbage, so the previous bases are kept
    and ``False`` is returned (see :func:`all_finite`).
    """
    if not all_finite(grad):
        return False
    side, left, right = subspace
    rank = (left if left is not None else cast(Tensor, right).T).shape[1]  # one side is always given
    new = SVDProjector(sign=sign).refresh(grad, rank, side, None, fused=False, first=False)
    for stored, value in zip([t for t in (left, right) if t is not None], new):
        stored.copy_(value)
    return True


@register_projector
@dataclasses.dataclass(frozen=True)
class SVDProjector(Projector):
    """GaLore's projector (arXiv 2403.03507): the top-``rank`` singular vectors of the gradient at each
    refresh, stored as ``basis_left`` (``m x r``) / ``basis_right`` (``r x n``) in the parameter's dtype.

    Args:
        sign: ``canonical`` (default: the largest-magnitude entry of each basis vector is positive, see
            :mod:`lowrank_optim.projection.svd`) or ``lapack`` (LAPACK's signs, as galore-torch).
    """

    name: ClassVar[str] = "svd"
    sign: str = "canonical"

    def __post_init__(self) -> None:
        if self.sign not in SIGN_RULES:
            raise ValueError(f"Invalid sign: {self.sign!r}. Must be one of {', '.join(SIGN_RULES)}.")

    def tensors(self, shape: tuple[int, int], rank: int, side: Side) -> list[ProjectorTensor]:
        return basis_tensors(shape, rank, side)

    def refresh(
        self, grad: Tensor, rank: int, side: Side, previous: Sequence[Tensor] | None, *, fused: bool, first: bool
    ) -> list[Tensor]:
        return self.signed(*svd_basis(grad, rank, side))

    def signed(self, left: Tensor | None, right: Tensor | None) -> list[Tensor]:
        """``[left?, right?]`` with this projector's sign rule applied."""
        if self.sign == "canonical":
            left = None if left is None else canonical_signs_(left.clone(), 0)
            right = None if right is None else canonical_signs_(right.clone(), 1)
        return [basis for basis in (left, right) if basis is not None]

    def subspace(
        self,
        stored: Sequence[Tensor],
        side: Side,
        shape: tuple[int, int],
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Subspace:
        return basis_subspace(stored, side)


def basis_tensors(shape: tuple[int, int], rank: int, side: Side) -> list[ProjectorTensor]:
    """The stored bases of a projector that keeps them (SVD, randomized SVD): a left basis lines up with
    the matrix's rows, a right one with its columns; column-major as LAPACK returns them, since a GEMM's
    rounding can depend on its operands' layout (MKL's AVX-512 kernels do) and with the same layout the
    projections are bit-identical to galore-torch's."""
    left, right = basis_shapes(shape, rank, side)
    result = []
    if left is not None:
        result.append(ProjectorTensor(BASIS_LEFT, left, None, "rows", column_major=True))
    if right is not None:
        result.append(ProjectorTensor(BASIS_RIGHT, right, None, "columns", column_major=True))
    return result


def basis_subspace(stored: Sequence[Tensor], side: Side) -> Subspace:
    """The :class:`Subspace` of stored ``[left?, right?]`` bases."""
    if side is Side.FULL:
        return Subspace(side, stored[0], stored[1])
    if side is Side.LEFT:
        return Subspace(side, stored[0], None)
    return Subspace(side, None, stored[0])
