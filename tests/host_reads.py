"""Which tensors a block of code reads back to the host (``item``, ``tolist``, ``bool`` / ``float`` /
``int`` conversions): the CPU stand-in for "this never synchronizes a device"."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def recorded_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.Tensor]]:
    """Inside the block, every tensor read on the host is appended to the yielded list."""
    read: list[torch.Tensor] = []

    def recording(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            read.append(self)
            return original(self, *args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in _READS:
            patch.setattr(torch.Tensor, name, recording(name))
        yield read
