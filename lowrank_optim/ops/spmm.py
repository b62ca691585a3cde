"""Products with a sparse matrix at a fixed support: the kernels of SLTrain's factored path (arXiv 2406.02214).

``S`` is an ``m x n`` matrix (``out_features x in_features``) that is zero except at a *support*: flat
row-major indices ``flat_indices`` (``int32`` or ``int64``) holding ``values``. Entry ``k`` sits at row
``r_k = flat_indices[k] // n`` and column ``c_k = flat_indices[k] % n``. ``row_ptr`` (``m + 1`` entries,
the dtype of ``flat_indices``) is :func:`sparse_row_pointers` of the support: ``row_ptr[o]`` is the number
of entries in rows ``< o``, which for a sorted support is the CSR row pointer (row ``o`` holds entries
``row_ptr[o] .. row_ptr[o + 1] - 1``). Dense operands are 2-D, ``tokens x features``, any strides:

- ``lowrank_optim::spmm_add_(Tensor(a!) out, Tensor input, Tensor values, Tensor flat_indices,
  Tensor row_ptr, bool check_indices=True) -> ()``
  ``out += input Sᵀ``, i.e. ``out[t, r_k] += values[k] · input[t, c_k]`` (``input``: ``T x n``,
  ``out``: ``T x m``): the sparse part of a linear layer's forward.
- ``lowrank_optim::spmm_t_add_(Tensor(a!) out, Tensor grad, Tensor values, Tensor flat_indices,
  Tensor row_ptr, bool check_indices=True) -> ()``
  ``out += grad S``, i.e. ``out[t, c_k] += values[k] · grad[t, r_k]`` (``grad``: ``T x m``, ``out``:
  ``T x n``): its input gradient.
- ``lowrank_optim::sddmm(Tensor grad, Tensor input, Tensor flat_indices, Tensor row_ptr,
  bool check_indices=True) -> Tensor``
  ``result[k] = Σ_t grad[t, r_k] · input[t, c_k]``: the gradient of ``values``, i.e. ``(gradᵀ input)``
  sampled at the support, without forming the ``m x n`` product.

Reduced precision (bf16, fp16) accumulates in fp32 and rounds once, when the sum is added to ``out`` (or
stored in ``result``); fp32 accumulates in fp32 and fp64 in fp64. Repeated indices accumulate.

Checks (every kernel; the same exception types and messages): shapes, dtypes (``values``, ``input``,
``grad`` and ``out`` share one floating dtype; ``row_ptr`` has the dtype of ``flat_indices``), devices,
and that ``out`` shares no memory with what the op reads. ``check_indices=True`` also checks, before
anything is written, every index against ``m · n`` (``IndexError`` naming the first bad one) and that
``row_ptr`` is the support's (``ValueError`` naming the first row where it differs). ``check_indices=False``
skips those (one read of the support and, on CUDA, one synchronization) for a caller that has checked its
support: :class:`~lowrank_optim.nn.SLTrainLinear` checks it once, and then requires it strictly increasing.

The defaults below are correct for any support (unsorted, repeated) and never form an ``m x n`` matrix:
they work on chunks of tokens (or of nonzeros) whose gathered ``chunk x nnz`` operand stays under
:data:`CHUNK_ELEMENTS` elements. Compiled kernels (``csrc/cpu/spmm.cpp``, ``csrc/cuda/spmm.cu``) run a
strictly increasing support through ``row_ptr`` and hand any other one to the same arithmetic as these
defaults. See :mod:`lowrank_optim.ops.sparse` for how compiled kernels override a default.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._library import define_op

__all__ = ["CHUNK_ELEMENTS", "sddmm", "sparse_row_pointers", "spmm_add_", "spmm_t_add_"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_VALUE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Upper bound on the elements of the gathered operand of one chunk of the default kernels (64 MiB in fp32).
CHUNK_ELEMENTS = 2**24


def _dtype_list(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(dtype) for dtype in dtypes)


def _check_support_args(op_name: str, flat_indices: Tensor, row_ptr: Tensor, device: torch.device) -> None:
    if flat_indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op_name}: flat_indices.dtype={flat_indices.dtype}; allowed: torch.int32, torch.int64")
    if flat_indices.dim() != 1:
        raise ValueError(f"{op_name}: flat_indices.shape={tuple(flat_indices.shape)}; must be 1-D")
    if row_ptr.dtype != flat_indices.dtype:
        raise TypeError(f"{op_name}: row_ptr.dtype={row_ptr.dtype} must equal flat_indices.dtype={flat_indices.dtype}")
    if row_ptr.dim() != 1 or row_ptr.numel() == 0:
        raise ValueError(
            f"{op_name}: row_ptr.shape={tuple(row_ptr.shape)}; must be 1-D with m + 1 >= 1 entries (m: the rows of S)"
        )
    for name, tensor in (("flat_indices", flat_indices), ("row_ptr", row_ptr)):
        if tensor.device != device:
            raise ValueError(f"{op_name}: {name}.device={tensor.device} differs from the dense operands' device={device}")


def _check_dense(op_name: str, name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{op_name}: {name}.shape={tuple(tensor.shape)}; must be 2-D (tokens x features)")
    if tensor.dtype not in _VALUE_DTYPES:
        raise TypeError(f"{op_name}: {name}.dtype={tensor.dtype}; allowed: {_dtype_list(_VALUE_DTYPES)}")


def _check_same(op_name: str, reference_name: str, reference: Tensor, others: dict[str, Tensor]) -> None:
    for name, tensor in others.items():
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{op_name}: {name}.dtype={tensor.dtype} must equal {reference_name}.dtype={reference.dtype}")
        if tensor.device != reference.device:
            raise ValueError(f"{op_name}: {name}.device={tensor.device} differs from {reference_name}.device={reference.device}")


def _check_no_alias(op_name: str, out: Tensor, read: dict[str, Tensor]) -> None:
    # Conservative (any shared storage is refused): the kernels read `read` while they write `out`. Fake
    # and meta tensors (tracing) have no memory to compare.
    if out.is_meta or is_fake(out):
        return
    pointer = out.untyped_storage().data_ptr()
    for name, tensor in read.items():
        if out.numel() > 0 and tensor.numel() > 0 and tensor.untyped_storage().data_ptr() == pointer:
            raise ValueError(f"{op_name}: out shares memory with {name}; out must be a separate tensor")


def _check_values(op_name: str, values: Tensor, flat_indices: Tensor) -> None:
    if values.shape != flat_indices.shape:
        raise ValueError(
            f"{op_name}: values.shape={tuple(values.shape)} must equal flat_indices.shape={tuple(flat_indices.shape)}"
        )


def _check_spmm_args(
    op_name: str, out: Tensor, dense: Tensor, dense_name: str, values: Tensor, flat_indices: Tensor, row_ptr: Tensor
) -> tuple[int, int]:
    """Checks of ``spmm_add_`` (``dense`` = input, ``T x n`` into ``out`` ``T x m``) and ``spmm_t_add_``
    (``dense`` = grad, ``T x m`` into ``out`` ``T x n``); returns ``(m, n)``, the shape of ``S``."""
    _check_dense(op_name, "out", out)
    _check_dense(op_name, dense_name, dense)
    _check_same(op_name, "out", out, {dense_name: dense, "values": values})
    _check_support_args(op_name, flat_indices, row_ptr, out.device)
    _check_values(op_name, values, flat_indices)
    if out.shape[0] != dense.shape[0]:
        raise ValueError(
            f"{op_name}: out.shape={tuple(out.shape)} and {dense_name}.shape={tuple(dense.shape)} must have the same "
            "number of rows (tokens)"
        )
    m = row_ptr.numel() - 1
    rows_of_s = dense if op_name == "spmm_t_add_" else out
    rows_name = dense_name if op_name == "spmm_t_add_" else "out"
    if rows_of_s.shape[1] != m:
        raise ValueError(
            f"{op_name}: {rows_name}.shape[1]={rows_of_s.shape[1]} must equal row_ptr.numel() - 1 = {m} (the rows of S)"
        )
    _check_no_alias(op_name, out, {dense_name: dense, "values": values, "flat_indices": flat_indices, "row_ptr": row_ptr})
    n = (out if op_name == "spmm_t_add_" else dense).shape[1]
    return m, n


def _check_sddmm_args(grad: Tensor, input: Tensor, flat_indices: Tensor, row_ptr: Tensor) -> tuple[int, int]:
    op_name = "sddmm"
    _check_dense(op_name, "grad", grad)
    _check_dense(op_name, "input", input)
    _check_same(op_name, "grad", grad, {"input": input})
    _check_support_args(op_name, flat_indices, row_ptr, grad.device)
    if grad.shape[0] != input.shape[0]:
        raise ValueError(
            f"{op_name}: grad.shape={tuple(grad.shape)} and input.shape={tuple(input.shape)} must have the same "
            "number of rows (tokens)"
        )
    m = row_ptr.numel() - 1
    if grad.shape[1] != m:
        raise ValueError(f"{op_name}: grad.shape[1]={grad.shape[1]} must equal row_ptr.numel() - 1 = {m} (the rows of S)")
    return m, input.shape[1]


def _row_counts(flat_indices: Tensor, m: int, n: int) -> Tensor:
    """``row_ptr`` of an in-range support: entries per row, prefix-summed (valid for any order)."""
    counts = torch.bincount((flat_indices // n).long(), minlength=m) if flat_indices.numel() else None
    row_ptr = torch.zeros(m + 1, dtype=flat_indices.dtype, device=flat_indices.device)
    if counts is not None:
        row_ptr[1:] = counts.cumsum(0)
    return row_ptr


def _check_range(op_name: str, flat_indices: Tensor, m: int, n: int) -> None:
    """Every index in ``[0, m·n)``, else ``IndexError`` at the first bad one (a host read: a CUDA sync)."""
    numel = m * n
    if flat_indices.numel() == 0:
        return
    low, high = (int(bound) for bound in torch.aminmax(flat_indices))
    if low >= 0 and high < numel:
        return
    position = int(((flat_indices < 0) | (flat_indices >= numel)).nonzero()[0, 0])
    raise IndexError(
        f"{op_name}: flat_indices[{position}]={int(flat_indices[position])} is out of range for S of shape "
        f"({m}, {n}) ({numel} elements); allowed: 0 <= index < {numel}"
    )


def _check_indices(op_name: str, flat_indices: Tensor, row_ptr: Tensor, m: int, n: int) -> None:
    """:func:`_check_range`, then ``row_ptr`` the support's (else ``ValueError`` at the first row where it
    differs)."""
    _check_range(op_name, flat_indices, m, n)
    expected = _row_counts(flat_indices, m, n)
    differs = expected != row_ptr
    if bool(differs.any()):
        row = int(differs.nonzero()[0, 0])
        raise ValueError(
            f"{op_name}: row_ptr[{row}]={int(row_ptr[row])}, but the support has {int(expected[row])} entries in rows "
            f"< {row}; row_ptr must be sparse_row_pointers(flat_indices, {m}, {n})"
        )


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coordinates(flat_indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    return flat_indices // n, flat_indices % n


def _spmm_default(
    out: Tensor, dense: Tensor, values: Tensor, flat_indices: Tensor, source: Tensor, target: Tensor
) -> None:
    """``out[t, target_k] += values[k] · dense[t, source_k]`` over chunks of tokens, summed in the
    accumulation dtype and rounded once into ``out``."""
    tokens, nnz = dense.shape[0], flat_indices.numel()
    if tokens == 0 or nnz == 0:
        return
    accumulate = _accumulate_dtype(out.dtype)
    weights = values.to(accumulate)
    chunk = max(1, CHUNK_ELEMENTS // nnz)
    for start in range(0, tokens, chunk):
        rows = slice(start, start + chunk)
        products = dense[rows].index_select(1, source).to(accumulate).mul_(weights)
        total = out[rows].to(accumulate).index_add_(1, target, products)
        out[rows] = total.to(out.dtype)


def _spmm_add_default(
    out: Tensor, input: Tensor, values: Tensor, flat_indices: Tensor, row_ptr: Tensor, check_indices: bool = True
) -> None:
    m, n = _check_spmm_args("spmm_add_", out, input, "input", values, flat_indices, row_ptr)
    if check_indices:
        _check_indices("spmm_add_", flat_indices, row_ptr, m, n)
    rows, cols = _coordinates(flat_indices, n)
    _spmm_default(out, input, values, flat_indices, source=cols, target=rows)


def _spmm_add_fake(
    out: Tensor, input: Tensor, values: Tensor, flat_indices: Tensor, row_ptr: Tensor, check_indices: bool = True
) -> None:
    _check_spmm_args("spmm_add_", out, input, "input", values, flat_indices, row_ptr)


def _spmm_t_add_default(
    out: Tensor, grad: Tensor, values: Tensor, flat_indices: Tensor, row_ptr: Tensor, check_indices: bool = True
) -> None:
    m, n = _check_spmm_args("spmm_t_add_", out, grad, "grad", values, flat_indices, row_ptr)
    if check_indices:
        _check_indices("spmm_t_add_", flat_indices, row_ptr, m, n)
    rows, cols = _coordinates(flat_indices, n)
    _spmm_default(out, grad, values, flat_indices, source=rows, target=cols)


def _spmm_t_add_fake(
    out: Tensor, grad: Tensor, values: Tensor, flat_indices: Tensor, row_ptr: Tensor, check_indices: bool = True
) -> None:
    _check_spmm_args("spmm_t_add_", out, grad, "grad", values, flat_indices, row_ptr)


def _sddmm_default(grad: Tensor, input: Tensor, flat_indices: Tensor, row_ptr: Tensor, check_indices: bool = True) -> Tensor:
    m, n = _check_sddmm_args(grad, input, flat_indices, row_ptr)
    if check_indices:
        _check_indices("sddmm", flat_indices, row_ptr, m, n)
    tokens, nnz = grad.shape[0], flat_indices.numel()
    accumulate = _accumulate_dtype(grad.dtype)
    result = torch.zeros(nnz, dtype=accumulate, device=grad.device)
    if tokens and nnz:
        rows, cols = _coordinates(flat_indices, n)
        chunk = max(1, CHUNK_ELEMENTS // tokens)
        for start in range(0, nnz, chunk):
            part = slice(start, start + chunk)
            left = grad.index_select(1, rows[part]).to(accumulate)
            right = input.index_select(1, cols[part]).to(accumulate)
            result[part] = left.mul_(right).sum(0)
    return result.to(grad.dtype)


def _sddmm_fake(grad: Tensor, input: Tensor, flat_indices: Tensor, row_ptr: Tensor, check_indices: bool = True) -> Tensor:
    _check_sddmm_args(grad, input, flat_indices, row_ptr)
    return grad.new_empty(flat_indices.shape)


define_op(
    "spmm_add_(Tensor(a!) out, Tensor input, Tensor values, Tensor flat_indices, Tensor row_ptr, "
    "bool check_indices=True) -> ()",
    _spmm_add_default,
    _spmm_add_fake,
)
define_op(
    "spmm_t_add_(Tensor(a!) out, Tensor grad, Tensor values, Tensor flat_indices, Tensor row_ptr, "
    "bool check_indices=True) -> ()",
    _spmm_t_add_default,
    _spmm_t_add_fake,
)
define_op(
    "sddmm(Tensor grad, Tensor input, Tensor flat_indices, Tensor row_ptr, bool check_indices=True) -> Tensor",
    _sddmm_default,
    _sddmm_fake,
)


def sparse_row_pointers(flat_indices: Tensor, out_features: int, in_features: int) -> Tensor:
    """``row_ptr`` of a support of an ``out_features x in_features`` matrix: ``m + 1`` entries in the dtype
    of ``flat_indices``, ``row_ptr[o]`` = the number of entries in rows ``< o`` (the CSR row pointer of a
    sorted support). One pass over the support on its device; indices outside the matrix are refused
    (``IndexError``), as by the ops."""
    if flat_indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"sparse_row_pointers: flat_indices.dtype={flat_indices.dtype}; allowed: torch.int32, torch.int64")
    if flat_indices.dim() != 1:
        raise ValueError(f"sparse_row_pointers: flat_indices.shape={tuple(flat_indices.shape)}; must be 1-D")
    for name, size in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"sparse_row_pointers: {name}={size!r}; allowed: an int >= 1")
    _check_range("sparse_row_pointers", flat_indices, out_features, in_features)
    return _row_counts(flat_indices, out_features, in_features)


def spmm_add_(
    out: Tensor, input: Tensor, values: Tensor, flat_indices: Tensor, row_ptr: Tensor, *, check_indices: bool = True
) -> None:
    """``out += input Sᵀ`` in place (``input``: ``T x n``, ``out``: ``T x m``, ``S`` ``m x n`` at the support);
    see the module docstring. Not differentiable (it mutates): SLTrain's autograd function calls it."""
    _check_spmm_args("spmm_add_", out, input, "input", values, flat_indices, row_ptr)
    torch.ops.lowrank_optim.spmm_add_(out, input, values, flat_indices, row_ptr, bool(check_indices))


def spmm_t_add_(
    out: Tensor, grad: Tensor, values: Tensor, flat_indices: Tensor, row_ptr: Tensor, *, check_indices: bool = True
) -> None:
    """``out += grad S`` in place (``grad``: ``T x m``, ``out``: ``T x n``); see the module docstring."""
    _check_spmm_args("spmm_t_add_", out, grad, "grad", values, flat_indices, row_ptr)
    torch.ops.lowrank_optim.spmm_t_add_(out, grad, values, flat_indices, row_ptr, bool(check_indices))


def sddmm(grad: Tensor, input: Tensor, flat_indices: Tensor, row_ptr: Tensor, *, check_indices: bool = True) -> Tensor:
    """``result[k] = Σ_t grad[t, r_k] · input[t, c_k]`` (a new tensor of ``grad``'s dtype); see the module
    docstring. Not differentiable."""
    _check_sddmm_args(grad, input, flat_indices, row_ptr)
    return torch.ops.lowrank_optim.sddmm(grad, input, flat_indices, row_ptr, bool(check_indices))
