"""Optimizer-state helpers: keeping state dtypes through ``load_state_dict`` and counting state bytes."""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["StateDtypeKeeper", "optimizer_state_bytes", "state_mismatch"]

#: ``(saved param group, param, state key, the param's saved state) -> dtype the tensor must have, or None
#: for "param dtype"``.
IntendedDtype = Callable[[dict[str, Any], Tensor, str, dict[str, Any]], "torch.dtype | None"]


class StateDtypeKeeper:
    """Load-state-dict hooks that keep state tensors in their intended dtype.

    ``Optimizer.load_state_dict`` casts every state tensor except ``step`` to a floating parameter's
    dtype, integer tensors included. That is wrong for state deliberately kept in another dtype (fp32
    moments of bf16 weights, int64 DCT indices) and lossy (fp32 -> bf16 -> fp32 cannot be undone
    afterwards; bf16 cannot even represent index 257). The pre-hook takes such tensors out
    of the incoming state dict before the stock loader sees them, and the post-hook puts them back,
    moved to the parameter's device and in their intended dtype. Everything else is loaded by torch.
    """

    def __init__(self, optimizer: Optimizer, intended_dtype: IntendedDtype) -> None:
        self._intended_dtype = intended_dtype
        self._held: list[tuple[Tensor, str, Tensor, torch.dtype]] = []
        optimizer.register_load_state_dict_pre_hook(self._take_out)
        optimizer.register_load_state_dict_post_hook(self._put_back)

    def _take_out(self, optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        saved_groups = state_dict["param_groups"]
        # The stock loader pairs saved ids with current params in group order; do the same.
        saved_ids = itertools.chain.from_iterable(group["params"] for group in saved_groups)
        params = itertools.chain.from_iterable(group["params"] for group in optimizer.param_groups)
        group_of_id = {pid: group for group in saved_groups for pid in group["params"]}
        param_of_id = dict(zip(saved_ids, params))
        self._held = []
        state = {}
        for pid, param_state in state_dict["state"].items():
            param = param_of_id.get(pid)
            if param is None:
                state[pid] = param_state
                continue
            kept = {}
            for key, value in param_state.items():
                dtype = self._intended_dtype(group_of_id[pid], param, key, param_state)
                if (
                    key != "step"
                    and isinstance(value, Tensor)
                    and dtype is not None
                    and dtype != param.dtype
                ):
                    self._held.append((param, key, value, dtype))
                else:
                    kept[key] = value
            state[pid] = kept
        return {**state_dict, "state": state}

    def _put_back(self, optimizer: Optimizer) -> None:
        for param, key, value, dtype in self._held:
            optimizer.state[param][key] = value.to(device=param.device, dtype=dtype)
        self._held = []


def state_mismatch(
    param: Tensor, state: dict[str, Any], expected: dict[str, tuple[torch.Size, torch.dtype]]
) -> tuple[str, str, torch.Size, torch.dtype] | None:
    """The first state tensor that no longer fits ``param`` (``expected``: ``{key: (shape, dtype)}``, on the
    parameter's device): ``(key, what it is, the shape and dtype it needs)``, or ``None`` when all fit. The
    one rule behind the optimizers' "the parameter changed after the first step" errors."""
    for key, (shape, dtype) in expected.items():
        value = state.get(key)
        if isinstance(value, Tensor) and value.shape == shape and value.dtype == dtype and value.device == param.device:
            continue
        if isinstance(value, Tensor):
            return key, f"is {value.dtype} on {value.device} with shape {tuple(value.shape)}", shape, dtype
        return key, "is missing", shape, dtype
    return None


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes this process holds in ``optimizer.state`` (moments, bases, step counters, ...): of a sharded
    tensor (a DTensor, e.g. under FSDP2), its local shard."""
    total = 0
    for param_state in optimizer.state.values():
        for value in param_state.values():
            if isinstance(value, Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total
