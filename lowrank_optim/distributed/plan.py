"""Partition plans: which element range of which matrix each rank's flat partition holds.

Pure bookkeeping (no DeepSpeed import): the builders take the numbers DeepSpeed's ZeRO optimizers keep
(order, per-parameter padding, partition size) and return, for one rank, the plan of every matrix of a
flat partition. Every rank computes the same global facts (shapes, holders) in the same order, which is
what lets the ranks call their collectives in lockstep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["MatrixPlan", "PartitionPlan", "Piece", "zero12_plans", "zero3_plans"]


@dataclass(frozen=True, kw_only=True)
class Piece:
    """Elements ``[param_start, param_start + numel)`` of the row-major flattened matrix, stored at
    ``[flat_start, flat_start + numel)`` of the flat partition."""

    param_start: int
    numel: int
    flat_start: int


@dataclass(frozen=True, kw_only=True)
class MatrixPlan:
    """One parameter (a projected matrix, or any full-rank tensor) as seen from one rank: its name and full shape, the ranks that
    hold a non-empty piece of it (ascending; the first is the owner that computes the projector), and this
    rank's piece (``None`` when it holds none). Holder ``holders[j]`` holds ``[starts[j], starts[j + 1])``
    (the last one up to ``numel``)."""

    name: str
    shape: tuple[int, ...]
    holders: tuple[int, ...]
    piece: Piece | None
    #: Where each holder's piece starts in the row-major matrix (aligned with ``holders``; ascending).
    starts: tuple[int, ...]
    #: The parameter's 1-based position among those the optimizer was built with (what a whole-tensor
    #: run gives the projector, e.g. the random projector's seed offset); ``None`` when unknown.
    ordinal: int | None = None

    @property
    def split(self) -> bool:
        """Held by more than one rank: projections and refresh gradients must be combined."""
        return len(self.holders) > 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def range_of(self, index: int) -> tuple[int, int]:
        """``[start, stop)`` of holder ``holders[index]``'s piece in the row-major matrix."""
        stop = self.starts[index + 1] if index + 1 < len(self.starts) else self.numel
        return self.starts[index], stop


@dataclass(frozen=True, kw_only=True)
class PartitionPlan:
    """The matrices of one flat partition (one param group at ZeRO-1/2, one sub-group at ZeRO-3), in the
    same order on every rank."""

    matrices: tuple[MatrixPlan, ...]


def _intersect(start: int, stop: int, lo: int, hi: int) -> tuple[int, int] | None:
    begin, end = max(start, lo), min(stop, hi)
    return (begin, end) if begin < end else None


def zero12_plans(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    paddings: Sequence[int],
    partition_size: int,
    world_size: int,
    rank: int,
    ordinals: Sequence[int | None] | None = None,
) -> PartitionPlan:
    """The plan of rank ``rank``'s ZeRO-1/2 partition of one param group.

    ``names``/``shapes``/``paddings`` follow the order of the flat buffer (DeepSpeed's
    ``round_robin_bit16_groups[i]`` and ``round_robin_bit16_padding[i]``); matrix ``j`` starts after the
    elements and padding of the ones before it, and rank ``k`` holds ``[k·size, (k+1)·size)``.
    ``ordinals`` (aligned with ``names``): each parameter's :attr:`MatrixPlan.ordinal`.
    """
    matrices = []
    offset = 0
    ordinals = [None] * len(names) if ordinals is None else list(ordinals)
    for name, shape, padding, ordinal in zip(names, shapes, paddings, ordinals, strict=True):
        numel = math.prod(shape)
        holders = tuple(
            k
            for k in range(world_size)
            if _intersect(offset, offset + numel, k * partition_size, (k + 1) * partition_size)
        )
        mine = _intersect(offset, offset + numel, rank * partition_size, (rank + 1) * partition_size)
        piece = None
        if mine is not None:
            piece = Piece(param_start=mine[0] - offset, numel=mine[1] - mine[0], flat_start=mine[0] - rank * partition_size)
        starts = tuple(max(k * partition_size - offset, 0) for k in holders)
        matrices.append(
            MatrixPlan(name=name, shape=tuple(shape), holders=holders, piece=piece, starts=starts, ordinal=ordinal)
        )
        offset += numel + padding
    return PartitionPlan(matrices=tuple(matrices))


def zero3_plans(
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    partition_numels: Sequence[int],
    world_size: int,
    rank: int,
    ordinals: Sequence[int | None] | None = None,
) -> PartitionPlan:
    """The plan of rank ``rank``'s ZeRO-3 sub-group partition.

    ZeRO-3 cuts every parameter on its own: rank ``k`` holds elements ``[k·pn, (k+1)·pn)`` of it
    (``pn = partition_numel()``, the last ranks' tails are padding), and the sub-group's flat fp32
    partition concatenates those slices at cumulative offsets of ``pn``. ``ordinals`` as for
    :func:`zero12_plans`.
    """
    matrices = []
    flat_offset = 0
    ordinals = [None] * len(names) if ordinals is None else list(ordinals)
    for name, shape, pn, ordinal in zip(names, shapes, partition_numels, ordinals, strict=True):
        numel = math.prod(shape)
        holders = tuple(k for k in range(world_size) if _intersect(0, numel, k * pn, (k + 1) * pn))
        mine = _intersect(0, numel, rank * pn, (rank + 1) * pn)
        piece = None if mine is None else Piece(param_start=mine[0], numel=mine[1] - mine[0], flat_start=flat_offset)
        starts = tuple(k * pn for k in holders)
        matrices.append(
            MatrixPlan(name=name, shape=tuple(shape), holders=holders, piece=piece, starts=starts, ordinal=ordinal)
        )
        flat_offset += pn
    return PartitionPlan(matrices=tuple(matrices))
