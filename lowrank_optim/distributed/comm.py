"""The one collective the fragment layouts need, behind a small interface (tests use an in-process fake)."""

from __future__ import annotations

from typing import Any, Protocol

import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "TorchCommunicator"]


class Communicator(Protocol):
    """A process group as the fragment step sees it.

    ``all_reduce`` sums ``tensor`` in place over the group and must leave bit-identical results on every
    rank (the ranks' projectors and moments must never drift apart). ``elements`` counts what this rank
    passed to collectives, for the benchmark.
    """

    rank: int
    world_size: int
    elements: int

    def all_reduce(self, tensor: Tensor) -> None: ...


class TorchCommunicator:
    """``torch.distributed.all_reduce`` over ``group`` (``None``: the default group)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group=group)
        self.world_size = dist.get_world_size(group=group)
        self.elements = 0

    def all_reduce(self, tensor: Tensor) -> None:
        self.elements += tensor.numel()
        dist.all_reduce(tensor, group=self.group)
