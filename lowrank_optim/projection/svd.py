"""GaLore's SVD basis: the top-``r`` singular vectors of the current gradient.

The reference (``galore-torch`` 1.0) takes ``torch.linalg.svd(G.float(), full_matrices=False)`` and keeps
``Vh[:r]`` (right), ``U[:, :r]`` (left) or both (full), cast to the gradient's dtype. We do the same so
that trajectories match, including the sign convention of the singular vectors: moments survive a
refresh, so a sign flip of a basis vector would change the run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .subspace import Side, Subspace, all_finite

__all__ = ["svd_basis", "refresh_svd_basis_"]


def svd_basis(grad: Tensor, rank: int, side: Side) -> tuple[Tensor | None, Tensor | None]:
    """``(U[:, :r], Vh[:r])`` of ``grad`` in fp32, with the unused side ``None``.

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


def refresh_svd_basis_(grad: Tensor, subspace: Subspace) -> bool:
    """Recompute ``subspace``'s bases in place from ``grad``; return whether they were replaced.

    A gradient with NaN/Inf would make the SVD fail or return garbage, so the previous bases are kept
    and ``False`` is returned (see :func:`all_finite`).
    """
    if not all_finite(grad):
        return False
    side, left, right = subspace
    rank = (left if left is not None else right.T).shape[1]
    new_left, new_right = svd_basis(grad, rank, side)
    if left is not None:
        left.copy_(new_left)
    if right is not None:
        right.copy_(new_right)
    return True
