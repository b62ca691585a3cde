"""Memory estimates per component for LLaMA pretraining with each method, from shapes alone.

For a ``m x n`` matrix (``m >= n`` after transposing), rank ``r_eff = min(r, m, n)``, element sizes
``e_w`` (weights, gradients, bases) and ``e_m`` (moments), counted in bytes:

==============  =====================================  ==========================================
component       method                                 bytes
==============  =====================================  ==========================================
weights         all                                    ``numel · e_w``; SLTrain linears:
                                                       ``(m·r + r·n + nnz) · e_w``, ``nnz = floor(delta·m·n)``
gradients       all                                    ``trainable numel · e_w``; per-layer updates
                                                       (no accumulation): the largest single gradient
states          AdamW, SLTrain (AdamW)                 ``moments(numel) + 4`` (fp32 step)
                projecting methods, projected matrix   ``moments(m · r_eff) + 4`` (+ 4: Fira's and APOLLO's
                                                       fp32 norm of the last update)
projection      GaLore / Fira (SVD basis)              ``n · r_eff · e_w``
                DCT (selected frequencies)             ``r_eff · 8`` (int64 indices)
                APOLLO (random projection)             ``8`` (the int64 seed it is drawn from)
sparse indices  SLTrain support                        ``nnz · 4`` (int32 below 2³¹ entries, else 8)
activations     all                                    see :func:`activation_bytes`
==============  =====================================  ==========================================

``moments(k)``, the two Adam moments of ``k`` elements, is the optimizers' own rule
(:func:`lowrank_optim.optim.moments.moment_state_bytes` of ``moment_format``, placed by
``optim.galore._moment_placement``): ``2 · k · e_m`` for full-precision moments; for 8-bit moments
(``Blockwise8bit``) ``2 · (k + 4 · blocks)`` bytes, uint8 codes plus one fp32 scale per block of
``block_size`` along the stored last dimension (a left projection's ``r x n`` moments are stored ``n x
r``, so their blocks run along ``r``), and ``2 · k · e_m`` for moments below ``min_size`` elements. Every
parameter's moments follow the format: the projected matrices' and the full-rank ones (embeddings,
``lm_head``, norms, SLTrain's factors and values), as bitsandbytes' 8-bit Adam does.

The per-matrix rows are :meth:`lowrank_optim.train.methods.Method.matrix_state_bytes` (the registry's
formula: the projector's own :meth:`~lowrank_optim.Projector.tensors` give the projection row, so a
preset's ``projector`` is counted too). So a GaLore matrix holds ``2·max(m,n)·r + min(m,n)·r`` state
elements. Parameters that are not projected (embeddings, ``lm_head``, norms) get full Adam in every
optimizer. Counts come from the real model (built on the meta device, nothing allocated), so they match
``optimizer_state_bytes`` of a real optimizer after its first step exactly.
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence, cast

import torch
from torch import nn

from .models import LlamaConfig, LlamaForCausalLM
from .optim.galore import _moment_placement
from .optim.moments import Blockwise8bit, MomentFormat, moment_state_bytes, resolve_moment_format
from .optim.ranks import AUTO
from .targets import find_targets
from .train.methods import METHODS, STEP_BYTES, TARGET_MODULES, MethodPreset

__all__ = [
    "PAPER_7B_RUNS",
    "PUBLISHED_GB",
    "MemoryEstimate",
    "PaperRun",
    "activation_bytes",
    "estimate_memory",
    "format_estimate_table",
    "format_paper_7b_table",
    "galore_state_elements",
]

#: GaLore Table 2 (weights + optimizer states, bf16, "G"), DESIGN.md §4, at ranks 128/256/256/512.
PUBLISHED_GB: dict[str, dict[str, float]] = {
    "adamw": {"60m": 0.36, "130m": 0.76, "350m": 2.06, "1b": 7.80},
    "galore": {"60m": 0.24, "130m": 0.52, "350m": 1.22, "1b": 4.38},
}

FP32_BYTES = 4


def galore_state_elements(m: int, n: int, rank: int) -> int:
    """State elements of one GaLore-projected ``m x n`` matrix: two ``max x r`` moments and a ``min x r`` basis."""
    r = min(rank, m, n)
    return 2 * max(m, n) * r + min(m, n) * r


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per component of one training step's peak (weights to activations)."""

    weights: int
    gradients: int
    optimizer_states: int  # moments, step counters, Fira's norm scalars
    projection: int  # GaLore/Fira bases or DCT indices (also optimizer state)
    sparse_indices: int  # SLTrain supports (model buffers)
    activations: int

    @property
    def weights_and_states(self) -> int:
        """The papers' "estimated memory": everything but gradients and activations."""
        return self.weights + self.optimizer_states + self.projection + self.sparse_indices

    @property
    def state_bytes(self) -> int:
        """What ``optimizer_state_bytes`` of the real optimizer reports: states plus projection."""
        return self.optimizer_states + self.projection

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


def activation_bytes(
    config: LlamaConfig, *, batch_size: int, seq_len: int, dtype: torch.dtype, gradient_checkpointing: bool
) -> int:
    """Activations saved for backward by :class:`LlamaForCausalLM` (b = batch, s = sequence, h, i, a, V),
    with ``e`` the element size of ``dtype`` and ``f = 4``.

    Per decoder layer, by counting what autograd saves: the two norm inputs in fp32 (RMSNorm normalises in
    fp32), nine ``b·s·h`` tensors in ``dtype`` (two normalised, two norm outputs, q, k, v, attention output
    and its re-laid-out copy), four ``b·s·i`` MLP tensors (gate, silu, up, product) and the attention's
    log-sum-exp (``b·a·s`` fp32; a fused attention kernel keeps no ``s x s`` matrix). With checkpointing a
    layer keeps only its ``b·s·h`` input, and one layer at a time is recomputed in backward. The head
    keeps the final norm's tensors and, at the loss, the contiguous logits, their fp32 log-softmax and
    its gradient: ``b·s·V·(e + 2f)`` (plus an fp32 copy ``b·s·V·f`` when ``dtype`` is not fp32).
    """
    e = torch.empty((), dtype=dtype).element_size()
    f = FP32_BYTES
    b, s, h, i = batch_size, seq_len, config.hidden_size, config.intermediate_size
    layer = b * s * h * (2 * f + 9 * e) + 4 * b * s * i * e + b * config.num_heads * s * f + 2 * b * s * f
    if gradient_checkpointing:
        layers = config.num_layers * b * s * h * e + layer
    else:
        layers = config.num_layers * layer
    logits = b * s * config.vocab_size * (e + 2 * f + (f if e != f else 0))
    head = b * s * h * (f + 2 * e) + logits
    return layers + head


def _meta_model(config: LlamaConfig, preset: MethodPreset) -> nn.Module:
    """The model ``preset``'s method trains, on the meta device (shapes only: nothing allocated or sampled)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    preset.spec.convert(model, preset, seed=0, device="meta", dtype=None)
    return model


def estimate_memory(
    config: LlamaConfig,
    preset: MethodPreset,
    *,
    dtype: torch.dtype = torch.bfloat16,
    moment_dtype: torch.dtype | None = None,
    batch_size: int = 1,
    seq_len: int = 256,
    gradient_checkpointing: bool = False,
    per_layer: bool = False,
    accumulation: int = 1,
    moment_format: str | MomentFormat | None = None,
) -> MemoryEstimate:
    """Estimated bytes per component of a training step of ``config`` with ``preset``'s method.

    ``dtype``: weights, gradients and bases (pure bf16 in the papers); ``moment_dtype``: Adam moments
    (default: ``dtype``, as in the papers and the reference optimizers). ``moment_format``: how every
    parameter's moments are stored (default: the preset's, else ``"full"``), ``"full"``, ``"8bit"`` or a format object such as
    ``Blockwise8bit(min_size=0)`` (module docstring; for ``adamw`` and ``sltrain``, whose optimizer is
    ``torch.optim.AdamW``, the state an 8-bit AdamW keeps: this package's full-rank groups with that
    format). ``per_layer``: per-layer updates, which keep one gradient at a time only when
    ``accumulation == 1`` (with accumulation the summed gradients must persist between micro-batches);
    the moments and states are the same either way. A ``rank="auto"`` preset: its matrices' moments and
    projector tensors are counted as its ``state_budget`` (the most they hold together, all of it in
    ``optimizer_states``; the ranks, and so how it splits into moments and projection, are chosen in
    training), plus each matrix's step count and scalars.
    """
    if preset.method not in METHODS:
        raise ValueError(f"preset.method ({preset.method!r}) must be one of {list(METHODS)}")
    if accumulation < 1:
        raise ValueError(f"accumulation ({accumulation}) must be >= 1")
    if per_layer and preset.rank == AUTO:
        raise ValueError(
            f"per_layer=True with a rank='auto' preset of {preset.method!r}: per-layer updates do not step rank='auto' "
            "groups (PerLayerUpdates refuses them); allowed: per_layer=False, or a positive integer rank"
        )
    fmt = resolve_moment_format(moment_format if moment_format is not None else preset.moment_format or "full")
    method = preset.spec
    e_w = torch.empty((), dtype=dtype).element_size()
    moments_dtype = moment_dtype or dtype
    model = _meta_model(config, preset)
    projected = set()
    if method.projects:
        projected = {id(target.weight) for target in find_targets(model, TARGET_MODULES).targets}
    weights = states = projection = 0
    largest_gradient = 0
    for param in model.parameters():
        weights += param.numel() * e_w
        largest_gradient = max(largest_gradient, param.numel() * e_w)
        if id(param) in projected and preset.rank == AUTO:
            states += STEP_BYTES + method.matrix_scalar_bytes  # the budget below holds the rest
        elif id(param) in projected:
            shape = (param.shape[0], param.shape[1])
            matrix_states, matrix_projection = method.matrix_state_bytes(
                shape, preset, weight_bytes=e_w, moment_dtype=moments_dtype, moment_format=fmt
            )
            states += matrix_states
            projection += matrix_projection
        else:
            moment_shape, sharding = _moment_placement({}, param.shape)
            states += moment_state_bytes(fmt, moment_shape, moments_dtype, sharding) + STEP_BYTES
    if projected and preset.rank == AUTO:
        states += cast(int, preset.state_budget)
    gradients = largest_gradient if per_layer and accumulation == 1 else weights
    # The rotary cos/sin tables (buffers in ``dtype``) belong to the resident model too.
    weights += 2 * config.max_seq_len * config.head_dim * e_w
    # Integer buffers are index tensors (SLTrain's supports); their dtype is the real one on meta too.
    sparse_indices = sum(
        buffer.numel() * buffer.element_size() for buffer in model.buffers() if not buffer.is_floating_point()
    )
    activations = activation_bytes(
        config, batch_size=batch_size, seq_len=seq_len, dtype=dtype, gradient_checkpointing=gradient_checkpointing
    )
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        projection=projection,
        sparse_indices=sparse_indices,
        activations=activations,
    )


@dataclass(frozen=True, kw_only=True)
class PaperRun:
    """One of the papers' LLaMA-7B memory configurations, with the figure they published for it."""

    label: str
    method: str
    moment_format: str
    per_layer: bool
    #: Published estimate of weights + optimizer states (GB), or ``None``.
    published_estimate: float | None = None
    #: Published measured peak (``torch.cuda.max_memory_allocated``, GB, one A100-80G), or ``None``.
    published_peak: float | None = None
    source: str = ""


#: The papers' 7B configurations (presets of ``7b.json``: GaLore r = 1024, SLTrain r = 1024, delta 0.05).
#: Estimates: GaLore Table 3; measured peaks: SLTrain Figure 3 (GaLore Figure 4 gives the same 22.0 GB).
PAPER_7B_RUNS: tuple[PaperRun, ...] = (
    PaperRun(label="Adam", method="adamw", moment_format="full", per_layer=False, published_peak=67.4,
             source="SLTrain Fig. 3"),
    PaperRun(label="8-bit Adam", method="adamw", moment_format="8bit", per_layer=False, published_estimate=26.0,
             source="GaLore Tab. 3"),
    PaperRun(label="8-bit Adam per-layer", method="adamw", moment_format="8bit", per_layer=True, published_peak=29.4,
             source="SLTrain Fig. 3"),
    PaperRun(label="8-bit GaLore", method="galore", moment_format="8bit", per_layer=False, published_estimate=18.0,
             source="GaLore Tab. 3"),
    PaperRun(label="8-bit GaLore per-layer", method="galore", moment_format="8bit", per_layer=True, published_peak=22.0,
             source="GaLore Fig. 4, SLTrain Fig. 3"),
    PaperRun(label="8-bit SLTrain per-layer", method="sltrain", moment_format="8bit", per_layer=True,
             published_peak=18.3, source="SLTrain Fig. 3"),
)


def format_estimate_table(
    sizes: tuple[str, ...] = ("60m", "130m", "350m", "1b", "7b"),
    *,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 1,
    seq_len: int = 256,
    gradient_checkpointing: bool = True,
    moment_format: str | MomentFormat = "full",
) -> str:
    """The estimate table for the paper sizes with their presets, beside the published estimates, with notes;
    with ``"7b"`` among ``sizes``, also the papers' 7B configurations with 8-bit moments beside their
    published figures (:data:`PAPER_7B_RUNS`). ``moment_format`` applies to the first table only."""
    from .train.methods import load_presets

    fmt = resolve_moment_format(moment_format)
    header = (
        "size", "method", "rank", "weights", "states", "W+S", "published", "vs adamw", "grads", "per-layer grads", "activations"
    )
    rows = []
    for size in sizes:
        config = LlamaConfig.from_name_or_path(size)
        presets = load_presets(size)
        baseline = None
        for method, preset in presets.items():
            options: dict[str, Any] = dict(
                dtype=dtype, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                moment_format=fmt,
            )
            estimate = estimate_memory(config, preset, **options)
            per_layer = estimate_memory(config, preset, per_layer=True, **options)
            baseline = baseline or estimate.weights_and_states
            # The published figures are for bf16 moments; beside other moments they would mislead.
            published = PUBLISHED_GB.get(method, {}).get(size) if fmt.name == "full" else None
            rows.append(
                (
                    size,
                    method,
                    "-" if preset.rank is None else str(preset.rank),
                    _gb(estimate.weights + estimate.sparse_indices),
                    _gb(estimate.state_bytes),
                    _gb(estimate.weights_and_states),
                    "-" if published is None else f"{published:.2f}",
                    f"{estimate.weights_and_states / baseline:.2f}x",
                    _gb(estimate.gradients),
                    _gb(per_layer.gradients),
                    _gb(estimate.activations),
                )
            )
    dtype_name = str(dtype).removeprefix("torch.")
    moments = (
        f"moments in {dtype_name}" if fmt.name == "full"
        else f"moments {_format_label(fmt)} (published: bf16 moments, so not listed)"
    )
    notes = f"""
GB = 1e9 bytes (the papers' unit; GiB would be 6.9% smaller). Weights, gradients and bases in {dtype_name}, {moments};
states = Adam moments + step counters + projection bases/indices; W+S = weights + states + SLTrain's int32 support
indices = the papers' "estimated memory". Activations: batch {batch_size} x seq {seq_len}, activation checkpointing
{'on' if gradient_checkpointing else 'off'}. Per-layer grads: the largest single gradient (no accumulation).
Weights include SLTrain's support indices. Published = GaLore Table 2. Differences in convention: the published
figures use nominal parameter counts (60M/130M/350M/1.3B x 2 bytes per weight, e.g. full-rank 1B = 1.3e9 x 6 B =
7.80 GB) where these use the real counts of the untied-embedding configs
({_real_counts(sizes)}); and the published GaLore states (1B: 1.78 GB, GaLore App. C.2) are close to
the moments alone ({_galore_moments_1b(dtype)} GB here), i.e. they leave out the projection bases, which are counted here
(min(m,n) x r per matrix). Embeddings, lm_head and norms get full Adam in every method. No published recipe
exists for 3B, so it is not listed."""
    table = _align(header, rows) + "\n" + notes
    if "7b" in sizes:
        table += "\n\n" + format_paper_7b_table(
            dtype=dtype, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing
        )
    return table


def format_paper_7b_table(
    *, dtype: torch.dtype = torch.bfloat16, batch_size: int = 1, seq_len: int = 256, gradient_checkpointing: bool = True
) -> str:
    """The papers' LLaMA-7B configurations (:data:`PAPER_7B_RUNS`) estimated here beside their published
    estimates and measured peaks, with what the estimate includes and omits."""
    from .train.methods import load_presets

    config = LlamaConfig.from_name_or_path("7b")
    presets = load_presets("7b")
    header = ("7B run", "rank", "weights", "states", "W+S", "published W+S", "grads", "activations", "total",
              "published peak", "source")
    rows = []
    for run in PAPER_7B_RUNS:
        preset = presets[run.method]
        estimate = estimate_memory(
            config, preset, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
            gradient_checkpointing=gradient_checkpointing, per_layer=run.per_layer, moment_format=run.moment_format,
        )
        rank = "-" if preset.rank is None else str(preset.rank)
        if preset.delta is not None:
            rank += f", delta {preset.delta:g}"
        rows.append(
            (
                run.label,
                rank,
                _gb(estimate.weights + estimate.sparse_indices),
                _gb(estimate.state_bytes),
                _gb(estimate.weights_and_states),
                "-" if run.published_estimate is None else f"{run.published_estimate:.1f}",
                _gb(estimate.gradients),
                _gb(estimate.activations),
                _gb(estimate.total),
                "-" if run.published_peak is None else f"{run.published_peak:.1f}",
                run.source,
            )
        )
    dtype_name = str(dtype).removeprefix("torch.")
    e_w = torch.empty((), dtype=dtype).element_size()
    embedding = config.vocab_size * config.hidden_size
    eight_bit = resolve_moment_format("8bit")
    assert isinstance(eight_bit, Blockwise8bit)
    paragraphs = (
        f"LLaMA-7B ({config.num_parameters() / 1e6:.0f}M parameters; presets of 7b.json), GB = 1e9 bytes. Estimated "
        f"here: weights, gradients, projection bases and Adam's moments in {dtype_name}; 8-bit = "
        f"{_format_label(eight_bit)} on every "
        "parameter (projected moments, embeddings, lm_head, norms, SLTrain's factors and values), as bitsandbytes' "
        f"8-bit Adam, with plain {dtype_name} moments below {eight_bit.min_size} elements; grads = all gradients, or "
        f"per-layer the largest single one (the {_gb(embedding * e_w)} GB embedding); activations for batch "
        f"{batch_size} x seq {seq_len}, activation checkpointing {'on' if gradient_checkpointing else 'off'}; "
        "total = weights + SLTrain's int32 support indices + states + grads + activations.",
        "Published W+S = GaLore Table 3's estimate (weights + optimizer states, nominal 7B parameters). Published "
        "peak = torch.cuda.max_memory_allocated on one A100-80G (GaLore: a token batch of at most 500; SLTrain "
        "states neither its batch nor its sequence length nor checkpointing).",
        "Not estimated, but inside a measured peak: the transients of the forward, backward and optimizer step "
        "(an 8-bit step's fp32 copies of the gradient and of M/(sqrt(V)+eps) for the parameter being stepped: "
        f"{_gb(2 * FP32_BYTES * embedding)} GB for the embedding; torch AdamW's foreach step, whose sqrt(V) "
        f"temporary copies every second moment, {_gb(config.num_parameters() * e_w)} GB in {dtype_name}, which may "
        "be most of Adam's gap to 67.4; GaLore's SVD at a refresh; SLTrain's dense B A + S in a dense-path "
        "forward), cuBLAS workspaces and allocator rounding. SLTrain's activations are counted as the dense model's.",
    )
    notes = "\n" + "\n".join(textwrap.fill(paragraph, width=118) for paragraph in paragraphs)
    return _align(header, rows) + "\n" + notes


def _format_label(fmt: MomentFormat) -> str:
    if isinstance(fmt, Blockwise8bit):
        return f"block-wise 8-bit moments (uint8 codes + one fp32 scale per {fmt.block_size} elements)"
    return f"{fmt.name} moments"


def _align(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    """Rows under a header, first two columns left-aligned and the rest right-aligned."""
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _real_counts(sizes: tuple[str, ...]) -> str:
    counts = (f"{size} {LlamaConfig.from_name_or_path(size).num_parameters() / 1e6:.2f}M" for size in sizes)
    return "computed: " + ", ".join(counts)


def _galore_moments_1b(dtype: torch.dtype) -> str:
    from .train.methods import load_presets

    estimate = estimate_memory(LlamaConfig.from_name_or_path("1b"), load_presets("1b")["galore"], dtype=dtype)
    return f"{estimate.optimizer_states / 1e9:.2f}"


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f}"
