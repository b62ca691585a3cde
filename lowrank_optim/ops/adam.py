"""The low-rank Adam moment update and normalization as one op (GaLore / DCT / Fira inner loop).

``lowrank_optim::lowrank_adam_(Tensor lowrank, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq,
Tensor(c!) normalized, float beta1, float beta2, float eps, Tensor? skip=None) -> ()``, elementwise over
equal-shape, equal-dtype tensors (``R``, ``M``, ``V``, ``N``)::

    M = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R² ;  N = M / (sqrt(V) + eps)

``skip`` (a 0-dim bool tensor on the tensors' device, e.g. "``R`` holds a NaN") makes the update a no-op
decided on the device: ``M`` and ``V`` keep their values and ``N`` is zero, so nothing reads the flag
back to the host.

The default kernel is the optimizer's reference arithmetic, op for op (so that its rounding is the
optimizer's); compiled kernels do the same in one pass over the four tensors instead of six. ``N`` must
not overlap ``R``, ``M`` or ``V`` (it is written while they are still read). Kernels override the
default the way :mod:`lowrank_optim.ops.sparse` describes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _library
from ._library import check_skip, define_op

__all__ = ["lowrank_adam_", "update_moments_"]

_SCHEMA = (
    "lowrank_adam_(Tensor lowrank, Tensor(a!) exp_avg, Tensor(b!) exp_avg_sq, Tensor(c!) normalized, "
    "float beta1, float beta2, float eps, Tensor? skip=None) -> ()"
)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_adam_args(
    lowrank: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, normalized: Tensor, skip: Tensor | None = None
) -> None:
    op_name = "lowrank_adam_"
    check_skip(op_name, skip, lowrank.device)
    for name, tensor in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("normalized", normalized)):
        if tensor.shape != lowrank.shape:
            raise ValueError(
                f"{op_name}: {name}.shape={tuple(tensor.shape)} must equal lowrank.shape={tuple(lowrank.shape)}"
            )
        if tensor.dtype != lowrank.dtype:
            raise TypeError(f"{op_name}: {name}.dtype={tensor.dtype} must equal lowrank.dtype={lowrank.dtype}")
        if tensor.device != lowrank.device:
            raise ValueError(f"{op_name}: {name}.device={tensor.device} must equal lowrank.device={lowrank.device}")
    if lowrank.dtype not in _DTYPES:
        raise TypeError(f"{op_name}: lowrank.dtype={lowrank.dtype}; allowed: {', '.join(map(str, _DTYPES))}")


def update_moments_(
    lowrank: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, skip: Tensor | None = None
) -> None:
    """``M = b1 M + (1 - b1) R``, ``V = b2 V + (1 - b2) R²`` in place, op by op: the reference's arithmetic.

    With ``skip`` the same ops run out of place (the same rounding) and the result is kept only where the
    flag is not set, one moment at a time: one moment-sized temporary, and no host read of the flag.
    """
    if skip is None:
        exp_avg.mul_(beta1).add_(lowrank, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(lowrank, lowrank, value=1.0 - beta2)
        return
    update = exp_avg.mul(beta1).add_(lowrank, alpha=1.0 - beta1)
    exp_avg.copy_(torch.where(skip, exp_avg, update, out=update))
    update = exp_avg_sq.mul(beta2).addcmul_(lowrank, lowrank, value=1.0 - beta2)
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, update, out=update))


def _adam_default(
    lowrank: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    normalized: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    skip: Tensor | None = None,
) -> None:
    _check_adam_args(lowrank, exp_avg, exp_avg_sq, normalized, skip)
    update_moments_(lowrank, exp_avg, exp_avg_sq, beta1, beta2, skip)
    torch.sqrt(exp_avg_sq, out=normalized).add_(eps)
    torch.div(exp_avg, normalized, out=normalized)
    if skip is not None:
        normalized.masked_fill_(skip, 0.0)


def _adam_fake(
    lowrank: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    normalized: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    skip: Tensor | None = None,
) -> None:
    _check_adam_args(lowrank, exp_avg, exp_avg_sq, normalized, skip)


define_op(_SCHEMA, _adam_default, _adam_fake)


def lowrank_adam_(
    lowrank: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    normalized: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    skip: Tensor | None = None,
    *,
    fused: bool = True,
) -> Tensor:
    """Update the moments in place and write ``N = M / (sqrt(V) + eps)`` into ``normalized``; returns it.

    With ``skip`` true (a 0-dim bool tensor, read on the device) the moments are kept and ``N`` is zero.
    ``fused=False`` runs the default kernel (:func:`lowrank_optim.ops._library.run`).
    """
    _check_adam_args(lowrank, exp_avg, exp_avg_sq, normalized, skip)  # same errors whichever kernel runs
    _library.run("lowrank_adam_", fused, lowrank, exp_avg, exp_avg_sq, normalized, float(beta1), float(beta2), float(eps), skip)
    return normalized
