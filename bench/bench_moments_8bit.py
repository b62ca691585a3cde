"""8-bit moments against fp32 moments, and against bitsandbytes' and torchao's 8-bit AdamW, in one process.

Two parts (issue 14's figures):

1. **Quality.** The ``tiny`` LLaMA trained as the demo trains it (200 updates of 16 x 128 tokens, the
   tiny presets' learning rates, seeds as given): GaLore and full-rank AdamW with fp32 moments and with
   ``moment_format="8bit"``; for the full-rank case also bitsandbytes' ``AdamW8bit`` and torchao's
   ``AdamW8bit`` where they import. Final held-out loss, optimizer-state bytes (``optimizer_state_bytes``,
   torchao's tensor subclass counted by its codes and scales) and tokens/s.
2. **Step time.** One optimizer step on LLaMA-60M-like full-rank tensors (an embedding, an MLP matrix, a
   norm) and on GaLore's low-rank moments, as ratios against ``torch.optim.AdamW`` on the same tensors.

Every optimizer here runs with weight decay 0 and the same betas; full-rank AdamW variants differ in
``eps`` placement only (torch / bitsandbytes / torchao: bias-corrected, ours: Hugging Face's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _demo_args import add_demo_run_arguments, start  # noqa: E402

from lowrank_optim import GaLoreAdamW, param_groups  # noqa: E402
from lowrank_optim.data import TokenStream, stdlib_corpus  # noqa: E402
from lowrank_optim.models import LlamaConfig  # noqa: E402
from lowrank_optim.optim import optimizer_state_bytes  # noqa: E402
from lowrank_optim.train.methods import build_model, load_presets  # noqa: E402
from lowrank_optim.train.pretrain import TrainSettings, pretrain  # noqa: E402


def _other_adamw8bit() -> dict[str, Callable[..., torch.optim.Optimizer]]:
    """bitsandbytes' and torchao's 8-bit AdamW, where they import and step on the CPU."""
    found: dict[str, Callable[..., torch.optim.Optimizer]] = {}
    try:
        import bitsandbytes as bnb

        found["bitsandbytes AdamW8bit"] = bnb.optim.AdamW8bit
    except Exception as error:  # an optional comparison: say why it is missing
        print(f"bitsandbytes: not compared ({type(error).__name__}: {error})")
    try:
        from torchao.optim import AdamW8bit

        found["torchao AdamW8bit"] = AdamW8bit
    except Exception as error:
        print(f"torchao: not compared ({type(error).__name__}: {error})")
    return found


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state; torchao's 8-bit state is a tensor subclass holding codes and scales."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            inner = [getattr(value, name) for name in ("codes", "scale", "qmap") if hasattr(value, name)]
            if inner:
                total += sum(t.numel() * t.element_size() for t in inner)
            else:
                total += value.numel() * value.element_size()
    return total if total else optimizer_state_bytes(optimizer)


def quality(args: argparse.Namespace) -> None:
    config = LlamaConfig.from_name_or_path("tiny")
    presets = load_presets("tiny")
    stream = TokenStream(stdlib_corpus(), args.seq_len)
    galore, adamw = presets["galore"], presets["adamw"]

    def galore_factory(fmt: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
        def make(model: nn.Module) -> torch.optim.Optimizer:
            groups = param_groups(model, rank=galore.rank, update_proj_gap=galore.update_proj_gap, scale=galore.scale)
            groups[0]["lr"] = galore.other_lr if galore.other_lr is not None else galore.lr
            return GaLoreAdamW(groups, lr=galore.lr, weight_decay=0.0, moment_format=fmt)

        return make

    def adamw_groups(model: nn.Module) -> list[dict[str, Any]]:
        groups = param_groups(model, rank=1)  # only to split matrices from the rest; no rank is used below
        matrices, others = groups[1]["params"], groups[0]["params"]
        other_lr = adamw.other_lr if adamw.other_lr is not None else adamw.lr
        return [{"params": matrices}, {"params": others, "lr": other_lr}]

    runs: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
        "GaLore, fp32 moments": galore_factory("full"),
        "GaLore, 8-bit moments": galore_factory("8bit"),
        "AdamW (torch), fp32": lambda m: torch.optim.AdamW(adamw_groups(m), lr=adamw.lr, weight_decay=0.0),
        "AdamW (ours), fp32 moments": lambda m: GaLoreAdamW(adamw_groups(m), lr=adamw.lr, eps=1e-8, weight_decay=0.0),
        "AdamW (ours), 8-bit moments": lambda m: GaLoreAdamW(
            adamw_groups(m), lr=adamw.lr, eps=1e-8, weight_decay=0.0, moment_format="8bit"
        ),
    }
    for name, cls in _other_adamw8bit().items():
        runs[name] = lambda m, cls=cls: cls(adamw_groups(m), lr=adamw.lr, weight_decay=0.0)
    print(
        f"\n## Quality: tiny, {args.steps} updates x {args.batch_size} x {args.seq_len} tokens, seeds {args.seeds}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'run':32s} {'final eval loss':>20s} {'state bytes':>12s} {'tokens/s':>10s}")
    for name, factory in runs.items():
        losses, speeds, state = [], [], 0
        for seed in args.seeds:
            settings = TrainSettings(
                steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_batches=8, seed=seed,
                measure_memory=False,
            )
            built: list[torch.optim.Optimizer] = []

            def keep(model: nn.Module, factory: Callable[[nn.Module], torch.optim.Optimizer] = factory) -> torch.optim.Optimizer:
                built.append(factory(model))
                return built[-1]

            preset = galore if name.startswith("GaLore") else adamw
            model = build_model(config, preset=preset, seed=seed)
            result = pretrain(model, keep, stream, settings, log=lambda line: None)
            losses.append(result["final_eval_loss"])
            speeds.append(result["tokens_per_s"])
            state = _state_bytes(built[-1])
        spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
        print(f"{name:32s} {statistics.mean(losses):>11.4f}{spread:>9s} {state:>12,d} {statistics.mean(speeds):>10,.0f}")


def _time(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up (torchao compiles its step here)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_time(args: argparse.Namespace) -> None:
    shapes = {"embedding 32000x512": (32000, 512), "MLP 1376x512": (1376, 512), "norm 512": (512,)}
    print(f"\n## Step time: one step, median of {args.repeats}, ratio to torch.optim.AdamW on the same tensors")
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    grads = {name: torch.randn(shape, generator=generator) * 1e-2 for name, shape in shapes.items()}
    makers: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "torch AdamW (fp32)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
        "ours, fp32 moments": lambda ps: GaLoreAdamW(ps, lr=1e-3, eps=1e-8),
        "ours, 8-bit moments": lambda ps: GaLoreAdamW(ps, lr=1e-3, eps=1e-8, moment_format="8bit"),
        "ours, 8-bit, default kernels": lambda ps: GaLoreAdamW(ps, lr=1e-3, eps=1e-8, moment_format="8bit", fused=False),
    }
    for name, cls in _other_adamw8bit().items():
        makers[name] = lambda ps, cls=cls: cls(ps, lr=1e-3, weight_decay=0.0)
    header = f"{'optimizer':32s}" + "".join(f" {name:>22s}" for name in shapes)
    print(header)
    reference: dict[str, float] = {}
    for label, make in makers.items():
        cells = []
        for name in shapes:
            param = nn.Parameter(base[name].clone())
            optimizer = make([param])
            param.grad = grads[name].clone()
            seconds = _time(optimizer.step, args.repeats)
            reference.setdefault(name, seconds)
            cells.append(f"{seconds * 1e3:8.2f} ms {seconds / reference[name]:5.2f}x")
        print(f"{label:32s}" + "".join(f" {cell:>22s}" for cell in cells))
    # GaLore's low-rank moments: the moment update itself, 8-bit vs fp32, on a rank-128 right moment.
    print("\nGaLore step on a 1376 x 512 matrix, rank 128 (refresh excluded):")
    for label, fmt in (("fp32 moments", "full"), ("8-bit moments", "8bit")):
        param = nn.Parameter(torch.randn(1376, 512, generator=generator))
        optimizer = GaLoreAdamW([{"params": [param], "rank": 128, "update_proj_gap": 10**9}], lr=1e-3, moment_format=fmt)
        param.grad = torch.randn(1376, 512, generator=generator)
        optimizer.step()  # the one refresh
        seconds = _time(optimizer.step, args.repeats)
        reference.setdefault("galore", seconds)
        print(f"  {label:16s} {seconds * 1e3:8.2f} ms {seconds / reference['galore']:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_run_arguments(parser, seeds=[0], repeats=15)
    args = start(parser)
    if args.part in ("all", "time"):
        step_time(args)
    if args.part in ("all", "quality"):
        quality(args)


if __name__ == "__main__":
    main()
