"""The DeepSpeed config plugin: a top-level ``"lowrank_optim"`` section in an ordinary DeepSpeed config.

DeepSpeed's JSON cannot name a third-party optimizer (``optimizer.type`` must be a DeepSpeed or
``torch.optim`` name) but accepts unknown *top-level* sections silently. So the plugin reads its own
section, builds the param groups, passes an optimizer factory to ``deepspeed.initialize`` and binds the
optimizer to the engine afterwards (:func:`lowrank_optim.distributed.zero.bind`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, cast

import torch.distributed as dist
from torch import nn

from ..optim import APOLLOAdamW, FiraAdamW, GaLoreAdamW
from ..optim._validation import MOMENT_POLICIES, NONFINITE_POLICIES, check_finite_number
from ..optim.apollo import APOLLO_SCALE_TYPES
from ..optim.moments import resolve_moment_format
from ..optim.ranks import AUTO
from ..projection import FIRA_RESIDUALS, PROJ_TYPES, projector_names
from ..targets import DEFAULT_TARGET_MODULES, find_targets
from ..train.methods import METHODS
from .zero import bind

__all__ = ["SECTION", "LowRankSection", "initialize", "optimizer_factory", "param_groups_for", "read_config"]

#: The plugin's top-level key in a DeepSpeed config.
SECTION = "lowrank_optim"

#: The optimizers the plugin builds: the registered methods that name one (``Method.deepspeed_optimizer``).
OPTIMIZERS: dict[str, type[GaLoreAdamW]] = {
    method.deepspeed_optimizer: cast(type[GaLoreAdamW], method.optimizer)
    for method in METHODS.values()
    if method.deepspeed_optimizer is not None
}
ZERO3_MOMENTS: tuple[str, ...] = ("sharded", "replicated")
#: Settings that only some optimizers read, and which: refused for the others rather than silently dropped.
READ_BY: dict[str, tuple[str, ...]] = {
    "residual": ("fira_adamw",),
    "fold_residual": ("fira_adamw",),
    "gamma": ("fira_adamw", "apollo_adamw"),
    "scale_type": ("apollo_adamw",),
    "scale_front": ("apollo_adamw",),
    "disable_nl": ("apollo_adamw",),
}
#: How a value that is not a JSON object is called in the error (the section is written in JSON).
_JSON_TYPES: dict[type, str] = {
    list: "an array",
    tuple: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def _invalid(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"Invalid '{SECTION}.{key}': {value!r}. Must be {allowed}.")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise _invalid(key, value, f"one of {', '.join(choices)}")


def _refuse_unread(optimizer: str, given: list[str]) -> None:
    """Refuse settings (``given``) that ``optimizer`` does not read, naming the optimizers that do."""
    if given:
        readers = [name for name in OPTIMIZERS if all(name in READ_BY[key] for key in given)]
        who = "; ".join(f"{key} is read by {' and '.join(READ_BY[key])}" for key in given)
        choose = f" or choose {' or '.join(readers)}" if readers else ""
        raise ValueError(
            f"The '{SECTION}' section sets {given} for optimizer {optimizer!r}, which does not read "
            f"{'it' if len(given) == 1 else 'them'}: {who}. Remove {'it' if len(given) == 1 else 'them'}{choose}."
        )


def _allowed_keys() -> list[str]:
    return [field.name for field in dataclasses.fields(LowRankSection)] + ["alpha"]


@dataclass(frozen=True, kw_only=True)
class LowRankSection:
    """The plugin section. ``optimizer``: one of :data:`OPTIMIZERS` (the registered methods that name a
    DeepSpeed optimizer: ``galore_adamw``, ``fira_adamw``, ``dct_adamw``, ``apollo_adamw``). ``scale``
    (GaLore, DCT, APOLLO) and ``alpha`` (Fira) are the same setting. ``residual``, ``fold_residual``
    (Fira), ``scale_type``, ``scale_front``, ``disable_nl`` (APOLLO) and ``gamma`` (both) are read only
    by the optimizers :data:`READ_BY` names, and refused for the others.

    ``target_modules``: the linear layers whose qualified names contain one of these strings have their
    weight projected (:func:`lowrank_optim.targets.find_targets`, the rule of ``param_groups``); all other
    trainable parameters get full-rank Adam.
    ``zero3_moments``: at ZeRO-3, ``sharded`` splits each one-sided matrix's low-rank moments and SVD
    basis among the ranks holding it, ``replicated`` keeps a full copy on each.
    ``moment_format``: how every group's Adam moments are stored (:mod:`lowrank_optim.optim.moments`):
    ``"full"``, ``"8bit"``, or an object with the format's options, e.g. ``{"name": "8bit", "block_size":
    128}``; 8-bit moments work at every ZeRO stage (:mod:`lowrank_optim.distributed.fragment`).
    ``rank``: a positive integer, or ``"auto"`` with ``state_budget`` (bytes of rank-dependent state for the
    projected group, counted as one process holds it): each matrix's rank is chosen from its gradient at
    every refresh (:mod:`lowrank_optim.optim.ranks`), at ZeRO-3 also over a group cut into sub-groups.
    """

    optimizer: str = "galore_adamw"
    rank: int | str = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    projector: str | None = None
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    correct_bias: bool = True
    moment_policy: str = "keep"
    nonfinite: str = "skip"
    residual: str = "code"
    gamma: float = 1.01
    fold_residual: bool = True
    scale_type: str = "channel"
    scale_front: bool = False
    disable_nl: bool = False
    zero3_moments: str = "sharded"
    moment_format: Any = "full"
    state_budget: int | None = None

    def __post_init__(self) -> None:
        """Check the type of every field, naming the key: the section comes from JSON, where any key can
        hold anything. The ranges (``lr >= 0``, ``betas`` in ``[0, 1)``, Fira's ``gamma >= 1``) are the
        optimizers' own checks, run when ``deepspeed.initialize`` builds the optimizer."""
        _check_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        for key in ("rank", "update_proj_gap"):
            value = getattr(self, key)
            if key == "rank" and value == AUTO:
                continue  # checked with state_budget below
            # JSON has one integer type; a bool is an int to Python but never meant as a rank.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                error = _invalid(key, value, "a positive integer")
                if key == "rank":
                    error = ValueError(
                        f"{error} Also allowed: \"auto\" with '{SECTION}.state_budget' (bytes; each matrix's rank "
                        "chosen from its gradient at every refresh, lowrank_optim.optim.ranks)."
                    )
                raise error
        budget = self.state_budget
        if self.rank == AUTO:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
                raise _invalid("state_budget", budget, "a positive integer (bytes) when 'rank' is \"auto\"")
        elif budget is not None:
            raise _invalid("state_budget", budget, f"null unless 'rank' is \"auto\" (it is {self.rank!r})")
        for key in ("scale", "lr", "eps", "weight_decay", "gamma"):
            check_finite_number(f"'{SECTION}.{key}'", getattr(self, key))
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise _invalid("betas", betas, "a list of two numbers [beta1, beta2]")
        for index, beta in enumerate(betas):
            check_finite_number(f"'{SECTION}.betas' at index {index}", beta)
        modules = self.target_modules
        if (
            not isinstance(modules, (list, tuple))
            or not modules
            or not all(isinstance(name, str) and name for name in modules)
        ):
            raise _invalid(
                "target_modules",
                modules,
                "a non-empty list of non-empty strings (substrings of module names; '' would match every module)",
            )
        for key in ("correct_bias", "fold_residual", "scale_front", "disable_nl"):
            if not isinstance(getattr(self, key), bool):
                raise _invalid(key, getattr(self, key), "true or false")
        _check_choice("proj_type", self.proj_type, PROJ_TYPES)
        names = projector_names()
        if self.projector is not None and self.projector not in names:
            raise _invalid("projector", self.projector, f"null (the optimizer's default) or one of {', '.join(names)}")
        _check_choice("moment_policy", self.moment_policy, MOMENT_POLICIES)
        _check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _check_choice("residual", self.residual, FIRA_RESIDUALS)
        _check_choice("scale_type", self.scale_type, APOLLO_SCALE_TYPES)
        _check_choice("zero3_moments", self.zero3_moments, ZERO3_MOMENTS)
        resolve_moment_format(self.moment_format, f" in '{SECTION}.moment_format'")
        defaults = {field.name: field.default for field in dataclasses.fields(LowRankSection)}
        _refuse_unread(
            self.optimizer,
            [key for key, readers in READ_BY.items() if self.optimizer not in readers and getattr(self, key) != defaults[key]],
        )
        # JSON arrays arrive as lists; the frozen section keeps tuples (hashable, not shared with the caller).
        object.__setattr__(self, "betas", tuple(betas))
        object.__setattr__(self, "target_modules", tuple(modules))

    @classmethod
    def from_dict(cls, section: Any) -> LowRankSection:
        """The section from its JSON object: refuses anything but an object, unknown keys and a ``scale``
        that contradicts its alias ``alpha``; the values are checked by :meth:`__post_init__`."""
        if not isinstance(section, Mapping):
            kind = _JSON_TYPES.get(type(section), type(section).__name__)
            raise ValueError(
                f"The '{SECTION}' section must be a JSON object of settings (for example {{\"rank\": 128}}), not "
                f"{kind}: {section!r}. Allowed keys: {', '.join(_allowed_keys())}."
            )
        values = dict(section)
        if "alpha" in values:
            alpha = values.pop("alpha")
            check_finite_number(f"'{SECTION}.alpha'", alpha)  # named as written, before it becomes scale
            if "scale" in values and values["scale"] != alpha:
                raise ValueError(
                    f"The '{SECTION}' section sets scale={values['scale']!r} and alpha={alpha!r}: they are the same "
                    "setting (Fira calls it alpha). Set only one."
                )
            values["scale"] = alpha
        allowed = _allowed_keys()
        unknown = sorted(set(values) - set(allowed), key=str)
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in the '{SECTION}' section. Allowed keys: {', '.join(allowed)}.")
        section = cls(**values)  # the values' own checks first
        # Even at their defaults: a key written for another optimizer says the config means something else.
        unread = [key for key, readers in READ_BY.items() if key in values and section.optimizer not in readers]
        _refuse_unread(section.optimizer, unread)
        return section


def read_config(config: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], LowRankSection]:
    """``(DeepSpeed config without the plugin section, the section)`` from a JSON path or a dict; refuses
    what the low-rank optimizers cannot run under, saying what to do instead."""
    if isinstance(config, Mapping):
        config = copy.deepcopy(dict(config))
    else:
        with open(config) as file:
            config = json.load(file)
        if not isinstance(config, dict):
            kind = _JSON_TYPES.get(type(config), type(config).__name__)
            raise ValueError(f"The DeepSpeed config must be a JSON object, not {kind}: {config!r}.")
    if SECTION not in config:
        raise ValueError(f"The DeepSpeed config has no top-level '{SECTION}' section; add one (see configs/deepspeed/).")
    section = LowRankSection.from_dict(config.pop(SECTION))
    if "optimizer" in config:
        raise ValueError(
            f"The DeepSpeed config has an 'optimizer' section ({config['optimizer'].get('type')!r}) next to the "
            f"'{SECTION}' section. DeepSpeed would silently ignore it; remove it and set lr, betas, eps and "
            f"weight_decay in '{SECTION}'."
        )
    zero = config.get("zero_optimization", {})
    misplaced = sorted(set(zero) & ({field.name for field in dataclasses.fields(LowRankSection)} | {"alpha"}))
    misplaced += sorted(key for key in zero if key.startswith(("lowrank", *METHODS)))  # e.g. "galore_rank"
    if misplaced:
        raise ValueError(
            f"Key(s) {misplaced} are inside 'zero_optimization'; the low-rank settings belong in the top-level "
            f"'{SECTION}' section (DeepSpeed rejects unknown keys inside 'zero_optimization')."
        )
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "'zero_optimization.elastic_checkpoint' is true: elastic checkpoints assume flat Adam state and break "
            "the low-rank state. Set it to false (rigid per-rank checkpoints, "
            "which save_checkpoint/load_checkpoint round-trip exactly)."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device")
        if device == "nvme":
            raise ValueError(
                f"'zero_optimization.{key}.device' is 'nvme', which the low-rank optimizers do not support. Use "
                "'cpu' (optimizer offload at stages 1 and 2) or no offload."
            )
    if zero.get("stage", 0) == 3 and (zero.get("offload_optimizer") or {}).get("device") not in (None, "none"):
        raise ValueError(
            "'zero_optimization.offload_optimizer' at stage 3 is not supported by the low-rank optimizers yet. "
            "Use stage 1 or 2 with optimizer offload, or stage 3 without it."
        )
    if config.get("pipeline") or (config.get("tensor_parallel") or {}).get("autotp_size", 1) > 1:
        raise ValueError(
            "Pipeline and tensor parallelism ('pipeline' / 'tensor_parallel.autotp_size' > 1) are not supported "
            "with the low-rank optimizers yet: remove them (pure data parallelism with ZeRO stages 0-3 is supported)."
        )
    if config.get("sequence_parallel_size", 1) > 1:
        raise ValueError(
            f"'sequence_parallel_size' is {config['sequence_parallel_size']}: sequence parallelism is not supported "
            "with the low-rank optimizers yet. Remove it."
        )
    return config, section


def param_groups_for(model: nn.Module, section: LowRankSection | Mapping[str, Any]) -> list[dict[str, Any]]:
    """``[{"params": full_rank}, {"params": projected, "rank": ..., ...}]`` for ``model``.

    Shapes come from ``ds_shape`` when present (``deepspeed.zero.Init`` leaves the tensors empty).
    """
    if not isinstance(section, LowRankSection):
        section = LowRankSection.from_dict(section)
    # The rule shared with param_groups and convert_to_sltrain; shapes from ds_shape under zero.Init.
    projected = [target.weight for target in find_targets(model, section.target_modules).targets]
    ids = {id(p) for p in projected}
    full_rank = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    scale_key = "alpha" if section.optimizer == "fira_adamw" else "scale"
    group = {
        "params": projected,
        "rank": section.rank,
        **({"state_budget": section.state_budget} if section.rank == AUTO else {}),
        "update_proj_gap": section.update_proj_gap,
        scale_key: section.scale,
        "proj_type": section.proj_type,
    }
    return ([{"params": full_rank}] if full_rank else []) + [group]


def optimizer_factory(section: LowRankSection | Mapping[str, Any]) -> Callable[[Any], GaLoreAdamW]:
    """The callable ``deepspeed.initialize(optimizer=...)`` calls with the model parameters or groups."""
    if not isinstance(section, LowRankSection):
        section = LowRankSection.from_dict(section)
    cls = OPTIMIZERS[section.optimizer]
    options: dict[str, Any] = dict(
        lr=section.lr,
        betas=section.betas,
        eps=section.eps,
        weight_decay=section.weight_decay,
        correct_bias=section.correct_bias,
        update_proj_gap=section.update_proj_gap,
        proj_type=section.proj_type,
        moment_policy=section.moment_policy,
        nonfinite=section.nonfinite,
        moment_format=resolve_moment_format(section.moment_format),
    )
    if section.projector is not None:
        options["projector"] = section.projector
    if cls is FiraAdamW:
        options.update(
            alpha=section.scale, residual=section.residual, gamma=section.gamma, fold_residual=section.fold_residual
        )
    elif cls is APOLLOAdamW:
        options.update(
            scale=section.scale,
            scale_type=section.scale_type,
            scale_front=section.scale_front,
            disable_nl=section.disable_nl,
            gamma=section.gamma,
        )
    else:
        options["scale"] = section.scale

    def build(params: Any) -> GaLoreAdamW:
        return cls(params, **options)

    return build


def _agree_across_ranks(
    result: tuple[dict[str, Any], LowRankSection] | None, failure: Exception | None
) -> tuple[dict[str, Any], LowRankSection]:
    """This rank's :func:`read_config` outcome (``result`` or ``failure``), checked against every other rank's.

    A rank whose config failed to read, or sections that differ between ranks, raise on *every* rank of
    the default process group (after one ``all_gather_object``, no further collective): otherwise the other
    ranks would go on into ``deepspeed.initialize`` and hang, or abort at the first step, waiting for
    collectives of another shape. Without a process group of more than one rank: the outcome as it is.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if failure is not None:
            raise failure
        assert result is not None
        return result
    if failure is None:
        assert result is not None
        mine: dict[str, Any] = {"section": dataclasses.asdict(result[1])}
    else:
        mine = {"error": f"{type(failure).__name__}: {failure}"}
    everyone: list[Any] = [None] * dist.get_world_size()
    # Objects travel as CPU tensors: gloo always takes them, whatever the default backend and device.
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    try:
        dist.all_gather_object(everyone, json.dumps(mine, sort_keys=True), group=group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    outcomes = [json.loads(item) for item in everyone]
    failed = {rank: outcome["error"] for rank, outcome in enumerate(outcomes) if "error" in outcome}
    if failed:
        raise ValueError(
            f"The DeepSpeed config could not be read on rank(s) {sorted(failed)}, so no rank starts: "
            + "; ".join(f"rank {rank}: {error}" for rank, error in failed.items())
        )
    sections = [outcome["section"] for outcome in outcomes]
    differing = [key for key in sections[0] if any(section[key] != sections[0][key] for section in sections)]
    if differing:
        raise ValueError(
            f"The '{SECTION}' section differs between the ranks: "
            + "; ".join(f"'{SECTION}.{key}' is {_values_by_rank(sections, key)}" for key in differing)
            + ". Every rank must get the same section (the ranks hold pieces of one optimizer state): pass "
            "all ranks the same config."
        )
    assert result is not None
    return result


def _values_by_rank(sections: list[dict[str, Any]], key: str) -> str:
    """``4 on rank(s) [0, 2], 8 on rank(s) [1]``: each value once, however many ranks there are."""
    ranks: dict[str, list[int]] = {}
    for rank, section in enumerate(sections):
        ranks.setdefault(json.dumps(section[key]), []).append(rank)
    return ", ".join(f"{value} on rank(s) {holders}" for value, holders in ranks.items())


def initialize(
    model: nn.Module, config: str | os.PathLike | Mapping[str, Any], **deepspeed_kwargs: Any
) -> tuple[Any, ...]:
    """``deepspeed.initialize`` with the low-rank optimizer of ``config``'s ``"lowrank_optim"`` section,
    bound to the engine; returns what ``deepspeed.initialize`` returns."""
    import deepspeed  # only here: the package does not need DeepSpeed otherwise

    for key in ("optimizer", "model_parameters", "config", "config_params"):
        if key in deepspeed_kwargs:
            raise ValueError(
                f"initialize(..., {key}=...): the plugin builds the optimizer and its parameters from the "
                f"'{SECTION}' section of config; do not pass {key}."
            )
    if deepspeed_kwargs.get("mpu") is not None:
        raise ValueError("initialize(..., mpu=...): model parallelism is not supported with the low-rank optimizers yet.")
    result: tuple[dict[str, Any], LowRankSection] | None = None
    failure: Exception | None = None
    try:
        result = read_config(config)
    except Exception as error:  # noqa: BLE001 - reported to the other ranks first, then raised
        failure = error
    # The process group deepspeed.initialize would create, created first by the same call (which makes
    # DeepSpeed's own call a no-op), so that the ranks' outcomes can be compared before DeepSpeed starts.
    from deepspeed.accelerator import get_accelerator

    init_options = {key: deepspeed_kwargs[key] for key in ("distributed_port", "dist_init_required") if key in deepspeed_kwargs}
    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), **init_options)
    except Exception:
        if failure is not None:  # no process group to tell (a single process, no launcher): the config's error
            raise failure from None
        raise
    config, section = _agree_across_ranks(result, failure)
    config["zero_allow_untested_optimizer"] = True
    if ((config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "cpu":
        config["zero_force_ds_cpu_optimizer"] = False
    result = deepspeed.initialize(
        model=model,
        optimizer=optimizer_factory(section),
        model_parameters=param_groups_for(model, section),
        config=config,
        **deepspeed_kwargs,
    )
    bind(result[0], shard_moments=section.zero3_moments == "sharded")
    return result
