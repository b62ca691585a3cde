"""The collectives the fragment layouts need, behind a small interface (tests use an in-process fake)."""

from __future__ import annotations

from typing import Any, Protocol

import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "TorchCommunicator", "all_reduce_sent", "chunk_sent"]


def all_reduce_sent(numel: int, world_size: int) -> int:
    """Elements one rank sends in a bandwidth-optimal (ring, or reduce-scatter + all-gather) all-reduce
    of ``numel`` elements: ``2 (W - 1) / W · numel`` (``numel`` at two ranks)."""
    return 2 * (world_size - 1) * numel // world_size


def chunk_sent(chunk: int, world_size: int) -> int:
    """Elements one rank sends in a ring all-gather or reduce-scatter with ``chunk`` elements per rank."""
    return (world_size - 1) * chunk


class Communicator(Protocol):
    """A process group as the fragment step sees it.

    ``all_reduce`` sums ``tensor`` in place over the group and must leave bit-identical results on every
    rank (the ranks' projectors and moments must never drift apart). ``all_gather`` fills ``output``
    (``world_size`` equal chunks, rank order) with every rank's ``input``; ``reduce_scatter`` sums the
    ranks' ``input`` (``world_size`` equal chunks) and leaves chunk ``rank`` in ``output``. ``elements``
    counts the elements this rank sent, as the bandwidth-optimal algorithm would send them
    (:func:`all_reduce_sent`, :func:`chunk_sent`), for the benchmark.
    """

    rank: int
    world_size: int
    elements: int

    def all_reduce(self, tensor: Tensor) -> None: ...

    def all_gather(self, output: Tensor, input: Tensor) -> None: ...

    def reduce_scatter(self, output: Tensor, input: Tensor) -> None: ...


# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class TorchCommunicator:
    """``torch.distributed`` collectives over ``group`` (``None``: the default group). Gloo (CPU) and NCCL
    both implement ``all_gather_into_tensor`` and ``reduce_scatter_tensor``."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group=group)
        self.world_size = dist.get_world_size(group=group)
        self.elements = 0

    def all_reduce(self, tensor: Tensor) -> None:
        self.elements += all_reduce_sent(tensor.numel(), self.world_size)
        dist.all_reduce(tensor, group=self.group)

    def all_gather(self, output: Tensor, input: Tensor) -> None:
        self.elements += chunk_sent(input.numel(), self.world_size)
        _ALL_GATHER(output, input, group=self.group)

    def reduce_scatter(self, output: Tensor, input: Tensor) -> None:
        self.elements += chunk_sent(output.numel(), self.world_size)
        _REDUCE_SCATTER(output, input, group=self.group)

    def gather(self, outputs: list[Tensor] | None, input: Tensor, dst: int) -> None:
        """Every rank's ``input`` into ``outputs`` (rank order) on group rank ``dst`` (``None`` elsewhere)."""
        if self.rank != dst:
            self.elements += input.numel()
        dist.gather(
            input, gather_list=outputs, dst=dist.get_global_rank(self.group, dst) if self.group else dst, group=self.group
        )

    def broadcast(self, tensor: Tensor, src: int) -> None:
        """``tensor`` of group rank ``src`` on every rank (counted once, on ``src``)."""
        if self.rank == src:
            self.elements += tensor.numel()
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)
