"""The methods, written once: a registry (:data:`METHODS`) that the pretraining loop, the estimator, the
presets, the CLI and the DeepSpeed plugin iterate over; presets per model size; building a model plus its
optimizer for a method.

A method is an optimizer (``adamw``, ``galore``, ``fira``, ``dct``, ``apollo``) or a parametrization
trained with AdamW (``sltrain``). A :class:`Method` holds everything the package needs to know about it:
the preset fields it requires, its optimizer, whether it projects the target matrices (then the state of
each projected matrix follows from its projector, :meth:`Method.matrix_state_bytes`) or replaces the
target linears (:attr:`Method.layer`), and its name in the DeepSpeed plugin. A new method is one
:func:`register_method` call, plus a preset in the size files where it should run.

Presets live in ``lowrank_optim/configs/presets/<size>.json``, one object per method. A size file may
leave a method out: the method is then not available at that size, and the commands that default to
"every method" take the ones the file has, in registration order.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..models import LlamaConfig, LlamaForCausalLM, RotaryEmbedding, available_configs
from ..nn import SLTrainLinear, derive_seed
from ..optim import APOLLOAdamW, DCTAdamW, FiraAdamW, GaLoreAdamW, param_groups
from ..optim.galore import _moment_placement
from ..optim.moments import FullPrecision, MomentFormat, moment_format_names, moment_state_bytes, resolve_moment_format
from ..optim.ranks import AUTO
from ..projection import effective_rank, projector_names, resolve_projector, resolve_side
from ..targets import find_targets

__all__ = [
    "METHODS",
    "PRESET_DIR",
    "COMMON_FIELDS",
    "PRESET_FIELDS",
    "TARGET_MODULES",
    "Method",
    "MethodPreset",
    "available_presets",
    "build_model",
    "build_optimizer",
    "check_methods_available",
    "cosine_with_warmup",
    "load_presets",
    "presets_for_config",
    "register_method",
]

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
#: Module-name substrings of the linears that the projecting methods project and SLTrain replaces in our
#: LLaMA (the papers'; :data:`lowrank_optim.targets.DEFAULT_TARGET_MODULES` finds the same ones).
TARGET_MODULES = ("attn", "mlp")
WARMUP_FRACTION = 0.1
MIN_LR_RATIO = 0.1
#: The optional fields of a preset, beyond ``lr`` (see :class:`MethodPreset`).
PRESET_FIELDS: tuple[str, ...] = (
    "rank", "scale", "update_proj_gap", "alpha", "delta", "projector", "other_lr", "moment_format", "state_budget"
)
#: Fields any method's preset may set (the others only if the method lists them in ``fields``).
COMMON_FIELDS: tuple[str, ...] = ("projector", "other_lr", "moment_format")
#: What a projecting method's preset must give: the keys of its projected param group.
PROJECTED_FIELDS: tuple[str, ...] = ("rank", "scale", "update_proj_gap")
#: Fields a projecting method's preset may set, required by none: ``state_budget`` (with ``rank="auto"``).
OPTIONAL_PROJECTED_FIELDS: tuple[str, ...] = ("state_budget",)
#: Every optimizer here keeps its step count as a 0-dim fp32 tensor per parameter.
STEP_BYTES = 4
#: A layer replacing one target linear: ``(linear, preset, seed, device, dtype) -> module``.
LayerFactory = Callable[[nn.Linear, "MethodPreset", int, "torch.device | str", "torch.dtype | None"], nn.Module]


@dataclass(frozen=True, kw_only=True)
class Method:
    """One method, in one place (see the module docstring).

    Args:
        name: what presets, ``--methods`` and results call it (lower-case letters, digits, ``_``).
        summary: one line for listings (the CLI's help).
        fields: the preset fields it requires beyond ``lr``, drawn from :data:`PRESET_FIELDS` (not the
            :data:`COMMON_FIELDS`, which are optional for every method); a preset may set no others.
        optimizer: its optimizer class or factory, called as ``optimizer(params_or_groups, lr=...,
            weight_decay=0.0, **options)``.
        projects: the target matrices (:data:`TARGET_MODULES`) get a projected param group with the
            preset's ``rank``, ``scale`` and ``update_proj_gap``; every other parameter full-rank Adam.
        projector: for a projecting method, the registered projector its optimizer uses by default.
        projector_option: a preset may name another registered projector (``"projector": "rsvd"``).
        matrix_scalar_bytes: bytes of per-matrix scalar state beyond the step count and the projector's
            tensors (Fira's and APOLLO's fp32 norm of the previous update: 4).
        layer: replaces each target linear (SLTrain); the other parameters stay as they are.
        deepspeed_optimizer: its name in the DeepSpeed plugin's ``"optimizer"`` key (``None``: the plugin
            does not build it).
    """

    name: str
    summary: str
    fields: tuple[str, ...] = ()
    optimizer: Callable[..., Optimizer]
    projects: bool = False
    projector: str | None = None
    projector_option: bool = False
    matrix_scalar_bytes: int = 0
    layer: LayerFactory | None = None
    deepspeed_optimizer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(
                f"method name ({self.name!r}) must be lower-case letters, digits and '_', starting with a letter"
            )
        allowed = [field for field in PRESET_FIELDS if field not in COMMON_FIELDS + OPTIONAL_PROJECTED_FIELDS]
        unknown = [field for field in self.fields if field not in allowed]
        if unknown:
            raise ValueError(f"method {self.name!r}: fields {unknown} must be drawn from {allowed}")
        if self.matrix_scalar_bytes < 0:
            raise ValueError(f"method {self.name!r}: matrix_scalar_bytes ({self.matrix_scalar_bytes}) must be >= 0")
        if self.projects:
            missing = [field for field in PROJECTED_FIELDS if field not in self.fields]
            if missing:
                raise ValueError(f"method {self.name!r} projects, so its fields must include {missing}")
            if self.projector not in projector_names():
                raise ValueError(
                    f"method {self.name!r}: projector ({self.projector!r}) must be one of {list(projector_names())}"
                )
            if self.layer is not None:
                raise ValueError(f"method {self.name!r} cannot both project the target matrices and replace their layers")
        elif self.projector is not None or self.projector_option or self.matrix_scalar_bytes:
            raise ValueError(
                f"method {self.name!r} does not project: projector, projector_option and matrix_scalar_bytes do not apply"
            )

    def convert(
        self, model: nn.Module, preset: MethodPreset, *, seed: int, device: torch.device | str, dtype: torch.dtype | None
    ) -> None:
        """Replace the target linears of ``model`` by :attr:`layer`, in place (nothing without a layer).
        The layer of target ``name`` is seeded ``derive_seed(seed, name)``, so it is exactly what
        ``convert_to_sltrain(model, seed=seed)`` would build."""
        if self.layer is None:
            return
        for target in find_targets(model, TARGET_MODULES).targets:
            parent, _, child = target.name.rpartition(".")
            linear = cast(nn.Linear, target.module)  # the targets of our LLaMA are nn.Linear layers
            setattr(model.get_submodule(parent), child, self.layer(linear, preset, derive_seed(seed, target.name), device, dtype))

    def build_optimizer(
        self, model: nn.Module, preset: MethodPreset, *, moment_format: str | MomentFormat | None = None
    ) -> Optimizer:
        """Its optimizer over ``model`` (built for ``preset`` by :func:`build_model`); weight decay 0, as in
        the papers' pretraining runs. With ``preset.other_lr`` the parameters outside the target layers
        (embeddings, ``lm_head``, norms: what a projecting method trains with full-rank Adam) form a
        group of their own at that rate; without it, one group (exactly as before the field existed).

        ``moment_format`` (default: the preset's, else ``"full"``) stores every moment as
        :mod:`lowrank_optim.optim.moments` says. A method whose optimizer is ``torch.optim.AdamW`` (which
        has full-precision moments only) is then stepped by :class:`~lowrank_optim.GaLoreAdamW`'s full-rank
        groups instead: the same Adam with torch's ``eps`` (1e-8), added before the bias correction."""
        fmt = resolve_moment_format(moment_format if moment_format is not None else preset.moment_format or "full")
        optimizer = self.optimizer
        options: dict[str, Any] = {}
        if not isinstance(fmt, FullPrecision):
            options["moment_format"] = fmt
            if optimizer is torch.optim.AdamW:
                optimizer, options["eps"] = GaLoreAdamW, 1e-8
            elif not (isinstance(optimizer, type) and issubclass(optimizer, GaLoreAdamW)):
                raise ValueError(
                    f"moment_format {fmt.to_state()!r}: method {self.name!r} builds "
                    f"{getattr(optimizer, '__name__', repr(optimizer))}, which has no moment formats; allowed there: "
                    "moment_format='full'"
                )
        if not self.projects:
            if preset.other_lr is None:
                return optimizer(model.parameters(), lr=preset.lr, weight_decay=0.0, **options)
            targets = self._target_parameters(model)
            others = [p for p in model.parameters() if id(p) not in {id(t) for t in targets}]
            groups_: list[dict[str, Any]] = [{"params": targets}, {"params": others, "lr": preset.other_lr}]
            return optimizer(groups_, lr=preset.lr, weight_decay=0.0, **options)
        assert preset.rank is not None and preset.update_proj_gap is not None and preset.scale is not None
        budget: dict[str, Any] = {} if preset.state_budget is None else {"state_budget": preset.state_budget}
        groups = param_groups(
            model, rank=preset.rank, update_proj_gap=preset.update_proj_gap, scale=preset.scale,
            target_modules=TARGET_MODULES, **budget,
        )
        if preset.other_lr is not None:
            if "rank" in groups[0]:
                raise ValueError(f"method {self.name!r}: other_lr is set but every parameter of the model is projected")
            groups[0]["lr"] = preset.other_lr
        if preset.projector is not None:
            options["projector"] = preset.projector
        return optimizer(groups, lr=preset.lr, weight_decay=0.0, **options)

    def _target_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of the target layers: their weights as :func:`find_targets` finds them (what a
        projecting method projects), or, for a method with a :attr:`layer`, every parameter of the
        modules that replaced them (leaf modules whose name contains one of :data:`TARGET_MODULES`)."""
        if self.layer is None:
            return [target.weight for target in find_targets(model, TARGET_MODULES).targets]
        return [
            param
            for name, module in model.named_modules()
            if any(pattern in name for pattern in TARGET_MODULES) and not list(module.children())
            for param in module.parameters(recurse=False)
        ]

    def matrix_state_bytes(
        self,
        shape: tuple[int, int],
        preset: MethodPreset,
        *,
        weight_bytes: int,
        moment_dtype: torch.dtype,
        moment_format: str | MomentFormat = "full",
    ) -> tuple[int, int]:
        """``(states, projection)``: bytes of one projected ``m x n`` matrix's state. States: the two
        moments of its low-rank gradient (``r x n`` or ``m x r``, ``r = min(rank, m, n)``, on the side
        ``proj_type="std"`` projects) as ``moment_format`` stores them in ``moment_dtype``
        (:func:`~lowrank_optim.optim.moments.moment_state_bytes`, the optimizer's own rule: 8-bit codes
        plus fp32 block scales, or plain tensors), the step count and :attr:`matrix_scalar_bytes`.
        Projection: the tensors its projector keeps (:meth:`~lowrank_optim.Projector.tensors`: an SVD
        basis in the weights' dtype, DCT indices, a seed). A ``rank="auto"`` preset has no rank per matrix
        (refused: its group holds at most ``state_budget`` bytes of both, :func:`lowrank_optim.estimate.estimate_memory`)."""
        if not self.projects:
            raise ValueError(f"method {self.name!r} does not project matrices")
        assert preset.rank is not None  # required of every projecting method
        if preset.rank == AUTO:
            raise ValueError(
                f"matrix_state_bytes: preset of method {self.name!r} has rank='auto': its matrices' ranks are chosen "
                f"in training, under state_budget={preset.state_budget} bytes for all of them together"
            )
        projector = resolve_projector(preset.projector or self.projector)
        side = resolve_side("std", shape)
        rank = effective_rank(cast(int, preset.rank), shape)
        moment_shape, sharding = _moment_placement({"rank": preset.rank, "proj_type": "std"}, shape)
        moments = moment_state_bytes(resolve_moment_format(moment_format), moment_shape, moment_dtype, sharding)
        states = moments + STEP_BYTES + self.matrix_scalar_bytes
        projection = 0
        for spec in projector.tensors(shape, rank, side):
            size = weight_bytes if spec.dtype is None else torch.empty((), dtype=spec.dtype).element_size()
            projection += math.prod(spec.shape) * size
        return states, projection


_REGISTRY: dict[str, Method] = {}
#: The registered methods by name, in registration order (read-only: :func:`register_method` adds).
METHODS: Mapping[str, Method] = MappingProxyType(_REGISTRY)


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a taken name is refused); returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method expects a Method, got {type(method).__name__}")
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered; registered: {list(_REGISTRY)}")
    _REGISTRY[method.name] = method
    return method


def _sltrain_layer(
    linear: nn.Linear, preset: MethodPreset, seed: int, device: torch.device | str, dtype: torch.dtype | None
) -> nn.Module:
    assert preset.rank is not None and preset.delta is not None  # required of sltrain
    return SLTrainLinear(
        linear.in_features,
        linear.out_features,
        rank=cast(int, preset.rank),  # "auto" is refused for sltrain (MethodPreset)
        delta=preset.delta,
        alpha=preset.alpha,
        seed=seed,
        device=device,
        dtype=dtype,
    )


register_method(Method(name="adamw", summary="full-rank AdamW (torch.optim.AdamW), the baseline", optimizer=torch.optim.AdamW))
register_method(
    Method(
        name="galore",
        summary="GaLore: Adam on SVD-projected gradients (Zhao et al., 2024)",
        fields=PROJECTED_FIELDS,
        optimizer=GaLoreAdamW,
        projects=True,
        projector="svd",
        projector_option=True,
        deepspeed_optimizer="galore_adamw",
    )
)
register_method(
    Method(
        name="fira",
        summary="Fira: GaLore plus the scaled full-rank residual (Chen et al., 2024)",
        fields=PROJECTED_FIELDS,
        optimizer=FiraAdamW,
        projects=True,
        projector="svd",
        projector_option=True,
        matrix_scalar_bytes=4,
        deepspeed_optimizer="fira_adamw",
    )
)
register_method(
    Method(
        name="dct",
        summary="GaLore with the SVD-free DCT projection (Modoranu et al., 2025)",
        fields=PROJECTED_FIELDS,
        optimizer=DCTAdamW,
        projects=True,
        projector="dct",
        deepspeed_optimizer="dct_adamw",
    )
)
register_method(
    Method(
        name="sltrain",
        summary="SLTrain: sparse plus low-rank weights, trained with AdamW (Han et al., 2024)",
        fields=("rank", "alpha", "delta"),
        optimizer=torch.optim.AdamW,
        layer=_sltrain_layer,
    )
)
register_method(
    Method(
        name="apollo",
        summary="APOLLO: AdamW scaled per channel from a random projection (Zhu et al., 2024)",
        fields=PROJECTED_FIELDS,
        optimizer=APOLLOAdamW,
        projects=True,
        projector="random",
        projector_option=True,
        matrix_scalar_bytes=4,
        deepspeed_optimizer="apollo_adamw",
    )
)


@dataclass(frozen=True, kw_only=True)
class MethodPreset:
    """Hyperparameters of one method. ``scale`` is GaLore/DCT/APOLLO's scale or Fira's alpha; ``alpha``
    and ``delta`` are SLTrain's (``W = alpha/rank · B A + S``, ``delta`` = density of ``S``). ``projector``
    (methods with :attr:`Method.projector_option`: a registered name such as ``"rsvd"``; ``None``: the
    optimizer's default) chooses the subspace. ``other_lr`` (any method; ``None``: ``lr``): the peak lr
    of the parameters outside the target layers (embeddings, ``lm_head``, norms), which every method
    trains with full-rank Adam. ``moment_format`` (any method; ``None``: ``"full"``): a registered moment
    format name, e.g. ``"8bit"`` (:mod:`lowrank_optim.optim.moments`; :meth:`Method.build_optimizer`).
    ``rank`` of a projecting method may be ``"auto"`` with ``state_budget`` (bytes): each matrix's rank is
    chosen from its gradient at every refresh under that budget (:mod:`lowrank_optim.optim.ranks`).
    Which fields a method needs: its :attr:`Method.fields`."""

    method: str
    lr: float
    rank: int | str | None = None
    scale: float | None = None
    update_proj_gap: int | None = None
    alpha: float | None = None
    delta: float | None = None
    projector: str | None = None
    other_lr: float | None = None
    moment_format: str | None = None
    state_budget: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method ({self.method!r}) must be one of {list(METHODS)}")
        spec = METHODS[self.method]
        missing = [name for name in spec.fields if getattr(self, name) is None]
        if missing:
            raise ValueError(f"preset of method {self.method!r} is missing {missing}")
        unused = [
            name
            for name in PRESET_FIELDS
            if name not in COMMON_FIELDS + OPTIONAL_PROJECTED_FIELDS and name not in spec.fields
            and getattr(self, name) is not None
        ]
        if unused:
            raise ValueError(
                f"preset of method {self.method!r} sets {unused}, which it does not use; its fields: {list(spec.fields)}"
            )
        if self.projector is not None:
            if not spec.projector_option:
                takes = [name for name, method in METHODS.items() if method.projector_option]
                raise ValueError(f"projector ({self.projector!r}) applies to methods {', '.join(takes)}, not {self.method!r}")
            if self.projector not in projector_names():
                raise ValueError(f"projector ({self.projector!r}) must be one of {list(projector_names())}")
        if self.moment_format is not None and self.moment_format not in moment_format_names():
            raise ValueError(f"moment_format ({self.moment_format!r}) must be one of {list(moment_format_names())}")
        for name in ("lr", "other_lr"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (math.isfinite(value) and value > 0)):
                raise ValueError(f"{name} ({value!r}) must be a finite number > 0")
        takes = [name for name, method in METHODS.items() if method.projects]
        if self.rank == AUTO and not spec.projects:
            raise ValueError(
                f"rank ('auto') applies to the projecting methods ({', '.join(takes)}), not {self.method!r}, whose "
                "rank must be a positive integer"
            )
        if self.state_budget is not None and not spec.projects:
            raise ValueError(
                f"state_budget ({self.state_budget!r}) applies to the projecting methods ({', '.join(takes)}) with "
                f"rank 'auto', not {self.method!r}"
            )
        if self.rank == AUTO and self.state_budget is None:
            raise ValueError("rank ('auto') needs state_budget: the bytes of rank-dependent state its matrices may hold")
        if self.state_budget is not None:
            if self.rank != AUTO:
                raise ValueError(f"state_budget ({self.state_budget!r}) applies with rank 'auto' only, not rank {self.rank!r}")
            value = self.state_budget
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"state_budget ({value!r}) must be a positive integer (bytes)")
        for name in ("rank", "update_proj_gap"):
            value = getattr(self, name)
            if name == "rank" and value == AUTO:
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                hint = " or 'auto' (with state_budget)" if name == "rank" and spec.projects else ""
                raise ValueError(f"{name} ({value!r}) must be a positive integer{hint}")

    @property
    def spec(self) -> Method:
        """The registered :class:`Method` of this preset."""
        return METHODS[self.method]

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


def available_presets() -> list[str]:
    """Names of the packaged preset files (model sizes), e.g. ``["130m", "1b", ..., "tiny"]``."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def load_presets(name_or_path: str | os.PathLike[str]) -> dict[str, MethodPreset]:
    """The method presets of a packaged size (``"60m"``, ``"tiny"``, ...) or of a JSON file path, in
    registration order (the file may leave methods out).

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
    return {method: MethodPreset(method=method, **entries[method]) for method in METHODS if method in entries}


def check_methods_available(
    methods: Sequence[str], presets: Mapping[str, MethodPreset], presets_name: str, what: str = "methods"
) -> None:
    """Refuse ``methods`` that are not registered or that ``presets`` (called ``presets_name``) has no
    preset for; ``what`` names the argument in the message."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"{what} ({list(methods)}): {unknown} not registered; the methods are {list(METHODS)}")
    absent = [method for method in methods if method not in presets]
    if absent:
        raise ValueError(
            f"{what} ({list(methods)}): presets {presets_name!r} have no preset for {absent}; they have "
            f"{list(presets)} (add one to the presets file, or choose other presets)"
        )


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
    ``meta``; a method with a :attr:`Method.layer` (SLTrain) has its target linears replaced by layers built
    directly on ``device`` (:meth:`Method.convert`); then the remaining parameters are allocated on
    ``device`` and initialised (normal with ``init_std`` from ``torch.manual_seed(seed)``, norm gains 1,
    rotary tables recomputed).
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config, gradient_checkpointing=gradient_checkpointing)
    if preset is not None:
        preset.spec.convert(model, preset, seed=seed, device=device, dtype=dtype)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module.register_parameter(name, nn.Parameter(torch.empty(param.shape, device=device, dtype=dtype)))
    model.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta).to(device=device, dtype=dtype)
    torch.manual_seed(seed)
    model.reset_parameters()
    return model


def build_optimizer(
    model: nn.Module, preset: MethodPreset, *, moment_format: str | MomentFormat | None = None
) -> Optimizer:
    """The optimizer of ``preset.method`` over ``model`` (built by :func:`build_model` for the same preset),
    its moments in ``moment_format`` (default: the preset's): :meth:`Method.build_optimizer`."""
    return preset.spec.build_optimizer(model, preset, moment_format=moment_format)
