"""Fira's scaled, norm-limited residual as one op (see :mod:`lowrank_optim.projection.fira` for the math).

``lowrank_optim::fira_residual_(Tensor grad, Tensor(a!) back, Tensor normalized, Tensor lowrank,
Tensor(b!) residual_norm, int dim, float subtract, float gamma, bool first, float scale, Tensor? skip=None) -> ()``::

    phi  = ||N||₂ / (||R||₂ + 1e-8)   along ``dim`` of N, R (1: R is m x r, phi per row; 0: r x n, per column)
    S    = (G - subtract · B) · phi   # B = back(R), given in ``back``, overwritten with the result
    lim  = max(||S||_F / (prev + 1e-8), gamma) / gamma ;  prev = ||S||_F / lim
    back = scale · S / lim

with the limiter's history rules of :func:`~lowrank_optim.projection.fira.limit_norm_growth_` (first step,
or no history yet: ``prev = ||S||_F``, ``lim = 1``; a zero residual leaves ``prev`` as it was). With
``skip`` true (a 0-dim bool tensor, read on the device) ``back`` becomes zero and ``residual_norm`` is
left as it was.

Why this boundary: the reference makes seven ``m x n`` passes after the back-projection (clone,
``addmm_``, ``mul_(phi)``, the norm, ``div_``, ``mul_(scale)``) plus the ``r``-sized norm ops; a kernel
needs two (write ``S`` while summing its squares; rescale it once the limiter is known), and the
limiter never leaves the device (no host sync). ``back`` is the matmul ``back(R)``'s own fresh output,
so overwriting it costs no extra buffer.

``residual_norm`` is the limiter's 0-dim state (fp32, or fp64), on ``grad``'s device; ``first`` comes from
the host-side step counter. ``normalized``/``lowrank`` have ``grad``'s dtype or fp32 (fp32 moments of
bf16 weights). The default kernel subtracts, then calls
:func:`~lowrank_optim.projection.fira.scale_and_limit_residual_` as the reference step does; compiled kernels
override it as :mod:`lowrank_optim.ops.sparse` describes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..projection.fira import fira_folded_update_, scale_and_limit_residual_
from ..projection.subspace import Side, Subspace
from . import _library
from ._library import check_skip, define_op

__all__ = [
    "FIRA_FOLDED_DTYPES",
    "FIRA_RESIDUAL_DTYPES",
    "fira_folded_",
    "fira_folded_accepts",
    "fira_residual_",
    "fira_residual_accepts",
]

_SCHEMA = (
    "fira_residual_(Tensor grad, Tensor(a!) back, Tensor normalized, Tensor lowrank, Tensor(b!) residual_norm, "
    "int dim, float subtract, float gamma, bool first, float scale, Tensor? skip=None) -> ()"
)

#: The dtypes of ``grad`` (and ``back``) the op takes; ``normalized``/``lowrank`` have ``grad``'s or fp32.
FIRA_RESIDUAL_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_NORM_DTYPES = (torch.float32, torch.float64)


def fira_residual_accepts(grad_dtype: torch.dtype, lowrank_dtype: torch.dtype) -> bool:
    """Whether :func:`fira_residual_` takes a gradient of ``grad_dtype`` with moments of ``lowrank_dtype``
    (the optimizers fall back to the reference arithmetic, or refuse ``fused=True``, when it does not)."""
    return grad_dtype in FIRA_RESIDUAL_DTYPES and lowrank_dtype in (grad_dtype, torch.float32)


def _check_fira_args(
    grad: Tensor,
    back: Tensor,
    normalized: Tensor,
    lowrank: Tensor,
    residual_norm: Tensor,
    dim: int,
    skip: Tensor | None = None,
) -> None:
    op_name = "fira_residual_"
    if grad.dim() != 2:
        raise ValueError(f"{op_name}: grad.shape={tuple(grad.shape)}; must be 2-D")
    if grad.dtype not in FIRA_RESIDUAL_DTYPES:
        raise TypeError(f"{op_name}: grad.dtype={grad.dtype}; allowed: {', '.join(map(str, FIRA_RESIDUAL_DTYPES))}")
    if dim not in (0, 1):
        raise ValueError(f"{op_name}: dim={dim}; allowed: 0 (lowrank is r x n), 1 (lowrank is m x r)")
    if back.shape != grad.shape or back.dtype != grad.dtype:
        raise ValueError(
            f"{op_name}: back (shape {tuple(back.shape)}, {back.dtype}) must match grad "
            f"(shape {tuple(grad.shape)}, {grad.dtype})"
        )
    if lowrank.dim() != 2 or lowrank.shape[1 - dim] != grad.shape[1 - dim]:
        raise ValueError(
            f"{op_name}: lowrank.shape={tuple(lowrank.shape)} with dim={dim} must have size "
            f"{grad.shape[1 - dim]} (grad.shape[{1 - dim}]) in dimension {1 - dim}"
        )
    if normalized.shape != lowrank.shape or normalized.dtype != lowrank.dtype:
        raise ValueError(
            f"{op_name}: normalized (shape {tuple(normalized.shape)}, {normalized.dtype}) must match lowrank "
            f"(shape {tuple(lowrank.shape)}, {lowrank.dtype})"
        )
    if not fira_residual_accepts(grad.dtype, lowrank.dtype):
        raise TypeError(f"{op_name}: lowrank.dtype={lowrank.dtype}; allowed: grad.dtype ({grad.dtype}) or torch.float32")
    if residual_norm.dim() != 0 or residual_norm.dtype not in _NORM_DTYPES:
        raise ValueError(
            f"{op_name}: residual_norm (shape {tuple(residual_norm.shape)}, {residual_norm.dtype}) must be a "
            "0-dim torch.float32 or torch.float64 tensor"
        )
    for name, tensor in (("back", back), ("normalized", normalized), ("lowrank", lowrank), ("residual_norm", residual_norm)):
        if tensor.device != grad.device:
            raise ValueError(f"{op_name}: {name}.device={tensor.device} must equal grad.device={grad.device}")
    check_skip(op_name, skip, grad.device)


def _fira_default(
    grad: Tensor,
    back: Tensor,
    normalized: Tensor,
    lowrank: Tensor,
    residual_norm: Tensor,
    dim: int,
    subtract: float,
    gamma: float,
    first: bool,
    scale: float,
    skip: Tensor | None = None,
) -> None:
    _check_fira_args(grad, back, normalized, lowrank, residual_norm, dim, skip)
    torch.add(grad, back, alpha=-subtract, out=back)
    side = Side.RIGHT if dim == 1 else Side.LEFT
    scale_and_limit_residual_(
        back, normalized, lowrank, side, residual_norm, gamma=gamma, first=first, scale=scale, skip=skip
    )


def _fira_fake(
    grad: Tensor,
    back: Tensor,
    normalized: Tensor,
    lowrank: Tensor,
    residual_norm: Tensor,
    dim: int,
    subtract: float,
    gamma: float,
    first: bool,
    scale: float,
    skip: Tensor | None = None,
) -> None:
    _check_fira_args(grad, back, normalized, lowrank, residual_norm, dim, skip)


define_op(_SCHEMA, _fira_default, _fira_fake)


def fira_residual_(
    grad: Tensor,
    back: Tensor,
    normalized: Tensor,
    lowrank: Tensor,
    residual_norm: Tensor,
    *,
    dim: int,
    subtract: float,
    gamma: float,
    first: bool,
    scale: float = 1.0,
    skip: Tensor | None = None,
    fused: bool = True,
) -> Tensor:
    """Overwrite ``back`` (holding ``back(R)``) with ``scale · limited((G - subtract · back) · phi)``; returns it.

    ``residual_norm`` (the limiter's state) is updated in place; with ``skip`` true ``back`` becomes zero
    and the state is kept. See the module docstring. ``fused=False`` runs the default kernel
    (:func:`lowrank_optim.ops._library.run`).
    """
    _check_fira_args(grad, back, normalized, lowrank, residual_norm, dim, skip)  # same errors whichever kernel runs
    _library.run(
        "fira_residual_",
        fused,
        grad,
        back,
        normalized,
        lowrank,
        residual_norm,
        int(dim),
        float(subtract),
        float(gamma),
        bool(first),
        float(scale),
        skip,
    )
    return back



# --- fira_folded_: Fira's whole update with the residual folded into the back-projection ----------------

_FOLDED_SCHEMA = (
    "fira_folded_(Tensor(a!) param, Tensor grad, Tensor lowrank, Tensor normalized, Tensor basis, "
    "Tensor(b!) residual_norm, int dim, float subtract, float scale, float residual_scale, float gamma, "
    "bool first, float step_size, Tensor? skip=None) -> ()"
)

#: The weight dtypes :func:`fira_folded_` takes (the folded update runs on fp32/fp64 weights only, see
#: FiraAdamW's ``fold_residual``); ``lowrank``/``normalized`` have the weight's dtype or fp32.
FIRA_FOLDED_DTYPES = (torch.float32, torch.float64)


def fira_folded_accepts(param_dtype: torch.dtype, lowrank_dtype: torch.dtype, basis_dtype: torch.dtype) -> bool:
    """Whether :func:`fira_folded_` takes weights of ``param_dtype`` with moments of ``lowrank_dtype`` and a
    basis of ``basis_dtype`` (otherwise the step runs the same arithmetic as pure functions)."""
    return param_dtype in FIRA_FOLDED_DTYPES and lowrank_dtype in (param_dtype, torch.float32) and basis_dtype == param_dtype


def _check_folded_args(
    param: Tensor,
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    basis: Tensor,
    residual_norm: Tensor,
    dim: int,
    skip: Tensor | None = None,
) -> None:
    op_name = "fira_folded_"
    if param.dim() != 2:
        raise ValueError(f"{op_name}: param.shape={tuple(param.shape)}; must be 2-D")
    if param.dtype not in FIRA_FOLDED_DTYPES:
        raise TypeError(f"{op_name}: param.dtype={param.dtype}; allowed: {', '.join(map(str, FIRA_FOLDED_DTYPES))}")
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise ValueError(
            f"{op_name}: grad (shape {tuple(grad.shape)}, {grad.dtype}) must match param "
            f"(shape {tuple(param.shape)}, {param.dtype})"
        )
    if dim not in (0, 1):
        raise ValueError(f"{op_name}: dim={dim}; allowed: 0 (lowrank is r x n), 1 (lowrank is m x r)")
    m, n = param.shape
    if lowrank.dim() != 2 or lowrank.shape[1 - dim] != param.shape[1 - dim]:
        raise ValueError(
            f"{op_name}: lowrank.shape={tuple(lowrank.shape)} with dim={dim} must have size "
            f"{param.shape[1 - dim]} (param.shape[{1 - dim}]) in dimension {1 - dim}"
        )
    if normalized.shape != lowrank.shape or normalized.dtype != lowrank.dtype:
        raise ValueError(
            f"{op_name}: normalized (shape {tuple(normalized.shape)}, {normalized.dtype}) must match lowrank "
            f"(shape {tuple(lowrank.shape)}, {lowrank.dtype})"
        )
    rank = lowrank.shape[dim]
    expected = (rank, n) if dim == 1 else (m, rank)
    if tuple(basis.shape) != expected:
        raise ValueError(
            f"{op_name}: basis.shape={tuple(basis.shape)}; must be {expected} (the {'right' if dim == 1 else 'left'} "
            f"basis of a {m} x {n} matrix at rank {rank})"
        )
    if not fira_folded_accepts(param.dtype, lowrank.dtype, basis.dtype):
        raise TypeError(
            f"{op_name}: lowrank.dtype={lowrank.dtype}, basis.dtype={basis.dtype}; allowed: lowrank in param.dtype "
            f"({param.dtype}) or torch.float32, basis in param.dtype"
        )
    if residual_norm.dim() != 0 or residual_norm.dtype not in _NORM_DTYPES:
        raise ValueError(
            f"{op_name}: residual_norm (shape {tuple(residual_norm.shape)}, {residual_norm.dtype}) must be a "
            "0-dim torch.float32 or torch.float64 tensor"
        )
    tensors = (
        ("grad", grad), ("lowrank", lowrank), ("normalized", normalized), ("basis", basis), ("residual_norm", residual_norm)
    )
    for name, tensor in tensors:
        if tensor.device != param.device:
            raise ValueError(f"{op_name}: {name}.device={tensor.device} must equal param.device={param.device}")
    check_skip(op_name, skip, param.device)


def _folded_default(
    param: Tensor,
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    basis: Tensor,
    residual_norm: Tensor,
    dim: int,
    subtract: float,
    scale: float,
    residual_scale: float,
    gamma: float,
    first: bool,
    step_size: float,
    skip: Tensor | None = None,
) -> None:
    _check_folded_args(param, grad, lowrank, normalized, basis, residual_norm, dim, skip)
    subspace = Subspace(Side.RIGHT, None, basis) if dim == 1 else Subspace(Side.LEFT, basis, None)
    fira_folded_update_(
        param, grad, lowrank, normalized, subspace, residual_norm, subtract=subtract, scale=scale,
        residual_scale=residual_scale, gamma=gamma, first=first, step_size=step_size, skip=skip,
    )


def _folded_fake(
    param: Tensor,
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    basis: Tensor,
    residual_norm: Tensor,
    dim: int,
    subtract: float,
    scale: float,
    residual_scale: float,
    gamma: float,
    first: bool,
    step_size: float,
    skip: Tensor | None = None,
) -> None:
    _check_folded_args(param, grad, lowrank, normalized, basis, residual_norm, dim, skip)


define_op(_FOLDED_SCHEMA, _folded_default, _folded_fake)


def fira_folded_(
    param: Tensor,
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    basis: Tensor,
    residual_norm: Tensor,
    *,
    dim: int,
    subtract: float,
    scale: float,
    residual_scale: float,
    gamma: float,
    first: bool,
    step_size: float,
    skip: Tensor | None = None,
    fused: bool = True,
) -> Tensor:
    """Fira's whole update of one matrix in place, the residual folded into the back-projection; returns
    ``param``.

    The math is :func:`~lowrank_optim.projection.fira.fira_folded_update_`'s (its default kernel):
    ``W -= step_size · (scale · back(N) + residual_scale · S / lim)`` with ``S = (G - subtract · back(R)) ·
    phi`` never formed, ``||S||`` from channel norms of ``G`` and ``R``, and ``residual_norm`` (the
    limiter's 0-dim state) updated. ``dim=1``: ``basis`` is the right basis (``r x n``), ``lowrank`` and
    ``normalized`` ``m x r``; ``dim=0``: the left basis (``m x r``), ``r x n``. With ``skip`` true ``param``
    and ``residual_norm`` keep their bits, even where ``grad`` holds NaN/Inf. The CPU kernel reads the
    flag directly and computes the channel terms in loops (no per-matrix cascade of small ops); it
    agrees with the default kernel to a few ulps. ``fused=False`` runs the default kernel
    (:func:`lowrank_optim.ops._library.run`).
    """
    _check_folded_args(param, grad, lowrank, normalized, basis, residual_norm, dim, skip)
    _library.run(
        "fira_folded_", fused, param, grad, lowrank, normalized, basis, residual_norm, int(dim), float(subtract),
        float(scale), float(residual_scale), float(gamma), bool(first), float(step_size), skip,
    )
    return param
