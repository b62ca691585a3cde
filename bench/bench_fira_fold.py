"""Fira's update folded into the back-projection (``fira_folded_update_``) vs the explicit path vs GaLore's.

On the LLaMA-60M projected matrices (per layer q/k/v/o 512 x 512, gate/up 1376 x 512, down 512 x 1376;
8 layers, 56 matrices), rank 128, fp32, a non-refresh step with the limiter active (lim > 1):

1. the update alone, all 56 matrices, each variant timed in the same process, rounds interleaved:
   - GaLore: ``add_project_back_(W, N, alpha=-step·scale)`` (one GEMM);
   - Fira explicit: galore.py's whole-matrix branch (``_fira_residual`` then ``W -= step · (scale·back(N) + S)``);
   - Fira folded, the pure-PyTorch default kernel with ``skip=None`` and with a flag (the optimizer's
     default passes one), and the ``fira_folded_`` op (the compiled CPU kernel where it loaded) with a flag;
2. end-to-end non-refresh steps in the same process: ``GaLoreAdamW``, ``FiraAdamW`` (folded, its
   default), ``FiraAdamW(fold_residual=False)`` (explicit), and both with ``nonfinite="propagate"``;
3. accuracy: folded vs explicit (max abs and max relative-to-|ΔW| difference of the weight), fp32 and
   fp64; and the relative error of the limiter's ``||S||`` against fp64 when G lies almost in the
   subspace, for the explicit fp32 path, the folded one, and the folded one with ``norm_dtype=float64``.

Usage: python bench/bench_fira_fold.py [--repeats N] [--threads T] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowrank_optim import FiraAdamW, GaLoreAdamW
from lowrank_optim.ops import fira_folded_, kernel_load_error, kernels_available
from lowrank_optim.optim.galore import FiraTerm, _fira_residual
from lowrank_optim.projection import Side, Subspace, add_project_back_, fira_coefficients
from lowrank_optim.projection.fira import FIRA_GAMMA, fira_folded_update_

HIDDEN, INTERMEDIATE, LAYERS, RANK, GAP, ALPHA, STEP = 512, 1376, 8, 128, 200, 0.25, 1e-3
LAYER_SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]


class Matrix:
    """One projected matrix's tensors for a non-refresh step: W, G, basis, R = project(G), N."""

    def __init__(self, shape: tuple[int, int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> None:
        m, n = shape
        self.side = Side.RIGHT if m >= n else Side.LEFT  # proj_type "std"
        self.weight = torch.randn(shape, generator=generator, dtype=dtype).mul_(0.02)
        self.grad = torch.randn(shape, generator=generator, dtype=dtype)
        if self.side is Side.RIGHT:
            basis = torch.linalg.qr(torch.randn(n, RANK, generator=generator, dtype=dtype))[0].T.contiguous()
            self.subspace = Subspace(self.side, None, basis)
            self.lowrank = self.grad @ basis.T
        else:
            basis = torch.linalg.qr(torch.randn(m, RANK, generator=generator, dtype=dtype))[0]
            self.subspace = Subspace(self.side, basis, None)
            self.lowrank = basis.T @ self.grad
        self.normalized = torch.randn(self.lowrank.shape, generator=generator, dtype=dtype)
        self.prev = torch.zeros((), dtype=torch.float32)


def coefficients() -> tuple[float, float, float]:
    subtract, residual_scale = fira_coefficients(ALPHA, "code")
    return subtract, ALPHA, residual_scale


def explicit_update(x: Matrix, skip: torch.Tensor | None) -> None:
    subtract, scale, residual_scale = coefficients()
    term = FiraTerm([x.prev], subtract, residual_scale, FIRA_GAMMA)
    residual = _fira_residual(x.grad, x.lowrank, x.normalized, x.subspace, x.prev, term, first=False, skip=skip, fused=None)
    x.weight.add_(add_project_back_(residual, x.normalized, x.subspace, alpha=scale), alpha=-STEP)


def folded_update(x: Matrix, skip: torch.Tensor | None, norm_dtype: torch.dtype | None = None) -> None:
    subtract, scale, residual_scale = coefficients()
    fira_folded_update_(
        x.weight, x.grad, x.lowrank, x.normalized, x.subspace, x.prev, subtract=subtract, scale=scale,
        residual_scale=residual_scale, gamma=FIRA_GAMMA, first=False, step_size=STEP, skip=skip, norm_dtype=norm_dtype,
    )


def folded_op(x: Matrix, skip: torch.Tensor | None) -> None:
    """The ``fira_folded_`` op through the dispatcher (the compiled CPU kernel where it loaded)."""
    subtract, scale, residual_scale = coefficients()
    basis = x.subspace.right if x.side is Side.RIGHT else x.subspace.left
    fira_folded_(
        x.weight, x.grad, x.lowrank, x.normalized, basis, x.prev, dim=1 if x.side is Side.RIGHT else 0,
        subtract=subtract, scale=scale, residual_scale=residual_scale, gamma=FIRA_GAMMA, first=False,
        step_size=STEP, skip=skip, fused=True,
    )


def galore_update(x: Matrix, skip: torch.Tensor | None) -> None:
    add_project_back_(x.weight, x.normalized, x.subspace, alpha=-STEP * ALPHA)


def residual_norm(x: Matrix) -> float:
    subtract = coefficients()[0]
    back = x.lowrank @ x.subspace.right if x.side is Side.RIGHT else x.subspace.left @ x.lowrank
    dim = 1 if x.side is Side.RIGHT else 0
    phi = x.normalized.norm(dim=dim, keepdim=True) / (x.lowrank.norm(dim=dim, keepdim=True) + 1e-8)
    return ((x.grad - subtract * back) * phi).norm().item()


def time_updates(matrices: list[Matrix], repeats: int) -> dict[str, float]:
    variants: dict[str, Callable[[Matrix], None]] = {
        "GaLore update (add_project_back_)": lambda x: galore_update(x, None),
        "Fira explicit (galore.py branch)": lambda x: explicit_update(x, x.flag),
        "Fira folded (default kernel), skip=None": lambda x: folded_update(x, None),
        "Fira folded (default kernel), skip flag": lambda x: folded_update(x, x.flag),
        "Fira folded (fira_folded_ op), skip flag": lambda x: folded_op(x, x.flag),
    }
    # prev at 1 % of ||S||: every timed call has the limiter active (lim ≈ 99 / 1.01^k).
    starts = [0.01 * residual_norm(x) for x in matrices]
    for x in matrices:
        x.flag = torch.tensor(False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        order = list(variants.items())
        if round_ % 2:
            order.reverse()  # neither variant always runs on operands the other just warmed
        for name, update in order:
            for x, start in zip(matrices, starts):
                x.prev.fill_(start)
            begin = time.perf_counter()
            for x in matrices:
                update(x)
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


#: The end-to-end steps timed in section 2 (same process, rounds interleaved): the optimizer and its options.
STEP_VARIANTS: dict[str, tuple[type, dict]] = {
    "GaLoreAdamW.step()": (GaLoreAdamW, {}),
    "FiraAdamW.step() (folded, default)": (FiraAdamW, {}),
    "FiraAdamW.step() fold_residual=False": (FiraAdamW, {"fold_residual": False}),
    "GaLoreAdamW.step() nonfinite=propagate": (GaLoreAdamW, {"nonfinite": "propagate"}),
    "FiraAdamW.step() nonfinite=propagate": (FiraAdamW, {"nonfinite": "propagate"}),
}


def time_steps(repeats: int) -> dict[str, float]:
    def make(optimizer_class: type, options: dict) -> torch.optim.Optimizer:
        generator = torch.Generator().manual_seed(0)
        params = []
        for shape in LAYER_SHAPES * LAYERS:
            param = nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02))
            param.grad = torch.randn(shape, generator=generator)
            params.append(param)
        group = {"params": params, "rank": RANK, "update_proj_gap": GAP, "scale": ALPHA}
        optimizer = optimizer_class([group], lr=1e-3, foreach=False, **options)
        optimizer.step()  # the refresh (SVDs) and state initialization; later steps are non-refresh
        optimizer.step()  # Fira's first limiter step
        return optimizer

    optimizers = {name: make(cls, options) for name, (cls, options) in STEP_VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(repeats):
        order = list(optimizers.items())
        if round_ % 2:
            order.reverse()
        for name, optimizer in order:
            begin = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def accuracy_vs_explicit() -> list[str]:
    lines = []
    for dtype in (torch.float32, torch.float64):
        for shape in [(HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]:
            worst_abs = worst_rel = 0.0
            for seed in range(3):
                base = Matrix(shape, torch.Generator().manual_seed(100 + seed), dtype)
                start = 0.01 * residual_norm(base)
                results = []
                for update in (explicit_update, folded_update):
                    x = Matrix(shape, torch.Generator().manual_seed(100 + seed), dtype)
                    x.prev.fill_(start)
                    update(x, None)
                    results.append(x.weight)
                diff = (results[0] - results[1]).abs().max().item()
                delta = (results[0] - base.weight).abs().max().item()
                worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / delta)
            side = "right" if shape[0] >= shape[1] else "left"
            lines.append(
                f"  {str(dtype).removeprefix('torch.'):8} {shape[0]:4d} x {shape[1]:<4d} ({side:5}): max |W_f - W_e| = "
                f"{worst_abs:.3e}, / max|ΔW| = {worst_rel:.3e}"
            )
    return lines


def cancellation_accuracy() -> list[str]:
    """||S|| (stored limiter norm after a first step) vs fp64 truth, G = inside + outside·noise."""
    lines = []
    generator = torch.Generator().manual_seed(7)
    for shape in [(INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]:
        x64 = Matrix(shape, generator, torch.float64)
        p = x64.subspace.right if x64.side is Side.RIGHT else x64.subspace.left
        inside = x64.lowrank @ p if x64.side is Side.RIGHT else p @ x64.lowrank
        noise = x64.grad - inside
        for outside in (None, 1e-1, 1e-2, 1e-3):
            grad = x64.grad if outside is None else inside + noise * (outside * inside.norm() / noise.norm())
            errors = {}
            truth = None
            for name, dtype, update, norm_dtype in (
                ("truth", torch.float64, folded_update, torch.float64),
                ("explicit fp32", torch.float32, explicit_update, None),
                ("folded fp32", torch.float32, folded_update, None),
                ("folded fp32, norm_dtype=fp64", torch.float32, folded_update, torch.float64),
                ("fira_folded_ op fp32", torch.float32, folded_op, None),
            ):
                x = Matrix(shape, torch.Generator().manual_seed(0), dtype)
                x.grad, basis = grad.to(dtype), p.to(dtype)
                x.subspace = Subspace(x64.side, None, basis) if x64.side is Side.RIGHT else Subspace(x64.side, basis, None)
                x.lowrank = x.grad @ basis.T if x64.side is Side.RIGHT else basis.T @ x.grad
                x.normalized = x64.normalized.to(dtype)
                x.prev = torch.zeros((), dtype=torch.float64)
                subtract, scale, residual_scale = 1.0, ALPHA, ALPHA  # paper form: subtract 1, the full cancellation
                if update is explicit_update:
                    term = FiraTerm([x.prev], subtract, residual_scale, FIRA_GAMMA)
                    _fira_residual(x.grad, x.lowrank, x.normalized, x.subspace, x.prev, term, first=True, skip=None, fused=None)
                elif update is folded_op:
                    x.prev = torch.zeros((), dtype=torch.float32)  # the op's state is fp32 (or fp64 for fp64 weights)
                    fira_folded_(
                        x.weight, x.grad, x.lowrank, x.normalized, basis, x.prev, dim=1 if x64.side is Side.RIGHT else 0,
                        subtract=subtract, scale=scale, residual_scale=residual_scale, gamma=FIRA_GAMMA, first=True,
                        step_size=STEP, fused=True,
                    )
                else:
                    fira_folded_update_(
                        x.weight, x.grad, x.lowrank, x.normalized, x.subspace, x.prev, subtract=subtract, scale=scale,
                        residual_scale=residual_scale, gamma=FIRA_GAMMA, first=True, step_size=STEP, skip=None,
                        norm_dtype=norm_dtype,
                    )
                if truth is None:
                    truth = x.prev.item()
                else:
                    errors[name] = abs(x.prev.item() - truth) / truth
            actual = (grad - inside).norm().item() / grad.norm().item()
            label = f"natural ({actual:.2f})" if outside is None else f"{outside:g}"
            lines.append(
                f"  {shape[0]:4d} x {shape[1]:<4d} ||G⊥||/||G|| = {label:15} "
                + ", ".join(f"{name}: {value:.1e}" for name, value in errors.items())
            )
    return lines


def header(args: argparse.Namespace) -> list[str]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return [
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        f"commit: {commit}{' (working tree has uncommitted changes to tracked files)' if dirty else ''}",
        f"machine: {torch.get_num_threads()}-thread torch on a {len(open('/proc/cpuinfo').read().split('processor')) - 1}-core "
        f"CPU ({model}), no GPU; torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"load average at start (1/5/15 min): {' '.join(open('/proc/loadavg').read().split()[:3])} "
        "(other processes share these cores: absolute times move with them; ratios are taken round by round)",
        f"compiled kernels loaded: {kernels_available('cpu')} ({kernel_load_error('cpu') or 'ok'}); the explicit path "
        "runs fira_residual_'s default (pure PyTorch) kernel when they are not",
        f"LLaMA-60M projected matrices: {len(LAYER_SHAPES) * LAYERS}, rank {RANK}, fp32, alpha {ALPHA} (code form), "
        f"non-refresh step, limiter active; median of {args.repeats} interleaved rounds",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the output here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        print("\n".join(header(args)), end="\n\n")
        generator = torch.Generator().manual_seed(0)
        matrices = [Matrix(shape, generator) for shape in LAYER_SHAPES * LAYERS]
        updates = time_updates(matrices, args.repeats)
        galore = updates["GaLore update (add_project_back_)"]
        explicit = updates["Fira explicit (galore.py branch)"]
        print("1. The update alone (56 matrices):")
        for name, seconds in updates.items():
            print(f"  {name:42} {seconds * 1e3:8.2f} ms  x GaLore {seconds / galore:5.2f}  x explicit {seconds / explicit:5.2f}")

        steps = time_steps(max(5, args.repeats // 2))
        print("\n2. End-to-end non-refresh step (foreach=False, default fused; nonfinite='skip' unless named):")
        baselines = {"skip": steps["GaLoreAdamW.step()"], "propagate": steps["GaLoreAdamW.step() nonfinite=propagate"]}
        for name, seconds in steps.items():
            baseline = baselines["propagate" if "propagate" in name else "skip"]
            print(f"  {name:42} {seconds * 1e3:8.2f} ms  x GaLore (same nonfinite) {seconds / baseline:5.2f}")
        ratio = steps["FiraAdamW.step() (folded, default)"] / baselines["skip"]
        print(f"  goal: Fira's default non-refresh step <= 1.15x GaLore's: {ratio:.3f}x, {'met' if ratio <= 1.15 else 'NOT met'}")

        print("\n3a. Folded vs explicit, limiter active, 3 seeds per shape (random orthonormal basis):")
        print("\n".join(accuracy_vs_explicit()))
        print("\n3b. Relative error of ||S|| (limiter state after a first step) vs fp64, paper form (subtract = 1):")
        print("\n".join(cancellation_accuracy()))
    text = buffer.getvalue()
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
