"""``compare`` / ``demo``: pretrain the same small LLaMA with each method and compare loss, speed and memory.

Every method starts from the same seed and sees the same batches, under the papers' schedule (cosine,
10% warmup, to 10% of the peak lr), with its preset from ``configs/presets/<size>.json`` (no method is
tuned more than another). Per-layer variants do the same arithmetic as their normal runs (bit-identical,
see ``tests/test_per_layer.py``), so they run fewer updates, only to measure their speed and memory.

Memory is reported twice: the allocator peak of the last training update at the training batch (there,
activations dominate on a tiny model), and the peak of one steady-state step at batch 1 with activation
checkpointing (the weight- and state-dominated regime that large models are in).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write, atomic_write_text, check_writable_directory
from .data import ByteTokenizer, TokenStream, load_text_files, stdlib_corpus
from .models import LlamaConfig
from .train.measure import measure_training_step
from .train.methods import METHODS, presets_for_config
from .train.pretrain import TrainSettings, check_window_fits, pretrain

__all__ = ["OUTPUT_FILES", "SWEEP_FILES", "format_table", "run_comparison", "run_sweep", "write_plots"]

#: What ``main`` writes into ``--out`` (each atomically: a killed run leaves the previous file or none).
OUTPUT_FILES = ("results.json", "loss_curves.png", "memory.png")
#: What ``compare --sweep-lr`` writes into ``--out``.
SWEEP_FILES = ("sweep.json", "sweep_lr.png")


def run_comparison(
    *,
    config: str = "tiny",
    presets: str | None = None,
    methods: Sequence[str] = METHODS,
    per_layer_methods: Sequence[str] = METHODS,
    steps: int = 200,
    per_layer_steps: int = 30,
    batch_size: int = 16,
    seq_len: int = 128,
    text_files: Sequence[str | os.PathLike[str]] = (),
    seed: int = 0,
    eval_batches: int = 8,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train each method (and each per-layer variant for ``per_layer_steps``) and measure a step's peak."""
    for name, chosen in (("methods", methods), ("per_layer_methods", per_layer_methods)):
        unknown = [method for method in chosen if method not in METHODS]
        if unknown:
            raise ValueError(f"{name} ({list(chosen)}) must be drawn from {list(METHODS)}")
    model_config, method_presets, presets_name, tokens, stream = _setup(config, presets, seq_len, text_files, log)
    log(
        f"model {config}: {model_config.num_parameters() / 1e6:.2f}M dense parameters; corpus {len(tokens):,} tokens "
        f"({len(stream.val_tokens):,} held out); {batch_size} x {seq_len} tokens per update; {torch.get_num_threads()} threads"
    )
    runs = [(method, False, steps) for method in methods] + [(method, True, per_layer_steps) for method in per_layer_methods]
    results = []
    for index, (method, per_layer, run_steps) in enumerate(runs, start=1):
        log(f"method {index} of {len(runs)}: {method}{' with per-layer updates' if per_layer else ''}, {run_steps} updates")
        # Four evaluations along the way, so the eval curve is a curve and not a line from start to end.
        settings = TrainSettings(
            steps=run_steps, batch_size=batch_size, seq_len=seq_len, per_layer=per_layer, eval_batches=eval_batches,
            seed=seed, eval_every=max(1, run_steps // 4),
        )
        result = pretrain(model_config, method_presets[method], stream, settings, log=log)
        step = measure_training_step(
            model_config,
            method_presets[method],
            per_layer=per_layer,
            batch_size=1,
            seq_len=seq_len,
            gradient_checkpointing=True,
            seed=seed,
        )
        result["steps"] = run_steps
        result["peak_bytes_batch1_checkpointed"] = step.peak
        results.append(result)
    settings_out = {
        "config": config,
        "presets": presets_name,
        "model_config": model_config.to_dict(),
        "steps": steps,
        "per_layer_steps": per_layer_steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "text_files": [str(path) for path in text_files],
        "seed": seed,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    return {"settings": settings_out, "results": results}


def _mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.2f}"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per run, columns aligned; memory in MiB."""
    header = (
        "method",
        "updates",
        "initial loss",
        "final eval loss",
        "ppl",
        "tokens/s",
        "state MiB",
        "peak MiB (train batch)",
        "peak MiB (b=1, ckpt)",
    )
    rows = [
        (
            result["method"],
            str(result["steps"]),
            f"{result['initial_eval_loss']:.4f}",
            f"{result['final_eval_loss']:.4f}",
            f"{result['final_perplexity']:.2f}",
            f"{result['tokens_per_s']:,.0f}",
            _mib(result["optimizer_state_bytes"]),
            _mib(result["peak_bytes"]),
            _mib(result["peak_bytes_batch1_checkpointed"]),
        )
        for result in results
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _setup(
    config: str, presets: str | None, seq_len: int, text_files: Sequence[str | os.PathLike[str]], log: Callable[[str], None]
) -> tuple[LlamaConfig, dict[str, Any], str, torch.Tensor, TokenStream]:
    """The model config, presets (and their name), tokens and stream of a comparison or a sweep."""
    model_config = LlamaConfig.from_name_or_path(config)
    if model_config.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            f"vocab_size ({model_config.vocab_size}) of config {config!r} must be >= {ByteTokenizer.vocab_size}, "
            "the byte tokenizer's vocabulary"
        )
    check_window_fits(seq_len, model_config, config)
    method_presets, presets_name, presets_line = presets_for_config(config, model_config, presets)
    log(presets_line)
    tokens = load_text_files(text_files) if text_files else stdlib_corpus()
    return model_config, method_presets, presets_name, tokens, TokenStream(tokens, seq_len)


def run_sweep(args: Any, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``compare --sweep-lr``: :func:`lowrank_optim.train.sweep.sweep_learning_rates` over ``args.methods``
    with the comparison's budget (``--steps``, batch, sequence length, ``--seed``) and ``--seeds``."""
    from .train.sweep import sweep_learning_rates

    model_config, presets, presets_name, _, stream = _setup(args.config, args.presets, args.seq_len, args.text, log)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             eval_batches=args.eval_batches, seed=args.seed, measure_memory=False)
    report = sweep_learning_rates(model_config, presets, stream, settings, args.methods, seeds=args.seeds, log=log)
    report.update(config=args.config, presets=presets_name)
    return report


def write_plots(results: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``loss_curves.png`` (train and eval loss per method) and ``memory.png`` (stacked bars per run:
    weights, optimizer state, gradients, the rest of the peak = activations and temporaries)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(8, 5))
    for result in results:
        if "per-layer" in result["method"]:
            continue  # same losses as the normal run, by construction
        steps, losses = zip(*result["train_curve"])
        line = axis.plot(steps, losses, alpha=0.5, label=f"{result['method']} (train)")[0]
        eval_steps, eval_losses = zip(*result["eval_curve"])
        axis.plot(eval_steps, eval_losses, "o-", color=line.get_color(), label=f"{result['method']} (eval)")
    axis.set_xlabel("update")
    axis.set_ylabel("next-token loss (nats)")
    axis.set_title("Pretraining loss per method")
    axis.legend(fontsize=8)
    loss_path = out_dir / "loss_curves.png"
    _save_figure(figure, loss_path)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(9, 5))
    names = [result["method"] for result in results]
    parts = {
        "weights": [r["weight_bytes"] for r in results],
        "optimizer state": [r["optimizer_state_bytes"] for r in results],
        "gradients": [r["gradient_bytes"] for r in results],
    }
    parts["activations + temporaries"] = [
        max(0, (r["peak_bytes"] or 0) - r["weight_bytes"] - r["optimizer_state_bytes"] - r["gradient_bytes"]) for r in results
    ]
    bottom = [0.0] * len(results)
    for label, values in parts.items():
        mib = [value / 2**20 for value in values]
        axis.bar(names, mib, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, mib)]
    axis.set_ylabel("MiB at the peak of a training update")
    axis.set_title("Memory per method (allocator peak, split by tensor accounting)")
    axis.tick_params(axis="x", rotation=30)
    axis.legend(fontsize=8)
    memory_path = out_dir / "memory.png"
    _save_figure(figure, memory_path)
    plt.close(figure)
    return [loss_path, memory_path]


def _save_figure(figure: Any, path: Path) -> None:
    # Into the atomic writer's file object: format named, since there is no file name to infer it from.
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=120, bbox_inches="tight"))


def main(args: Any) -> int:
    """The ``compare``/``demo`` command: run, print the table, write JSON and plots, then the estimates."""
    start = time.perf_counter()
    if getattr(args, "sweep_lr", False):
        from .train.sweep import format_sweep_table, write_sweep_plot

        check_writable_directory(args.out, "--out", files=SWEEP_FILES)
        report = run_sweep(args)
        print()
        print(format_sweep_table(report))
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "sweep.json", json.dumps(report, indent=2) + "\n")
        plot = write_sweep_plot(report, out_dir / "sweep_lr.png")
        print(f"\nwrote {out_dir / 'sweep.json'}, {plot}")
        print(f"\ntotal time {time.perf_counter() - start:.0f} s")
        return 0
    # The trainings take minutes: an --out that cannot be written must fail now, not after them.
    check_writable_directory(args.out, "--out", files=OUTPUT_FILES)
    report = run_comparison(
        config=args.config,
        presets=args.presets,
        methods=args.methods,
        per_layer_methods=args.per_layer_methods,
        steps=args.steps,
        per_layer_steps=args.per_layer_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        text_files=args.text,
        seed=args.seed,
        eval_batches=args.eval_batches,
        log=print,
    )
    print()
    print(format_table(report["results"]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2) + "\n")
    paths = write_plots(report["results"], out_dir)
    print(f"\nwrote {out_dir / 'results.json'}, " + ", ".join(str(path) for path in paths))
    if args.estimate:
        from .estimate import format_estimate_table

        print("\nEstimated memory for the paper sizes (bf16, seq 256, batch 1, activation checkpointing):\n")
        print(format_estimate_table())
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    return 0
