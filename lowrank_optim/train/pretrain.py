"""The pretraining loop: one method on one token stream, with evaluation, checkpoints and resume.

Per update: ``accumulation`` micro-batches of ``batch_size`` random windows (loss divided by
``accumulation``), one optimizer update (or per-layer updates during the last backward), then one
scheduler step (cosine, 10% warmup, to 10% of the peak lr). Throughput is tokens of the training
batches per second of wall time, evaluation and checkpointing included (the papers' convention), except
the one update profiled for its memory peak.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import TokenStream
from ..memory import peak_extra_memory
from ..models import LlamaConfig, LlamaForCausalLM
from ..optim import optimizer_state_bytes
from .measure import tensor_bytes
from .methods import MethodPreset, build_model, build_optimizer, cosine_with_warmup
from .per_layer import PerLayerUpdates

__all__ = ["TrainSettings", "evaluate", "pretrain"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """How to train (the method is given separately as a :class:`MethodPreset`)."""

    steps: int
    batch_size: int
    seq_len: int
    accumulation: int = 1
    per_layer: bool = False
    eval_every: int = 0  # 0: evaluate only at the start and the end
    eval_batches: int = 8
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    gradient_checkpointing: bool = False
    measure_memory: bool = True  # peak of the last update (profiler on CPU), also the stacked-bar parts
    log_every: int = 0  # 0: steps / 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "accumulation", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("eval_every", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype ({self.dtype!r}) must be one of {sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def check_window_fits(seq_len: int, model_config: LlamaConfig, config_name: str | None = None) -> None:
    """A training window is ``seq_len + 1`` tokens (inputs plus their next-token targets, shifted inside
    the model), so ``seq_len`` must be below the model's ``max_seq_len``."""
    if seq_len + 1 > model_config.max_seq_len:
        where = f" of config {config_name!r}" if config_name is not None else ""
        raise ValueError(
            f"seq_len ({seq_len}) must be < max_seq_len ({model_config.max_seq_len}){where}: a training window "
            "is seq_len + 1 tokens (the inputs and their next-token targets)"
        )


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, stream: TokenStream, batch_size: int, max_batches: int) -> float:
    """Mean next-token loss over the first ``max_batches`` validation batches (the same every call)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_targets = 0.0, 0
    for batch in stream.eval_batches(batch_size, max_batches):
        batch = batch.to(device)
        num_targets = batch.shape[0] * (batch.shape[1] - 1)
        total_loss += model(batch, labels=batch).loss.float().item() * num_targets
        total_targets += num_targets
    model.train(was_training)
    return total_loss / total_targets


def _sample(stream: TokenStream, generator: torch.Generator, batch_size: int) -> Tensor:
    """``batch_size`` random training windows, drawn exactly as ``TokenStream.train_batches``."""
    num_starts = len(stream.train_tokens) - stream.window + 1
    starts = torch.randint(num_starts, (batch_size,), generator=generator)
    return stream.train_tokens[starts[:, None] + torch.arange(stream.window)]


def pretrain(
    model_config: LlamaConfig,
    preset: MethodPreset,
    stream: TokenStream,
    settings: TrainSettings,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model_config`` with ``preset`` on ``stream``; returns curves and summary figures.

    ``checkpoint``: file written every ``checkpoint_every`` updates and at the end (model, optimizer,
    scheduler, update count, data-sampler and global RNG states); with ``resume=True`` training continues
    from it bit-identically (loaded with ``torch.load(weights_only=True)``).
    """
    if settings.seq_len != stream.seq_len:
        raise ValueError(f"settings.seq_len ({settings.seq_len}) must equal the stream's seq_len ({stream.seq_len})")
    check_window_fits(settings.seq_len, model_config)
    name = preset.method + ("+per-layer" if settings.per_layer else "")
    device = torch.device(settings.device)
    model = build_model(
        model_config,
        preset=preset,
        device=device,
        dtype=settings.torch_dtype,
        seed=settings.seed,
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    model.train()
    optimizer = build_optimizer(model, preset)
    scheduler = cosine_with_warmup(optimizer, settings.steps)
    updates = PerLayerUpdates(optimizer) if settings.per_layer else None
    data_generator = torch.Generator().manual_seed(settings.seed)
    start_step = 0
    history: dict[str, list] = {"train": [], "eval": []}
    if resume:
        if checkpoint is None or not Path(checkpoint).exists():
            raise ValueError(f"resume=True needs an existing checkpoint file, got checkpoint={checkpoint!r}")
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        data_generator.set_state(saved["data_rng"])
        torch.set_rng_state(saved["cpu_rng"])
        start_step = int(saved["step"])
        history = {"train": [tuple(x) for x in saved["train_curve"]], "eval": [tuple(x) for x in saved["eval_curve"]]}
        log(f"[{name}] resumed from {checkpoint} at update {start_step}")
    else:
        initial = evaluate(model, stream, settings.batch_size, settings.eval_batches)
        history["eval"].append((0, initial))
        log(f"[{name}] update 0/{settings.steps}  eval loss {initial:.4f}")

    def save() -> None:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data_rng": data_generator.get_state(),
                "cpu_rng": torch.get_rng_state(),
                "step": step,
                "train_curve": history["train"],
                "eval_curve": history["eval"],
            },
            checkpoint,
        )

    def update() -> float:
        total = 0.0
        for micro in range(settings.accumulation):
            batch = _sample(stream, data_generator, settings.batch_size).to(device)
            loss = model(batch, labels=batch).loss / settings.accumulation
            last = micro == settings.accumulation - 1
            if updates is None:
                loss.backward()
            else:
                updates.backward(loss, step=last)
            total += loss.item()
        if updates is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return total

    log_every = settings.log_every or max(1, settings.steps // 10)
    tokens_per_update = settings.accumulation * settings.batch_size * settings.seq_len
    peak = None
    profiled_seconds = 0.0  # the profiled update is slower; it is left out of the throughput
    step = start_step
    start_time = time.perf_counter()
    for step in range(start_step + 1, settings.steps + 1):
        if settings.measure_memory and step == settings.steps and step > 1:
            # The last update is a steady-state one (the state exists): measure its allocator peak.
            resident = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + optimizer_state_bytes(optimizer)
            losses: list[float] = []
            profile_start = time.perf_counter()
            peak = resident + peak_extra_memory(lambda: losses.append(update()), device)
            profiled_seconds = time.perf_counter() - profile_start
            loss = losses[0]
        else:
            loss = update()
        history["train"].append((step, loss))
        if step % log_every == 0 or step == settings.steps:
            elapsed = time.perf_counter() - start_time
            rate = (step - start_step) * tokens_per_update / elapsed
            log(f"[{name}] update {step}/{settings.steps}  loss {loss:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  {rate:,.0f} tok/s")
        if settings.eval_every and step % settings.eval_every == 0 and step != settings.steps:
            history["eval"].append((step, evaluate(model, stream, settings.batch_size, settings.eval_batches)))
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
            save()
    seconds = time.perf_counter() - start_time - profiled_seconds
    timed_updates = settings.steps - start_step - (1 if profiled_seconds else 0)
    final = evaluate(model, stream, settings.batch_size, settings.eval_batches)
    history["eval"].append((settings.steps, final))
    if checkpoint is not None:
        save()
    log(f"[{name}] final eval loss {final:.4f}  perplexity {math.exp(final):.2f}")
    param_bytes = tensor_bytes(model.parameters())
    return {
        "method": name,
        "preset": preset.to_dict(),
        "settings": asdict(settings),
        "initial_eval_loss": history["eval"][0][1],
        "final_eval_loss": final,
        "final_perplexity": math.exp(final),
        "tokens_per_s": timed_updates * tokens_per_update / seconds,
        "train_seconds": seconds,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "weight_bytes": param_bytes + tensor_bytes(model.buffers()),
        # Full gradients exist only without per-layer updates, or between accumulated micro-batches.
        "gradient_bytes": 0 if settings.per_layer and settings.accumulation == 1 else param_bytes,
        "peak_bytes": peak,
        "train_curve": history["train"],
        "eval_curve": history["eval"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
