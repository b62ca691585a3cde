"""Per-layer updates ("optimizer in backward"): step each parameter as soon as its gradient is complete.

In a normal step every parameter's full gradient exists at once between ``backward()`` and
``optimizer.step()``, adding ``sum_p |G_p|`` bytes to the peak. Here a post-accumulate-grad hook steps
parameter ``p`` with the *same* optimizer (restricted to ``p``) the moment autograd has accumulated
``G_p``, then frees it, so at most the gradients still in flight inside autograd exist together.

Exactness: the optimizer and its state are the user's own object; per parameter it runs the same
single-tensor arithmetic as a full ``step()`` (torch's AdamW and this package's optimizers update each
parameter independently on CPU), with the same per-parameter step counters, so GaLore/Fira/DCT refresh at
the same updates and the parameters come out bit-identical to a normal run. Learning-rate schedulers,
``state_dict()``, ``optimizer_state_bytes`` and high-rank restarts see one ordinary optimizer.

Gradient accumulation: only a :meth:`PerLayerUpdates.backward` with ``step=True`` steps; earlier
micro-batches call it with ``step=False`` and gradients accumulate in ``.grad`` as usual (so with
accumulation the full gradients *do* exist between micro-batches; the saving is the last micro-batch's
and the step's). A plain ``loss.backward()`` never steps.

What it cannot do, by construction (a parameter is updated before the other gradients exist):
global-norm gradient clipping, loss scaling with an inf/NaN check over all gradients (fp16
``GradScaler``), closures, and data-parallel wrappers that reduce gradients after the hooks run
(DDP, DeepSpeed). Per-parameter clipping by value would be possible but is not offered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

__all__ = ["PerLayerUpdates"]


class PerLayerUpdates:
    """Hooks that step ``optimizer`` one parameter at a time during :meth:`backward`.

    Usage, with ``accumulation`` micro-batches per update::

        updates = PerLayerUpdates(optimizer)
        for micro in range(accumulation):
            loss = model(batch[micro], labels=batch[micro]).loss / accumulation
            updates.backward(loss, step=micro == accumulation - 1)
        scheduler.step()  # once per update, as usual

    Args:
        optimizer: any optimizer whose ``step()`` updates each parameter independently of the others
            (torch AdamW/Adam/SGD, :class:`~lowrank_optim.GaLoreAdamW`, ``FiraAdamW``, ``DCTAdamW``).
        clip_grad_norm: must be ``None``; global-norm clipping needs every gradient before any update.
    """

    def __init__(self, optimizer: Optimizer, *, clip_grad_norm: float | None = None) -> None:
        if clip_grad_norm is not None:
            raise ValueError(
                f"clip_grad_norm ({clip_grad_norm!r}) is not supported with per-layer updates: the global "
                "gradient norm needs all gradients before the first parameter is updated, and per-layer "
                "updates free each gradient as soon as it is used; allowed value: None"
            )
        self.optimizer = optimizer
        self._stepping = False
        self._handles: list[RemovableHandle] = []
        self._group_of: dict[Tensor, dict[str, Any]] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                self._group_of[param] = group
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook))

    def backward(self, loss: Tensor, *, step: bool = True) -> None:
        """``loss.backward()``; with ``step=True`` (the last micro-batch of an update) also update every
        parameter once, as its gradient completes, and free the gradient.

        Parameters that received no gradient in this backward but hold one from earlier micro-batches
        are stepped at the end, so every accumulated gradient is used exactly once.
        """
        if not step:
            loss.backward()
            return
        self._stepping = True
        try:
            loss.backward()
        finally:
            self._stepping = False
        for param in self._group_of:
            if param.grad is not None:
                self._step_one(param)

    def remove(self) -> None:
        """Remove the hooks; the optimizer is left as it is."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, param: Tensor) -> None:
        if self._stepping:
            self._step_one(param)

    def _step_one(self, param: Tensor) -> None:
        """``optimizer.step()`` restricted to ``param``, then free its gradient.

        The optimizer sees a one-parameter copy of the param's group, so it reads the scheduler's
        current ``lr`` and every other group option exactly as a full step would.
        """
        optimizer = self.optimizer
        groups = optimizer.param_groups
        optimizer.param_groups = [{**self._group_of[param], "params": [param]}]
        try:
            optimizer.step()
        finally:
            optimizer.param_groups = groups
        param.grad = None
