"""The compared methods: presets per model size, and building a model plus its optimizer for a method.

A method is an optimizer (``adamw``, ``galore``, ``fira``, ``dct``) or a parametrization trained with
AdamW (``sltrain``). Presets live in ``lowrank_optim/configs/presets/<size>.json``, one object per
method, so no method is tuned more than another: AdamW lr 1e-3; GaLore/Fira/DCT lr 1e-2 with scale
(Fira: alpha) 0.25; SLTrain lr 3e-3 with its rank/alpha/delta recipe.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..models import LlamaConfig, LlamaForCausalLM, RotaryEmbedding, available_configs
from ..nn import SLTrainLinear, derive_seed
from ..optim import DCTAdamW, FiraAdamW, GaLoreAdamW, param_groups
from ..projection import projector_names
from ..targets import find_targets

__all__ = [
    "METHODS",
    "PRESET_DIR",
    "TARGET_MODULES",
    "MethodPreset",
    "available_presets",
    "build_model",
    "build_optimizer",
    "cosine_with_warmup",
    "load_presets",
    "presets_for_config",
]

METHODS = ("adamw", "galore", "fira", "dct", "sltrain")
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
#: Module-name substrings of the linears that GaLore/Fira/DCT project and SLTrain replaces in our LLaMA (the
#: papers'; :data:`lowrank_optim.targets.DEFAULT_TARGET_MODULES` finds the same ones).
TARGET_MODULES = ("attn", "mlp")
WARMUP_FRACTION = 0.1
MIN_LR_RATIO = 0.1


@dataclass(frozen=True, kw_only=True)
class MethodPreset:
    """Hyperparameters of one method. ``scale`` is GaLore/DCT's scale or Fira's alpha; ``alpha`` and
    ``delta`` are SLTrain's (``W = alpha/rank · B A + S``, ``delta`` = density of ``S``). ``projector``
    (GaLore, Fira: a registered name such as ``"rsvd"``; ``None``: the optimizer's default) chooses the
    subspace."""

    method: str
    lr: float
    rank: int | None = None
    scale: float | None = None
    update_proj_gap: int | None = None
    alpha: float | None = None
    delta: float | None = None
    projector: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method ({self.method!r}) must be one of {list(METHODS)}")
        needed = {
            "adamw": (),
            "galore": ("rank", "scale", "update_proj_gap"),
            "fira": ("rank", "scale", "update_proj_gap"),
            "dct": ("rank", "scale", "update_proj_gap"),
            "sltrain": ("rank", "alpha", "delta"),
        }[self.method]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"preset of method {self.method!r} is missing {missing}")
        if self.projector is not None:
            if self.method not in ("galore", "fira"):
                raise ValueError(f"projector ({self.projector!r}) applies to methods galore and fira, not {self.method!r}")
            if self.projector not in projector_names():
                raise ValueError(f"projector ({self.projector!r}) must be one of {list(projector_names())}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr ({self.lr!r}) must be a finite number > 0")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


def available_presets() -> list[str]:
    """Names of the packaged preset files (model sizes), e.g. ``["130m", "1b", ..., "tiny"]``."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_presets(name_or_path: str | os.PathLike[str]) -> dict[str, MethodPreset]:
    """All method presets of a packaged size (``"60m"``, ``"tiny"``, ...) or of a JSON file path.

    Keys starting with ``_`` (e.g. ``"_source"``) are comments.
    """
    text = str(name_or_path)
    if text.endswith(".json") or os.path.sep in text:
        path = Path(name_or_path)
    else:
        name = text.lower().removeprefix("llama_")
        if name not in available_presets():
            raise ValueError(f"presets ({text!r}) is neither a JSON path nor a packaged preset; packaged: {available_presets()}")
        path = PRESET_DIR / f"{name}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"presets file {str(path)!r} must hold a JSON object with one object per method, not {raw!r}")
    entries = {key: value for key, value in raw.items() if not key.startswith("_")}
    strangers = [key for key, value in entries.items() if key not in METHODS or not isinstance(value, dict)]
    if strangers:
        hint = " (it looks like a model config: pass it as --config)" if "hidden_size" in entries else ""
        raise ValueError(
            f"presets file {str(path)!r}: {strangers} are not method presets{hint}; the file must map methods "
            f"({', '.join(METHODS)}) to objects of their settings, e.g. {{\"galore\": {{\"lr\": 0.01, \"rank\": 128, ...}}}}"
        )
    return {method: MethodPreset(method=method, **values) for method, values in entries.items()}


def presets_for_config(
    config_name: str, config: LlamaConfig, presets: str | None = None
) -> tuple[dict[str, MethodPreset], str, str]:
    """``(presets, their name or path, a line saying why)`` to train ``config`` with: ``presets`` if given,
    else the packaged presets of the packaged config ``config_name``, else (a user's JSON, or a packaged
    size without presets) those of the packaged size nearest in parameter count (log scale)."""
    if presets is not None:
        return load_presets(presets), str(presets), f"presets: {presets}"
    name = str(config_name).lower().removeprefix("llama_")
    if name in available_presets():
        return load_presets(name), name, f"presets: {name}"

    def distance(size: str) -> float:
        packaged = LlamaConfig.from_name_or_path(size).num_parameters()
        return abs(math.log(packaged / config.num_parameters()))

    nearest = min((size for size in available_presets() if size in available_configs()), key=distance)
    count = config.num_parameters()
    return load_presets(nearest), nearest, (
        f"presets: {nearest} (the packaged size nearest to {config_name}'s {count / 1e6:.1f}M parameters; "
        "--presets chooses others)"
    )


def cosine_with_warmup(optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """Linear warmup over the first 10% of updates, then cosine decay to 10% of the peak lr (the papers')."""
    warmup_steps = max(1, round(WARMUP_FRACTION * total_steps))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, lr_factor)


def build_model(
    config: LlamaConfig,
    *,
    preset: MethodPreset | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    gradient_checkpointing: bool = False,
) -> LlamaForCausalLM:
    """A LLaMA for ``preset``'s method, built on the meta device and materialized on ``device`` in ``dtype``.

    No full-size tensor is allocated anywhere but in its final place: the dense model is created on
    ``meta``; for SLTrain the target linears are replaced by :class:`SLTrainLinear` layers built directly on
    ``device`` (seeded ``derive_seed(seed, name)``, i.e. exactly what ``convert_to_sltrain(model, seed=seed)``
    would produce); then the remaining parameters are allocated on ``device`` and initialised (normal
    with ``init_std`` from ``torch.manual_seed(seed)``, norm gains 1, rotary tables recomputed).
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config, gradient_checkpointing=gradient_checkpointing)
    if preset is not None and preset.method == "sltrain":
        assert preset.rank is not None and preset.delta is not None  # MethodPreset requires them of sltrain
        for target in find_targets(model, TARGET_MODULES).targets:
            parent, _, child = target.name.rpartition(".")
            linear = cast(nn.Linear, target.module)  # the targets of our LLaMA are nn.Linear layers
            layer = SLTrainLinear(
                linear.in_features,
                linear.out_features,
                rank=preset.rank,
                delta=preset.delta,
                alpha=preset.alpha,
                seed=derive_seed(seed, target.name),
                device=device,
                dtype=dtype,
            )
            setattr(model.get_submodule(parent), child, layer)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module.register_parameter(name, nn.Parameter(torch.empty(param.shape, device=device, dtype=dtype)))
    model.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    model.reset_parameters()
    return model


def build_optimizer(model: nn.Module, preset: MethodPreset) -> Optimizer:
    """The optimizer of ``preset.method`` over ``model`` (built by :func:`build_model` for the same preset).

    Weight decay 0 for every method (the papers' pretraining runs).
    """
    if preset.method in ("adamw", "sltrain"):
        return torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.0)
    # MethodPreset requires these of galore, fira and dct.
    assert preset.rank is not None and preset.update_proj_gap is not None and preset.scale is not None
    groups = param_groups(
        model,
        rank=preset.rank,
        update_proj_gap=preset.update_proj_gap,
        scale=preset.scale,
        target_modules=TARGET_MODULES,
    )
    optimizer_class = {"galore": GaLoreAdamW, "fira": FiraAdamW, "dct": DCTAdamW}[preset.method]
    options = {} if preset.projector is None else {"projector": preset.projector}
    return optimizer_class(groups, lr=preset.lr, **options)
