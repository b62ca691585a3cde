"""Blockwise 8-bit quantization of optimizer state, and the Adam moment update on 8-bit moments.

Design: dynamic ("decade") code maps in the spirit of Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization" (arXiv 2110.02861). A tensor is cut into blocks; each block stores its absolute
maximum in fp32 (``absmax``) and, per element, the 8-bit index (``code``) of the map value nearest to
``x / absmax``. The maps are not linear: each decade below the block maximum gets half the codes of the
decade above it, so the codes are densest near the maximum (where a block's large values are, and where
their relative error would hurt most) while values down to 7 (signed map) or 8 (unsigned map) decades
below the maximum still keep a non-zero code instead of flushing to zero. Blocks bound the damage of an
outlier to its own block, and make the maximum a cheap local reduction.

Code maps (:func:`signed_code_map`, :func:`unsigned_code_map`: fp32, sorted ascending, computed in fp64
then rounded once; cached per device, shared: do not modify them):

- signed, 255 values, for Adam's first moment: 0 and ``±10^-j · (0.1 + 0.9 (i+1) / 2^(6-j))`` for
  ``j = 0..6``, ``i = 0..2^(6-j)-1`` (127 magnitudes per sign, from exactly 1.0 down to 1e-6);
- unsigned, 256 values, for the second moment: 0 and ``10^-j · (0.1 + 0.9 (i+1) / 2^(7-j))`` for
  ``j = 0..7``, ``i = 0..2^(7-j)-1`` (from 1.0 down to 1e-7).

Blocks run along the last dimension of a contiguous tensor of shape ``(..., n)``: block ``b`` of each row
holds the elements ``[b·B, min((b+1)·B, n))``, so ``absmax`` has shape ``(..., ceil(n / B))`` (see
:func:`absmax_shape`); ``B`` (``block_size``) is an int in ``[1, 4096]``. Per block::

    absmax = max |x|                        (NaN if the block holds a NaN; Inf if it holds an Inf)
    x_norm = x / (absmax if absmax > 0 else 1)           (fp32 division; so a NaN absmax divides by 1)
    code   = #{k : t_k < x_norm},  t_k = (map[k] + map[k+1]) · 0.5  (fp32 midpoints; NaN: len(map) - 1)
    x'     = map[code] · absmax                          (dequantized, fp32; absmax 0 gives zeros)

``code`` is ``torch.searchsorted(t, x_norm, right=False)``: the nearest map value, ties to the lower one.
A NaN has no order: it gets the last code explicitly (the default turns it into +inf before the search,
which exceeds every threshold; the kernels count ``!(x_norm <= t_k)``), and the block's NaN absmax makes
the whole block NaN again on dequantization. A code past the map's end (never written by these ops)
dequantizes to NaN rather than reading past the map.

Ops (``lowrank_optim`` namespace):

- ``quantize_blockwise_(Tensor x, Tensor code_map, int block_size, Tensor(a!) codes, Tensor(b!) absmax) -> ()``
- ``dequantize_blockwise(Tensor codes, Tensor absmax, Tensor code_map, int block_size) -> Tensor``
- ``blockwise_adam_(Tensor lowrank, Tensor(a!) exp_avg, Tensor(b!) exp_avg_absmax, Tensor(c!) exp_avg_sq,
  Tensor(d!) exp_avg_sq_absmax, Tensor(e!) normalized, Tensor signed_map, Tensor unsigned_map, float beta1,
  float beta2, float eps, int block_size, Tensor? skip=None) -> ()``: :func:`lowrank_optim.ops.adam.lowrank_adam_`
  on moments stored as codes: per block ``M = signed_map[c_M] · a_M``, ``V = unsigned_map[c_V] · a_V``, then
  ``M = b1 M + (1 - b1) R``, ``V = b2 V + (1 - b2) R²`` (the rounding of
  :func:`~lowrank_optim.ops.adam.update_moments_`), ``N = M / (sqrt(V) + eps)``, and ``M``, ``V`` quantized
  back (with their new block maxima). ``skip`` (a 0-dim bool tensor on the device) keeps codes and absmaxes
  as they were and makes ``N`` zero.

State per element: ``1 + 4 / B`` bytes per moment instead of 4 (B = 256: 1.016 bytes).

The defaults are the composition of the one rule for each step (dequantize, ``update_moments_``,
sqrt/add/div, quantize), so they are the reference; compiled kernels (``csrc/cpu/quant.cpp``,
``csrc/cuda/quant.cu``) do a block at a time in one pass and store the same codes and absmaxes (CPU:
bitwise; ``N`` within 2 ulp, ATen's vectorized ``sqrt`` not being correctly rounded).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _library
from ._library import check_skip, define_op
from .adam import update_moments_

__all__ = [
    "MAX_BLOCK_SIZE",
    "absmax_shape",
    "blockwise_adam_",
    "dequantize_blockwise",
    "quantize_blockwise_",
    "signed_code_map",
    "unsigned_code_map",
]

#: The largest ``block_size`` the ops accept (a CUDA block, or one CPU task's stack buffers, holds a block).
MAX_BLOCK_SIZE = 4096
#: A code is one byte: a map has at most 256 values (and at least 2, so that it has a threshold).
_MAP_LENGTHS = (2, 256)

_QUANTIZE_SCHEMA = "quantize_blockwise_(Tensor x, Tensor code_map, int block_size, Tensor(a!) codes, Tensor(b!) absmax) -> ()"
_DEQUANTIZE_SCHEMA = "dequantize_blockwise(Tensor codes, Tensor absmax, Tensor code_map, int block_size) -> Tensor"
_ADAM_SCHEMA = (
    "blockwise_adam_(Tensor lowrank, Tensor(a!) exp_avg, Tensor(b!) exp_avg_absmax, Tensor(c!) exp_avg_sq, "
    "Tensor(d!) exp_avg_sq_absmax, Tensor(e!) normalized, Tensor signed_map, Tensor unsigned_map, float beta1, "
    "float beta2, float eps, int block_size, Tensor? skip=None) -> ()"
)


# ---- code maps ---------------------------------------------------------------------------------------

_MAPS: dict[tuple[bool, torch.device], Tensor] = {}


def _decade_magnitudes(decades: int) -> list[float]:
    """``10^-j · (0.1 + 0.9 (i+1) / 2^(decades-1-j))`` for ``j < decades``, ``i < 2^(decades-1-j)``, in fp64:
    each decade below the top one has half the codes of the one above it."""
    values = []
    for j in range(decades):
        count = 2 ** (decades - 1 - j)
        values += [10.0**-j * (0.1 + 0.9 * (i + 1) / count) for i in range(count)]
    return values


def _code_map(signed: bool, device: torch.device | str | None) -> Tensor:
    device = torch.device("cpu" if device is None else device)
    key = (signed, device)
    if key not in _MAPS:
        magnitudes = _decade_magnitudes(7 if signed else 8)
        values = [0.0] + magnitudes + ([-value for value in magnitudes] if signed else [])
        _MAPS[key] = torch.tensor(sorted(values), dtype=torch.float64).to(dtype=torch.float32, device=device)
    return _MAPS[key]


def signed_code_map(device: torch.device | str | None = None) -> Tensor:
    """The 255-value signed dynamic map (first moment): 0 and ``±10^-j · (0.1 + 0.9 (i+1) / 2^(6-j))``,
    ``j = 0..6``, ``i = 0..2^(6-j)-1``; fp32, ascending, from -1.0 to 1.0, smallest magnitude 1e-6.
    Cached per device (the returned tensor is shared: do not modify it)."""
    return _code_map(True, device)


def unsigned_code_map(device: torch.device | str | None = None) -> Tensor:
    """The 256-value unsigned dynamic map (second moment): 0 and ``10^-j · (0.1 + 0.9 (i+1) / 2^(7-j))``,
    ``j = 0..7``, ``i = 0..2^(7-j)-1``; fp32, ascending, up to 1.0, smallest non-zero 1e-7.
    Cached per device (the returned tensor is shared: do not modify it)."""
    return _code_map(False, device)


def absmax_shape(shape: torch.Size | tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """The shape of the block maxima of a tensor of ``shape`` (``(..., n)`` -> ``(..., ceil(n / block_size))``)."""
    return (*shape[:-1], math.ceil(shape[-1] / block_size))


# ---- checks (the same for every kernel: the wrappers run them before any kernel) --------------------


def _check_block_size(op_name: str, block_size: object) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"{op_name}: block_size={block_size!r}; allowed: an int in [1, {MAX_BLOCK_SIZE}]")


def _check_map(op_name: str, name: str, code_map: Tensor, device: torch.device) -> None:
    if code_map.dtype != torch.float32:
        raise TypeError(f"{op_name}: {name}.dtype={code_map.dtype}; allowed: torch.float32")
    low, high = _MAP_LENGTHS
    if code_map.dim() != 1 or not low <= code_map.numel() <= high:
        raise ValueError(f"{op_name}: {name}.shape={tuple(code_map.shape)}; allowed: 1-D with {low}..{high} values")
    if code_map.device != device:
        raise ValueError(f"{op_name}: {name}.device={code_map.device} must equal the tensors' device={device}")
    if not code_map.is_contiguous():
        raise ValueError(f"{op_name}: {name} must be contiguous")


def _check_tensor(
    op_name: str, name: str, tensor: Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None, device: torch.device
) -> None:
    """``tensor`` has ``dtype``, ``shape`` (None: any of dim >= 1), ``device``, and is contiguous."""
    if tensor.dtype != dtype:
        raise TypeError(f"{op_name}: {name}.dtype={tensor.dtype}; allowed: {dtype}")
    if shape is None:
        if tensor.dim() < 1:
            raise ValueError(f"{op_name}: {name}.shape={tuple(tensor.shape)}; must have dim >= 1 (blocks run along the last)")
    elif tuple(tensor.shape) != shape:
        raise ValueError(f"{op_name}: {name}.shape={tuple(tensor.shape)}; must be {shape}")
    if tensor.device != device:
        raise ValueError(f"{op_name}: {name}.device={tensor.device} must equal the tensors' device={device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{op_name}: {name} must be contiguous (strides {tensor.stride()} for shape {tuple(tensor.shape)})")


def _check_quantize_args(x: Tensor, code_map: Tensor, block_size: int, codes: Tensor, absmax: Tensor) -> None:
    op_name = "quantize_blockwise_"
    _check_block_size(op_name, block_size)
    _check_tensor(op_name, "x", x, torch.float32, None, x.device)
    _check_map(op_name, "code_map", code_map, x.device)
    _check_tensor(op_name, "codes", codes, torch.uint8, tuple(x.shape), x.device)
    _check_tensor(op_name, "absmax", absmax, torch.float32, absmax_shape(x.shape, block_size), x.device)


def _check_dequantize_args(codes: Tensor, absmax: Tensor, code_map: Tensor, block_size: int) -> None:
    op_name = "dequantize_blockwise"
    _check_block_size(op_name, block_size)
    _check_tensor(op_name, "codes", codes, torch.uint8, None, codes.device)
    _check_map(op_name, "code_map", code_map, codes.device)
    _check_tensor(op_name, "absmax", absmax, torch.float32, absmax_shape(codes.shape, block_size), codes.device)


def _check_adam_args(
    lowrank: Tensor,
    exp_avg: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_absmax: Tensor,
    normalized: Tensor,
    signed_map: Tensor,
    unsigned_map: Tensor,
    block_size: int,
    skip: Tensor | None,
) -> None:
    op_name = "blockwise_adam_"
    _check_block_size(op_name, block_size)
    device = lowrank.device
    _check_tensor(op_name, "lowrank", lowrank, torch.float32, None, device)
    shape = tuple(lowrank.shape)
    _check_tensor(op_name, "normalized", normalized, torch.float32, shape, device)
    blocks = absmax_shape(shape, block_size)
    _check_tensor(op_name, "exp_avg", exp_avg, torch.uint8, shape, device)
    _check_tensor(op_name, "exp_avg_absmax", exp_avg_absmax, torch.float32, blocks, device)
    _check_tensor(op_name, "exp_avg_sq", exp_avg_sq, torch.uint8, shape, device)
    _check_tensor(op_name, "exp_avg_sq_absmax", exp_avg_sq_absmax, torch.float32, blocks, device)
    _check_map(op_name, "signed_map", signed_map, device)
    _check_map(op_name, "unsigned_map", unsigned_map, device)
    check_skip(op_name, skip, device)


# ---- default kernels ---------------------------------------------------------------------------------


def _block_pieces(tensor: Tensor, block_size: int) -> list[tuple[Tensor, slice]]:
    """Views of ``tensor`` (``(..., n)``) as ``(..., blocks, b)`` pieces with the block indices they cover:
    the full blocks, then the short last one when ``block_size`` does not divide ``n``. No copies."""
    n = tensor.shape[-1]
    full = n // block_size
    lead = tensor.shape[:-1]
    pieces = []
    if full > 0:
        pieces.append((tensor[..., : full * block_size].view(*lead, full, block_size), slice(0, full)))
    if n > full * block_size:
        pieces.append((tensor[..., full * block_size :].unsqueeze(-1).transpose(-1, -2), slice(full, full + 1)))
    return pieces


def _quantize_default(x: Tensor, code_map: Tensor, block_size: int, codes: Tensor, absmax: Tensor) -> None:
    _check_quantize_args(x, code_map, block_size, codes, absmax)
    pieces = _block_pieces(x, block_size)
    for piece, blocks in pieces:
        # amax propagates NaN (a NaN block has a NaN absmax) and takes |Inf| = Inf.
        torch.amax(piece.abs(), dim=-1, out=absmax[..., blocks])
    divisor = torch.where(absmax > 0, absmax, 1.0)  # NaN > 0 is false: a NaN block divides by 1
    normalized = torch.empty_like(x)
    for (piece, blocks), (out, _) in zip(pieces, _block_pieces(normalized, block_size)):
        torch.div(piece, divisor[..., blocks].unsqueeze(-1), out=out)
    # A NaN gets the last code explicitly: +inf exceeds every (finite) threshold.
    normalized.masked_fill_(normalized.isnan(), math.inf)
    thresholds = (code_map[:-1] + code_map[1:]) * 0.5
    codes.copy_(torch.searchsorted(thresholds, normalized, right=False, out_int32=True))


def _dequantize_into(codes: Tensor, absmax: Tensor, code_map: Tensor, block_size: int, out: Tensor) -> Tensor:
    """``out = code_map[codes] · absmax`` per block (fp32); codes past the map's end give NaN."""
    # The map padded to 256 entries with NaN: every byte indexes it, on any device, without a host check.
    table = torch.cat([code_map, code_map.new_full((256 - code_map.numel(),), math.nan)])
    torch.index_select(table, 0, codes.view(-1).long(), out=out.view(-1))
    for piece, blocks in _block_pieces(out, block_size):
        piece.mul_(absmax[..., blocks].unsqueeze(-1))
    return out


def _dequantize_default(codes: Tensor, absmax: Tensor, code_map: Tensor, block_size: int) -> Tensor:
    _check_dequantize_args(codes, absmax, code_map, block_size)
    return _dequantize_into(codes, absmax, code_map, block_size, torch.empty(codes.shape, device=codes.device))


def _blockwise_adam_default(
    lowrank: Tensor,
    exp_avg: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_absmax: Tensor,
    normalized: Tensor,
    signed_map: Tensor,
    unsigned_map: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    block_size: int,
    skip: Tensor | None = None,
) -> None:
    _check_adam_args(lowrank, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, normalized, signed_map,
                     unsigned_map, block_size, skip)
    m = _dequantize_default(exp_avg, exp_avg_absmax, signed_map, block_size)
    v = _dequantize_default(exp_avg_sq, exp_avg_sq_absmax, unsigned_map, block_size)
    update_moments_(lowrank, m, v, beta1, beta2)
    torch.sqrt(v, out=normalized).add_(eps)
    torch.div(m, normalized, out=normalized)
    if skip is None:
        _quantize_default(m, signed_map, block_size, exp_avg, exp_avg_absmax)
        _quantize_default(v, unsigned_map, block_size, exp_avg_sq, exp_avg_sq_absmax)
        return
    # Skipped: the stored codes, not a requantization of their dequantized values (which need not give
    # the same codes: a NaN block, an absmax whose products underflow), selected on the device.
    for value, code_map, codes, absmax in ((m, signed_map, exp_avg, exp_avg_absmax),
                                           (v, unsigned_map, exp_avg_sq, exp_avg_sq_absmax)):
        new_codes, new_absmax = torch.empty_like(codes), torch.empty_like(absmax)
        _quantize_default(value, code_map, block_size, new_codes, new_absmax)
        codes.copy_(torch.where(skip, codes, new_codes))
        absmax.copy_(torch.where(skip, absmax, new_absmax))
    normalized.masked_fill_(skip, 0.0)


# ---- fake kernels ------------------------------------------------------------------------------------


def _quantize_fake(x: Tensor, code_map: Tensor, block_size: int, codes: Tensor, absmax: Tensor) -> None:
    _check_quantize_args(x, code_map, block_size, codes, absmax)


def _dequantize_fake(codes: Tensor, absmax: Tensor, code_map: Tensor, block_size: int) -> Tensor:
    _check_dequantize_args(codes, absmax, code_map, block_size)
    return codes.new_empty(codes.shape, dtype=torch.float32)


def _blockwise_adam_fake(
    lowrank: Tensor,
    exp_avg: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_absmax: Tensor,
    normalized: Tensor,
    signed_map: Tensor,
    unsigned_map: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    block_size: int,
    skip: Tensor | None = None,
) -> None:
    _check_adam_args(lowrank, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, normalized, signed_map,
                     unsigned_map, block_size, skip)


define_op(_QUANTIZE_SCHEMA, _quantize_default, _quantize_fake)
define_op(_DEQUANTIZE_SCHEMA, _dequantize_default, _dequantize_fake)
define_op(_ADAM_SCHEMA, _blockwise_adam_default, _blockwise_adam_fake)


# ---- wrappers ----------------------------------------------------------------------------------------


def quantize_blockwise_(
    x: Tensor, code_map: Tensor, block_size: int, codes: Tensor, absmax: Tensor, *, fused: bool = True
) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` (fp32, contiguous, dim >= 1) in blocks of ``block_size`` along its last dimension:
    writes the uint8 ``codes`` (``x``'s shape) and the fp32 block maxima ``absmax`` (:func:`absmax_shape`);
    returns them. ``fused=False`` runs the default kernel (:func:`lowrank_optim.ops._library.run`)."""
    _check_quantize_args(x, code_map, block_size, codes, absmax)  # same errors whichever kernel runs
    _library.run("quantize_blockwise_", fused, x, code_map, block_size, codes, absmax)
    return codes, absmax


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, code_map: Tensor, block_size: int, *, out: Tensor | None = None, fused: bool = True
) -> Tensor:
    """``code_map[codes] · absmax`` per block, fp32 of ``codes``' shape; into ``out`` (fp32, that shape,
    contiguous) when given, else a new tensor. ``fused=False`` runs the default kernel."""
    _check_dequantize_args(codes, absmax, code_map, block_size)
    if out is not None:
        _check_tensor("dequantize_blockwise", "out", out, torch.float32, tuple(codes.shape), codes.device)
        if not fused:  # the default writes in place; the op returns a new tensor
            return _dequantize_into(codes, absmax, code_map, block_size, out)
        return out.copy_(_library.run("dequantize_blockwise", fused, codes, absmax, code_map, block_size))
    return _library.run("dequantize_blockwise", fused, codes, absmax, code_map, block_size)


def blockwise_adam_(
    lowrank: Tensor,
    exp_avg: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_sq_absmax: Tensor,
    normalized: Tensor,
    signed_map: Tensor,
    unsigned_map: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    block_size: int,
    skip: Tensor | None = None,
    *,
    fused: bool = True,
) -> Tensor:
    """The Adam moment update on 8-bit blockwise moments; writes ``N = M / (sqrt(V) + eps)`` into
    ``normalized`` and returns it.

    ``M = signed_map[exp_avg] · exp_avg_absmax`` and ``V = unsigned_map[exp_avg_sq] · exp_avg_sq_absmax``
    per block; ``M = b1 M + (1 - b1) R``, ``V = b2 V + (1 - b2) R²`` (as
    :func:`~lowrank_optim.ops.adam.update_moments_`); ``N``; then ``M`` and ``V`` are quantized back into the
    codes and absmaxes in place. With ``skip`` true (a 0-dim bool tensor, read on the device) the state is
    kept and ``N`` is zero. ``fused=False`` runs the default kernel (:func:`lowrank_optim.ops._library.run`).
    """
    _check_adam_args(lowrank, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, normalized, signed_map,
                     unsigned_map, block_size, skip)  # same errors whichever kernel runs
    _library.run("blockwise_adam_", fused, lowrank, exp_avg, exp_avg_absmax, exp_avg_sq, exp_avg_sq_absmax, normalized,
                 signed_map, unsigned_map, float(beta1), float(beta2), float(eps), block_size, skip)
    return normalized
