"""Registers the layouts an optimizer finds from its parameters (:func:`lowrank_optim.optim.layout.layout_for`).

Imported by the package itself, so that ``GaLoreAdamW(model.parameters())`` on a model wrapped with
FSDP2's ``fully_shard`` steps its shards with no extra call, while :mod:`lowrank_optim.optim` itself
imports nothing from :mod:`lowrank_optim.distributed`. The FSDP2 layout is imported only when DTensor
parameters arrive (by then ``torch.distributed.tensor`` is loaded anyway): importing the package stays
as fast as without it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .optim.layout import register_layout


def _is_dtensor(tensor: Tensor) -> bool:
    return any(cls.__module__.startswith("torch.distributed.tensor") for cls in type(tensor).__mro__)


def _fsdp2(params: list[Tensor]) -> Any:
    """FSDP2's layout for DTensor parameters (``lowrank_optim.distributed.fsdp2``), else ``None``."""
    if not any(_is_dtensor(p) for p in params):
        return None
    from .distributed.fsdp2 import FSDP2Layout

    return FSDP2Layout.resolve(params)


register_layout(_fsdp2)
