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
states          AdamW, SLTrain (AdamW)                 ``2 · numel · e_m + 4`` (moments, fp32 step)
                projecting methods, projected matrix   ``2 · m · r_eff · e_m + 4`` (+ 4: Fira's and APOLLO's
                                                       fp32 norm of the last update)
projection      GaLore / Fira (SVD basis)              ``n · r_eff · e_w``
                DCT (selected frequencies)             ``r_eff · 8`` (int64 indices)
                APOLLO (random projection)             ``8`` (the int64 seed it is drawn from)
sparse indices  SLTrain support                        ``nnz · 4`` (int32 below 2³¹ entries, else 8)
activations     all                                    see :func:`activation_bytes`
==============  =====================================  ==========================================

The per-matrix rows are :meth:`lowrank_optim.train.methods.Method.matrix_state_bytes` (the registry's
formula: the projector's own :meth:`~lowrank_optim.Projector.tensors` give the projection row, so a
preset's ``projector`` is counted too). So a GaLore matrix holds ``2·max(m,n)·r + min(m,n)·r`` state
elements. Parameters that are not projected (embeddings, ``lm_head``, norms) get full Adam in every
optimizer. Counts come from the real model (built on the meta device, nothing allocated), so they match
``optimizer_state_bytes`` of a real optimizer after its first step exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .models import LlamaConfig, LlamaForCausalLM
from .targets import find_targets
from .train.methods import METHODS, STEP_BYTES, TARGET_MODULES, MethodPreset

__all__ = [
    "PUBLISHED_GB",
    "MemoryEstimate",
    "activation_bytes",
    "estimate_memory",
    "format_estimate_table",
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
) -> MemoryEstimate:
    """Estimated bytes per component of a training step of ``config`` with ``preset``'s method.

    ``dtype``: weights, gradients and bases (pure bf16 in the papers); ``moment_dtype``: Adam moments
    (default: ``dtype``, as in the papers and the reference optimizers). ``per_layer``: per-layer updates,
    which keep one gradient at a time only when ``accumulation == 1`` (with accumulation the summed
    gradients must persist between micro-batches).
    """
    if preset.method not in METHODS:
        raise ValueError(f"preset.method ({preset.method!r}) must be one of {list(METHODS)}")
    if accumulation < 1:
        raise ValueError(f"accumulation ({accumulation}) must be >= 1")
    method = preset.spec
    e_w = torch.empty((), dtype=dtype).element_size()
    e_m = torch.empty((), dtype=moment_dtype or dtype).element_size()
    model = _meta_model(config, preset)
    projected = set()
    if method.projects:
        projected = {id(target.weight) for target in find_targets(model, TARGET_MODULES).targets}
    weights = states = projection = 0
    largest_gradient = 0
    for param in model.parameters():
        weights += param.numel() * e_w
        largest_gradient = max(largest_gradient, param.numel() * e_w)
        if id(param) in projected:
            shape = (param.shape[0], param.shape[1])
            matrix_states, matrix_projection = method.matrix_state_bytes(shape, preset, weight_bytes=e_w, moment_bytes=e_m)
            states += matrix_states
            projection += matrix_projection
        else:
            states += 2 * param.numel() * e_m + STEP_BYTES
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


def format_estimate_table(
    sizes: tuple[str, ...] = ("60m", "130m", "350m", "1b", "7b"),
    *,
    dtype: torch.dtype = torch.bfloat16,
    batch_size: int = 1,
    seq_len: int = 256,
    gradient_checkpointing: bool = True,
) -> str:
    """The estimate table for the paper sizes with their presets, beside the published estimates, with notes."""
    from .train.methods import load_presets

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
                dtype=dtype, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing
            )
            estimate = estimate_memory(config, preset, **options)
            per_layer = estimate_memory(config, preset, per_layer=True, **options)
            baseline = baseline or estimate.weights_and_states
            published = PUBLISHED_GB.get(method, {}).get(size)
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
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    dtype_name = str(dtype).removeprefix("torch.")
    notes = f"""
GB = 1e9 bytes (the papers' unit; GiB would be 6.9% smaller). Weights, gradients, bases and moments in {dtype_name};
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
    return "\n".join(lines) + "\n" + notes


def _real_counts(sizes: tuple[str, ...]) -> str:
    counts = (f"{size} {LlamaConfig.from_name_or_path(size).num_parameters() / 1e6:.2f}M" for size in sizes)
    return "computed: " + ", ".join(counts)


def _galore_moments_1b(dtype: torch.dtype) -> str:
    from .train.methods import load_presets

    estimate = estimate_memory(LlamaConfig.from_name_or_path("1b"), load_presets("1b")["galore"], dtype=dtype)
    return f"{estimate.optimizer_states / 1e9:.2f}"


def _gb(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f}"
