"""Projector refresh cost (SVD vs DCT scoring) and optimizer-state bytes (GaLore, DCT, Fira, AdamW).

1. Refresh cost for a ``2d x d`` fp32 gradient at rank 128, each measured in this process on this
   machine's CPU: GaLore's SVD (``torch.linalg.svd(G, full_matrices=False)``, top-r rows of ``Vh``, as the
   optimizer does it) against the DCT selection (arXiv 2505.17967) with the scores from an explicit
   matmul with the ``d x d`` DCT matrix or from the FFT (Makhoul), both including the top-r selection.
   Times are the best of ``--repeats`` runs (one run for SVDs of d >= 2048); the DCT matrix and FFT
   tables are built (and cached) by an untimed warm-up, as in training.
2. State bytes after one step over the projected matrices of LLaMA-60M (hidden 512, intermediate 1376,
   8 layers; q/k/v/o 512x512, gate/up 1376x512, down 512x1376), rank 128, fp32: AdamW vs GaLore (SVD
   basis) vs DCT (int64 indices instead of a basis) vs Fira (GaLore + one fp32 scalar per matrix).

On a machine whose cores are busy with other work, multi-threaded LAPACK (the SVD) can slow down by
100x from threads waiting on each other; ``--threads 1`` gives steadier numbers there.

Usage: python bench/bench_projection_refresh.py [--sizes 512 1024 2048 4096] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW, optimizer_state_bytes
from lowrank_optim.projection import Side, select_dct_indices, svd_basis
from _timing import best_time

RANK = 128
HIDDEN, INTERMEDIATE, LAYERS = 512, 1376, 8
LAYER_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]


def refresh_table(sizes: list[int], repeats: int) -> None:
    print(f"Refresh cost, 2d x d fp32 gradient, rank {RANK}, {torch.get_num_threads()} threads (seconds)")
    print(f"{'d':>6} {'SVD':>10} {'DCT-matmul':>11} {'DCT-FFT':>10} {'SVD/matmul':>11} {'SVD/FFT':>9}")
    generator = torch.Generator().manual_seed(0)
    for d in sizes:
        grad = torch.randn(2 * d, d, generator=generator)
        for scoring in ("matmul", "fft"):  # warm-up: builds the cached DCT matrix / FFT tables
            select_dct_indices(grad, RANK, Side.RIGHT, scoring)
        svd = best_time(lambda: svd_basis(grad, RANK, Side.RIGHT), 1 if d >= 2048 else repeats)
        matmul = best_time(lambda: select_dct_indices(grad, RANK, Side.RIGHT, "matmul"), repeats)
        fft = best_time(lambda: select_dct_indices(grad, RANK, Side.RIGHT, "fft"), repeats)
        print(f"{d:>6} {svd:>10.4f} {matmul:>11.4f} {fft:>10.4f} {svd / matmul:>10.1f}x {svd / fft:>8.1f}x")


def llama60m_params() -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in LAYER_SHAPES * LAYERS:
        param = nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02))
        param.grad = torch.randn(shape, generator=generator)
        params.append(param)
    return params


def state_table() -> None:
    params = llama60m_params()
    numel = sum(p.numel() for p in params)
    # A fresh group dict each: an optimizer fills its defaults (e.g. projector="svd") into the dict it gets.
    optimizers = {
        "AdamW": lambda: torch.optim.AdamW(params),
        "GaLore-SVD": lambda: GaLoreAdamW([{"params": params, "rank": RANK}]),
        "DCT": lambda: DCTAdamW([{"params": params, "rank": RANK}]),
        "Fira": lambda: FiraAdamW([{"params": params, "rank": RANK}]),
    }
    print(
        f"\nOptimizer state after one step, LLaMA-60M projected matrices ({len(params)}, {numel / 1e6:.1f}M params), "
        f"rank {RANK}, fp32"
    )
    print(f"{'optimizer':>10} {'bytes':>12} {'MiB':>8} {'vs AdamW':>9} {'vs GaLore':>10}")
    sizes = {}
    for name, make in optimizers.items():
        optimizer = make()
        optimizer.step()
        sizes[name] = optimizer_state_bytes(optimizer)
        del optimizer
    for name, size in sizes.items():
        print(
            f"{name:>10} {size:>12,} {size / 2**20:>8.2f} {size / sizes['AdamW']:>9.3f} "
            f"{size / sizes['GaLore-SVD']:>10.3f}"
        )
    basis = sum(min(p.shape) * RANK * 4 for p in params)
    indices = len(params) * RANK * 8
    assert sizes["GaLore-SVD"] - sizes["DCT"] == basis - indices  # the bases, replaced by int64 indices
    assert sizes["Fira"] - sizes["GaLore-SVD"] == 4 * len(params)  # one fp32 scalar per matrix
    print(f"GaLore - DCT = {basis:,} B of bases - {indices:,} B of indices; Fira - GaLore = {4 * len(params)} B")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's); 1 is steadier on a busy machine"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    refresh_table(args.sizes, args.repeats)
    state_table()


if __name__ == "__main__":
    main()
