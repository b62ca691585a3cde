"""Which weights are projected (GaLore, Fira, DCT, APOLLO) or replaced (SLTrain): one matching rule for
:func:`~lowrank_optim.optim.param_groups`, :func:`~lowrank_optim.nn.convert_to_sltrain`, the DeepSpeed
plugin, the Hugging Face integration and the CLI.

The rule: a module is a target when its qualified name contains one of ``target_modules`` (substrings,
as in the GaLore and SLTrain scripts) and it is a linear layer: ``nn.Linear`` (any subclass) or a
``Conv1D`` (GPT-2's linear with a transposed ``in x out`` weight, recognised by its class name and its
``nf`` attribute, so that transformers need not be imported). Containers and modules whose own
parameters are vectors (norms, activations) are passed over. Its 2-D ``weight`` is the target; a frozen
one (``requires_grad=False``) is reported and left alone.

:data:`DEFAULT_TARGET_MODULES` finds the attention and MLP projections of LLaMA, Mistral, Qwen2
(``self_attn.*``, ``mlp.*``), GPT-NeoX/Pythia (``attention.*``, ``mlp.*``), GPT-2 (``attn.c_attn``,
``attn.c_proj``, ``mlp.*``: Conv1D) and BERT-style encoders (``attention.self.*``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``); embeddings and output heads are not matched. With the
defaults a pattern may match nothing (each architecture uses some of them) and a matched module that is
not linear (e.g. T5's ``relative_attention_bias`` embedding) is reported and left full-rank. Patterns
the user gives are checked: each must match a module name and find a linear layer, and a matched module
with a matrix parameter that is not a linear layer is an error, so a typo or an unintended match never
passes silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .optim._validation import matrix_shape

__all__ = ["DEFAULT_TARGET_MODULES", "Target", "TargetReport", "check_target_modules", "find_targets", "is_conv1d"]

#: Module-name substrings of the attention and MLP projections of the common architectures (module docstring).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("attn", "attention", "mlp", "intermediate.dense", "output.dense")
#: Names shown in an error message.
_SHOWN = 8


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape ``(in, out)``."""
    return (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module._parameters.get("weight"), nn.Parameter)
    )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class Target:
    """A matched linear layer: its qualified ``name``, the ``module`` and its 2-D ``weight``;
    ``transposed``: the weight is ``in x out`` (Conv1D), not ``out x in``."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    transposed: bool

    @property
    def features(self) -> tuple[int, int]:
        """``(in_features, out_features)``, whichever way the weight is stored (``ds_shape`` under zero.Init)."""
        rows, cols = matrix_shape(self.weight)
        return (rows, cols) if self.transposed else (cols, rows)


@dataclass(frozen=True)
class TargetReport:
    """What :func:`find_targets` found: the targets, and the matrix parameters left out with the reason."""

    patterns: tuple[str, ...]
    targets: tuple[Target, ...]
    #: ``(parameter name, shape, why it is not a target)`` for every other parameter of 2 or more dims.
    left_out: tuple[tuple[str, tuple[int, ...], str], ...]

    def __str__(self) -> str:
        projected = sum(math.prod(matrix_shape(t.weight)) for t in self.targets)
        lines = [f"target_modules {list(self.patterns)}: {len(self.targets)} matrices, {projected / 1e6:.2f}M parameters"]
        for target in self.targets:
            kind = "Conv1D, transposed" if target.transposed else type(target.module).__name__
            lines.append(f"  + {target.name}.weight {tuple(matrix_shape(target.weight))} ({kind})")
        for name, shape, why in self.left_out:
            lines.append(f"  - {name} {shape}: {why}")
        return "\n".join(lines)


def check_target_modules(target_modules: Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """The patterns and whether they are the user's (checked) rather than the defaults; refuses a string
    or an empty or non-string entry (callers that match later use it to refuse early)."""
    if target_modules is None:
        return DEFAULT_TARGET_MODULES, False
    if isinstance(target_modules, str):
        raise TypeError(f"target_modules must be a sequence of strings, not the string {target_modules!r}.")
    patterns = tuple(target_modules)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"Invalid target_modules: {target_modules!r}. Must be a non-empty sequence of non-empty strings "
            "('' would match every module)."
        )
    return patterns, patterns != DEFAULT_TARGET_MODULES


def find_targets(model: nn.Module, target_modules: Sequence[str] | None = None) -> TargetReport:
    """The linear layers of ``model`` that ``target_modules`` (``None``: :data:`DEFAULT_TARGET_MODULES`)
    selects, by the rule of the module docstring; raises where that rule says so, naming the pattern or
    the module."""
    patterns, checked = check_target_modules(target_modules)
    modules = [(name, module) for name, module in model.named_modules() if name]
    if checked:
        for pattern in patterns:
            if not any(pattern in name for name, _ in modules):
                examples = ", ".join(repr(name) for name, _ in modules[:_SHOWN])
                raise ValueError(
                    f"target_modules pattern {pattern!r} matches no module name of {type(model).__name__}; "
                    f"module names include: {examples}"
                )
    targets: list[Target] = []
    seen: set[int] = set()
    reasons: dict[int, str] = {}
    found_by: dict[str, int] = dict.fromkeys(patterns, 0)
    for name, module in modules:
        hits = [pattern for pattern in patterns if pattern in name]
        if not hits:
            continue
        matrices = [p for p in module.parameters(recurse=False) if len(matrix_shape(p)) >= 2]
        if _is_linear(module):
            weight = module._parameters["weight"]
            if not weight.requires_grad:
                reasons[id(weight)] = f"matches {hits[0]!r} but is frozen (requires_grad=False)"
                continue
            for pattern in hits:
                found_by[pattern] += 1
            if id(weight) not in seen:  # a weight shared by two modules is one target
                seen.add(id(weight))
                targets.append(Target(name, module, weight, transposed=is_conv1d(module)))
        elif matrices:
            if checked:
                raise TypeError(
                    f"module {name!r} matches target_modules={patterns!r} but its type is {type(module).__name__}, "
                    "not nn.Linear (or a Conv1D); narrow target_modules so that it is not matched"
                )
            for p in matrices:
                reasons.setdefault(id(p), f"matches {hits[0]!r} but {type(module).__name__} is not a linear layer")
    if checked:
        for pattern, count in found_by.items():
            if count == 0:
                matched = [
                    f"{name!r} ({type(module).__name__}"
                    + "".join(f", {key} {tuple(matrix_shape(p))}" for key, p in module.named_parameters(recurse=False))
                    + ")"
                    for name, module in modules
                    if pattern in name
                ][:_SHOWN]
                raise ValueError(
                    f"target_modules pattern {pattern!r} matches no linear layer with a trainable weight: it matches "
                    f"{', '.join(matched)}; only the 2-D weights of nn.Linear and Conv1D layers are targets."
                )
    if not targets:
        linear = [name for name, module in modules if _is_linear(module)]
        raise ValueError(
            f"target_modules {patterns} match no linear layer of {type(model).__name__} (its linear layers "
            f"include {linear[:_SHOWN]})."
        )
    names = {id(p): name for name, p in model.named_parameters()}
    left_out = tuple(
        (name, tuple(matrix_shape(p)), reasons.get(id(p), "not matched by target_modules"))
        for name, p in model.named_parameters()
        if len(matrix_shape(p)) >= 2 and id(p) not in seen and names.get(id(p)) == name
    )
    return TargetReport(patterns, tuple(targets), left_out)
