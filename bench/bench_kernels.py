"""Compiled kernels vs their pure-PyTorch references on LLaMA-1B shapes, in one run.

Shapes: SLTrain's sparse ops on a 2048 x 5461 dense matrix with a 3 % support (delta 0.03, int32
indices); the low-rank Adam update on rank-512 moments, 512 x 5461 (right-projected MLP weight) and
2048 x 512 (left-projected); Fira's residual on the 2048 x 5461 weight, left-projected (rank-512
moments 512 x 5461) and, transposed, right-projected (5461 x 512); the DCT top-512 selection from a
2048 x 5461 transformed gradient. Every repeat times each case's kernel and reference back to back
(interleaved, so that load from other processes hits both alike; which goes first alternates, since
the first finds its operands evicted by the previous case and warms them for the second) and the
medians are reported, with the speed-up ``reference / kernel``. With ``--device cuda`` it also reports the achieved bandwidth
(bytes the op must move / time) as a fraction of the card's peak.

    python bench/bench_kernels.py [--device cpu|cuda] [--repeats 16] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

# Idle OpenMP workers sleep instead of spinning: on a shared, oversubscribed CPU a spinning team of one
# op starves the next op's threads, which distorts whichever op runs second. Applies to kernel and
# reference alike; must be set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lowrank_optim.ops import kernel_load_error, kernels_available  # noqa: E402
from lowrank_optim.ops.adam import _adam_default  # noqa: E402
from lowrank_optim.ops.dct import _dct_topk_default  # noqa: E402
from lowrank_optim.ops.fira import _fira_default  # noqa: E402
from lowrank_optim.ops.sparse import _gather_default, _scatter_add_default  # noqa: E402

HIDDEN, INTERMEDIATE, RANK, DELTA = 2048, 5461, 512, 0.03

# Peak DRAM bandwidth in bytes/s, by a substring of torch.cuda.get_device_name (checked in order).
PEAK_BANDWIDTH = [
    ("H100 PCIe", 2.0e12, "H100 PCIe (HBM2e, 2.0 TB/s)"),
    ("H100 NVL", 3.9e12, "H100 NVL (HBM3, 3.9 TB/s)"),
    ("H100", 3.35e12, "H100 SXM (HBM3, 3.35 TB/s)"),
    ("H200", 4.8e12, "H200 (HBM3e, 4.8 TB/s)"),
    ("A100-SXM4-80GB", 2.04e12, "A100 SXM 80GB (2.04 TB/s)"),
    ("A100", 1.56e12, "A100 40GB (1.56 TB/s)"),
]


@dataclass
class Case:
    name: str
    kernel: Callable[[], object]
    reference: Callable[[], object]
    bytes_moved: int  # what the op must read and write at least


def _cases(device: torch.device) -> list[Case]:
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(HIDDEN, INTERMEDIATE, generator=generator).to(device)
    nnz = int(DELTA * dense.numel())
    indices = torch.randperm(dense.numel(), generator=generator)[:nnz].sort().values.to(torch.int32).to(device)
    values = torch.randn(nnz, generator=generator).to(device)
    ops = torch.ops.lowrank_optim
    cases = [
        Case(
            f"sparse_scatter_add_ {HIDDEN}x{INTERMEDIATE} nnz={nnz} fp32/int32",
            lambda: ops.sparse_scatter_add_(dense, indices, values, 1e-3),
            lambda: _scatter_add_default(dense, indices, values, 1e-3),
            nnz * (4 + 4 + 4 + 4),  # index, value, dense read + write
        ),
        Case(
            f"sparse_gather {HIDDEN}x{INTERMEDIATE} nnz={nnz} fp32/int32",
            lambda: ops.sparse_gather(dense, indices),
            lambda: _gather_default(dense, indices),
            nnz * (4 + 4 + 4),  # index, dense read, output write
        ),
    ]
    for rows, cols in ((RANK, INTERMEDIATE), (HIDDEN, RANK)):
        for dtype in (torch.float32, torch.bfloat16):
            lowrank, exp_avg, exp_avg_sq = (torch.randn(rows, cols, generator=generator).to(device, dtype) for _ in range(3))
            exp_avg_sq.abs_()
            normalized = torch.empty_like(exp_avg)
            args = (lowrank, exp_avg, exp_avg_sq, normalized, 0.9, 0.999, 1e-6)
            cases.append(
                Case(
                    f"lowrank_adam_ {rows}x{cols} {str(dtype).removeprefix('torch.')}",
                    lambda args=args: ops.lowrank_adam_(*args),
                    lambda args=args: _adam_default(*args),
                    lowrank.numel() * lowrank.element_size() * 6,  # R read, M and V read + write, N write
                )
            )
    # Limiter "on": the stored norm starts at 1, far below the residual's, so every call is limited (the
    # kernel's second pass divides). "off": it starts huge, so the limiter is exactly 1 on every call
    # (the residual's norm does not grow between repeats) and the kernel skips its second pass.
    for (rows, cols), dim, dtype, limiter in (
        ((HIDDEN, INTERMEDIATE), 0, torch.float32, "on"),
        ((INTERMEDIATE, HIDDEN), 1, torch.float32, "on"),
        ((HIDDEN, INTERMEDIATE), 0, torch.bfloat16, "on"),
        ((INTERMEDIATE, HIDDEN), 1, torch.float32, "off"),
    ):
        grad, back = (torch.randn(rows, cols, generator=generator).to(device, dtype) for _ in range(2))
        lowrank_shape = (RANK, cols) if dim == 0 else (rows, RANK)
        lowrank, normalized = (torch.randn(lowrank_shape, generator=generator).to(device) for _ in range(2))
        start = 1.0 if limiter == "on" else 1e30
        states = [torch.full((), start, device=device) for _ in range(2)]
        # Each call overwrites `back` with a residual of the same scale, so repeats see like values.
        args = [(grad, back, normalized, lowrank, state, dim, 0.25, 1.01, False, 1.0) for state in states]
        element = grad.element_size()
        passes = 5 if limiter == "on" else 3  # G, B read + S write; S read + write (limited only)
        cases.append(
            Case(
                f"fira_residual_ {rows}x{cols} r={RANK} dim={dim} {str(dtype).removeprefix('torch.')} lim {limiter}",
                lambda args=args[0]: ops.fira_residual_(*args),
                lambda args=args[1]: _fira_default(*args),
                rows * cols * element * passes + lowrank.numel() * 4 * 2,  # ... and N, R
            )
        )
    transformed = torch.randn(HIDDEN, INTERMEDIATE, generator=generator).to(device)
    cases.append(
        Case(
            f"dct_topk {HIDDEN}x{INTERMEDIATE} r={RANK} fp32",
            lambda: ops.dct_topk(transformed, RANK, 0),
            lambda: _dct_topk_default(transformed, RANK, 0),
            transformed.numel() * 4,
        )
    )
    return cases


def _time(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - begin) / inner


def _peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "n/a"
    name = torch.cuda.get_device_name(device)
    for key, peak, label in PEAK_BANDWIDTH:
        if key in name:
            return peak, label
    return None, f"unknown peak for {name!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=16, help="interleaved measurements per case (median; even, so each goes first equally often)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not kernels_available(device):
        print(f"no compiled kernels for {device.type}: {kernel_load_error(device)}", file=sys.stderr)
        return 1
    inner = 20 if device.type == "cuda" else 3
    cases = _cases(device)
    for case in cases:  # warm up (allocator, caches, first-call dispatch)
        for fn in (case.kernel, case.reference):
            _time(fn, device, 2)
    samples: dict[str, tuple[list[float], list[float]]] = {case.name: ([], []) for case in cases}
    for repeat in range(args.repeats):
        for case in cases:
            # Whichever runs first after the previous case finds its operands evicted from the caches and
            # warms them for the other; alternating the order shares that cost evenly.
            kernel_first = repeat % 2 == 0
            if kernel_first:
                samples[case.name][0].append(_time(case.kernel, device, inner))
            samples[case.name][1].append(_time(case.reference, device, inner))
            if not kernel_first:
                samples[case.name][0].append(_time(case.kernel, device, inner))

    peak, peak_label = _peak_bandwidth(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}; median of {args.repeats} interleaved repeats")
    if device.type == "cuda":
        print(f"peak bandwidth assumed: {peak_label}")
    header = f"{'case':<60} {'kernel ms':>10} {'reference ms':>13} {'speed-up':>9}"
    if device.type == "cuda":
        header += f" {'GB/s':>8} {'of peak':>8}"
    print(header)
    rows = []
    for case in cases:
        kernel_s = statistics.median(samples[case.name][0])
        reference_s = statistics.median(samples[case.name][1])
        row = dict(case=case.name, kernel_ms=kernel_s * 1e3, reference_ms=reference_s * 1e3,
                   speedup=reference_s / kernel_s, bytes_moved=case.bytes_moved)
        line = f"{case.name:<60} {row['kernel_ms']:>10.3f} {row['reference_ms']:>13.3f} {row['speedup']:>8.2f}x"
        if device.type == "cuda":
            row["bandwidth_gbs"] = case.bytes_moved / kernel_s / 1e9
            line += f" {row['bandwidth_gbs']:>8.0f}"
            if peak is not None:
                row["fraction_of_peak"] = case.bytes_moved / kernel_s / peak
                line += f" {row['fraction_of_peak']:>7.0%}"
        print(line)
        rows.append(row)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(dict(device=device_name, torch=torch.__version__, cuda=torch.version.cuda,
                           peak_bandwidth=peak_label, repeats=args.repeats, results=rows), file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
