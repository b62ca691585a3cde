"""Sparse scatter/gather at a fixed flat support: the two kernels behind SLTrain (arXiv 2406.02214).

A support is a 1-D tensor of flat row-major indices into a dense tensor (``int32`` or ``int64``;
``int32`` suffices below 2³¹ elements and saves 4 bytes per entry).

- ``lowrank_optim::sparse_scatter_add_(Tensor(a!) dense, Tensor flat_indices, Tensor values, float alpha,
  bool check_indices=True) -> ()``
  ``dense.view(-1)[flat_indices] += alpha * values`` in place (``dense`` must be contiguous); repeated
  indices accumulate.
- ``lowrank_optim::sparse_gather(Tensor dense, Tensor flat_indices, bool check_indices=True) -> Tensor``
  ``dense.reshape(-1)[flat_indices]`` without copying a non-contiguous ``dense``.

Every kernel checks every index before it reads or writes ``dense``: an index outside
``[0, dense.numel())`` raises ``IndexError`` naming its position and value, and ``dense`` is left as it
was. SLTrain's supports are *sorted and unique* (strictly increasing); compiled kernels scatter such a
support in parallel without atomics and hand any other one to ``index_add_`` (the default kernel), so
the result is correct for every support and only the speed differs. The check is one extra read of the
indices (and, on CUDA, one device-to-host copy of two integers: a synchronization). ``check_indices=False``
skips it for a caller that has checked its support itself (``SLTrainLinear``, once per support: its
forward and backward then never synchronize).

How compiled kernels override these defaults
--------------------------------------------
The pure-PyTorch kernels below are registered under the ``CompositeExplicitAutograd`` dispatch key.
That key only fills the backend slots (CPU, CUDA, ...) that have no kernel of their own, so a C++/CUDA
extension accelerates an op by registering a backend kernel for the same name::

    TORCH_LIBRARY_IMPL(lowrank_optim, CUDA, m) { m.impl("sparse_gather", &sparse_gather_cuda); }

No Python change is needed, the dispatcher prefers the backend kernel, and the registration may run
before or after this module is imported (the dispatcher joins a schema and its kernels whenever both
exist). The extension must not ``def`` the schemas again: they live here. The fake (meta) kernels,
which ``torch.compile`` and meta-device code use, and the autograd formula of ``sparse_gather`` stay
in Python and apply to every backend. The compiled kernels raise the same exceptions with the same
messages as the checks here (``csrc/common/sparse_checks.h``; a test compares them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._library import LIBRARY, qualified_name

__all__ = ["sparse_gather", "sparse_scatter_add_"]

_INDEX_DTYPES = (torch.int32, torch.int64)

LIBRARY.define(
    "sparse_scatter_add_(Tensor(a!) dense, Tensor flat_indices, Tensor values, float alpha, "
    "bool check_indices=True) -> ()"
)
LIBRARY.define("sparse_gather(Tensor dense, Tensor flat_indices, bool check_indices=True) -> Tensor")


def _check_support(op_name: str, dense: Tensor, flat_indices: Tensor) -> None:
    if flat_indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op_name}: flat_indices.dtype={flat_indices.dtype}; allowed: torch.int32, torch.int64")
    if flat_indices.dim() != 1:
        raise ValueError(f"{op_name}: flat_indices.shape={tuple(flat_indices.shape)}; must be 1-D")
    if flat_indices.device != dense.device:
        raise ValueError(
            f"{op_name}: flat_indices.device={flat_indices.device} differs from dense.device={dense.device}"
        )


def _check_scatter_args(dense: Tensor, flat_indices: Tensor, values: Tensor) -> None:
    op_name = "sparse_scatter_add_"
    _check_support(op_name, dense, flat_indices)
    if values.shape != flat_indices.shape:
        raise ValueError(
            f"{op_name}: values.shape={tuple(values.shape)} must equal flat_indices.shape={tuple(flat_indices.shape)}"
        )
    if values.dtype != dense.dtype:
        raise TypeError(f"{op_name}: values.dtype={values.dtype} must equal dense.dtype={dense.dtype}")
    if values.device != dense.device:
        raise ValueError(f"{op_name}: values.device={values.device} differs from dense.device={dense.device}")
    if not dense.is_contiguous():
        raise ValueError(f"{op_name}: dense (shape {tuple(dense.shape)}) must be contiguous to be updated in place")


def _check_in_range(op_name: str, dense: Tensor, flat_indices: Tensor) -> None:
    """Raise ``IndexError`` at the first index outside ``[0, dense.numel())``; one pass and one host read."""
    if flat_indices.numel() == 0:
        return
    numel = dense.numel()
    low, high = (int(bound) for bound in torch.aminmax(flat_indices))
    if low >= 0 and high < numel:
        return
    position = int(((flat_indices < 0) | (flat_indices >= numel)).nonzero()[0, 0])
    raise IndexError(
        f"{op_name}: flat_indices[{position}]={int(flat_indices[position])} is out of range for dense of shape "
        f"{tuple(dense.shape)} ({numel} elements); allowed: 0 <= index < {numel}"
    )


def _scatter_add_default(
    dense: Tensor, flat_indices: Tensor, values: Tensor, alpha: float, check_indices: bool = True
) -> None:
    _check_scatter_args(dense, flat_indices, values)
    if check_indices:
        _check_in_range("sparse_scatter_add_", dense, flat_indices)
    # index_add_ takes int32 or int64 indices directly, so no int64 copy of the support is made.
    dense.view(-1).index_add_(0, flat_indices, values, alpha=alpha)


def _scatter_add_fake(
    dense: Tensor, flat_indices: Tensor, values: Tensor, alpha: float, check_indices: bool = True
) -> None:
    _check_scatter_args(dense, flat_indices, values)


def _gather_default(dense: Tensor, flat_indices: Tensor, check_indices: bool = True) -> Tensor:
    _check_support("sparse_gather", dense, flat_indices)
    if check_indices:
        _check_in_range("sparse_gather", dense, flat_indices)
    if dense.is_contiguous():
        return dense.view(-1).index_select(0, flat_indices)
    # reshape(-1) would copy the whole dense tensor; indexing by coordinates reads only the support.
    return dense[torch.unravel_index(flat_indices, dense.shape)]


def _gather_fake(dense: Tensor, flat_indices: Tensor, check_indices: bool = True) -> Tensor:
    _check_support("sparse_gather", dense, flat_indices)
    return dense.new_empty(flat_indices.shape)


def _gather_setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, bool], output: Tensor) -> None:
    dense, flat_indices, check_indices = inputs
    ctx.save_for_backward(flat_indices)
    ctx.dense_shape = dense.shape
    ctx.check_indices = check_indices


def _gather_backward(ctx: Any, grad_values: Tensor) -> tuple[Tensor, None, None]:
    (flat_indices,) = ctx.saved_tensors
    grad_dense = grad_values.new_zeros(ctx.dense_shape)
    torch.ops.lowrank_optim.sparse_scatter_add_(
        grad_dense, flat_indices, grad_values.contiguous(), 1.0, ctx.check_indices
    )
    return grad_dense, None, None


LIBRARY.impl("sparse_scatter_add_", _scatter_add_default, "CompositeExplicitAutograd")
LIBRARY.impl("sparse_gather", _gather_default, "CompositeExplicitAutograd")
torch.library.register_fake(qualified_name("sparse_scatter_add_"), _scatter_add_fake, lib=LIBRARY)
torch.library.register_fake(qualified_name("sparse_gather"), _gather_fake, lib=LIBRARY)
torch.library.register_autograd(
    qualified_name("sparse_gather"), _gather_backward, setup_context=_gather_setup_context, lib=LIBRARY
)


def sparse_scatter_add_(
    dense: Tensor, flat_indices: Tensor, values: Tensor, alpha: float = 1.0, *, check_indices: bool = True
) -> None:
    """``dense.view(-1)[flat_indices] += alpha * values`` in place (repeated indices accumulate).

    ``dense`` must be contiguous; ``values`` has ``dense``'s dtype and ``flat_indices``'s length; every
    index must lie in ``[0, dense.numel())`` (else ``IndexError``, ``dense`` untouched).
    ``check_indices=False`` skips that check (and, on CUDA, its host synchronization): only for a caller
    that has itself checked that the support is strictly increasing and within ``dense`` (as
    :class:`~lowrank_optim.nn.SLTrainLinear` does once per support); anything else is then undefined.
    Not differentiable (it mutates); SLTrain's autograd function calls it with gradients off.
    """
    # Checked here too, so that errors have the same type and text whichever kernel runs.
    _check_scatter_args(dense, flat_indices, values)
    torch.ops.lowrank_optim.sparse_scatter_add_(dense, flat_indices, values, float(alpha), bool(check_indices))


def sparse_gather(dense: Tensor, flat_indices: Tensor, *, check_indices: bool = True) -> Tensor:
    """``dense.reshape(-1)[flat_indices]`` (a new tensor); differentiable in ``dense``.
    ``check_indices`` as for :func:`sparse_scatter_add_`."""
    _check_support("sparse_gather", dense, flat_indices)
    return torch.ops.lowrank_optim.sparse_gather(dense, flat_indices, bool(check_indices))
