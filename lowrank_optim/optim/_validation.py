"""Argument checks shared by the optimizers. Messages name the argument, its value and what is allowed."""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

from ..ops import kernel_load_error, kernels_available
from ..projection import FIRA_RESIDUALS, PROJ_TYPES

__all__ = [
    "FOREIGN_GROUP_KEYS",
    "MOMENT_POLICIES",
    "NONFINITE_POLICIES",
    "check_group_keys",
    "check_nonfinite_policy",
    "check_param_tensors",
    "normalize_scalars",
    "check_adam_hyperparameters",
    "check_finite_number",
    "check_fira_options",
    "check_limiter_gamma",
    "check_implementation_options",
    "check_no_duplicates",
    "check_projection_group",
    "matrix_shape",
    "resolve_alpha_alias",
]

#: What happens to the low-rank moments when the projector is refreshed: ``keep`` carries them into
#: the new subspace unchanged (the reference behaviour; DCT frequencies keep theirs), ``reset`` zeroes
#: them, ``rotate`` expresses them in the new basis (``projection.rotate_moments_``).
MOMENT_POLICIES: tuple[str, ...] = ("keep", "reset", "rotate")

#: What a step does with a parameter whose gradient holds a NaN/Inf: ``skip`` leaves the parameter and
#: its state as they were (decided on the device, no host sync), ``propagate`` applies the update as
#: ``torch.optim.AdamW`` would (NaN reaches the weights and the moments).
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "propagate")

#: Options given as counts and as real numbers. numpy scalars and 0-dim tensors of them are accepted and
#: stored as Python numbers (so that param groups and state dicts hold plain values).
_INTEGER_OPTIONS = ("rank", "update_proj_gap")
_REAL_OPTIONS = ("scale", "alpha", "gamma")

#: Keys other code puts into param groups and reads itself, accepted as they are: torch's named parameters
#: and learning-rate schedulers (``OneCycleLR``, ``CyclicLR``, ``swa_utils.SWALR``), DeepSpeed's MoE groups
#: (``name``, ``moe``) and timm's layer decay (``lr_scale``). Keys of your own: start them with ``_``.
FOREIGN_GROUP_KEYS: tuple[str, ...] = (
    "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr",
    "name", "moe", "lr_scale",
)
#: The option values of torch's Adam family that are the only behaviour these optimizers have.
_TORCH_FIXED_OPTIONS = {"maximize": False, "amsgrad": False, "capturable": False, "differentiable": False,
                        "decoupled_weight_decay": True}


def check_adam_hyperparameters(
    *, lr: float | Tensor, betas: tuple[float, float], eps: float, weight_decay: float, where: str = ""
) -> None:
    """Validate the Adam hyperparameters of the defaults or of one param group."""
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate{where}: {lr}. Must be >= 0.0.")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value{where}: {eps}. Must be >= 0.0.")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas{where}: {betas}. Must be a pair (beta1, beta2).")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}{where}: {beta}. Must be in [0, 1).")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value{where}: {weight_decay}. Must be >= 0.0.")


def check_moment_options(*, moment_dtype: torch.dtype | None, moment_policy: str, where: str = "") -> None:
    """Validate the options the reference lacks (moment storage dtype, policy at a refresh)."""
    if moment_dtype is not None and not (isinstance(moment_dtype, torch.dtype) and moment_dtype.is_floating_point):
        raise ValueError(f"Invalid moment_dtype{where}: {moment_dtype!r}. Must be None or a floating torch.dtype.")
    if moment_policy not in MOMENT_POLICIES:
        raise ValueError(
            f"Invalid moment_policy{where}: {moment_policy!r}. Must be one of {', '.join(MOMENT_POLICIES)}."
        )


def check_projection_group(group: dict[str, Any], index: int) -> None:
    """Validate a param group that carries ``rank`` (the reference's marker for projected params)."""
    where = f" in param group {index}"
    rank = group["rank"]
    if rank == "auto":
        budget = group.get("state_budget")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ValueError(
                f"Invalid state_budget{where}: {budget!r}. rank='auto' needs state_budget, a positive integer: the "
                "bytes of rank-dependent state (moments and projector tensors) the group's matrices may hold together."
            )
    elif isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(
            f"Invalid rank{where}: {rank!r}. Must be a positive integer. Also allowed: 'auto' with a state_budget "
            "(each matrix's rank chosen from its gradient under that many bytes of state)."
        )
    elif "state_budget" in group:
        raise ValueError(
            f"Invalid state_budget{where}: {group['state_budget']!r}. It is read only with rank='auto' (this group "
            f"has rank {rank}): remove it or set rank='auto'."
        )
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
        raise ValueError(f"Invalid update_proj_gap{where}: {gap!r}. Must be a positive integer.")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"Invalid proj_type{where}: {group['proj_type']!r}. Must be one of {', '.join(PROJ_TYPES)}.")
    for position, param in enumerate(group["params"]):
        if len(matrix_shape(param)) != 2:
            raise ValueError(
                f"Param {position} of param group {index} has shape {matrix_shape(param)}: only 2-D tensors can "
                "be projected. Put it in a group without 'rank' (lowrank_optim.param_groups does this). If it is "
                "a flattened parameter (FSDP1 without use_orig_params=True, or another engine's flat buffer), "
                "projecting it is impossible: wrap the model with FSDP2's fully_shard (or FSDP1 with "
                "use_orig_params=True), or bind to DeepSpeed ZeRO with lowrank_optim.deepspeed."
            )


def matrix_shape(param: Tensor) -> tuple[int, ...]:
    """A parameter's real shape: DeepSpeed ZeRO-3 (``zero.Init``) keeps it in ``ds_shape``, the tensor is empty."""
    return tuple(getattr(param, "ds_shape", param.shape))


def check_no_deprecation_warning(value: Any) -> None:
    """galore-torch's, Fira's and apollo-torch's ``no_deprecation_warning`` (they inherit it from
    transformers' AdamW): accepted so their call sites run unchanged; there is no warning to silence."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid no_deprecation_warning: {value!r}. Must be True or False.")


def check_finite_number(name: str, value: Any, where: str = "") -> None:
    """A plain finite real number (``scale``, ``alpha``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}{where}: {value!r}. Must be a finite number.")


def check_implementation_options(
    *, fused: Any, foreach: Any, devices: Iterable[torch.device] = (), where: str = ""
) -> None:
    """Validate ``fused``/``foreach`` (each ``None`` or a bool, not both ``True``); ``fused=True`` also needs
    the compiled kernels of every device in ``devices``, and the error carries why they did not load."""
    for name, value in (("fused", fused), ("foreach", foreach)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"Invalid {name}{where}: {value!r}. Must be None, True or False.")
    if fused and foreach:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    if not fused:
        return
    for device in dict.fromkeys(devices):  # each device type once, in order
        if not kernels_available(device):
            raise RuntimeError(
                f"Invalid fused{where}: True. The compiled lowrank_optim kernels for {device.type} did not load: "
                f"{kernel_load_error(device)}. Use fused=None (kernels where they loaded) or fused=False."
            )


def check_fira_options(*, alpha: Any, residual: str, gamma: Any, fold_residual: Any = True, where: str = "") -> None:
    """Validate Fira's scale ``alpha``, residual form, limiter bound ``gamma`` and ``fold_residual``."""
    check_finite_number("alpha", alpha, where)
    if residual not in FIRA_RESIDUALS:
        raise ValueError(f"Invalid residual{where}: {residual!r}. Must be one of {', '.join(FIRA_RESIDUALS)}.")
    check_limiter_gamma(gamma, where)
    if not isinstance(fold_residual, bool):
        raise ValueError(f"Invalid fold_residual{where}: {fold_residual!r}. Must be True or False.")


def check_limiter_gamma(gamma: Any, where: str = "") -> None:
    """The norm-growth limiter's bound per step (Fira, APOLLO): a finite number >= 1."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 1.0 <= gamma < math.inf:
        raise ValueError(f"Invalid gamma{where}: {gamma!r}. Must be a finite number >= 1.0.")


def resolve_alpha_alias(group: dict[str, Any], index: int) -> None:
    """Fira calls GaLore's ``scale`` ``alpha``: accept ``scale`` as an alias (groups built for GaLore keep
    working), rename it in place, and refuse a group that sets both to different values."""
    if "scale" not in group:
        return
    scale = group.pop("scale")
    if "alpha" in group and group["alpha"] != scale:
        raise ValueError(
            f"Param group {index} sets alpha={group['alpha']!r} and scale={scale!r}: for Fira they are the same "
            "setting (scale is an alias of alpha). Set only one."
        )
    group["alpha"] = scale


def group_tensors(param_group: dict[str, Any]) -> list[Tensor]:
    """Normalize a user's ``param_group["params"]`` in place to a list (one tensor is wrapped; a set is left
    for torch to refuse with its own error) and return its tensors (named parameters are ``(name, tensor)``)."""
    params = param_group["params"]
    if isinstance(params, Tensor):
        params = [params]
    elif not isinstance(params, set):
        params = list(params)
    param_group["params"] = params
    return [p[1] if isinstance(p, tuple) else p for p in params]


def add_checked_group(optimizer: torch.optim.Optimizer, param_group: dict[str, Any], check: Any) -> None:
    """``Optimizer.add_param_group``, then ``check(group)`` on the group as torch completed it (defaults
    filled in); a group the check refuses is taken out again, so a refused group leaves no trace."""
    torch.optim.Optimizer.add_param_group(optimizer, param_group)
    try:
        check(optimizer.param_groups[-1])
    except (ValueError, RuntimeError):
        optimizer.param_groups.pop()
        raise


def check_no_duplicates(params: list[Tensor], existing: list[dict[str, Any]]) -> None:
    """Refuse a parameter listed twice, within the new group or across groups, before torch warns."""
    seen = {id(p) for group in existing for p in group["params"]}
    for position, param in enumerate(params):
        if id(param) in seen:
            raise ValueError(
                f"Param {position} of param group {len(existing)} (shape {tuple(param.shape)}) appears more than "
                "once in the optimizer. Each parameter must be in exactly one group, once."
            )
        seen.add(id(param))


def normalize_scalars(options: dict[str, Any]) -> None:
    """Turn numpy scalars and 0-dim tensors given for count or real options into Python numbers, in place.

    Anything else is left for the option's own check to refuse (with its value in the message); a real
    value given for a count (``rank=2.0``) stays as it is and is refused there.
    """
    for key in _INTEGER_OPTIONS + _REAL_OPTIONS:
        if key not in options:
            continue
        value = options[key]
        if isinstance(value, Tensor):
            if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
                continue
            value = value.item()
        elif isinstance(value, np.generic) and not isinstance(value, np.bool_):
            value = value.item()
        else:
            continue
        if key in _INTEGER_OPTIONS and isinstance(value, float):
            continue
        options[key] = float(value) if key in _REAL_OPTIONS else value


def check_group_keys(group: dict[str, Any], allowed: Iterable[str], index: int) -> None:
    """Refuse a key the optimizer would silently ignore (a typo such as ``rnak``), with a suggestion.

    ``allowed`` are the optimizer's own options. :data:`FOREIGN_GROUP_KEYS` (keys that schedulers and
    libraries write and read themselves) and keys starting with ``_`` (a user's own) pass; the options of
    torch's Adam family (``amsgrad``, ``maximize``, ...) pass only at the value these optimizers implement.
    """
    known = set(allowed) | {"params"} | set(FOREIGN_GROUP_KEYS)
    for key, value in group.items():
        if key in known or (isinstance(key, str) and key.startswith("_")):
            continue
        if key in _TORCH_FIXED_OPTIONS:
            if value == _TORCH_FIXED_OPTIONS[key]:
                continue
            raise ValueError(
                f"Invalid {key} in param group {index}: {value!r}. This optimizer only implements "
                f"{key}={_TORCH_FIXED_OPTIONS[key]!r}."
            )
        own = sorted(set(allowed) - {"params"})
        close = difflib.get_close_matches(str(key), own, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown key {key!r} in param group {index}.{hint} This optimizer reads: {', '.join(own)}; it also "
            f"accepts {', '.join(FOREIGN_GROUP_KEYS)} (written and read by schedulers and libraries) and any key "
            "starting with '_' (your own metadata). Other keys are refused so that a typo is not silently ignored."
        )


def check_nonfinite_policy(nonfinite: Any, where: str = "") -> None:
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite{where}: {nonfinite!r}. Must be one of {', '.join(NONFINITE_POLICIES)}.")


def check_param_tensors(params: Iterable[Tensor], index: int) -> None:
    """Refuse parameters no optimizer here can update: complex ones (Adam's second moment and the
    projections are defined for real matrices only)."""
    for position, param in enumerate(params):
        if param.is_complex():
            raise ValueError(
                f"Param {position} of param group {index} is complex ({param.dtype}, shape {tuple(param.shape)}): "
                "these optimizers update real floating-point parameters only. Optimize its real and imaginary "
                "parts as separate real parameters (torch.view_as_real)."
            )
