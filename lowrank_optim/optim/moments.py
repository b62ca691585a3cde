"""Moment formats: how the Adam moments of a parameter are stored, written once for every optimizer.

The update math lives in the step (:func:`~lowrank_optim.optim.galore_adamw`); a *format* only says what
tensors hold ``M`` and ``V`` and how the step reads and writes them, so that a new storage (8-bit, 4-bit)
is a new class here, not a new optimizer. Every optimizer of the package takes ``moment_format=`` (a
registered name or a format object), per param group, for its projected and full-rank groups alike.

- :class:`FullPrecision` (``"full"``, the default): ``M`` and ``V`` are plain tensors in ``moment_dtype``
  (``None``: the parameter's dtype), as in the reference packages.
- :class:`Blockwise8bit` (``"8bit"``): block-wise dynamic 8-bit quantization (Dettmers et al., 2022,
  "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861). Each moment is a ``uint8`` code
  tensor of its shape plus one fp32 ``absmax`` per block of ``block_size`` elements along its stored last
  dimension; ``M`` uses the signed and ``V`` the unsigned decade map of :mod:`lowrank_optim.ops.quant`.
  A step dequantizes a block, updates it in fp32 with the step's own arithmetic, computes ``N`` and
  requantizes it, all in one op (``blockwise_adam_``), so no fp32 copy of a whole moment ever exists
  during an ordinary step. Moments with fewer than ``min_size`` elements (as bitsandbytes'
  ``min_8bit_size``) stay in ``moment_dtype``: they cost little. 1-D moments above it (SLTrain's sparse
  values, large norms) are quantized in blocks along their one dimension.

Why blocks run along rows and how the stored orientation is chosen: a layout shards a state tensor along
its rows (``rows``) or its columns (``columns``, ``optim.layout.SHARDINGS``). A block must never straddle
a shard boundary, or two processes would need each other's elements to quantize it. So the codes of a
``columns``-sharded moment (the ``r x n`` moments of a left projection) are stored transposed,
``n x r``, and sharded by rows; blocks then run along ``r`` within each stored row, and every stored row
lies on one process whatever the sharding (their sharding label is ``columns_first``: dimension 0 runs along
the parameter's columns). The state keys, shapes and dtypes are therefore the same on every layout, which
is what lets a checkpoint reshard.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import torch
from torch import Tensor

from .._named import NamedRegistry, to_state
from ..ops.quant import (
    MAX_BLOCK_SIZE,
    absmax_shape,
    blockwise_adam_,
    dequantize_blockwise,
    quantize_blockwise_,
    signed_code_map,
    unsigned_code_map,
)
from ..projection import ProjectorTensor
from ..state_keys import EXP_AVG, EXP_AVG_ABSMAX, EXP_AVG_SQ, EXP_AVG_SQ_ABSMAX

__all__ = [
    "Blockwise8bit",
    "FullPrecision",
    "MomentFormat",
    "QuantizedMoments",
    "moment_format_names",
    "moment_state_bytes",
    "register_moment_format",
    "resolve_moment_format",
]

@dataclasses.dataclass(frozen=True)
class MomentFormat:
    """Base of every moment format (see the module docstring). Subclasses are frozen dataclasses whose
    fields are the options, validated in ``__post_init__``."""

    #: The name ``moment_format=`` accepts for this class with default options.
    name: ClassVar[str] = ""

    def quantizes(self, shape: Sequence[int]) -> bool:
        """Whether a moment of whole shape ``shape`` is stored quantized (else as a plain tensor)."""
        return False

    def tensors(self, shape: Sequence[int], dtype: torch.dtype, sharding: str) -> list[ProjectorTensor]:
        """The state tensors of the two moments of whole shape ``shape`` (``dtype``: ``moment_dtype`` or
        the parameter's), placed as ``sharding`` says: what ``_init_state`` builds, what the estimator
        counts and what ``load_state_dict`` keeps in its dtype."""
        shape = tuple(shape)
        return [ProjectorTensor(EXP_AVG, shape, dtype, sharding), ProjectorTensor(EXP_AVG_SQ, shape, dtype, sharding)]

    def initial(self, spec: ProjectorTensor, tensor: Tensor) -> None:
        """Set a freshly made (zero) state tensor to the value of zero moments."""

    def splits_on_blocks(self, size: int, pieces: Callable[[int], list[tuple[int, int]]]) -> bool:
        """Whether a 1-D moment of ``size`` elements survives a layout that cuts every 1-D state tensor of
        ``n`` elements into ``pieces(n)`` (``[start, stop)`` per process): each process must hold whole
        blocks, the very blocks whose scales its piece of the scales holds. Plain moments always do."""
        return True

    def to_state(self) -> str | dict[str, Any]:
        """This format as plain values for a state dict: its name, or a dict with its options."""
        return to_state(self)


@dataclasses.dataclass(frozen=True)
class FullPrecision(MomentFormat):
    """``M`` and ``V`` as plain tensors in ``moment_dtype`` (the reference packages' storage)."""

    name: ClassVar[str] = "full"


@dataclasses.dataclass(frozen=True)
class Blockwise8bit(MomentFormat):
    """Block-wise dynamic 8-bit moments (module docstring).

    Per moment of ``k`` elements stored as ``rows x c``: ``k`` bytes of codes and ``4 · rows · ceil(c /
    block_size)`` bytes of fp32 scales, i.e. ``(1 + 4 / min(c, block_size)) / 4`` of fp32 moments
    (0.254x for blocks of 256; 0.258x for a rank-128 moment, whose blocks hold 128 elements).

    Args:
        block_size: elements per quantization block along the stored last dimension, 1 to 4096 (default
            256, bitsandbytes' and torchao's choice: smaller blocks track outliers better and cost more
            scales).
        min_size: moments with fewer elements stay in ``moment_dtype`` (default 4096, bitsandbytes'
            ``min_8bit_size``); 0 quantizes every moment. A layout that splits vectors between
            processes (FSDP2) refuses a quantized 1-D moment whose pieces would cut a block
            (:meth:`splits_on_blocks`; a 4096-element norm over 2 to 16 ranks is fine).
    """

    name: ClassVar[str] = "8bit"
    block_size: int = 256
    min_size: int = 4096

    def __post_init__(self) -> None:
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BLOCK_SIZE:
            raise ValueError(f"Invalid block_size: {size!r}. Must be an integer from 1 to {MAX_BLOCK_SIZE}.")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"Invalid min_size: {self.min_size!r}. Must be a non-negative integer.")

    def quantizes(self, shape: Sequence[int]) -> bool:
        return len(shape) >= 1 and math.prod(shape) >= max(self.min_size, 1)

    def tensors(self, shape: Sequence[int], dtype: torch.dtype, sharding: str) -> list[ProjectorTensor]:
        if not self.quantizes(shape):
            return super().tensors(shape, dtype, sharding)
        stored, stored_sharding = _stored(tuple(shape), sharding)
        scales = absmax_shape(stored, self.block_size)
        return [
            ProjectorTensor(EXP_AVG, stored, torch.uint8, stored_sharding),
            ProjectorTensor(EXP_AVG_ABSMAX, scales, torch.float32, stored_sharding),
            ProjectorTensor(EXP_AVG_SQ, stored, torch.uint8, stored_sharding),
            ProjectorTensor(EXP_AVG_SQ_ABSMAX, scales, torch.float32, stored_sharding),
        ]

    def splits_on_blocks(self, size: int, pieces: Callable[[int], list[tuple[int, int]]]) -> bool:
        if not self.quantizes((size,)):
            return True
        blocks = absmax_shape((size,), self.block_size)[0]
        return all(
            (start, stop) == (min(first * self.block_size, size), min(last * self.block_size, size))
            for (start, stop), (first, last) in zip(pieces(size), pieces(blocks))
        )

    def initial(self, spec: ProjectorTensor, tensor: Tensor) -> None:
        # Scales of zero make every code decode to zero; the codes are set to the map's zero anyway, so
        # that fresh, reset and requantized-zero blocks are the same bytes.
        if spec.key in (EXP_AVG, EXP_AVG_SQ) and spec.dtype == torch.uint8:
            tensor.fill_(_zero_code(spec.key))


def _stored(shape: tuple[int, ...], sharding: str) -> tuple[tuple[int, ...], str]:
    """The stored shape and sharding of a quantized moment of whole ``shape`` (module docstring)."""
    if sharding == "columns" and len(shape) == 2:
        return (shape[1], shape[0]), "columns_first"
    return shape, sharding


def _code_map(key: str, device: torch.device) -> Tensor:
    return signed_code_map(device) if key == EXP_AVG else unsigned_code_map(device)


def _zero_code(key: str) -> int:
    """The code of 0.0 in the moment's map (the maps are sorted and hold 0 exactly)."""
    return int((_code_map(key, torch.device("cpu")) == 0).nonzero()[0, 0])


class QuantizedMoments(NamedTuple):
    """One parameter's quantized moments as a step sees them (this process's pieces): transient, built
    from its state on every step, like :class:`~lowrank_optim.projection.Projection`."""

    format: Blockwise8bit
    #: The codes are stored as the transpose of the moment (a ``columns``-sharded moment).
    transposed: bool
    exp_avg: Tensor
    exp_avg_absmax: Tensor
    exp_avg_sq: Tensor
    exp_avg_sq_absmax: Tensor

    def _oriented(self, stored: Tensor) -> Tensor:
        return stored.T.contiguous() if self.transposed else stored

    def _storage(self, moment: Tensor) -> Tensor:
        return moment.T.contiguous() if self.transposed else moment.contiguous()

    def load(self, *, fused: bool = True) -> tuple[Tensor, Tensor]:
        """``(M, V)`` dequantized to new fp32 tensors in the moment's orientation (for a refresh's
        moment policy; the ordinary step never needs them)."""
        size, device = self.format.block_size, self.exp_avg.device
        exp_avg = dequantize_blockwise(self.exp_avg, self.exp_avg_absmax, _code_map(EXP_AVG, device), size, fused=fused)
        exp_avg_sq = dequantize_blockwise(
            self.exp_avg_sq, self.exp_avg_sq_absmax, _code_map(EXP_AVG_SQ, device), size, fused=fused
        )
        return self._oriented(exp_avg), self._oriented(exp_avg_sq)

    def store_(self, exp_avg: Tensor, exp_avg_sq: Tensor, *, fused: bool = True) -> None:
        """Quantize fp32 ``M`` and ``V`` (the moment's orientation) into the state."""
        size = self.format.block_size
        device = self.exp_avg.device
        quantize_blockwise_(
            self._storage(exp_avg.float()), _code_map(EXP_AVG, device), size, self.exp_avg, self.exp_avg_absmax, fused=fused
        )
        quantize_blockwise_(
            self._storage(exp_avg_sq.float()), _code_map(EXP_AVG_SQ, device), size, self.exp_avg_sq, self.exp_avg_sq_absmax,
            fused=fused,
        )

    def zero_(self) -> None:
        """Zero moments (``moment_policy="reset"``), the same bytes as fresh state."""
        self.exp_avg.fill_(_zero_code(EXP_AVG))
        self.exp_avg_sq.fill_(_zero_code(EXP_AVG_SQ))
        self.exp_avg_absmax.zero_()
        self.exp_avg_sq_absmax.zero_()

    def update_(
        self, lowrank: Tensor, beta1: float, beta2: float, eps: float, skip: Tensor | None, *, fused: bool
    ) -> Tensor:
        """The step's moment update on the quantized state, returning ``N = M / (sqrt(V) + eps)`` (fp32, the
        moment's orientation): dequantize, update and requantize each block in one op."""
        device = self.exp_avg.device
        stored = self._storage(lowrank.float())
        normalized = blockwise_adam_(
            stored,
            self.exp_avg,
            self.exp_avg_absmax,
            self.exp_avg_sq,
            self.exp_avg_sq_absmax,
            torch.empty_like(stored),
            _code_map(EXP_AVG, device),
            _code_map(EXP_AVG_SQ, device),
            beta1,
            beta2,
            eps,
            self.format.block_size,
            skip,
            fused=fused,
        )
        return self._oriented(normalized)


def quantized_moments(fmt: MomentFormat, shape: Sequence[int], sharding: str, state: dict[str, Any]) -> QuantizedMoments | None:
    """The quantized moments of a state whose moment has whole shape ``shape``, or ``None`` where ``fmt``
    keeps it as plain tensors."""
    if not isinstance(fmt, Blockwise8bit) or not fmt.quantizes(shape):
        return None
    transposed = _stored(tuple(shape), sharding)[1] != sharding
    return QuantizedMoments(
        fmt, transposed, state[EXP_AVG], state[EXP_AVG_ABSMAX], state[EXP_AVG_SQ], state[EXP_AVG_SQ_ABSMAX]
    )


def moment_state_bytes(fmt: MomentFormat, shape: Sequence[int], dtype: torch.dtype, sharding: str = "rows") -> int:
    """Bytes of the two moments of whole shape ``shape`` in ``fmt`` (``dtype``: the plain moments' dtype):
    the sum over :meth:`MomentFormat.tensors`, the one rule the estimator and the optimizer share."""
    total = 0
    for spec in fmt.tensors(shape, dtype, sharding):
        total += math.prod(spec.shape) * torch.empty((), dtype=spec.dtype or dtype).element_size()
    return total


#: Registered formats by name (the rule shared with projectors: :mod:`lowrank_optim._named`).
_FORMATS: NamedRegistry[MomentFormat] = NamedRegistry(
    "moment_format", MomentFormat, "lowrank_optim.Blockwise8bit(block_size=128)"
)


def register_moment_format(cls: type[MomentFormat]) -> type[MomentFormat]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    return _FORMATS.register(cls)


register_moment_format(FullPrecision)
register_moment_format(Blockwise8bit)


def moment_format_names() -> tuple[str, ...]:
    """The names ``moment_format=`` accepts, in registration order."""
    return _FORMATS.names()


def resolve_moment_format(value: Any, where: str = "") -> MomentFormat:
    """The format ``value`` names: a registered name, a :class:`MomentFormat`, or the plain form
    :meth:`MomentFormat.to_state` writes (``where`` says which param group, for messages)."""
    return _FORMATS.resolve(value, where)


def quantized_state_dtypes() -> dict[str, torch.dtype]:
    """``{state key: dtype}`` of the quantized formats' scales (fixed whatever the parameter's dtype)."""
    return {EXP_AVG_ABSMAX: torch.float32, EXP_AVG_SQ_ABSMAX: torch.float32}
