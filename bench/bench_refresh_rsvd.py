"""Randomized (cold and warm-started) SVD refresh vs GaLore's full SVD: time and captured energy.

For each gradient, in this process, on this machine's CPU (fp32, ``--threads`` threads):

- ``svd``: :func:`lowrank_optim.projection.svd_basis` (``torch.linalg.svd(G, full_matrices=False)``, top r);
- ``cold``: :func:`lowrank_optim.projection.rsvd.randomized_basis` from a Gaussian start block;
- ``warm``: the same started from the basis of an *earlier* gradient (the previous refresh's basis,
  computed by the full SVD of that gradient);
- ``stale``: no refresh at all, the earlier basis applied to the new gradient (context for ``warm``).
- ``dct``: the DCT projector's refresh (``DCTProjector()``, top-r DCT-II frequencies by L1 score, FFT
  scoring from d = 384 on), whose fixed basis captures less energy than any SVD basis, at a fraction of
  the cost (context: the SVD-free alternative).

Each basis's captured energy ``‖projection‖²_F / ‖G‖²_F`` is printed as a ratio to the optimal rank-r
energy ``Σ_{k<r} σ_k² / Σ σ_k²`` (fp64 ``svdvals``), and each time as ``svd time / method time``. Times are
the best of ``--repeats`` runs.

Gradients:

- synthetic ``m x n`` with random singular vectors and singular values ``k^-a``, a in ``--decays``; the
  earlier gradient is ``G`` and the new one ``G' = G + η ‖G‖_F N / ‖N‖_F`` (N Gaussian, η = ``--noise``);
- real ones from the repo's LLaMA-60M architecture (hidden 512, intermediate 1376, 8 layers) trained with
  AdamW (lr 1e-3) on the byte-level stdlib-source corpus of :mod:`lowrank_optim.data` (so the vocabulary
  is 257 bytes instead of 32000 tokens; the projected layer shapes are LLaMA-60M's), batch
  ``--batch`` x ``--seq``: the q/gate/down weight gradients of layer ``--layer`` at step ``--real-steps[0]``
  (earlier) and ``--real-steps[1]`` (new). Cached in ``--cache`` (under bench/out/, git-ignored) since the
  training is the slow part. LLaMA-1B shapes have synthetic gradients only: a 1B model is too slow to
  train here.

The ``--sweep`` table runs cold and warm starts over oversample x iterations at 5461 x 2048, r = 512, to
pick the defaults.

Usage: python bench/bench_refresh_rsvd.py [--threads 2] [--repeats 3] [--decays 0.5 1.0] [--noise 0.3]
       [--oversample P] [--cold-iterations Q] [--warm-iterations Q] [--real-steps 10 210] [--no-real]
       [--sweep] [--cache PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from torch import Tensor

from lowrank_optim.projection import DCTProjector, resolve_side, svd_basis
from lowrank_optim.projection.rsvd import (
    COLD_ITERATIONS,
    DEFAULT_OVERSAMPLE,
    WARM_ITERATIONS,
    captured_energy,
    optimal_energy,
    randomized_basis,
)
from _timing import best_time

SHAPES_60M = [((512, 512), 128), ((1376, 512), 128), ((512, 1376), 128)]
SHAPES_1B = [((5461, 2048), 512), ((2048, 2048), 512)]
GOAL_SHAPE, GOAL_RANK, GOAL_SPEEDUP, GOAL_ENERGY = (5461, 2048), 512, 5.0, 0.995


def synthetic(shape: tuple[int, int], decay: float, generator: torch.Generator) -> Tensor:
    """``U diag(k^-decay) Vᵀ`` with Haar-like random orthonormal ``U`` (m x d), ``V`` (n x d)."""
    m, n = shape
    d = min(m, n)
    u = torch.linalg.qr(torch.randn(m, d, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, d, generator=generator)).Q
    sigma = torch.arange(1, d + 1, dtype=torch.float32).pow(-decay)
    return (u * sigma) @ v.T


def perturbed(grad: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    """``G + η ‖G‖_F N / ‖N‖_F``: a later gradient at relative (Frobenius) distance ``η``."""
    n = torch.randn(grad.shape, generator=generator)
    return grad + (noise * grad.norm() / n.norm()) * n


def real_gradients(args: argparse.Namespace) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (earlier, new)}`` weight gradients of one layer of LLaMA-60M trained on real text."""
    cache = Path(args.cache)
    key = (tuple(args.real_steps), args.layer, args.batch, args.seq)
    if cache.exists():
        saved = torch.load(cache)
        if saved.get("key") == key:
            return saved["grads"]
    from lowrank_optim.data import ByteTokenizer, TokenStream, stdlib_corpus
    from lowrank_optim.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dataclasses.replace(LlamaConfig.from_name_or_path("60m"), vocab_size=ByteTokenizer.vocab_size)
    model = LlamaForCausalLM(config)
    layer = model.layers[args.layer]
    weights = {
        "q_proj": layer.attn.q_proj.weight,
        "gate_proj": layer.mlp.gate_proj.weight,
        "down_proj": layer.mlp.down_proj.weight,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = TokenStream(stdlib_corpus(), args.seq).train_batches(args.batch, seed=0)
    earlier: dict[str, Tensor] = {}
    grads: dict[str, tuple[Tensor, Tensor]] = {}
    start = time.perf_counter()
    for step in range(args.real_steps[1] + 1):
        tokens = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        if step == args.real_steps[0]:
            earlier = {name: w.grad.detach().clone() for name, w in weights.items()}
        if step == args.real_steps[1]:
            grads = {name: (earlier[name], w.grad.detach().clone()) for name, w in weights.items()}
        optimizer.step()
    print(
        f"(trained {args.real_steps[1] + 1} AdamW steps in {time.perf_counter() - start:.0f} s, "
        f"final loss {loss.item():.3f})"
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "grads": grads}, cache)
    return grads


HEADER = (
    f"{'gradient':<22} {'shape':>11} {'r':>4} {'side':>5} {'svd s':>7} {'cold s':>7} {'warm s':>7} "
    f"{'svd/cold':>8} {'svd/warm':>8} {'opt E':>7} {'svd/opt':>8} {'cold/opt':>8} {'warm/opt':>8} {'stale/opt':>9} "
    f"{'dct s':>7} {'svd/dct':>7} {'dct/opt':>8}"
)


def measure(name: str, earlier: Tensor, grad: Tensor, rank: int, args: argparse.Namespace) -> dict:
    """One table row: times and energy ratios of svd / cold / warm (and stale) on ``grad``."""
    side = resolve_side("std", grad.shape)
    previous = svd_basis(earlier, rank, side)
    seed = 1

    def cold() -> tuple[Tensor | None, Tensor | None]:
        return randomized_basis(
            grad, rank, side, oversample=args.oversample, iterations=args.cold_iterations,
            generator=torch.Generator().manual_seed(seed),
        )

    def warm() -> tuple[Tensor | None, Tensor | None]:
        return randomized_basis(
            grad, rank, side, previous, oversample=args.oversample, iterations=args.warm_iterations,
            generator=torch.Generator().manual_seed(seed),
        )

    def svd() -> tuple[Tensor | None, Tensor | None]:
        return svd_basis(grad, rank, side)

    dct_projector = DCTProjector()  # auto scoring: FFT from 384 on

    def dct() -> tuple[Tensor | None, Tensor | None]:
        indices = dct_projector.refresh(grad, rank, side, None, fused=False, first=True)
        subspace = dct_projector.subspace(indices, side, tuple(grad.shape), rank, torch.float32, grad.device)
        return subspace.left, subspace.right

    # Interleaved, so that a change in the machine's load hits all three alike.
    dct()  # builds and caches the FFT tables, as training's first refresh does
    methods = (("svd", svd), ("cold", cold), ("warm", warm), ("dct", dct))
    times = dict.fromkeys([name for name, _ in methods], float("inf"))
    for _ in range(args.repeats):
        for method, run in methods:
            times[method] = min(times[method], best_time(run, 1))
    optimum = optimal_energy(grad, rank)
    energy = {method: captured_energy(grad, *run()) / optimum for method, run in methods}
    energy["stale"] = captured_energy(grad, *previous) / optimum
    row = {"name": name, "shape": tuple(grad.shape), "rank": rank, "side": side.value, "times": times,
           "optimum": optimum, "energy": energy}
    m, n = row["shape"]
    print(
        f"{name:<22} {f'{m}x{n}':>11} {rank:>4} {row['side']:>5} {times['svd']:>7.3f} {times['cold']:>7.3f} "
        f"{times['warm']:>7.3f} {times['svd'] / times['cold']:>7.1f}x {times['svd'] / times['warm']:>7.1f}x "
        f"{optimum:>7.4f} {energy['svd']:>8.5f} {energy['cold']:>8.5f} {energy['warm']:>8.5f} {energy['stale']:>9.5f} "
        f"{times['dct']:>7.3f} {times['svd'] / times['dct']:>6.1f}x {energy['dct']:>8.5f}",
        flush=True,
    )
    return row


def sweep(args: argparse.Namespace) -> None:
    """Cold and warm start over oversample x iterations at the goal shape (one run each, same process)."""
    print(f"\nSweep at {GOAL_SHAPE[0]}x{GOAL_SHAPE[1]}, r={GOAL_RANK}: energy / optimal and time (s); "
          f"svd time measured once per gradient")
    generator = torch.Generator().manual_seed(2)
    for decay in args.decays:
        earlier = synthetic(GOAL_SHAPE, decay, generator)
        grad = perturbed(earlier, args.noise, generator)
        side = resolve_side("std", grad.shape)
        previous = svd_basis(earlier, GOAL_RANK, side)
        optimum = optimal_energy(grad, GOAL_RANK)
        svd_time = best_time(lambda: svd_basis(grad, GOAL_RANK, side), 1)
        print(f"synthetic a={decay}, η={args.noise}: svd {svd_time:.3f} s, optimal energy {optimum:.4f}")
        print(f"  {'p':>3} {'q':>2} {'cold/opt':>9} {'cold s':>7} {'svd/cold':>8} {'warm/opt':>9} {'warm s':>7} {'svd/warm':>8}")
        for p in args.sweep_oversample:
            for q in args.sweep_iterations:
                results = []
                for prev in (None, previous):
                    def run() -> tuple[Tensor | None, Tensor | None]:
                        return randomized_basis(grad, GOAL_RANK, side, prev, oversample=p, iterations=q,
                                                generator=torch.Generator().manual_seed(1))
                    seconds = best_time(run, 1)
                    results.append((captured_energy(grad, *run()) / optimum, seconds))
                (ce, ct), (we, wt) = results
                print(f"  {p:>3} {q:>2} {ce:>9.5f} {ct:>7.3f} {svd_time / ct:>7.1f}x {we:>9.5f} {wt:>7.3f} {svd_time / wt:>7.1f}x",
                      flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decays", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--noise", type=float, default=0.3, help="relative perturbation of the synthetic warm start")
    parser.add_argument("--oversample", type=int, default=DEFAULT_OVERSAMPLE)
    parser.add_argument("--cold-iterations", type=int, default=COLD_ITERATIONS)
    parser.add_argument("--warm-iterations", type=int, default=WARM_ITERATIONS)
    parser.add_argument("--real-steps", type=int, nargs=2, default=[10, 210], metavar=("EARLIER", "NEW"))
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-real", action="store_true", help="skip the real LLaMA-60M gradients")
    parser.add_argument("--cache", default="bench/out/rsvd_real_grads.pt")
    parser.add_argument("--sweep", action="store_true", help="also sweep oversample x iterations at 5461x2048")
    parser.add_argument("--sweep-oversample", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--sweep-iterations", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"Refresh: full SVD vs randomized subspace iteration, fp32, {torch.get_num_threads()} threads, "
        f"oversample {args.oversample}, iterations cold {args.cold_iterations} / warm {args.warm_iterations}; "
        f"times best of {args.repeats}; energies as a ratio to the optimal rank-r energy (opt E)"
    )
    print(HEADER)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for shapes in (SHAPES_60M, SHAPES_1B):
        for shape, rank in shapes:
            for decay in args.decays:
                earlier = synthetic(shape, decay, generator)
                grad = perturbed(earlier, args.noise, generator)
                rows.append(measure(f"synth a={decay} η={args.noise}", earlier, grad, rank, args))
    if not args.no_real:
        for name, (earlier, grad) in real_gradients(args).items():
            label = f"real {name} s{args.real_steps[0]}->{args.real_steps[1]}"
            rows.append(measure(label, earlier, grad, 128, args))

    print(f"\nGoal at {GOAL_SHAPE[0]}x{GOAL_SHAPE[1]}, r={GOAL_RANK}: >= {GOAL_SPEEDUP:.0f}x faster than the SVD "
          f"and >= {GOAL_ENERGY:.1%} of the optimal energy")
    for row in rows:
        if row["shape"] == GOAL_SHAPE and row["rank"] == GOAL_RANK:
            for method in ("cold", "warm"):
                speedup = row["times"]["svd"] / row["times"][method]
                met = speedup >= GOAL_SPEEDUP and row["energy"][method] >= GOAL_ENERGY
                print(f"  {row['name']:<22} {method}: {speedup:.1f}x, {row['energy'][method]:.5f} -> "
                      f"{'met' if met else 'NOT met'}")
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()
