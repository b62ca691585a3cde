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
(DDP, FSDP, DeepSpeed). Per-parameter clipping by value would be possible but is not offered.

Data parallelism is refused, not left to drift: each rank would step its replica with its own local
gradient (the hooks run before the wrapper's all-reduce), and the replicas silently diverge (two DDP
ranks: 0.21 max weight difference after 10 GaLore updates on the ``test`` model). The checks run at
construction and again at every :meth:`PerLayerUpdates.backward` (a model may be wrapped afterwards);
they are local (no collective) and cost a few attribute reads per parameter:

* ``torch.distributed`` initialised with world size > 1: the parameters are taken to be replicas;
* parameters that are DTensors (FSDP2 ``fully_shard``, tensor parallelism), flattened by FSDP1, or
  owned by DeepSpeed (ZeRO-3 partitioned, or linked to a ZeRO/bf16 fp32 master partition);
* an optimizer that is DeepSpeed's wrapper (``engine.optimizer``) or a low-rank optimizer bound to an
  engine's ZeRO partitions (:func:`lowrank_optim.deepspeed.bind`);
* a gradient written again after its parameter was stepped and freed, which is what DDP does even at
  world size 1 (its reducer copies the reduced gradients back at the end of backward): the update is
  refused before the rewritten gradients are stepped a second time.

A process group of world size 1 without a wrapper is allowed: per-layer updates are exact there.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..optim._validation import matrix_shape
from ..optim.galore import GaLoreAdamW
from ..optim.layout import DenseLayout
from ..optim.ranks import AUTO

__all__ = ["PerLayerUpdates"]

#: What every data-parallel refusal says after its reason: why it cannot work and what to do instead.
_DATA_PARALLEL = (
    "Per-layer updates step each parameter inside backward, in its post-accumulate-grad hook, before DDP, "
    "FSDP or DeepSpeed reduce the gradients across ranks: each replica would be updated with its own local "
    "gradient and the replicas would drift apart silently. Use a normal step instead: loss.backward() then "
    "optimizer.step() (under DeepSpeed: engine.backward(loss) then engine.step())."
)


def _parameter_refusal(position: int, param: Tensor, dtensor: type | None) -> str | None:
    """Why ``param`` (the optimizer's ``position``-th) is sharded or owned by a data-parallel wrapper, or None."""
    what = f"parameter {position} of the optimizer (shape {matrix_shape(param)})"
    if dtensor is not None and isinstance(param, dtensor):
        return f"{what} is a DTensor: the model is sharded by FSDP2 (fully_shard) or tensor parallelism"
    # FSDP1 marks both its FlatParameters and the original parameters it flattened into them.
    if getattr(param, "_fsdp_flattened", False) or getattr(param, "_is_flat_param", False):
        return f"{what} has been flattened by FSDP (FullyShardedDataParallel)"
    if hasattr(param, "ds_id"):
        return f"{what} is partitioned by DeepSpeed ZeRO-3 (deepspeed.zero.Init or a ZeRO-3 engine)"
    if getattr(param, "_hp_mapping", None) is not None:  # DeepSpeed clears it to None in engine.destroy()
        return f"{what} belongs to a DeepSpeed engine (ZeRO or bf16 keeps its fp32 master in a flat partition)"
    return None


def _refusal(optimizer: Optimizer, params: Iterable[Tensor]) -> str | None:
    """Why per-layer updates of ``params`` with ``optimizer`` cannot be correct in this process, or None.

    Local checks only (no collective), so that running them at every backward costs next to nothing.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return (
            f"torch.distributed is initialised with world size {dist.get_world_size()}, so the parameters are "
            "data-parallel replicas"
        )
    # DeepSpeed's ZeRO and fp16/bf16 wrappers (not torch optimizers) all live in deepspeed.runtime.
    wrapper = next((cls for cls in type(optimizer).__mro__ if cls.__module__.startswith("deepspeed.runtime")), None)
    if wrapper is not None:
        return (
            f"the optimizer is DeepSpeed's {type(optimizer).__name__} (the engine's wrapper), which steps its flat "
            "partitions after the engine has reduced the gradients"
        )
    if isinstance(optimizer, GaLoreAdamW) and not isinstance(optimizer.layout, DenseLayout):
        return (
            f"the optimizer steps a DeepSpeed engine's ZeRO partitions ({type(optimizer.layout).__name__}, "
            "set by lowrank_optim.deepspeed.bind)"
        )
    # DTensors exist only once torch.distributed.tensor is imported: not importing it keeps this module's
    # import light.
    tensor_module = sys.modules.get("torch.distributed.tensor")
    dtensor = None if tensor_module is None else tensor_module.DTensor
    for position, param in enumerate(params):
        reason = _parameter_refusal(position, param, dtensor)
        if reason is not None:
            return reason
    return None


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

    Raises:
        ValueError: at construction or at :meth:`backward`, under data parallelism (see the module
            docstring): the message says which check failed and to use a normal ``optimizer.step()``.
    """

    def __init__(self, optimizer: Optimizer, *, clip_grad_norm: float | None = None) -> None:
        if clip_grad_norm is not None:
            raise ValueError(
                f"clip_grad_norm ({clip_grad_norm!r}) is not supported with per-layer updates: the global "
                "gradient norm needs all gradients before the first parameter is updated, and per-layer "
                "updates free each gradient as soon as it is used; allowed value: None"
            )
        self._refuse_data_parallel(optimizer, [p for group in optimizer.param_groups for p in group["params"]])
        self.optimizer = optimizer
        # The parameters stepped by the hooks during the current ``backward(step=True)``; None outside one.
        self._stepped: set[Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        # Each parameter's group as the optimizer holds it *now*: load_state_dict() replaces the group
        # dicts (a resumed run's scheduler then sets the lr in the new ones) and add_param_group() adds
        # parameters, so the map is rebuilt at every backward (_sync).
        self._group_of: dict[Tensor, dict[str, Any]] = {}
        # Every parameter ever hooked, in order: the data-parallel checks look at these too, since a
        # wrapper (DeepSpeed) may have replaced the optimizer's parameters by its own flat partitions.
        self._hooked: list[Tensor] = []
        self._sync()

    def backward(self, loss: Tensor, *, step: bool = True) -> None:
        """``loss.backward()``; with ``step=True`` (the last micro-batch of an update) also update every
        parameter once, as its gradient completes, and free the gradient.

        Parameters that received no gradient in this backward but hold one from earlier micro-batches
        are stepped at the end, so every accumulated gradient is used exactly once.

        Raises ``ValueError`` (before stepping anything) when the model has become data-parallel since
        construction, and after this backward's hooks when a gradient reappeared on a parameter they had
        already stepped (DDP's reducer): the rewritten gradients are not stepped a second time.
        """
        self._sync()
        self._refuse_data_parallel(self.optimizer, self._hooked)
        hooked = list(self._group_of)  # what the hooks step, in the optimizer's order
        if not step:
            loss.backward()
            return
        stepped: set[Tensor] = set()
        self._stepped = stepped
        try:
            loss.backward()
        finally:
            self._stepped = None
        rewritten = [position for position, param in enumerate(hooked) if param in stepped and param.grad is not None]
        if rewritten:
            param = hooked[rewritten[0]]
            raise ValueError(
                f"PerLayerUpdates: the gradients of {len(rewritten)} parameter(s) (first: parameter {rewritten[0]}, "
                f"shape {tuple(param.shape)}) were written again after per-layer updates had stepped them and "
                "freed them: a wrapper reduces the gradients after autograd's hooks, as DDP does even at world size "
                "1. This backward's update was applied once, with the gradients as autograd produced them; the "
                f"rewritten gradients were not used. {_DATA_PARALLEL}"
            )
        for param in hooked:
            if param.grad is not None:
                self._step_one(param)

    def _sync(self) -> None:
        """Map every parameter of the optimizer to its current group, hooking the ones not hooked yet."""
        for index, group in enumerate(self.optimizer.param_groups):
            if group.get("rank") == AUTO:
                # Its ranks share one budget, allocated over the group's matrices refreshing together; one
                # matrix stepped alone would see the whole budget.
                raise ValueError(
                    f"PerLayerUpdates cannot step param group {index}: its rank is 'auto', whose state_budget is "
                    "shared by the group's matrices and allocated when they refresh together, and per-layer updates "
                    "step one matrix at a time. Allowed: a positive integer rank in that group (or step it "
                    "without PerLayerUpdates)."
                )
        group_of = {param: group for group in self.optimizer.param_groups for param in group["params"]}
        hooked = {id(param) for param in self._hooked}
        for param in group_of:
            if id(param) not in hooked and param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook))
                self._hooked.append(param)
        self._group_of = group_of

    def remove(self) -> None:
        """Remove the hooks; the optimizer is left as it is."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _refuse_data_parallel(optimizer: Optimizer, params: list[Tensor]) -> None:
        reason = _refusal(optimizer, params)
        if reason is not None:
            raise ValueError(f"PerLayerUpdates cannot be used here: {reason}. {_DATA_PARALLEL}")

    def _hook(self, param: Tensor) -> None:
        if self._stepped is not None and param in self._group_of:  # (a parameter no longer in the optimizer)
            self._step_one(param)
            self._stepped.add(param)

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
