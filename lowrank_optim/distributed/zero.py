"""Binding a low-rank optimizer to a DeepSpeed engine: the layout from ZeRO's own partition bookkeeping.

Only attributes of DeepSpeed 0.19.x's ZeRO optimizers are read (nothing is imported from DeepSpeed):

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): each param group is flattened in ``round_robin_bit16_groups[i]``
  order with ``round_robin_bit16_padding[i]`` after each parameter, padded to ``bit16_groups_flat[i]``,
  and cut into equal pieces; rank ``k``'s fp32 piece ``single_partition_of_fp32_groups[i]`` is what the
  optimizer's group holds. (DeepSpeed's own ``_hp_mapping`` is wrong under round-robin gradients, so it
  is not used.)
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is cut on its own (``partition_numel()``
  elements per rank, real shape ``ds_shape``); sub-group ``s`` of ``fp16_groups`` concatenates the pieces
  into ``fp32_partitioned_groups_flat[s]``, which belongs to param group ``sub_group_to_group_id[s]``;
  before its own step a sub-group's reduced gradient is in ``averaged_gradients[s]`` (read for a
  ``rank="auto"`` group cut into several sub-groups, :func:`_sub_group_gradient`).

Each plan is verified when bound: the flat fp32 partition must equal the pieces of the parameters it
claims to hold; a mismatch (a DeepSpeed version that lays partitions out differently) raises.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim._validation import matrix_shape
from ..optim.galore import GaLoreAdamW
from .comm import TorchCommunicator
from .fragment import FragmentLayout
from .plan import PartitionPlan, zero3_plans, zero12_plans

__all__ = ["bind"]


def _names(engine: Any) -> dict[int, str]:
    return {id(param): name for name, param in engine.module.named_parameters()}


def _base_optimizer(engine: Any) -> GaLoreAdamW:
    base = engine.optimizer
    # ZeRO and the fp16/bf16 wrappers keep the client optimizer as ``.optimizer``.
    while not isinstance(base, GaLoreAdamW) and hasattr(base, "optimizer"):
        base = base.optimizer
    if not isinstance(base, GaLoreAdamW):
        raise TypeError(
            f"bind(engine): the engine's optimizer is {type(engine.optimizer).__name__}, which wraps no "
            "lowrank_optim optimizer (GaLoreAdamW, FiraAdamW, DCTAdamW). Pass one (or "
            "lowrank_optim.deepspeed.optimizer_factory(section)) to deepspeed.initialize."
        )
    return base


def _mismatch(where: str, name: str) -> RuntimeError:
    return RuntimeError(
        f"bind(engine): {where}: the flat fp32 partition does not hold the values of parameter {name!r} where "
        "DeepSpeed's partition bookkeeping says it should. This DeepSpeed version lays partitions out "
        "differently from 0.19.x; the low-rank optimizer cannot run on it (refusing rather than training wrongly)."
    )


def _verify(flat: Tensor, plan: PartitionPlan, values: list[Tensor], where: str) -> None:
    """Every piece of ``flat`` must equal the slice of the parameter it stands for (``values``: the
    parameters' data, flattened, in plan order, as much of each as this rank can see)."""
    for matrix, value in zip(plan.matrices, values):
        piece = matrix.piece
        if piece is None:
            continue
        held = flat[piece.flat_start : piece.flat_start + piece.numel]
        if not torch.equal(held, value[: piece.numel].to(flat.dtype)):
            raise _mismatch(where, matrix.name)


def _undo_state_warmup(engine: Any, base: GaLoreAdamW) -> None:
    """Undo the zero-gradient step DeepSpeed's stage-0 fp16/bf16 wrapper takes when it is built.

    ``FP16_UnfusedOptimizer.__init__`` (``initialize_optimizer_states``) calls ``base.step()`` once with
    all-zero gradients to create Adam's state. For torch's AdamW that step still counts (bias correction)
    and decays the fp32 masters by ``lr · weight_decay``; for a low-rank optimizer it also takes the
    first projector refresh from a zero gradient and shifts every later refresh by one step. Here the
    state is dropped and the masters are copied again from the model's weights (which that step left
    untouched, and of which the masters were exact copies), so training starts as in one process.
    """
    wrapper = engine.optimizer
    if type(wrapper).__name__ != "FP16_UnfusedOptimizer" or engine.global_steps != 0:
        return
    steps = {int(state["step"].item()) for state in base.state.values()}
    if steps != {1}:
        raise RuntimeError(
            "bind(engine): DeepSpeed's FP16_UnfusedOptimizer should have stepped the optimizer exactly once (with "
            f"zero gradients) when it was built, but its step counters are {sorted(steps)}. Bind right after "
            "deepspeed.initialize, before training."
        )
    base.state.clear()
    with torch.no_grad():
        for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            for model_param, master in zip(low, high):
                master.copy_(model_param)


def _sub_group_gradient(zero: Any, sub_group: int) -> Tensor | None:
    """A ZeRO-3 sub-group's flat fp32 gradient: the one DeepSpeed prepared for its step, or, before that,
    its reduced gradient partitions (``averaged_gradients``), flattened as DeepSpeed will flatten them.
    For a ``rank="auto"`` group cut into several sub-groups, whose ranks the refresh of its first sub-group
    due in a step allocates from all those due (:mod:`lowrank_optim.distributed.fragment`)."""
    flat = zero.fp32_partitioned_groups_flat[sub_group]
    if flat.grad is not None:
        return flat.grad
    parts = zero.averaged_gradients.get(sub_group)  # a dict by sub-group; None once prepared
    if not parts:
        return None
    return torch.cat([part.reshape(-1) for part in parts]).to(flat.dtype)


def bind(engine: Any, *, shard_moments: bool = True) -> GaLoreAdamW:
    """Give the engine's low-rank optimizer the layout of ZeRO's partitions and return it.

    Stage 0 keeps whole tensors (the dense layout); with fp16/bf16 the zero-gradient step DeepSpeed's
    wrapper took at construction is undone (:func:`_undo_state_warmup`). At ZeRO-1/2 the low-rank state of a matrix split
    between ranks is duplicated on its holders; at ZeRO-3 ``shard_moments`` (default) splits the
    moments and SVD bases of every split one-sided matrix among its holders instead (see
    :mod:`lowrank_optim.distributed.fragment`).
    """
    base = _base_optimizer(engine)
    stage = engine.zero_optimization_stage()
    if stage == 0:
        _undo_state_warmup(engine, base)
        return base
    names = _names(engine)
    zero = engine.optimizer
    layout = FragmentLayout()
    if stage in (1, 2):
        for index, group in enumerate(base.param_groups):
            flat = zero.single_partition_of_fp32_groups[index]
            if group["params"][0] is not flat:
                raise _mismatch(f"param group {index}", "<group tensor>")
            process_group = zero.real_dp_process_group[index]
            world_size = dist.get_world_size(group=process_group)
            rank = dist.get_rank(group=process_group)
            params = zero.round_robin_bit16_groups[index]
            plan = zero12_plans(
                [names[id(p)] for p in params],
                [matrix_shape(p) for p in params],
                zero.round_robin_bit16_padding[index],
                zero.bit16_groups_flat[index].numel() // world_size,
                world_size,
                rank,
                ordinals=[base.param_ordinal(p) for p in params],
            )
            values = [
                p.detach().reshape(-1)[m.piece.param_start :] if m.piece else p for p, m in zip(params, plan.matrices)
            ]
            _verify(flat, plan, values, f"ZeRO-{stage} param group {index}")
            if "rank" in group:
                layout.add_partition(flat, plan, TorchCommunicator(process_group), group_index=index, shard_moments=False)
            else:
                layout.add_full_rank_partition(flat, plan, TorchCommunicator(process_group), group_index=index)
    elif stage == 3:
        if getattr(zero, "offload_optimizer", False):
            raise ValueError(
                "bind(engine): ZeRO-3 with offload_optimizer is not supported by the low-rank optimizers yet. "
                "Use stage 1 or 2 with offload_optimizer {device: cpu}, or stage 3 without offload."
            )
        process_group = zero.dp_process_group
        world_size = dist.get_world_size(group=process_group)
        rank = dist.get_rank(group=process_group)
        communicator = TorchCommunicator(process_group)
        for sub_group, params in enumerate(zero.fp16_groups):
            group_index = zero.sub_group_to_group_id[sub_group]
            flat = zero.fp32_partitioned_groups_flat[sub_group]
            plan = zero3_plans(
                [names[id(p)] for p in params],
                [matrix_shape(p) for p in params],
                [p.partition_numel() for p in params],
                world_size,
                rank,
                ordinals=[base.param_ordinal(p) for p in params],
            )
            if flat.numel() != sum(p.partition_numel() for p in params):
                raise _mismatch(f"ZeRO-3 sub-group {sub_group}", names[id(params[0])])
            _verify(flat, plan, [p.ds_tensor.detach().reshape(-1) for p in params], f"ZeRO-3 sub-group {sub_group}")
            if "rank" in base.param_groups[group_index]:
                gradient = functools.partial(_sub_group_gradient, zero, sub_group)
                layout.add_partition(
                    flat, plan, communicator, group_index=group_index, shard_moments=shard_moments, gradient=gradient
                )
            else:
                layout.add_full_rank_partition(flat, plan, communicator, group_index=group_index)
        # One training step steps every sub-group in turn; the engine counts the steps after them.
        layout.step_token = lambda: engine.global_steps
    else:
        raise ValueError(f"bind(engine): unknown ZeRO stage {stage!r}; supported stages are 0, 1, 2, 3.")
    layout.attach(base)
    return base
