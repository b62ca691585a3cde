"""Where an optimizer's tensors come from: the layout object a low-rank optimizer steps its groups through.

The optimizers never branch on the training backend. ``GaLoreAdamW.step()`` hands every param group to
``optimizer.layout.step_group``; the layout knows which element ranges of which parameters the group's
tensors hold. :class:`DenseLayout` (the default) is the plain case: every tensor is a whole parameter
and nothing is communicated. :mod:`lowrank_optim.distributed` provides the layouts for DeepSpeed ZeRO's
flat partitions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from .galore import GaLoreAdamW

__all__ = ["DenseLayout", "Layout"]


class Layout(Protocol):
    """Steps one param group of an optimizer, knowing how the group's tensors map onto parameters."""

    def check_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> None:
        """Raise if ``group`` cannot be stepped; called for every group before any is stepped."""
        ...

    def begin_step(self, optimizer: GaLoreAdamW) -> None:
        """Called once per ``step()``, after every group passed :meth:`check_group`, before the first
        :meth:`step_group` (e.g. for a decision all groups and ranks must share)."""
        ...

    def step_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> None: ...


class DenseLayout:
    """Every tensor in ``param_groups`` is a whole parameter with its real shape; no communication."""

    def check_group(self, optimizer: GaLoreAdamW, group: dict[str, Any]) -> None:
        """A projected group must still hold the 2-D matrices it was built with, and every parameter's
        state must still fit it."""
        if "rank" in group:
            self._check_matrices(optimizer, group)
        optimizer._check_state(group)

    @staticmethod
    def _check_matrices(optimizer: GaLoreAdamW, group: dict[str, Any]) -> None:
        for position, param in enumerate(group["params"]):
            if param.dim() != 2:
                # DeepSpeed ZeRO replaces a group's parameters by one flat partition after the
                # optimizer was built; projecting that would crash or, worse, silently run as Adam.
                raise RuntimeError(
                    f"{type(optimizer).__name__}: tensor {position} of a projected param group (rank "
                    f"{group['rank']}) has shape {tuple(param.shape)}, not the 2-D matrix it was built with. "
                    "This happens under DeepSpeed ZeRO (flat partitions) or deepspeed.zero.Init: bind the "
                    "optimizer to the engine with lowrank_optim.deepspeed.bind(engine) after "
                    "deepspeed.initialize, or use lowrank_optim.deepspeed.initialize, which does it."
                )

    def begin_step(self, optimizer: GaLoreAdamW) -> None:
        """Nothing to share: each parameter decides for itself."""

    def step_group(self, optimizer: GaLoreAdamW, group: dict[str, Any], found_inf: Tensor | None = None) -> None:
        """One optimizer step of ``group`` with the optimizer's own functional step; ``found_inf`` (0-dim
        bool) skips every update of the group where set."""
        batch = optimizer._collect(group)
        if batch is not None:
            optimizer._step_group(group, batch, found_inf)
