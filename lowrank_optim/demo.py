"""``compare`` / ``demo``: pretrain the same small LLaMA with each method and compare loss, speed and memory.

Every method starts from the same seed and sees the same batches, under the papers' schedule (cosine,
10% warmup, to 10% of the peak lr), with its preset from ``configs/presets/<size>.json``. The ``tiny``
presets' learning rates come from the same sweep for every method (``compare --sweep-lr``, recorded in
``bench/results/cpu-sweep-tiny-*.txt``); the other sizes keep the papers' rates. With ``seeds > 1`` each
method runs at seeds ``seed, seed + 1, ...`` (other initial weights and batch order, the same for every
method) and the table gives the mean ± sample std of the final eval loss. Per-layer variants do the same
arithmetic as their normal runs (bit-identical, see ``tests/test_per_layer.py``), so they run fewer
updates, once, only to measure their speed and memory.

Memory is reported twice: the allocator peak of the last training update at the training batch (there,
activations dominate on a tiny model), and the peak of one steady-state step at batch 1 with activation
checkpointing (the weight- and state-dominated regime that large models are in).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write, atomic_write_text, check_writable_directory
from .data import ByteTokenizer, TokenStream, load_text_files, stdlib_corpus
from .models import LlamaConfig
from .train.measure import measure_training_step
from .train.methods import check_methods_available, presets_for_config
from .train.pretrain import TrainSettings, check_window_fits, pretrain
from .train.sweep import mean_std

__all__ = [
    "DEFAULT_STEPS",
    "OUTPUT_FILES",
    "SWEEP_FILES",
    "format_table",
    "resolve_budget",
    "run_comparison",
    "run_sweep",
    "tokens_to_target",
    "write_plots",
]

#: What ``main`` writes into ``--out`` (each atomically: a killed run leaves the previous file or none).
OUTPUT_FILES = ("results.json", "loss_curves.png", "memory.png")
#: What ``compare --sweep-lr`` writes into ``--out``.
SWEEP_FILES = ("sweep.json", "sweep_lr.png")
#: Updates per run when neither steps nor a token budget is given.
DEFAULT_STEPS = 200
#: Seeds at each method's best learning rate in ``compare --sweep-lr`` unless ``--seeds`` says.
SWEEP_SEEDS = 2


def run_comparison(
    *,
    config: str = "tiny",
    presets: str | None = None,
    methods: Sequence[str] | None = None,
    per_layer_methods: Sequence[str] | None = None,
    steps: int | None = None,
    tokens_budget: int | None = None,
    per_layer_steps: int = 30,
    batch_size: int = 16,
    seq_len: int = 128,
    text_files: Sequence[str | os.PathLike[str]] = (),
    seed: int = 0,
    seeds: int = 1,
    eval_batches: int = 8,
    eval_every: int | None = None,
    target_loss: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train each method at ``seeds`` seeds (``seed``, ``seed + 1``, ...; each changes the initial weights
    and the batch order, the same for every method), each per-layer variant once for ``per_layer_steps``,
    and measure a step's peak.

    ``methods``/``per_layer_methods``: default every method the presets have. The budget is ``steps``
    updates (default 200) or ``tokens_budget`` training tokens (``tokens_budget // (batch_size ·
    seq_len)`` updates, the same for every method: equal tokens, equal model FLOPs per token for the
    dense methods). ``eval_every``: updates between evaluations (default a quarter of the run).
    ``target_loss``: also report when each run's eval loss first reached it (tokens and seconds at the
    run's throughput), at the resolution of ``eval_every``.
    """
    if seeds < 1:
        raise ValueError(f"seeds ({seeds}) must be >= 1")
    if target_loss is not None and not (math.isfinite(target_loss) and target_loss > 0):
        raise ValueError(f"target_loss ({target_loss!r}) must be a finite number > 0 (nats)")
    steps = resolve_budget(steps, tokens_budget, batch_size, seq_len)
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every ({eval_every}) must be >= 1")
    model_config, method_presets, presets_name, tokens, stream = _setup(config, presets, seq_len, text_files, log)
    methods = list(method_presets) if methods is None else list(methods)
    per_layer_methods = list(method_presets) if per_layer_methods is None else list(per_layer_methods)
    check_methods_available(methods, method_presets, presets_name, "methods")
    check_methods_available(per_layer_methods, method_presets, presets_name, "per_layer_methods")
    tokens_per_update = batch_size * seq_len
    log(
        f"model {config}: {model_config.num_parameters() / 1e6:.2f}M dense parameters; corpus {len(tokens):,} tokens "
        f"({len(stream.val_tokens):,} held out); {steps} updates x {batch_size} x {seq_len} = {steps * tokens_per_update:,} "
        f"tokens per run; seeds {list(range(seed, seed + seeds))}; {torch.get_num_threads()} threads"
    )
    runs = [(method, False, steps, seed + k) for method in methods for k in range(seeds)]
    runs += [(method, True, per_layer_steps, seed) for method in per_layer_methods]
    results = []
    peaks: dict[tuple[str, bool], int | None] = {}
    for index, (method, per_layer, run_steps, run_seed) in enumerate(runs, start=1):
        variant = " with per-layer updates" if per_layer else ""
        log(f"method {index} of {len(runs)}: {method}{variant}, {run_steps} updates, seed {run_seed}")
        # Four evaluations along the way by default, so the eval curve is a curve and not a line.
        settings = TrainSettings(
            steps=run_steps, batch_size=batch_size, seq_len=seq_len, per_layer=per_layer, eval_batches=eval_batches,
            seed=run_seed, eval_every=min(eval_every or max(1, run_steps // 4), run_steps),
        )
        result = pretrain(model_config, method_presets[method], stream, settings, log=log)
        if (method, per_layer) not in peaks:  # the step's memory does not depend on the seed
            peaks[(method, per_layer)] = measure_training_step(
                model_config,
                method_presets[method],
                per_layer=per_layer,
                batch_size=1,
                seq_len=seq_len,
                gradient_checkpointing=True,
                seed=seed,
            ).peak
        result["steps"] = run_steps
        result["seed"] = run_seed
        result["peak_bytes_batch1_checkpointed"] = peaks[(method, per_layer)]
        if target_loss is not None:
            result["target_loss"] = target_loss
            result["tokens_to_target"] = tokens_to_target(result["eval_curve"], target_loss, tokens_per_update)
        results.append(result)
    settings_out = {
        "config": config,
        "presets": presets_name,
        "model_config": model_config.to_dict(),
        "steps": steps,
        "tokens_per_run": steps * tokens_per_update,
        "per_layer_steps": per_layer_steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "text_files": [str(path) for path in text_files],
        "seed": seed,
        "seeds": list(range(seed, seed + seeds)),
        "target_loss": target_loss,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    return {"settings": settings_out, "results": results}


def resolve_budget(steps: int | None, tokens_budget: int | None, batch_size: int, seq_len: int) -> int:
    """Updates per run from ``steps`` or ``tokens_budget`` (at most one may be given; neither: 200)."""
    if steps is not None and tokens_budget is not None:
        raise ValueError(
            f"steps ({steps}) and tokens_budget ({tokens_budget}) both set the budget; give one "
            "(tokens_budget = steps x batch_size x seq_len)"
        )
    if tokens_budget is None:
        steps = DEFAULT_STEPS if steps is None else steps
        if steps < 1:
            raise ValueError(f"steps ({steps}) must be >= 1")
        return steps
    per_update = batch_size * seq_len
    if tokens_budget < per_update:
        raise ValueError(
            f"tokens_budget ({tokens_budget:,}) is less than one update ({batch_size} x {seq_len} = {per_update:,} tokens)"
        )
    return tokens_budget // per_update


def tokens_to_target(eval_curve: Sequence[Sequence[float]], target: float, tokens_per_update: int) -> int | None:
    """Training tokens at the first evaluation whose loss is at most ``target`` (``None``: never)."""
    for step, loss in eval_curve:
        if loss <= target:
            return int(step) * tokens_per_update
    return None


def _mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.2f}"


def _grouped(results: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The runs of each method (its seeds), in the order the methods first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["method"], []).append(result)
    return list(groups.values())


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per method (its seeds summarised: mean ± sample std of the final eval loss, the mean
    throughput), columns aligned; memory in MiB. With a target loss: tokens and seconds to reach it
    (mean over the seeds that did; ``k/n`` when only some did)."""
    target = next((r["target_loss"] for r in results if r.get("target_loss") is not None), None)
    header = [
        "method", "updates", "seeds", "initial loss", "final eval loss", "ppl", "tokens/s", "state MiB",
        "peak MiB (train batch)", "peak MiB (b=1, ckpt)",
    ]
    if target is not None:
        header += [f"tokens to {target:g}", f"s to {target:g}"]
    rows = []
    for runs in _grouped(results):
        first = runs[0]
        final = [run["final_eval_loss"] for run in runs]
        mean, spread = mean_std(final)
        loss = f"{mean:.4f}" + (f" ± {spread:.4f}" if len(runs) > 1 else "")
        row = [
            first["method"],
            str(first["steps"]),
            ",".join(str(run.get("seed", "-")) for run in runs),
            f"{statistics.fmean(run['initial_eval_loss'] for run in runs):.4f}",
            loss,
            f"{math.exp(mean):.2f}",
            f"{statistics.fmean(run['tokens_per_s'] for run in runs):,.0f}",
            _mib(first["optimizer_state_bytes"]),
            _mib(first["peak_bytes"]),
            _mib(first["peak_bytes_batch1_checkpointed"]),
        ]
        if target is not None:
            reached = [run for run in runs if run.get("tokens_to_target") is not None]
            if not reached:
                row += ["not reached", "-"]
            else:
                share = "" if len(reached) == len(runs) else f" ({len(reached)}/{len(runs)})"
                row += [
                    f"{statistics.fmean(run['tokens_to_target'] for run in reached):,.0f}{share}",
                    f"{statistics.fmean(run['tokens_to_target'] / run['tokens_per_s'] for run in reached):.1f}",
                ]
        rows.append(row)
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
    from .train.sweep import DEFAULT_OFFSETS, sweep_learning_rates

    if args.target_loss is not None or args.eval_every is not None or args.per_layer_methods is not None:
        given = [name for name, value in (("--target-loss", args.target_loss), ("--eval-every", args.eval_every),
                                          ("--per-layer-methods", args.per_layer_methods)) if value is not None]
        raise ValueError(f"{', '.join(given)}: not used by --sweep-lr (it reports each run's final eval loss)")
    steps = resolve_budget(args.steps, args.tokens_budget, args.batch_size, args.seq_len)
    model_config, presets, presets_name, _, stream = _setup(args.config, args.presets, args.seq_len, args.text, log)
    methods = list(presets) if args.methods is None else args.methods
    check_methods_available(methods, presets, presets_name, "--methods")
    settings = TrainSettings(steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             eval_batches=args.eval_batches, seed=args.seed, measure_memory=False)
    seeds = SWEEP_SEEDS if args.seeds is None else args.seeds
    offsets = DEFAULT_OFFSETS if args.sweep_offsets is None else args.sweep_offsets
    report = sweep_learning_rates(model_config, presets, stream, settings, methods, offsets=offsets, seeds=seeds,
                                  grid_seeds=args.grid_seeds or 1, field=args.sweep_field or "lr", log=log)
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
    first_seed: dict[str, int | None] = {}
    for result in results:
        first_seed.setdefault(result["method"], result.get("seed"))
    for result in results:
        if "per-layer" in result["method"] or result.get("seed") != first_seed[result["method"]]:
            continue  # per-layer: the normal run's losses, by construction; further seeds would crowd the plot
        steps, losses = zip(*result["train_curve"])
        line = axis.plot(steps, losses, alpha=0.5, label=f"{result['method']} (train)")[0]
        eval_steps, eval_losses = zip(*result["eval_curve"])
        axis.plot(eval_steps, eval_losses, "o-", color=line.get_color(), label=f"{result['method']} (eval)")
    axis.set_xlabel("update")
    axis.set_ylabel("next-token loss (nats)")
    axis.set_title("Pretraining loss per method (each method's first seed)")
    axis.legend(fontsize=8)
    loss_path = out_dir / "loss_curves.png"
    _save_figure(figure, loss_path)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(9, 5))
    runs = [group[0] for group in _grouped(results)]  # memory does not depend on the seed: one bar per method
    names = [run["method"] for run in runs]
    parts = {
        "weights": [r["weight_bytes"] for r in runs],
        "optimizer state": [r["optimizer_state_bytes"] for r in runs],
        "gradients": [r["gradient_bytes"] for r in runs],
    }
    parts["activations + temporaries"] = [
        max(0, (r["peak_bytes"] or 0) - r["weight_bytes"] - r["optimizer_state_bytes"] - r["gradient_bytes"]) for r in runs
    ]
    bottom = [0.0] * len(runs)
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
    for option, value in (("--sweep-offsets", args.sweep_offsets), ("--grid-seeds", args.grid_seeds),
                          ("--sweep-field", args.sweep_field)):
        if value is not None and not args.sweep_lr:
            raise ValueError(f"{option} sets the grid of --sweep-lr; add --sweep-lr or leave it out")
    if args.sweep_lr:
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
        tokens_budget=args.tokens_budget,
        per_layer_steps=args.per_layer_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        text_files=args.text,
        seed=args.seed,
        seeds=args.default_seeds if args.seeds is None else args.seeds,
        eval_batches=args.eval_batches,
        eval_every=args.eval_every,
        target_loss=args.target_loss,
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
