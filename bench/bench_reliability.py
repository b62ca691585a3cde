"""What the reliability checks cost on the hot paths, each as a ratio against a baseline run in this process.

1. Sparse kernels (SLTrain, LLaMA-1B MLP shape 2048 x 5461, 3 % support, int32): the compiled
   ``sparse_scatter_add_`` / ``sparse_gather``, which now check every index (range and order) before they
   touch ``dense``, against ATen's ``index_add_`` / ``index_select`` on the same tensors (which our
   changes do not touch). Run this script on a build from before the checks and on one after: the
   change of the ratio is the checks' cost.
2. Optimizer steps (LLaMA-60M's 56 projected matrices, rank 128, plus an embedding-sized full-rank
   parameter, 32000 x 512, fp32, no refresh): ``nonfinite="skip"`` (the default: a NaN/Inf flag per
   parameter, decided on the device, and masked arithmetic where no kernel does it) against
   ``nonfinite="propagate"`` (the arithmetic without any flag), for every implementation. Needs a build
   with the ``nonfinite`` option; skipped otherwise.

Steps and kernels are timed interleaved (A, B, B, A, ...) and medians reported.

    python bench/bench_reliability.py [--repeats 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_kernels.py: fair to whichever runs second

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW  # noqa: E402
from lowrank_optim.ops import kernel_load_error, kernels_available  # noqa: E402

HIDDEN, INTERMEDIATE, DELTA = 2048, 5461, 0.03
LAYER_SHAPES = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
LAYERS, RANK, VOCAB = 8, 128, 32000


def _time(fn: Callable[[], object], inner: int) -> float:
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - begin) / inner


def _interleaved(first: Callable[[], object], second: Callable[[], object], repeats: int, inner: int) -> tuple[float, float]:
    for fn in (first, second):
        _time(fn, 1)
    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(repeats):
        order = (0, 1) if repeat % 2 == 0 else (1, 0)
        for which in order:
            times[which].append(_time((first, second)[which], inner))
    return statistics.median(times[0]), statistics.median(times[1])


def sparse_rows(repeats: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(HIDDEN, INTERMEDIATE, generator=generator)
    nnz = int(DELTA * dense.numel())
    indices = torch.randperm(dense.numel(), generator=generator)[:nnz].sort().values.to(torch.int32)
    values = torch.randn(nnz, generator=generator)
    ops = torch.ops.lowrank_optim
    flat = dense.view(-1)
    cases = [
        ("sparse_scatter_add_", lambda: ops.sparse_scatter_add_(dense, indices, values, 1e-3),
         "index_add_", lambda: flat.index_add_(0, indices, values, alpha=1e-3)),
        ("sparse_gather", lambda: ops.sparse_gather(dense, indices),
         "index_select", lambda: flat.index_select(0, indices)),
    ]
    rows = []
    for name, kernel, baseline_name, baseline in cases:
        kernel_s, baseline_s = _interleaved(kernel, baseline, repeats, inner=5)
        rows.append(dict(case=f"{name} {HIDDEN}x{INTERMEDIATE} nnz={nnz} fp32/int32", kernel_ms=kernel_s * 1e3,
                         baseline=baseline_name, baseline_ms=baseline_s * 1e3, ratio=kernel_s / baseline_s))
    return rows


def _optimizer(kind: str) -> torch.optim.Optimizer:
    generator = torch.Generator().manual_seed(0)
    matrices = [nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02)) for shape in LAYER_SHAPES * LAYERS]
    embedding = nn.Parameter(torch.randn(VOCAB, 512, generator=generator).mul_(0.02))
    params = matrices + [embedding]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    name, _, implementation = kind.partition(" ")
    options = {"": {}, "fused=False": {"fused": False}, "foreach": {"foreach": True}}[implementation]
    cls = {"GaLoreAdamW": GaLoreAdamW, "FiraAdamW": FiraAdamW, "DCTAdamW": DCTAdamW}[name]
    groups = [{"params": [embedding]}, {"params": matrices, "rank": RANK, "update_proj_gap": 10**6, "scale": 0.25}]
    optimizer = cls(groups, lr=1e-3, weight_decay=0.01, **options)
    optimizer.step()  # state and the first projectors; later steps are plain ones
    return optimizer


def step_rows(repeats: int) -> list[dict]:
    kinds = ["GaLoreAdamW", "GaLoreAdamW fused=False", "GaLoreAdamW foreach", "FiraAdamW", "FiraAdamW fused=False",
             "DCTAdamW"]
    rows = []
    for kind in kinds:
        # One optimizer whose groups switch policy between steps: the same tensors in the same memory for
        # both, so only the policy differs.
        optimizer = _optimizer(kind)

        def step_with(policy: str, optimizer: torch.optim.Optimizer = optimizer) -> None:
            for group in optimizer.param_groups:
                group["nonfinite"] = policy
            optimizer.step()

        skip_s, propagate_s = _interleaved(lambda: step_with("skip"), lambda: step_with("propagate"), repeats, inner=1)
        rows.append(dict(case=kind, skip_ms=skip_s * 1e3, propagate_ms=propagate_s * 1e3, ratio=skip_s / propagate_s))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=12, help="interleaved measurements per case (median)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; median of {args.repeats} interleaved repeats")
    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats}
    if kernels_available("cpu"):
        result["sparse"] = sparse_rows(args.repeats)
        print(f"\n{'kernel':<58} {'ms':>8} {'ATen baseline':>14} {'ms':>8} {'kernel/ATen':>12}")
        for row in result["sparse"]:
            print(f"{row['case']:<58} {row['kernel_ms']:8.3f} {row['baseline']:>14} {row['baseline_ms']:8.3f} "
                  f"{row['ratio']:11.3f}x")
    else:
        print(f"no compiled CPU kernels ({kernel_load_error('cpu')}): sparse part skipped")
    if "nonfinite" in inspect.signature(GaLoreAdamW).parameters:
        result["steps"] = step_rows(args.repeats)
        print(f"\n{'optimizer (56 matrices + 32000x512 full-rank)':<46} {'skip ms':>9} {'propagate ms':>13} {'skip/propagate':>15}")
        for row in result["steps"]:
            print(f"{row['case']:<46} {row['skip_ms']:9.2f} {row['propagate_ms']:13.2f} {row['ratio']:14.3f}x")
    else:
        print("\nthis build has no nonfinite option: step part skipped")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
