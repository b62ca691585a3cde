"""``python -m lowrank_optim demo``: pretrain a tiny LLaMA with each optimizer and compare them.

Every method starts from the same initial weights and sees the same batches in the same order, with
the papers' schedule (cosine, 10% linear warmup, decay to 10% of the peak lr). Runs on a laptop CPU
in a few minutes with the defaults; the corpus is the Python standard library's own source code.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from . import GaLoreAdamW, optimizer_state_bytes, param_groups
from .data import ByteTokenizer, TokenStream, load_text_files, stdlib_corpus
from .models import LlamaConfig, LlamaForCausalLM

__all__ = [
    "METHOD_PRESETS",
    "add_arguments",
    "build_optimizer",
    "cosine_with_warmup",
    "format_table",
    "main",
    "run_demo",
]

#: Hyperparameters per method, one place so neither method is tuned more than the other: the GaLore
#: paper's 60M learning rates (AdamW 1e-3; GaLore 10x that with scale 0.25), rank = hidden / 4 (32 for
#: ``tiny``) and a projector refresh every 50 steps so a few-hundred-step run sees several.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-3},
    "galore": {"lr": 1e-2, "rank_fraction": 0.25, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std"},
}

WARMUP_FRACTION = 0.1
MIN_LR_RATIO = 0.1


def cosine_with_warmup(optimizer: Optimizer, total_steps: int) -> LambdaLR:
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak lr."""
    warmup_steps = max(1, round(WARMUP_FRACTION * total_steps))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, lr_factor)


def build_optimizer(method: str, model: LlamaForCausalLM) -> Optimizer:
    """The optimizer of ``method`` with its :data:`METHOD_PRESETS` hyperparameters."""
    preset = METHOD_PRESETS[method]
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=preset["lr"], weight_decay=0.0)
    if method == "galore":
        groups = param_groups(
            model,
            rank=max(1, int(model.config.hidden_size * preset["rank_fraction"])),
            update_proj_gap=preset["update_proj_gap"],
            scale=preset["scale"],
            proj_type=preset["proj_type"],
            target_modules=("attn", "mlp"),
        )
        return GaLoreAdamW(groups, lr=preset["lr"])
    raise ValueError(f"method ({method!r}) must be one of {sorted(METHOD_PRESETS)}")


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, stream: TokenStream, batch_size: int, max_batches: int) -> float:
    """Mean next-token loss over the first ``max_batches`` validation batches (the same every call)."""
    model.eval()
    total_loss, total_targets = 0.0, 0
    for batch in stream.eval_batches(batch_size, max_batches):
        num_targets = batch.shape[0] * (batch.shape[1] - 1)
        total_loss += model(batch, labels=batch).loss.item() * num_targets
        total_targets += num_targets
    model.train()
    return total_loss / total_targets


def _train_one(
    method: str,
    initial_model: LlamaForCausalLM,
    stream: TokenStream,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    eval_batches: int,
    log_every: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    model = copy.deepcopy(initial_model)
    model.train()
    optimizer = build_optimizer(method, model)
    scheduler = cosine_with_warmup(optimizer, steps)
    initial_eval_loss = evaluate(model, stream, batch_size, eval_batches)
    log(f"[{method}] initial eval loss {initial_eval_loss:.4f}")

    step_seconds = 0.0
    train_start = time.perf_counter()
    # A fresh iterator with the shared seed: every method trains on identical batches.
    batches = stream.train_batches(batch_size, seed)
    for step in range(1, steps + 1):
        batch = next(batches)
        loss = model(batch, labels=batch).loss
        loss.backward()
        step_start = time.perf_counter()
        optimizer.step()
        step_seconds += time.perf_counter() - step_start
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            log(f"[{method}] step {step}/{steps}  train loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}")
        scheduler.step()
    train_seconds = time.perf_counter() - train_start

    final_eval_loss = evaluate(model, stream, batch_size, eval_batches)
    log(f"[{method}] final eval loss {final_eval_loss:.4f}")
    return {
        "method": method,
        "hyperparameters": dict(METHOD_PRESETS[method]),
        "initial_eval_loss": initial_eval_loss,
        "final_eval_loss": final_eval_loss,
        "final_perplexity": math.exp(final_eval_loss),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "mean_step_ms": 1000.0 * step_seconds / steps,
        "tokens_per_s": steps * batch_size * stream.seq_len / train_seconds,
        "train_seconds": train_seconds,
    }


def run_demo(
    *,
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int = 128,
    config: str = "tiny",
    text_files: Sequence[str | os.PathLike[str]] = (),
    methods: Iterable[str] = ("adamw", "galore"),
    seed: int = 0,
    eval_batches: int = 8,
    log_every: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one model per method from the same start on the same batches; returns settings and results."""
    methods = list(methods)
    unknown = [method for method in methods if method not in METHOD_PRESETS]
    if unknown or not methods:
        raise ValueError(f"methods ({methods}) must be a non-empty list drawn from {sorted(METHOD_PRESETS)}")
    log_every = max(1, steps // 10) if log_every is None else log_every
    sizes = {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "eval_batches": eval_batches,
        "log_every": log_every,
    }
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} ({value}) must be >= 1")
    model_config = LlamaConfig.from_name_or_path(config)
    if model_config.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            f"vocab_size ({model_config.vocab_size}) of config {config!r} must be >= "
            f"{ByteTokenizer.vocab_size}, the byte tokenizer's vocabulary"
        )
    if seq_len + 1 > model_config.max_seq_len:
        # Each window carries one extra token: the target of the last position.
        raise ValueError(
            f"seq_len ({seq_len}) must be < max_seq_len ({model_config.max_seq_len}) of config {config!r}"
        )

    tokens = load_text_files(text_files) if text_files else stdlib_corpus()
    stream = TokenStream(tokens, seq_len)
    torch.manual_seed(seed)
    initial_model = LlamaForCausalLM(model_config)
    log(
        f"model {config}: {model_config.num_parameters() / 1e6:.2f}M parameters; corpus {len(tokens):,} tokens "
        f"({len(stream.val_tokens):,} held out); {steps} steps of {batch_size} x {seq_len} tokens"
    )
    results = [
        _train_one(
            method,
            initial_model,
            stream,
            steps=steps,
            batch_size=batch_size,
            seed=seed,
            eval_batches=eval_batches,
            log_every=log_every,
            log=log,
        )
        for method in methods
    ]
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "methods": methods,
        "config": config,
        "model_config": model_config.to_dict(),
        "text_files": [str(path) for path in text_files],
        "seed": seed,
        "eval_batches": eval_batches,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    return {"settings": settings, "results": results}


def _format_bytes(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per method, columns aligned."""
    header = ("method", "initial eval loss", "final eval loss", "final ppl", "optimizer state", "step ms", "tokens/s")
    rows = [
        (
            result["method"],
            f"{result['initial_eval_loss']:.4f}",
            f"{result['final_eval_loss']:.4f}",
            f"{result['final_perplexity']:.2f}",
            _format_bytes(result["optimizer_state_bytes"]),
            f"{result['mean_step_ms']:.2f}",
            f"{result['tokens_per_s']:,.0f}",
        )
        for result in results
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, rows)])


def _method_list(text: str) -> list[str]:
    methods = [method.strip() for method in text.split(",") if method.strip()]
    unknown = [method for method in methods if method not in METHOD_PRESETS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated list from {', '.join(METHOD_PRESETS)}")
    return methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument(
        "--steps", type=int, metavar="N", default=300, help="optimizer steps per method (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        default=16,
        help="sequences per step, also per eval batch (default: %(default)s)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        metavar="L",
        default=128,
        help="tokens per training sequence; must be below the config's max_seq_len (default: %(default)s)",
    )
    parser.add_argument(
        "--config",
        default="tiny",
        metavar="NAME_OR_JSON",
        help="model config: a packaged name (test, tiny, 60m, ...) or a path to a LlamaConfig JSON file "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--text",
        nargs="+",
        default=[],
        metavar="FILE",
        help="train on these files instead of the built-in corpus (Python stdlib source); "
        "a .jsonl file contributes the 'text' field of each line, any other file its raw bytes",
    )
    parser.add_argument(
        "--methods",
        type=_method_list,
        metavar="LIST",
        default=list(METHOD_PRESETS),
        help=f"comma-separated optimizers to compare, from: {', '.join(METHOD_PRESETS)} (default: all)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        default=0,
        help="seed of the initial weights and of the batch order, shared by all methods (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        metavar="N",
        default=8,
        help="validation batches per evaluation; always the same ones (default: %(default)s)",
    )
    parser.add_argument(
        "--log-every", type=int, metavar="N", help="print the training loss every N steps (default: steps / 10)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write settings and results to this JSON file")


def main(args: argparse.Namespace) -> int:
    """Run the demo from parsed ``args``, print the comparison table, optionally write JSON."""
    report = run_demo(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        config=args.config,
        text_files=args.text,
        methods=args.methods,
        seed=args.seed,
        eval_batches=args.eval_batches,
        log_every=args.log_every,
    )
    print()
    print(format_table(report["results"]))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0
