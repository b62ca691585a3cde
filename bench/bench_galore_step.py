"""GaLoreAdamW and FiraAdamW vs torch.optim.AdamW (foreach) on the projected weight shapes of LLaMA-60M.

LLaMA-60M: hidden 512, intermediate 1376, 8 layers; per layer q/k/v/o (512 x 512), gate/up (1376 x 512)
and down (512 x 1376), i.e. the 56 matrices GaLore projects. Rank 128, gap 200, fp32, on this machine's
CPU (or ``--device cuda``). Reports, each beside AdamW measured in the same process:

- optimizer-state bytes, checked against the formula ``2·max(m,n)·r + min(m,n)·r`` per matrix (plus
  the 4-byte ``step`` counter every torch optimizer keeps per parameter);
- median wall time of a non-refresh step and of a refresh step (the SVDs), with the compiled kernels
  (``fused=None``, the default, picks them when they are built) and with ``fused=False`` (the reference
  arithmetic), so the kernels' effect on a whole step shows;
- extra peak memory during a step (above weights, gradients and state), from the allocator's
  accounting (lowrank_optim.memory.peak_extra_memory).

Usage: python bench/bench_galore_step.py [--repeats N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from lowrank_optim import FiraAdamW, GaLoreAdamW, optimizer_state_bytes
from lowrank_optim.memory import peak_extra_memory
from lowrank_optim.ops import kernel_load_error, kernels_available

HIDDEN, INTERMEDIATE, LAYERS, RANK, GAP = 512, 1376, 8, 128, 200
LAYER_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]


def make_params(device: torch.device) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in LAYER_SHAPES * LAYERS:
        param = nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(device))
        param.grad = torch.randn(shape, generator=generator).to(device)
        params.append(param)
    return params


def timed(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def formula_bytes(params: list[nn.Parameter]) -> int:
    """GaLore's state per matrix: two m x r (or r x n) moments and one min(m,n) x r basis, plus step."""
    total = 0
    for p in params:
        m, n = p.shape
        total += (2 * max(m, n) * RANK + min(m, n) * RANK) * p.element_size() + 4
    return total


def measure(name: str, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], args) -> dict:
    device = torch.device(args.device)
    params = make_params(device)
    optimizer = make_optimizer(params)
    optimizer.step()  # initializes state (and, for GaLore, computes the first projectors)
    step_times = [timed(optimizer.step, device) for _ in range(args.repeats)]
    step_peak = peak_extra_memory(optimizer.step, device)
    result = {
        "name": name,
        "state_bytes": optimizer_state_bytes(optimizer),
        "step_s": statistics.median(step_times),
        "step_peak": step_peak,
        "refresh_s": float("nan"),
        "refresh_peak": float("nan"),
    }
    if isinstance(optimizer, GaLoreAdamW):
        # Make the next step a refresh: the counter is a multiple of the gap when gap == 1.
        group = optimizer.param_groups[0]
        group["update_proj_gap"] = 1
        # One timed refresh: 56 SVDs take tens of seconds on a 2-core CPU.
        result["refresh_s"] = timed(optimizer.step, device)
        result["refresh_peak"] = peak_extra_memory(optimizer.step, device)
        group["update_proj_gap"] = GAP
        expected = formula_bytes(params)
        if isinstance(optimizer, FiraAdamW):  # plus the limiter's fp32 norm per matrix
            expected += 4 * len(params)
        assert result["state_bytes"] == expected, (result["state_bytes"], expected)
        result["formula_ok"] = True
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per measurement (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    print(f"LLaMA-60M projected matrices: {len(LAYER_SHAPES) * LAYERS}, rank {RANK}, gap {GAP}, fp32\n")

    def lowrank(optimizer_class: type, **flags: bool) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
        return lambda ps: optimizer_class(
            [{"params": ps, "rank": RANK, "update_proj_gap": GAP, "scale": 0.25}], lr=1e-3, **flags
        )

    results = [
        measure("AdamW (torch, foreach)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), args),
        measure("GaLoreAdamW", lowrank(GaLoreAdamW, foreach=False), args),
        measure("GaLoreAdamW fused=False", lowrank(GaLoreAdamW, foreach=False, fused=False), args),
        measure("GaLoreAdamW foreach", lowrank(GaLoreAdamW, foreach=True), args),
        measure("FiraAdamW", lowrank(FiraAdamW, foreach=False), args),
        measure("FiraAdamW fused=False", lowrank(FiraAdamW, foreach=False, fused=False), args),
    ]
    base = results[0]
    header = f"{'optimizer':26} {'state MiB':>10} {'x AdamW':>8} {'step ms':>9} {'x AdamW':>8} " \
             f"{'refresh ms':>11} {'step peak MiB':>14} {'refresh peak MiB':>17}"
    print(header)
    print("-" * len(header))
    mib = 2.0**20
    for r in results:
        print(
            f"{r['name']:26} {r['state_bytes'] / mib:10.2f} {r['state_bytes'] / base['state_bytes']:8.3f} "
            f"{r['step_s'] * 1e3:9.2f} {r['step_s'] / base['step_s']:8.2f} {r['refresh_s'] * 1e3:11.1f} "
            f"{r['step_peak'] / mib:14.2f} {r['refresh_peak'] / mib:17.2f}"
        )
    weights = sum(m * n for m, n in LAYER_SHAPES) * LAYERS * 4
    print(f"\nweights: {weights / mib:.2f} MiB; state equals the formula 2·max(m,n)·r + min(m,n)·r "
          f"(+4 B step, +4 B Fira norm) per matrix: {all(r.get('formula_ok') for r in results[1:])}")
    print(f"compiled kernels loaded: {kernels_available(args.device)} ({kernel_load_error(args.device) or 'ok'}); "
          "rows without fused=False use them when loaded")


if __name__ == "__main__":
    main()
