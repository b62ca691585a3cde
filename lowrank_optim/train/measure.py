"""Measured memory of one training step (forward, backward, optimizer step) for a config and method.

What is measured, and why this way:

- ``weights``, ``gradients``, ``optimizer_states``: exact tensor accounting — bytes of the parameters and
  buffers, of every ``.grad`` right after ``backward()`` (a normal step; with per-layer updates no full set
  of gradients ever exists, so the figure is the normal step's), and ``optimizer_state_bytes`` after the
  step. These are what the estimator predicts, independent of allocator caching.
- ``peak``: the allocator's own peak during a steady-state step (a first step has already created the
  optimizer state): ``resident + peak_extra_memory(step)``, where ``resident`` is the tensor bytes live
  before the step (weights, buffers, states) and the extra peak comes from CUDA's
  ``max_memory_allocated`` or, on CPU, the profiler's allocation timeline (:mod:`lowrank_optim.memory`).

Moment formats (``moment_format="8bit"``, or a preset's ``moment_format``): the optimizer is
:func:`build_optimizer`'s for that format (``adamw`` and ``sltrain``, whose optimizer is ``torch.optim.AdamW``
with full-precision moments only, are then stepped by :class:`~lowrank_optim.GaLoreAdamW`'s full-rank
groups: :meth:`Method.build_optimizer`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..memory import peak_extra_memory
from ..models import LlamaConfig
from ..optim import optimizer_state_bytes
from ..optim.moments import MomentFormat
from .methods import MethodPreset, build_model, build_optimizer
from .per_layer import PerLayerUpdates

__all__ = ["StepMeasurement", "build_measured_optimizer", "measure_training_step", "tensor_bytes"]


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Total storage bytes of an iterable of tensors (``None`` entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True, kw_only=True)
class StepMeasurement:
    """Bytes of one training step; ``peak`` is the allocator peak, the rest exact tensor accounting."""

    weights: int  # parameters + buffers (SLTrain indices, rotary tables)
    gradients: int
    optimizer_states: int
    peak: int
    step_seconds: float


def build_measured_optimizer(
    model: nn.Module, preset: MethodPreset, moment_format: str | MomentFormat | None = None
) -> Optimizer:
    """The optimizer of ``preset`` over ``model`` with its moments stored as ``moment_format`` says
    (default: the preset's): :func:`build_optimizer`, which holds the rule for every method."""
    return build_optimizer(model, preset, moment_format=moment_format)


def _step(model: nn.Module, optimizer: Optimizer, updates: PerLayerUpdates | None, batch: torch.Tensor) -> None:
    loss = model(batch, labels=batch).loss
    if updates is None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        updates.backward(loss)


def measure_training_step(
    config: LlamaConfig,
    preset: MethodPreset,
    *,
    per_layer: bool = False,
    batch_size: int = 1,
    seq_len: int = 256,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    timed_steps: int = 0,
    moment_format: str | MomentFormat | None = None,
) -> StepMeasurement:
    """Build the model and optimizer of ``preset`` on ``device`` and measure a steady-state training step.

    ``moment_format``: how the optimizer stores its moments (:func:`build_measured_optimizer`).

    ``step_seconds``: the mean wall time of ``timed_steps`` further steps, or of the measured step itself
    (profiler overhead included on CPU) when ``timed_steps`` is 0.
    """
    device = torch.device(device)
    model = build_model(
        config, preset=preset, device=device, dtype=dtype, seed=seed, gradient_checkpointing=gradient_checkpointing
    )
    model.train()
    optimizer = build_measured_optimizer(model, preset, moment_format)
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator).to(device)

    # Gradient bytes of a normal backward, then the first optimizer step (creates the state).
    model(batch, labels=batch).loss.backward()
    gradients = tensor_bytes(p.grad for p in model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    updates = PerLayerUpdates(optimizer) if per_layer else None

    weights = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())
    states = optimizer_state_bytes(optimizer)
    start = time.perf_counter()
    extra = peak_extra_memory(lambda: _step(model, optimizer, updates, batch), device)
    seconds = time.perf_counter() - start
    if timed_steps > 0:
        start = time.perf_counter()
        for _ in range(timed_steps):
            _step(model, optimizer, updates, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - start) / timed_steps
    return StepMeasurement(
        weights=weights, gradients=gradients, optimizer_states=states, peak=weights + states + extra, step_seconds=seconds
    )
