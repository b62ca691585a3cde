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
    "apply_folded_update_",
    "fira_folded_terms",
    "fira_folded_update_",
    "fira_residual",
    "fira_scaling",
    "limit_norm_growth_",
    "norm_growth_limiter_",
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
    limiter = norm_growth_limiter_(norm, previous_norm, gamma=gamma, first=first, skip=skip)
    return residual if limiter is None else residual.div_(limiter)


def norm_growth_limiter_(
    norm: Tensor, previous_norm: Tensor, *, gamma: float, first: bool, skip: Tensor | None = None
) -> Tensor | None:
    """The limiter's divisor for a residual of Frobenius norm ``norm``; updates ``previous_norm`` in place.

    The state half of :func:`limit_norm_growth_` (which divides its residual by the result), for callers
    that fold ``1 / lim`` into other coefficients instead of dividing an ``m x n`` residual
    (:func:`fira_folded_update_`). ``None`` on the first step (nothing is limited, ``prev = ||S||``);
    otherwise a 0-dim tensor ``lim >= 1`` of ``norm``'s dtype, with the history rules of the module
    docstring. Decided on the device: no host read.
    """
    if first:
        kept = norm if skip is None else torch.where(skip, previous_norm, norm)
        previous_norm.copy_(kept)
        return None
    limiter = torch.clamp_min(norm / (previous_norm + _LIMITER_EPS), gamma).div_(gamma)
    limiter = torch.where(previous_norm > 0, limiter, 1.0)  # no history yet: store, do not limit
    limited = norm / limiter
    keep = norm == 0 if skip is None else (norm == 0) | skip  # a zero residual tells nothing about growth
    previous_norm.copy_(torch.where(keep, previous_norm, limited))
    return limiter


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


def _sum_of_squares(x: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """``sum(x², dim, keepdim=True)`` in ``dtype`` without an ``x``-sized temporary.

    Along the contiguous ``dim=1`` ATen's 2-norm reduction is fast; along ``dim=0`` it is not vectorized on
    CPU (0.4–1 ms for a 512 x 1376 fp32 matrix here, vs 0.03 ms for ``sum(0)``), so the rows go through a
    fixed 64k-element buffer, squared and column-summed, a block at a time: a few ops per block, no
    ``m x n`` temporary.
    """
    if dim == 1 or x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype).square_()
    rows = max(1, _SQUARE_BLOCK // max(1, x.shape[1]))
    total = torch.zeros((1, x.shape[1]), dtype=dtype, device=x.device)
    buffer = torch.empty((min(rows, x.shape[0]), x.shape[1]), dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        squares = torch.mul(block, block, out=buffer[: block.shape[0]])
        total.add_(squares.sum(dim=0, keepdim=True, dtype=dtype))
    return total


# Elements of the CPU column-sum-of-squares buffer (256 KiB in fp32: stays in the L2 cache).
_SQUARE_BLOCK = 1 << 16


def fira_folded_update_(
    param: Tensor,
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    subspace: Subspace,
    residual_norm: Tensor,
    *,
    subtract: float,
    scale: float,
    residual_scale: float,
    gamma: float,
    first: bool,
    step_size: float,
    skip: Tensor | None = None,
    norm_dtype: torch.dtype | None = None,
) -> Tensor:
    """Apply Fira's whole update to ``param`` in place, with the residual folded into the back-projection.

    What it computes is the update of the reference package ``fira`` 1.0.2 (Chen et al., 2024, arXiv
    2410.01623), as this module's docstring states it, for a whole one-sided projected matrix::

        phi = ||N||_k / (||R||_k + 1e-8)                 # per row (RIGHT) / per column (LEFT)
        S   = (G - subtract · back(R)) · phi
        lim = norm-growth limiter of ||S||_F             # first step: lim = 1, prev = ||S||
        W  -= step_size · (scale · back(N) + residual_scale · S / lim)

    ``residual_norm`` (the limiter's 0-dim state, ``prev``) is updated as :func:`limit_norm_growth_` does.

    How, for the RIGHT side (``P`` is ``r x n`` with ``P Pᵀ = I``, ``R = G Pᵀ``, ``back(X) = X P``; phi
    is ``m x 1``). Both ``S`` and ``back`` are linear, so with ``c = residual_scale · phi / lim``::

        W -= step_size · ((scale · N - subtract · c ∘ R) P + c ∘ G)

    one ``addmm_`` of an ``m x r`` term and one ``addcmul_`` of ``G`` with ``c`` broadcast over its rows.
    ``lim`` needs ``||S||`` before either, and that follows from norms alone: row ``i`` of
    ``G - s · R P`` has ``||G_i||² - 2s·G_i Pᵀ R_iᵀ + s²·R_i P Pᵀ R_iᵀ = ||G_i||² - (2s - s²)·||R_i||²``
    (``G_i Pᵀ = R_i``, ``P Pᵀ = I``), hence ``||S||² = Σ_i phi_i² · max(||G_i||² - (2s - s²)·||R_i||², 0)``.
    The LEFT side (``P`` is ``m x r`` with ``Pᵀ P = I``, ``R = Pᵀ G``, ``back(X) = P X``, phi ``1 x n``)
    is the transpose: column norms, ``W -= step_size · (P (scale · N - subtract · R ∘ c) + G ∘ c)``.

    Accuracy: for ``0 < subtract < 2`` the row formula subtracts nearly equal numbers when ``G`` lies almost in
    the subspace; its absolute error is a few ulps of ``||G_i||²`` (plus the basis's departure from
    orthonormality, and ``R``'s own rounding), so ``||S||`` has a relative error of about ``ulp · ||G||² / ||G -
    back(R)||²`` instead of the explicit form's ``ulp · ||G|| / ||G - back(R)||``. It reaches the update only
    through ``lim`` (and the stored ``prev``); the clamp at 0 keeps a row from contributing a negative square.
    ``norm_dtype`` (default: ``grad``'s dtype promoted with ``residual_norm``'s, at least fp32) is the dtype of
    the norms and the limiter. fp64 removes only the ``||G_i||²`` summation error, which is not the dominant one
    (``R``'s fp32 rounding and the fp32 basis's orthonormality are): measured on the LLaMA-60M shapes it changes
    nothing (bench/bench_fira_fold.py, 3b: 1.6e-5 either way at ``||G - back(R)|| / ||G|| = 0.01``, 4.5e-4 at
    0.001, vs 3.5e-9 at the 0.87 of a random basis), and ``vector_norm(..., dtype=float64)`` casts ``G`` into an
    fp64 ``m x n`` copy first. A bf16/fp16 basis is orthonormal to about 1e-2, far too loosely for the identity:
    keep such weights on the explicit path.

    ``skip`` (0-dim bool, read on the device): ``param`` is left bit-for-bit unchanged and so is
    ``residual_norm``, even when ``G`` holds NaN/Inf (the very case that sets it). Because ``0 · NaN`` is
    NaN, a zero coefficient cannot do that in place; the update is built in one ``m x n`` temporary and
    selected with ``torch.where``. The rounding differs from the explicit path's (which forms
    ``back(R)``, the residual and ``scale · back(N) + S`` as ``m x n`` tensors), so that path stays the
    bit-exact form.

    Passes over ``m x n`` data and temporaries:

    - ``skip=None``: one read of ``G`` (its row/column sums of squares; LEFT on CPU through a fixed
      64k-element buffer), one ``addmm_`` (read and write ``W``), one ``addcmul_`` (read ``W`` and ``G``,
      write ``W``); no ``m x n`` temporary, only ``r``-sized and ``m``/``n``-sized ones (with a
      ``norm_dtype`` wider than ``grad``'s, ``vector_norm``'s cast copy of ``G`` on top).
    - ``skip`` given: the same read of ``G``, ``T = addmm(W, ...)`` (read ``W``, write the one ``m x n``
      temporary ``T``), ``T.addcmul_`` (read ``T``, ``G``, write ``T``), ``W = where(skip, W, T)`` (read
      ``W``, ``T``, write ``W``): one more read and write than without ``skip``, and the same bits when
      ``skip`` is false.

    No host read anywhere (``first`` comes from the host-side step counter). ``Side.FULL`` is refused: phi
    scales the channels of the one unprojected dimension, and a two-sided projection has none (FiraAdamW
    refuses ``proj_type="full"`` for the same reason). Returns ``param``.
    """
    if grad.shape != param.shape or grad.dim() != 2:
        raise ValueError(f"grad.shape={tuple(grad.shape)} must equal param.shape={tuple(param.shape)} (2-D)")
    first_factor, second_factor, coefficient = fira_folded_terms(
        grad,
        lowrank,
        normalized,
        subspace,
        residual_norm,
        subtract=subtract,
        scale=scale,
        residual_scale=residual_scale,
        gamma=gamma,
        first=first,
        skip=skip,
        norm_dtype=norm_dtype,
        dtype=param.dtype,
    )
    return apply_folded_update_(param, grad, first_factor, second_factor, coefficient, step_size, skip)


def fira_folded_terms(
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    subspace: Subspace,
    residual_norm: Tensor,
    *,
    subtract: float,
    scale: float,
    residual_scale: float,
    gamma: float,
    first: bool,
    skip: Tensor | None = None,
    norm_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The state half of :func:`fira_folded_update_`: ``(A, B, c)`` with the update ``W -= step · (A B + c ∘ G)``
    (``A B`` the back-projection of the ``r``-sized term, ``c`` the channel coefficient, ``m x 1`` or
    ``1 x n``), all in ``dtype`` (default ``grad``'s); ``residual_norm`` is updated (kept where ``skip``).
    Reads ``G`` once (its channel sums of squares); no host read."""
    side = subspace.side
    if side is Side.FULL:
        raise ValueError("Fira's scaling needs a one-sided projection; proj_type 'full' has none.")
    if grad.dim() != 2:
        raise ValueError(f"grad.shape={tuple(grad.shape)} must be 2-D")
    dtype = dtype or grad.dtype
    dim = 1 if side is Side.RIGHT else 0
    if norm_dtype is None:
        norm_dtype = torch.promote_types(torch.promote_types(grad.dtype, residual_norm.dtype), torch.float32)

    # phi by the same ops as fira_scaling, so it has the explicit path's bits.
    lowrank_norm = torch.linalg.vector_norm(lowrank, dim=dim, keepdim=True)
    phi = torch.linalg.vector_norm(normalized, dim=dim, keepdim=True).div_(lowrank_norm + _PHI_EPS)

    # ||S||² from norms: ||G_k||² - (2s - s²)·||R_k||² per channel k, clamped (cancellation), weighted by phi².
    overlap = 2.0 * subtract - subtract * subtract
    channel = _sum_of_squares(grad, dim, norm_dtype)
    channel.sub_(lowrank_norm.to(norm_dtype).square(), alpha=overlap).clamp_min_(0.0)
    norm = channel.mul_(phi.to(norm_dtype).square()).sum().sqrt_()
    limiter = norm_growth_limiter_(norm, residual_norm, gamma=gamma, first=first, skip=skip)

    # c = residual_scale · phi / lim (channel-sized); the r-sized term scale·N - subtract·c∘R.
    coefficient = phi.to(norm_dtype) * residual_scale
    if limiter is not None:
        coefficient = coefficient / limiter
    # Widened before scaling: fp32 moments of fp64 weights are not rounded to fp32 once more here.
    combined = normalized.to(torch.promote_types(normalized.dtype, coefficient.dtype)).mul(scale)
    combined.addcmul_(coefficient, lowrank, value=-subtract)
    combined = combined.to(dtype)
    coefficient = coefficient.to(dtype)
    if side is Side.RIGHT:
        assert subspace.right is not None  # a RIGHT subspace carries its right basis
        return combined, subspace.right.to(dtype), coefficient
    assert subspace.left is not None  # a LEFT subspace carries its left basis
    return subspace.left.to(dtype), combined, coefficient


def apply_folded_update_(
    param: Tensor,
    grad: Tensor,
    first_factor: Tensor,
    second_factor: Tensor,
    coefficient: Tensor,
    step_size: float,
    skip: Tensor | None = None,
) -> Tensor:
    """``W -= step_size · (A B + c ∘ G)`` in place (``c`` broadcast over ``G``); with ``skip`` true, ``W``
    is left bit-for-bit as it was, even where ``G`` holds NaN/Inf. The default kernel of the
    ``fira_update_`` op (:mod:`lowrank_optim.ops.fira`), and its reference."""
    if skip is None:
        param.addmm_(first_factor, second_factor, alpha=-step_size)
        return param.addcmul_(grad, coefficient, value=-step_size)
    # 0 · NaN = NaN: a skipped update must not touch param arithmetically, hence the temporary and where.
    # Same operations in the same order as above, so skip=False gives the bits of skip=None.
    update = torch.addmm(param, first_factor, second_factor, alpha=-step_size)
    update.addcmul_(grad, coefficient, value=-step_size)
    return torch.where(skip, param, update, out=param)
