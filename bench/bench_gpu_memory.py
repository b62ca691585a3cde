"""Peak memory and tokens/s of a few LLaMA training steps per method and size (``make bench-gpu``).

For an NVIDIA GPU: bf16 weights and states, seq 256, activation checkpointing from 1B on, batch 1 for
the larger sizes; peak = ``torch.cuda.max_memory_allocated`` of a steady-state step (after one warm-up
step has created the optimizer state). Writes ``bench/results/gpu-memory-<date>.md`` and ``.json``.
``--dry-run`` runs the same code on the CPU with the ``test`` config, in fp32, for a smoke test.

The runs include the papers' 7B memory configurations with 8-bit moments (``moment_format="8bit"`` on
every parameter: 8-bit Adam, 8-bit GaLore with and without per-layer updates, 8-bit SLTrain per-layer),
whose published peaks (SLTrain Fig. 3, GaLore Fig. 4; ``lowrank_optim.estimate.PAPER_7B_RUNS``) are
printed beside them. The measured optimizer-state bytes must equal the estimate's exactly.
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

from lowrank_optim.estimate import PAPER_7B_RUNS, estimate_memory  # noqa: E402
from lowrank_optim.models import LlamaConfig  # noqa: E402
from lowrank_optim.train.measure import measure_training_step  # noqa: E402
from lowrank_optim.train.methods import load_presets  # noqa: E402

#: (size, batch size, activation checkpointing); 7B at batch 1 with checkpointing as in the papers' 80 GB runs.
SIZES = (("60m", 8, False), ("350m", 4, False), ("1b", 2, True), ("7b", 1, True))
#: (method, per-layer updates, moment format).
RUNS = (
    ("adamw", False, "full"), ("galore", False, "full"), ("galore", True, "full"), ("dct", False, "full"),
    ("sltrain", False, "full"), ("sltrain", True, "full"),
    ("adamw", False, "8bit"), ("adamw", True, "8bit"), ("galore", False, "8bit"), ("galore", True, "8bit"),
    ("sltrain", True, "8bit"),
)
#: Published 7B peaks (GB) by (method, per-layer, moment format).
PUBLISHED_7B = {
    (run.method, run.per_layer, run.moment_format): run.published_peak
    for run in PAPER_7B_RUNS
    if run.published_peak is not None
}


def run(
    sizes: tuple[tuple[str, int, bool], ...], device: str, dtype: torch.dtype, seq_len: int, steps: int,
    runs: tuple[tuple[str, bool, str], ...] = RUNS,
) -> list[dict]:
    rows = []
    for size, batch_size, checkpointing in sizes:
        config = LlamaConfig.from_name_or_path(size)
        presets = load_presets(size)
        for method, per_layer, moment_format in runs:
            name = ("8-bit " if moment_format == "8bit" else "") + method + ("+per-layer" if per_layer else "")
            row = {"size": size, "method": name, "moment_format": moment_format, "per_layer": per_layer,
                   "batch_size": batch_size, "seq_len": seq_len, "checkpointing": checkpointing}
            if size == "7b" and (method, per_layer, moment_format) in PUBLISHED_7B:
                row["published_peak_gb"] = PUBLISHED_7B[method, per_layer, moment_format]
            try:
                measured = measure_training_step(
                    config, presets[method], per_layer=per_layer, batch_size=batch_size, seq_len=seq_len,
                    device=device, dtype=dtype, gradient_checkpointing=checkpointing, timed_steps=steps,
                    moment_format=moment_format,
                )
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            else:
                estimate = estimate_memory(config, presets[method], dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                                           gradient_checkpointing=checkpointing, per_layer=per_layer,
                                           moment_format=moment_format)
                row |= {
                    "peak_gb": measured.peak / 1e9,
                    "estimated_gb": estimate.total / 1e9,
                    "weights_gb": measured.weights / 1e9,
                    "states_gb": measured.optimizer_states / 1e9,
                    "states_exact": measured.optimizer_states == estimate.state_bytes,
                    "tokens_per_s": batch_size * seq_len / measured.step_seconds,
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return rows


def to_markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"Device: {device_name}; torch {torch.__version__}", "",
             "| size | method | batch x seq | ckpt | peak GB | published peak GB | estimated GB | weights GB | "
             "states GB | states = estimate | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        published = f"{row['published_peak_gb']:.1f}" if "published_peak_gb" in row else ""
        if "error" in row:
            lines.append(f"| {row['size']} | {row['method']} | {row['batch_size']} x {row['seq_len']} | "
                         f"{row['checkpointing']} | {row['error']} | {published} | | | | | |")
        else:
            lines.append(f"| {row['size']} | {row['method']} | {row['batch_size']} x {row['seq_len']} | {row['checkpointing']} | "
                         f"{row['peak_gb']:.2f} | {published} | {row['estimated_gb']:.2f} | {row['weights_gb']:.2f} | "
                         f"{row['states_gb']:.2f} | {'yes' if row['states_exact'] else 'NO'} | {row['tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, test config, fp32: checks the script end to end")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run after the measured one (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output directory")
    parser.add_argument("--moments", choices=("all", "full", "8bit"),
                        help="which runs: all, the full-precision ones or the 8-bit ones (default: all; with --dry-run "
                        "full, the 8-bit steps being slow on the CPU, whose quantization ops are pure PyTorch)")
    args = parser.parse_args(argv)
    moments = args.moments or ("full" if args.dry_run else "all")
    runs = tuple(entry for entry in RUNS if moments in ("all", entry[2]))
    if args.dry_run:
        sizes, device, dtype, seq_len, device_name = (("test", 2, True),), "cpu", torch.float32, 32, "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --dry-run to check the script on the CPU")
        sizes, device, dtype, seq_len = SIZES, "cuda", torch.bfloat16, 256
        device_name = torch.cuda.get_device_name()
    start = time.perf_counter()
    rows = run(sizes, device, dtype, seq_len, args.steps, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-memory-dry-run" if args.dry_run else f"gpu-memory-{datetime.date.today().isoformat()}"
    if args.moments not in (None, "all"):
        stem += f"-{args.moments}"
    (args.out / f"{stem}.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(rows, device_name))
    print(to_markdown(rows, device_name))
    print(f"wrote {args.out / stem}.md/.json in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
