"""8-bit blockwise Adam moments (``blockwise_adam_``) against fp32 moments (``lowrank_adam_``), same shapes.

For each shape of the low-rank moments (``--shapes``, default 4096x128, 1024x4096, 32000x512) it times, in
one process and interleaved per repeat (the order rotating, so that no case always finds its operands
warmed by another):

- ``blockwise_adam_`` through the compiled kernel (``fused=True``) and its pure-PyTorch default
  (``fused=False``), on uint8 codes with one fp32 maximum per ``--block-size`` block;
- ``lowrank_adam_`` (compiled kernel) on fp32 moments of the same shape: what the 8-bit state replaces.

It prints the medians, the ratios (8-bit kernel / fp32 kernel: the cost of the quantization; default /
kernel), and the state's bytes: ``(n + 4·blocks)·2`` for the two quantized moments against ``8·n``.

    python bench/bench_quant.py [--threads 2] [--repeats 12] [--block-size 256] [--shapes 4096x128 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

# Idle OpenMP workers sleep instead of spinning (see bench_kernels.py); set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lowrank_optim.ops import kernel_load_error, kernels_available, lowrank_adam_  # noqa: E402
from lowrank_optim.ops.quant import (  # noqa: E402
    absmax_shape,
    blockwise_adam_,
    quantize_blockwise_,
    signed_code_map,
    unsigned_code_map,
)

DEFAULT_SHAPES = ["4096x128", "1024x4096", "32000x512"]
BETAS = (0.9, 0.999, 1e-8)


def _time(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls."""
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - begin) / inner


def _cases(shape: tuple[int, int], block_size: int) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(0)
    lowrank = torch.randn(shape, generator=generator) * 1e-2
    exp_avg = torch.randn(shape, generator=generator) * 1e-2
    exp_avg_sq = (torch.randn(shape, generator=generator) * 1e-2).square()
    normalized = torch.empty(shape)
    signed, unsigned = signed_code_map(), unsigned_code_map()
    blocks = absmax_shape(shape, block_size)
    state = [torch.empty(shape, dtype=torch.uint8), torch.empty(blocks), torch.empty(shape, dtype=torch.uint8),
             torch.empty(blocks)]
    quantize_blockwise_(exp_avg, signed, block_size, state[0], state[1])
    quantize_blockwise_(exp_avg_sq, unsigned, block_size, state[2], state[3])
    normalized_8bit = torch.empty(shape)

    def eight_bit(fused: bool) -> Callable[[], object]:
        return lambda: blockwise_adam_(lowrank, *state, normalized_8bit, signed, unsigned, *BETAS, block_size, fused=fused)

    return {
        "8-bit kernel": eight_bit(True),
        "8-bit default": eight_bit(False),
        "fp32 kernel": lambda: lowrank_adam_(lowrank, exp_avg, exp_avg_sq, normalized, *BETAS),
    }


def _parse_shape(text: str) -> tuple[int, int]:
    rows, cols = text.lower().split("x")
    return int(rows), int(cols)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved measurements per case (median)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="moment shapes, ROWSxCOLS")
    args = parser.parse_args()
    if not kernels_available("cpu"):
        print(f"no compiled kernels for cpu: {kernel_load_error('cpu')}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    print(f"device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; block size {args.block_size}; "
          f"median of {args.repeats} interleaved repeats")
    header = (f"{'shape':>10} {'8-bit kernel ms':>16} {'8-bit default ms':>17} {'fp32 kernel ms':>15} "
              f"{'8-bit/fp32':>11} {'default/kernel':>15} {'state bytes':>12}")
    print(header)
    for text in args.shapes:
        shape = _parse_shape(text)
        cases = _cases(shape, args.block_size)
        numel = shape[0] * shape[1]
        inner = max(1, min(20, 2**22 // numel))
        for fn in cases.values():  # warm up (allocator, caches, first-call dispatch)
            _time(fn, 1)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for repeat in range(args.repeats):
            for k in range(len(names)):
                name = names[(repeat + k) % len(names)]
                samples[name].append(_time(cases[name], inner if name != "8-bit default" else 1))
        ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
        blocks = shape[0] * -(-shape[1] // args.block_size)
        state_ratio = (numel + 4 * blocks) * 2 / (8 * numel)
        print(f"{text:>10} {ms['8-bit kernel']:>16.3f} {ms['8-bit default']:>17.3f} {ms['fp32 kernel']:>15.3f} "
              f"{ms['8-bit kernel'] / ms['fp32 kernel']:>10.2f}x {ms['8-bit default'] / ms['8-bit kernel']:>14.1f}x "
              f"{state_ratio:>11.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
