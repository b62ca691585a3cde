"""Peak memory and tokens/s of a few LLaMA training steps per method and size (``make bench-gpu``).

For an NVIDIA GPU: bf16 weights and states, seq 256, activation checkpointing from 1B on, batch 1 for
the larger sizes; peak = ``torch.cuda.max_memory_allocated`` of a steady-state step (after one warm-up
step has created the optimizer state). Writes ``bench/results/gpu-memory-<date>.md`` and ``.json``.
``--dry-run`` runs the same code on the CPU with the ``test`` config, in fp32, for a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowrank_optim.estimate import estimate_memory  # noqa: E402
from lowrank_optim.models import LlamaConfig  # noqa: E402
from lowrank_optim.train.measure import measure_training_step  # noqa: E402
from lowrank_optim.train.methods import load_presets  # noqa: E402

#: (size, batch size, activation checkpointing); 7B at batch 1 with checkpointing as in the papers' 80 GB runs.
SIZES = (("60m", 8, False), ("350m", 4, False), ("1b", 2, True), ("7b", 1, True))
RUNS = (("adamw", False), ("galore", False), ("galore", True), ("dct", False), ("sltrain", False), ("sltrain", True))


def run(sizes: tuple[tuple[str, int, bool], ...], device: str, dtype: torch.dtype, seq_len: int, steps: int) -> list[dict]:
    rows = []
    for size, batch_size, checkpointing in sizes:
        config = LlamaConfig.from_name_or_path(size)
        presets = load_presets(size)
        for method, per_layer in RUNS:
            name = method + ("+per-layer" if per_layer else "")
            row = {"size": size, "method": name, "batch_size": batch_size, "seq_len": seq_len, "checkpointing": checkpointing}
            try:
                measured = measure_training_step(
                    config, presets[method], per_layer=per_layer, batch_size=batch_size, seq_len=seq_len,
                    device=device, dtype=dtype, gradient_checkpointing=checkpointing, timed_steps=steps,
                )
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            else:
                estimate = estimate_memory(config, presets[method], dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                                           gradient_checkpointing=checkpointing, per_layer=per_layer)
                row |= {
                    "peak_gb": measured.peak / 1e9,
                    "estimated_gb": estimate.total / 1e9,
                    "weights_gb": measured.weights / 1e9,
                    "states_gb": measured.optimizer_states / 1e9,
                    "tokens_per_s": batch_size * seq_len / measured.step_seconds,
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def to_markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"Device: {device_name}; torch {torch.__version__}", "",
             "| size | method | batch x seq | ckpt | peak GB | estimated GB | weights GB | states GB | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['method']} | {row['batch_size']} x {row['seq_len']} | "
                         f"{row['checkpointing']} | {row['error']} | | | | |")
        else:
            lines.append(f"| {row['size']} | {row['method']} | {row['batch_size']} x {row['seq_len']} | {row['checkpointing']} | "
                         f"{row['peak_gb']:.2f} | {row['estimated_gb']:.2f} | {row['weights_gb']:.2f} | "
                         f"{row['states_gb']:.2f} | {row['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, test config, fp32: checks the script end to end")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run after the measured one (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output directory")
    args = parser.parse_args(argv)
    if args.dry_run:
        sizes, device, dtype, seq_len, device_name = (("test", 2, True),), "cpu", torch.float32, 32, "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --dry-run to check the script on the CPU")
        sizes, device, dtype, seq_len = SIZES, "cuda", torch.bfloat16, 256
        device_name = torch.cuda.get_device_name()
    start = time.perf_counter()
    rows = run(sizes, device, dtype, seq_len, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-memory-dry-run" if args.dry_run else f"gpu-memory-{datetime.date.today().isoformat()}"
    (args.out / f"{stem}.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(rows, device_name))
    print(to_markdown(rows, device_name))
    print(f"wrote {args.out / stem}.md/.json in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
