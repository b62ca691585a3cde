"""WeLore: measure how low-rank a model's weights are, compress it with non-uniform ranks, fine-tune the
low-rank components (Jaiswal et al., 2024, "From GaLore to WeLore: How Low-Rank Weights Non-uniformly
Emerge from Low-Rank Gradients", arXiv 2407.11239).

Works on any model whose linear layers :func:`lowrank_optim.targets.find_targets` finds (``nn.Linear``
and GPT-2's ``Conv1D``; embeddings, ``lm_head`` and norms are never touched).

**Analysis** (:func:`weight_spectra`, :func:`analyze`, :class:`SpectrumTracker`). For a target matrix
``W`` (``m x n`` as ``out x in``, ``r = min(m, n)``, singular values ``s_1 >= ... >= s_r`` in fp32):
the stable rank ``‖W‖_F² / s_1²`` (ours: the reference computes only the values) and the energy rank
``k_e(f) = min{k : Σ_{i<=k} s_i² >= f · Σ_i s_i²}``.

**The WeLore rank rule** (the reference code's): with the min-max normalised values
``ŝ_i = (s_i - s_r) / (s_1 - s_r)`` and one global threshold ``τ``, matrix ``W`` drops
``p(τ) = #{i : ŝ_i < τ}`` of its ``r`` ranks (its heavy tail) and keeps ``k = r - p``; its reduction
ratio is ``ρ = p / r``. A matrix is a low-rank component (LRC) when ``ρ > min_ratio`` (the reference's
fine-tuning default is 0.4999) *and* its factors are smaller than it, ``k (m + n) < m n`` (ours: the
reference factors at ``min_ratio = 0`` even when that grows the matrix); the others (N-LRCs) stay dense.
Where ours differs from the reference code (see ``notes/welore.md``):

* ``τ`` is found for any model from the global target (the reference reads it from a table keyed by
  "7b"/"13b" in the model name): the smallest ``τ`` whose reduction reaches the target, found exactly
  over the finitely many values at which the reduction changes. The target is a fraction of the target
  matrices' ranks (``by="ranks"``: ``Σ_LRC p / Σ r``, counting only what is really removed) or of their
  parameters (``by="parameters"``: ``1 - Σ params after / Σ m n``).
* A flat spectrum (``s_1 - s_r <= 1e-6 · s_1``) drops nothing (the reference divides by zero), and no
  matrix keeps fewer than one rank.
* One fp32 SVD per compressed matrix, on the weight's device; factors in the weight's dtype; a bias is
  kept (on the layer, added after the factors).

An LRC ``W ≈ U_k S_k V_kᵀ`` becomes :class:`LowRankLinear` with ``up = U_k √S_k`` (``m x k``) and
``down = √S_k V_kᵀ`` (``k x n``), the balanced split of the reference. :func:`uniform_plan` is the
baseline: one reduction ratio for every matrix, at the same kind of target.

**LRC fine-tuning** (:func:`freeze_for_lrc_finetune`): only the LRC factors (and their biases) train;
N-LRCs, embeddings, ``lm_head`` and (by default; the reference trains them) norms are frozen.
:func:`merge_welore` exports back to dense layers.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._io import atomic_write, atomic_write_text
from .targets import Target, find_targets

__all__ = [
    "FLAT_SPECTRUM_RTOL",
    "PLAN_TARGETS",
    "CompressionReport",
    "LowRankLinear",
    "MatrixPlan",
    "MatrixSpectrum",
    "RankPlan",
    "SpectrumTracker",
    "analyze",
    "compress",
    "freeze_for_lrc_finetune",
    "merge_welore",
    "spectra_of",
    "uniform_plan",
    "weight_spectra",
    "welore_plan",
]

#: What a global target counts: the target matrices' ranks or their parameters.
PLAN_TARGETS: tuple[str, ...] = ("ranks", "parameters")
#: A spectrum with ``s_1 - s_r <= FLAT_SPECTRUM_RTOL · s_1`` has no tail to cut.
FLAT_SPECTRUM_RTOL = 1e-6


def _matrix(target: Target) -> Tensor:
    """The target's weight as ``out x in`` (a Conv1D stores ``in x out``)."""
    weight = target.weight.detach()
    return weight.t() if target.transposed else weight


@dataclass(frozen=True)
class MatrixSpectrum:
    """The singular values (fp32, descending, on the CPU) of one target matrix of shape ``(out, in)``."""

    name: str
    shape: tuple[int, int]
    singular_values: Tensor

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def stable_rank(self) -> float:
        """``‖W‖_F² / s_1²`` (0 for a zero matrix): a smooth count of the directions that matter."""
        top = float(self.singular_values[0]) if self.singular_values.numel() else 0.0
        if top == 0.0:
            return 0.0
        return float((self.singular_values.double() ** 2).sum()) / top**2

    def energy_rank(self, fraction: float) -> int:
        """The fewest leading singular values holding ``fraction`` of ``Σ s_i²`` (0 for a zero matrix)."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"energy fraction ({fraction!r}) must be in (0, 1]")
        energy = (self.singular_values.double() ** 2).cumsum(0)
        if energy.numel() == 0 or float(energy[-1]) == 0.0:
            return 0
        k = int(torch.searchsorted(energy, fraction * energy[-1]).item()) + 1
        return min(k, self.max_rank)

    def normalized(self) -> Tensor:
        """``ŝ = (s - s_r) / (s_1 - s_r)``, descending, fp64; all ones for a flat spectrum (no tail, so no
        threshold below 1 cuts any of it)."""
        values = self.singular_values.double()
        top, bottom = values[0], values[-1]
        if float(top - bottom) <= FLAT_SPECTRUM_RTOL * float(top):
            return torch.ones_like(values)
        return (values - bottom) / (top - bottom)

    def to_dict(self, energy: Sequence[float] = (0.9, 0.99)) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "stable_rank": self.stable_rank,
            "energy_ranks": {str(f): self.energy_rank(f) for f in energy},
            "singular_values": self.singular_values.tolist(),
        }


@torch.no_grad()
def weight_spectra(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[MatrixSpectrum]:
    """The spectrum of every target matrix of ``model`` (fp32 ``svdvals`` on the weight's device)."""
    spectra = []
    for target in find_targets(model, target_modules).targets:
        matrix = _matrix(target)
        values = torch.linalg.svdvals(matrix.float()).cpu()
        spectra.append(MatrixSpectrum(target.name, (matrix.shape[0], matrix.shape[1]), values))
    return spectra


def analyze(
    model: nn.Module, target_modules: Sequence[str] | None = None, energy: Sequence[float] = (0.9, 0.99)
) -> dict[str, Any]:
    """Per target matrix: shape, stable rank, energy ranks and singular values (JSON-ready)."""
    return {spectrum.name: spectrum.to_dict(energy) for spectrum in weight_spectra(model, target_modules)}


class SpectrumTracker:
    """Records the spectra of a model's target matrices every ``every`` updates of a run, so that low-rank
    weights can be seen to emerge: pass it as ``pretrain(..., callbacks=[tracker])`` (it is called
    ``tracker(step, model)`` after each update) or call :meth:`record` yourself; :meth:`write` writes the
    records as JSON and a plot of every matrix's stable rank against the update, one panel per layer.
    """

    def __init__(self, every: int, *, target_modules: Sequence[str] | None = None, energy: float = 0.9) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every ({every!r}) must be an integer >= 1")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy ({energy!r}) must be in (0, 1]")
        self.every = every
        self.target_modules = target_modules
        self.energy = energy
        self.records: list[dict[str, Any]] = []

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every == 0:
            self.record(step, model)

    def record(self, step: int, model: nn.Module) -> None:
        matrices = {
            spectrum.name: {
                "stable_rank": spectrum.stable_rank,
                "energy_rank": spectrum.energy_rank(self.energy),
                "max_rank": spectrum.max_rank,
                "singular_values": spectrum.singular_values.tolist(),
            }
            for spectrum in weight_spectra(model, self.target_modules)
        }
        self.records.append({"step": step, "matrices": matrices})

    def write(self, json_path: str | os.PathLike[str], plot_path: str | os.PathLike[str] | None = None) -> None:
        """The records to ``json_path`` (atomically), and the stable-rank plot to ``plot_path``."""
        if not self.records:
            raise ValueError("SpectrumTracker.write: nothing recorded yet")
        report = {"energy": self.energy, "every": self.every, "records": self.records}
        atomic_write_text(json_path, json.dumps(report) + "\n")
        if plot_path is not None:
            self._plot(Path(plot_path))

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.records[-1]["matrices"])
        layers: dict[str, list[str]] = {}
        for name in names:
            layers.setdefault(_layer_of(name), []).append(name)
        figure, axes = plt.subplots(len(layers), 1, figsize=(8, 2.6 * len(layers)), squeeze=False, sharex=True)
        steps = [record["step"] for record in self.records]
        for axis, (layer, members) in zip(axes[:, 0], layers.items()):
            for name in members:
                ranks = [record["matrices"][name]["stable_rank"] for record in self.records]
                axis.plot(steps, ranks, "o-", markersize=3, label=name.removeprefix(layer).lstrip("."))
            axis.set_title(layer or "model", fontsize=9)
            axis.set_ylabel("stable rank")
            axis.legend(fontsize=6, ncol=4)
        axes[-1, 0].set_xlabel("update")
        figure.tight_layout()
        atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=110))
        plt.close(figure)


def _layer_of(name: str) -> str:
    """``"layers.3"`` of ``"model.layers.3.attn.q_proj"``: the name up to the first numeric component."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1])


@dataclass(frozen=True)
class MatrixPlan:
    """One matrix in a :class:`RankPlan`: ``rank`` kept of ``max_rank``; ``lrc``: factored."""

    name: str
    shape: tuple[int, int]
    rank: int
    lrc: bool

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def cut(self) -> int:
        """Ranks removed (0 for an N-LRC, whose dense matrix is kept)."""
        return self.max_rank - self.rank if self.lrc else 0

    @property
    def parameters(self) -> int:
        m, n = self.shape
        return self.rank * (m + n) if self.lrc else m * n


@dataclass(frozen=True)
class RankPlan:
    """Ranks for every target matrix: what :func:`compress` applies. ``threshold``: WeLore's ``τ``
    (``None`` for a uniform plan, whose ``ratio`` is its one reduction ratio)."""

    rule: str
    by: str
    target: float
    matrices: tuple[MatrixPlan, ...]
    threshold: float | None = None
    ratio: float | None = None
    min_ratio: float = 0.0

    @property
    def rank_reduction(self) -> float:
        """``Σ ranks removed / Σ max ranks`` over the target matrices (only LRCs remove any)."""
        return sum(m.cut for m in self.matrices) / max(1, sum(m.max_rank for m in self.matrices))

    @property
    def parameters_before(self) -> int:
        return sum(m.shape[0] * m.shape[1] for m in self.matrices)

    @property
    def parameters_after(self) -> int:
        return sum(m.parameters for m in self.matrices)

    @property
    def parameter_reduction(self) -> float:
        return 1.0 - self.parameters_after / max(1, self.parameters_before)

    @property
    def achieved(self) -> float:
        """The reduction in the plan's own terms (``by``)."""
        return self.rank_reduction if self.by == "ranks" else self.parameter_reduction

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "by": self.by,
            "target": self.target,
            "threshold": self.threshold,
            "ratio": self.ratio,
            "min_ratio": self.min_ratio,
            "rank_reduction": self.rank_reduction,
            "parameter_reduction": self.parameter_reduction,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "matrices": {m.name: {"shape": list(m.shape), "rank": m.rank, "lrc": m.lrc} for m in self.matrices},
        }

    def __str__(self) -> str:
        lrcs = sum(m.lrc for m in self.matrices)
        where = f"tau {self.threshold:.4g}" if self.threshold is not None else f"ratio {self.ratio:.4g}"
        lines = [
            f"{self.rule} plan ({where}, target {self.target:.1%} of {self.by}): {lrcs} of {len(self.matrices)} matrices "
            f"factored; ranks removed {self.rank_reduction:.1%}, parameters {self.parameters_before:,} -> "
            f"{self.parameters_after:,} ({self.parameter_reduction:.1%} fewer)"
        ]
        for m in self.matrices:
            lines.append(f"  {m.name:40s} {m.shape[0]:>6d} x {m.shape[1]:<6d} rank {m.rank:>5d} / {m.max_rank:<5d}"
                         f" {'LRC' if m.lrc else 'dense'}")
        return "\n".join(lines)


def _check_target(target: float, by: str, min_ratio: float) -> None:
    if by not in PLAN_TARGETS:
        raise ValueError(f"by ({by!r}) must be one of {', '.join(PLAN_TARGETS)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
        raise ValueError(f"target ({target!r}) must be a fraction in (0, 1) of the target matrices' {by}")
    if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or not 0.0 <= min_ratio < 1.0:
        raise ValueError(f"min_ratio ({min_ratio!r}) must be in [0, 1)")


def _matrix_plan(spectrum: MatrixSpectrum, cut: int, min_ratio: float) -> MatrixPlan:
    """The plan of one matrix that would drop ``cut`` ranks: factored only if that is an LRC."""
    m, n = spectrum.shape
    r = spectrum.max_rank
    cut = min(cut, r - 1)  # keep at least one rank
    rank = r - cut
    lrc = cut > 0 and cut / r > min_ratio and rank * (m + n) < m * n
    return MatrixPlan(spectrum.name, spectrum.shape, rank if lrc else r, lrc)


def _smallest_reaching(
    candidates: Sequence[float], build: Callable[[float], RankPlan], target: float, what: str
) -> RankPlan:
    """The plan of the smallest candidate whose reduction reaches ``target`` (the reduction does not
    decrease along ``candidates``: binary search)."""
    plans: dict[int, RankPlan] = {}

    def plan(index: int) -> RankPlan:
        if index not in plans:
            plans[index] = build(candidates[index])
        return plans[index]

    if not candidates or plan(len(candidates) - 1).achieved < target:
        best = plan(len(candidates) - 1).achieved if candidates else 0.0
        raise ValueError(
            f"target ({target:.1%}) is out of reach: the most {what} can remove here is {best:.1%} (every matrix keeps "
            "at least one rank, and a matrix is factored only where that makes it smaller)"
        )
    index = bisect.bisect_left(range(len(candidates)), True, key=lambda i: plan(i).achieved >= target)
    return plan(index)


def welore_plan(
    spectra: Sequence[MatrixSpectrum], target: float, *, by: str = "ranks", min_ratio: float = 0.0
) -> RankPlan:
    """WeLore's non-uniform ranks for a global ``target`` (module docstring): the smallest ``τ`` whose
    reduction (``by``) reaches ``target``. ``min_ratio``: an LRC must drop more than this fraction of its
    ranks (the reference: 0 to compress, 0.4999 to fine-tune)."""
    _check_target(target, by, min_ratio)
    normalized = [spectrum.normalized().flip(0).tolist() for spectrum in spectra]  # ascending
    # p(τ) = #{ŝ < τ} changes only as τ passes a value: τ just above each distinct value below 1.
    values = sorted({value for column in normalized for value in column if value < 1.0})
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:] + [1.0])]

    def build(tau: float) -> RankPlan:
        matrices = tuple(
            _matrix_plan(spectrum, bisect.bisect_left(column, tau), min_ratio) for spectrum, column in zip(spectra, normalized)
        )
        return RankPlan(rule="welore", by=by, target=target, matrices=matrices, threshold=tau, min_ratio=min_ratio)

    return _smallest_reaching(candidates, build, target, "WeLore")


def uniform_plan(
    spectra: Sequence[MatrixSpectrum], target: float, *, by: str = "ranks", min_ratio: float = 0.0
) -> RankPlan:
    """The uniform baseline: every matrix drops ``floor(ρ · r)`` ranks for one ratio ``ρ``, the smallest
    whose reduction (``by``) reaches ``target``; the same LRC rule as :func:`welore_plan`."""
    _check_target(target, by, min_ratio)
    candidates = sorted({cut / spectrum.max_rank for spectrum in spectra for cut in range(1, spectrum.max_rank)})

    def build(ratio: float) -> RankPlan:
        # The tiny epsilon: cut / r computed back from a float ratio must give cut exactly.
        matrices = tuple(
            _matrix_plan(spectrum, math.floor(ratio * spectrum.max_rank + 1e-9), min_ratio) for spectrum in spectra
        )
        return RankPlan(rule="uniform", by=by, target=target, matrices=matrices, ratio=ratio, min_ratio=min_ratio)

    return _smallest_reaching(candidates, build, target, "a uniform ratio")


class LowRankLinear(nn.Module):
    """``y = up (down x) + bias``: a linear layer stored as two factors (``up``: ``out x rank``, ``down``:
    ``rank x in``), the form of a WeLore low-rank component."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank ({rank}) must be in [1, {min(in_features, out_features)}] for {out_features} x {in_features}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.up = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.down = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        #: The class a Conv1D was compressed from (:func:`merge_welore` gives it back).
        self.merges_to: type[nn.Module] | None = None

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: Tensor, rank: int, bias: Tensor | None = None) -> LowRankLinear:
        """The balanced factors ``U_k √S_k`` and ``√S_k V_kᵀ`` of the fp32 SVD of ``weight`` (``out x in``),
        on its device and in its dtype."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = s[:rank].sqrt()
        layer.up.copy_(u[:, :rank] * root)
        layer.down.copy_(root[:, None] * vh[:rank])
        if bias is not None:
            assert layer.bias is not None
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The dense ``out x in`` matrix ``up · down``."""
        return self.up @ self.down

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


@dataclass(frozen=True)
class CompressionReport:
    """What :func:`compress` did: the factored matrices and the model's parameters and bytes."""

    plan: RankPlan
    compressed: tuple[str, ...]
    parameters_before: int
    parameters_after: int
    bytes_before: int
    bytes_after: int
    dense: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return (
            f"compressed {len(self.compressed)} of {len(self.plan.matrices)} target matrices ({self.plan.rule}, ranks "
            f"removed {self.plan.rank_reduction:.1%}); model parameters {self.parameters_before:,} -> "
            f"{self.parameters_after:,}, weight bytes {self.bytes_before:,} -> {self.bytes_after:,}"
        )


def _parameter_bytes(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


@torch.no_grad()
def compress(model: nn.Module, plan: RankPlan, target_modules: Sequence[str] | None = None) -> CompressionReport:
    """Replace, in place, every LRC of ``plan`` by a :class:`LowRankLinear` (module docstring); N-LRCs stay.

    ``plan`` must have been made for this model's targets (the same names and shapes: refused otherwise,
    before anything is replaced)."""
    targets = {target.name: target for target in find_targets(model, target_modules).targets}
    planned = {m.name: m for m in plan.matrices}
    if set(targets) != set(planned):
        missing, extra = sorted(set(targets) - set(planned)), sorted(set(planned) - set(targets))
        raise ValueError(
            f"plan does not match the model's target matrices: not in the plan {missing[:3]}, not in the model {extra[:3]}"
        )
    for name, target in targets.items():
        shape = tuple(_matrix(target).shape)
        if shape != planned[name].shape:
            raise ValueError(f"plan gives {name!r} shape {planned[name].shape}; the model's matrix is {shape}")
    parameters_before, bytes_before = _parameter_bytes(model)
    compressed = []
    for name, target in targets.items():
        entry = planned[name]
        if not entry.lrc:
            continue
        bias = target.module._parameters.get("bias")
        layer = LowRankLinear.from_weight(_matrix(target), entry.rank, bias)
        if target.transposed:
            layer.merges_to = type(target.module)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        compressed.append(name)
    parameters_after, bytes_after = _parameter_bytes(model)
    return CompressionReport(
        plan=plan,
        compressed=tuple(compressed),
        parameters_before=parameters_before,
        parameters_after=parameters_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        dense=tuple(name for name in targets if name not in compressed),
    )


def freeze_for_lrc_finetune(model: nn.Module, *, train_norms: bool = False) -> list[nn.Parameter]:
    """Freeze everything but the :class:`LowRankLinear` factors and biases (and, with ``train_norms``, the
    parameters of modules whose class name contains "Norm"); returns the trainable parameters, the ones
    to give the optimizer. A model without a LowRankLinear is an error (nothing would train)."""
    layers = [module for module in model.modules() if isinstance(module, LowRankLinear)]
    if not layers:
        raise ValueError(f"freeze_for_lrc_finetune: {type(model).__name__} has no LowRankLinear; compress it first")
    trainable_ids = {id(p) for layer in layers for p in layer.parameters()}
    if train_norms:
        trainable_ids |= {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    trainable = []
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable_ids)
        if id(param) in trainable_ids:
            trainable.append(param)
    return trainable


@torch.no_grad()
def merge_welore(model: nn.Module) -> list[str]:
    """Replace, in place, every :class:`LowRankLinear` by the dense layer holding ``up · down`` (and its
    bias), an ``nn.Linear`` or the ``Conv1D`` it was compressed from; returns the merged names."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, LowRankLinear)]
    if not layers:
        raise ValueError(f"merge_welore: {type(model).__name__} has no LowRankLinear to merge")
    for name, layer in layers:
        weight = layer.dense_weight()
        dense: nn.Module
        if layer.merges_to is not None:  # a Conv1D: y = x W + b with W = weightᵀ
            dense = layer.merges_to(layer.out_features, layer.in_features).to(weight.device, weight.dtype)
            cast(Tensor, dense.weight).copy_(weight.t())
            if layer.bias is None:
                dense.register_parameter("bias", None)
            else:
                cast(Tensor, dense.bias).copy_(layer.bias)
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        dense.requires_grad_(layer.up.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    return [name for name, _ in layers]


def spectra_of(matrices: Iterable[tuple[str, Tensor]]) -> list[MatrixSpectrum]:
    """Spectra of named ``out x in`` matrices (e.g. a checkpoint's weights) without a model."""
    return [
        MatrixSpectrum(name, (int(matrix.shape[0]), int(matrix.shape[1])), torch.linalg.svdvals(matrix.detach().float()).cpu())
        for name, matrix in matrices
    ]
