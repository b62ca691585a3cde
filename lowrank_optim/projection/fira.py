"""Fira's full-rank residual: norm-based scaling and the norm-growth limiter (Chen et al., 2024, arXiv 2410.01623).

GaLore discards the part of ``G`` outside its subspace. Fira adds it back, rescaled by how much Adam
changed the projected gradient, channel by channel. As the reference package ``fira`` 1.0.2 computes it,
with ``R`` the projected gradient and ``N = M / (sqrt(V) + eps)`` the *un-bias-corrected* Adam direction::

    phi = ||N||_k / (||R||_k + 1e-8)                # along the projected dimension: one factor per row of
                                                    # a right-projected W, per column of a left-projected W
    S   = (G - alpha · back(R)) · phi               # "code" form: alpha inside the subtraction
    update = alpha · back(N) + S                    # S is not multiplied by alpha

The paper (Algorithm 1) writes ``S = (I - P Pᵀ) G`` and ``update = alpha · (back(N) + phi·S)``; the two
agree only for ``alpha = 1``. Both are offered (``residual="code"`` | ``"paper"``), the code form by default
because the published numbers come from it.

Norm-growth limiter (gamma = 1.01), on ``||S||_F`` per matrix with one stored scalar: the first step stores
``||S||``; afterwards ``lim = max(||S|| / (prev + 1e-8), gamma) / gamma``, ``S /= lim``, ``prev = ||S|| / lim``
(the post-limit norm). Growth faster than gamma per step is cut to exactly gamma; shrinking passes.

Two history rules the reference lacks, both decided on the device: a residual with ``||S|| = 0`` (an
all-zero gradient) leaves ``prev`` as it was, and ``prev = 0`` means "no history yet", so the next
residual is stored unlimited, as on the first step. In the reference one all-zero gradient sets
``prev = 0`` and every later residual is then cut to ``1e-8 · gamma^k`` after ``k`` steps: about 1850
steps to grow back to a norm of 1. Everywhere else (``prev > 0``, ``||S|| > 0``) the arithmetic is the
reference's. A skipped update (non-finite gradient) leaves ``prev`` untouched too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .subspace import Side, Subspace, add_project_back_

__all__ = [
    "FIRA_GAMMA",
    "FIRA_RESIDUALS",
    "fira_coefficients",
    "fira_residual",
    "fira_scaling",
    "limit_norm_growth_",
    "scale_and_limit_residual_",
]

#: The limiter's growth bound; hard-coded in the reference and used for every experiment of the paper.
FIRA_GAMMA = 1.01

#: ``code``: the reference package's arithmetic; ``paper``: Algorithm 1 of the paper.
FIRA_RESIDUALS: tuple[str, ...] = ("code", "paper")

# Keeps the factor finite for a channel whose projected gradient is zero (the reference's constant).
_PHI_EPS = 1e-8
# Keeps the limiter's ratio finite after a zero residual (the reference's constant).
_LIMITER_EPS = 1e-8


def fira_coefficients(alpha: float, residual: str) -> tuple[float, float]:
    """``(subtract, residual_scale)``: ``S = (G - subtract · back(R)) · phi`` enters the update times
    ``residual_scale``; the code form is ``(alpha, 1)``, the paper form ``(1, alpha)``."""
    if residual == "code":
        return alpha, 1.0
    if residual == "paper":
        return 1.0, alpha
    raise ValueError(f"Invalid residual: {residual!r}. Must be one of {', '.join(FIRA_RESIDUALS)}.")


def fira_scaling(normalized: Tensor, lowrank: Tensor, side: Side) -> Tensor:
    """``phi``: per-channel ratio ``||N||₂ / (||R||₂ + 1e-8)`` over the ``r`` projected coordinates.

    Right side (``N``, ``R`` are ``m x r``): one factor per row, shape ``m x 1``. Left side (``r x n``):
    one per column, shape ``1 x n``. Either broadcasts over the ``m x n`` residual.
    """
    if side is Side.FULL:
        raise ValueError("Fira's scaling needs a one-sided projection; proj_type 'full' has none.")
    dim = 1 if side is Side.RIGHT else 0
    numerator = torch.linalg.vector_norm(normalized, dim=dim, keepdim=True)
    return numerator.div_(torch.linalg.vector_norm(lowrank, dim=dim, keepdim=True).add_(_PHI_EPS))


def fira_residual(grad: Tensor, lowrank: Tensor, normalized: Tensor, subspace: Subspace, *, subtract: float) -> Tensor:
    """``S = (G - subtract · back(R)) · phi``, a new ``m x n`` tensor in ``grad``'s dtype."""
    residual = add_project_back_(grad.clone(), lowrank, subspace, alpha=-subtract)
    return residual.mul_(fira_scaling(normalized, lowrank, subspace.side))


def limit_norm_growth_(
    residual: Tensor,
    previous_norm: Tensor,
    *,
    gamma: float,
    first: bool,
    norm: Tensor | None = None,
    skip: Tensor | None = None,
) -> Tensor:
    """Cap the growth of ``||residual||_F`` to ``gamma`` per step, in place; ``previous_norm`` is updated.

    ``previous_norm`` is a 0-dim tensor on the residual's device and ``first`` a Python bool (from the
    step counter), so nothing here reads a device value back to the host: the clamp replaces the
    reference's ``max(tensor, float)``, which synchronizes every step on a GPU, and the history rules of
    the module docstring are ``torch.where`` calls. ``norm`` is the Frobenius norm of the whole matrix when
    ``residual`` is only a piece of it (computed from it if ``None``). ``skip`` (0-dim bool): leave
    ``previous_norm`` as it is (the caller discards the residual).
    """
    if norm is None:
        norm = torch.linalg.vector_norm(residual, dtype=torch.promote_types(residual.dtype, previous_norm.dtype))
    if first:
        kept = norm if skip is None else torch.where(skip, previous_norm, norm)
        previous_norm.copy_(kept)
        return residual
    limiter = torch.clamp_min(norm / (previous_norm + _LIMITER_EPS), gamma).div_(gamma)
    limiter = torch.where(previous_norm > 0, limiter, 1.0)  # no history yet: store, do not limit
    limited = norm / limiter
    keep = norm == 0 if skip is None else (norm == 0) | skip  # a zero residual tells nothing about growth
    previous_norm.copy_(torch.where(keep, previous_norm, limited))
    return residual.div_(limiter)


def scale_and_limit_residual_(
    difference: Tensor,
    normalized: Tensor,
    lowrank: Tensor,
    side: Side,
    previous_norm: Tensor,
    *,
    gamma: float,
    first: bool,
    scale: float = 1.0,
    skip: Tensor | None = None,
) -> Tensor:
    """Fira after the subtraction, in place on ``D = G - subtract · back(R)`` (a whole matrix):
    ``scale · limited(D · phi)``; ``previous_norm`` is the limiter's state. ``skip`` (0-dim bool): the
    result is zero and the state is kept (decided on the device).

    The one statement of this sequence: the reference step (which forms ``D`` with ``addmm``) and the
    pure-PyTorch ``fira_residual_`` op (which gets ``back(R)`` and subtracts) both end with it.
    """
    difference.mul_(fira_scaling(normalized, lowrank, side))
    limit_norm_growth_(difference, previous_norm, gamma=gamma, first=first, skip=skip)
    if scale != 1.0:
        difference.mul_(scale)
    if skip is not None:
        difference.masked_fill_(skip, 0.0)
    return difference
