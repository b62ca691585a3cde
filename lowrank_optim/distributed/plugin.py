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
from typing import Any, Callable, Mapping

from torch import nn

from ..optim import DCTAdamW, FiraAdamW, GaLoreAdamW
from ..optim._validation import matrix_shape
from .zero import bind

__all__ = ["SECTION", "LowRankSection", "initialize", "optimizer_factory", "param_groups_for", "read_config"]

#: The plugin's top-level key in a DeepSpeed config.
SECTION = "lowrank_optim"

OPTIMIZERS: dict[str, type[GaLoreAdamW]] = {
    "galore_adamw": GaLoreAdamW,
    "fira_adamw": FiraAdamW,
    "dct_adamw": DCTAdamW,
}
ZERO3_MOMENTS: tuple[str, ...] = ("sharded", "replicated")


@dataclass(frozen=True, kw_only=True)
class LowRankSection:
    """The plugin section. ``scale`` (GaLore, DCT) and ``alpha`` (Fira) are the same setting.

    ``target_modules``: a module whose qualified name contains one of these strings has its direct
    ``weight`` projected (it must be 2-D); all other trainable parameters get full-rank Adam.
    ``zero3_moments``: at ZeRO-3, ``sharded`` splits each one-sided matrix's low-rank moments and SVD
    basis among the ranks holding it, ``replicated`` keeps a full copy on each.
    """

    optimizer: str = "galore_adamw"
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    projector: str | None = None
    target_modules: tuple[str, ...] = ("attn", "mlp")
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    correct_bias: bool = True
    moment_policy: str = "keep"
    residual: str = "code"
    gamma: float = 1.01
    zero3_moments: str = "sharded"

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> LowRankSection:
        """Validate the keys and the choices; numbers are validated by the optimizer itself."""
        values = dict(section)
        if "alpha" in values:
            alpha = values.pop("alpha")
            if "scale" in values and values["scale"] != alpha:
                raise ValueError(
                    f"The '{SECTION}' section sets scale={values['scale']!r} and alpha={alpha!r}: they are the same "
                    "setting (Fira calls it alpha). Set only one."
                )
            values["scale"] = alpha
        allowed = [field.name for field in dataclasses.fields(cls)] + ["alpha"]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in the '{SECTION}' section. Allowed keys: {', '.join(allowed)}.")
        if values.get("optimizer", cls.optimizer) not in OPTIMIZERS:
            raise ValueError(
                f"Invalid '{SECTION}.optimizer': {values['optimizer']!r}. Must be one of {', '.join(OPTIMIZERS)}."
            )
        if values.get("zero3_moments", cls.zero3_moments) not in ZERO3_MOMENTS:
            raise ValueError(
                f"Invalid '{SECTION}.zero3_moments': {values['zero3_moments']!r}. Must be one of "
                f"{', '.join(ZERO3_MOMENTS)}."
            )
        if isinstance(values.get("target_modules"), str):
            raise ValueError(f"'{SECTION}.target_modules' must be a list of strings, not {values['target_modules']!r}.")
        for key in ("target_modules", "betas"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def read_config(config: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], LowRankSection]:
    """``(DeepSpeed config without the plugin section, the section)`` from a JSON path or a dict; refuses
    what the low-rank optimizers cannot run under, saying what to do instead."""
    if isinstance(config, Mapping):
        config = copy.deepcopy(dict(config))
    else:
        with open(config) as file:
            config = json.load(file)
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
    misplaced += sorted(key for key in zero if key.startswith(("galore", "lowrank", "fira", "dct")))
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
    projected: list[nn.Parameter] = []
    ids: set[int] = set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or not weight.requires_grad or not any(t in name for t in section.target_modules):
            continue
        if len(matrix_shape(weight)) != 2:
            raise ValueError(
                f"Parameter '{name}.weight' (shape {matrix_shape(weight)}) matches target_modules "
                f"{list(section.target_modules)} but only 2-D weights can be projected. Narrow target_modules so "
                "that it matches only linear layers."
            )
        if id(weight) not in ids:
            ids.add(id(weight))
            projected.append(weight)
    if not projected:
        raise ValueError(f"target_modules {list(section.target_modules)} match no module with a 2-D weight in the model.")
    full_rank = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    scale_key = "alpha" if section.optimizer == "fira_adamw" else "scale"
    group = {
        "params": projected,
        "rank": section.rank,
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
    )
    if section.projector is not None:
        options["projector"] = section.projector
    if cls is FiraAdamW:
        options.update(alpha=section.scale, residual=section.residual, gamma=section.gamma)
    else:
        options["scale"] = section.scale

    def build(params: Any) -> GaLoreAdamW:
        return cls(params, **options)

    return build


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
    config, section = read_config(config)
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
