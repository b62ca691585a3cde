"""``rank="auto"`` against a fixed rank of equal state memory, on the demo's ``tiny`` LLaMA (issue 17).

For each fixed rank ``r`` given: the budget is ``B = sum_i rank_state_bytes(group, W_i, min(r, m_i, n_i))``
over the projected matrices, exactly the rank-dependent state (moments and projector tensors) GaLore
keeps at rank ``r``. Then the same training runs twice per seed, once with ``rank=r`` and once with
``rank="auto", state_budget=B`` (everything else equal: the tiny GaLore preset's lr, gap, scale; the demo's
200 updates of 16 x 128 tokens). Printed per run: final held-out loss (mean ± std over the seeds), the
largest rank-dependent state seen after any update (counted from the tensors really held, not from the
accounting) against ``B``, tokens/s as a ratio to the fixed-rank run of the same seed in this process, and
the mean final rank per matrix kind with its range over the layers.

``--part time``: the cost of choosing the ranks, on LLaMA-60M's 56 projected matrices (8 layers of q/k/v/o
512x512, gate/up 1376x512, down 512x1376) with random gradients: the median time of a refresh step and
of a normal step, ``rank="auto"`` at the budget of rank 128 against rank 128, in this process. An auto
refresh adds one ``svdvals`` per matrix (the spectrum the allocation reads) to the projector's own SVD.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _demo_args import add_demo_run_arguments, start  # noqa: E402

from lowrank_optim import GaLoreAdamW, param_groups  # noqa: E402
from lowrank_optim.data import TokenStream, stdlib_corpus  # noqa: E402
from lowrank_optim.models import LlamaConfig  # noqa: E402
from lowrank_optim.train.methods import build_model, load_presets  # noqa: E402
from lowrank_optim.train.pretrain import TrainSettings, pretrain  # noqa: E402

# State that does not depend on the rank (the budget does not bound it).
_UNBUDGETED = {"step", "residual_norm", "update_norm"}


def _held_bytes(optimizer: GaLoreAdamW) -> int:
    """Bytes of the rank-dependent tensors the projected group really holds."""
    total = 0
    for param in optimizer.param_groups[1]["params"]:
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and key not in _UNBUDGETED:
                total += value.numel() * value.element_size()
    return total


def _kind(name: str) -> str:
    """``layers.2.attn.q_proj.weight`` -> ``q_proj``."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def step_time(args: argparse.Namespace) -> None:
    shapes = ([(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]) * 8
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    threads = torch.get_num_threads()
    print(f"\n## step time, LLaMA-60M's {len(shapes)} projected matrices, median of {args.repeats}, {threads} threads")
    optimizers: dict[str, GaLoreAdamW] = {}
    budget = 0
    for label in ("fixed rank 128", "auto"):
        params = [nn.Parameter(torch.zeros(shape)) for shape in shapes]
        group: dict[str, Any] = {"params": params, "rank": 128, "update_proj_gap": 2}
        if label == "auto":
            group.update(rank="auto", state_budget=budget)
        optimizer = optimizers[label] = GaLoreAdamW([group], lr=1e-3, weight_decay=0.0)
        if label != "auto":
            budget = sum(optimizer.rank_state_bytes(optimizer.param_groups[0], p, 128) for p in params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()  # the first refresh builds the state
    # Alternated step by step, so that a drift of the machine's speed reaches both alike.
    times: dict[tuple[str, str], list[float]] = {(label, kind): [] for label in optimizers for kind in ("refresh", "normal")}
    for _ in range(args.repeats):
        for kind in ("normal", "refresh"):  # steps 1, 3, ...: normal; 2, 4, ...: a refresh
            for label, optimizer in optimizers.items():
                start = time.perf_counter()
                optimizer.step()
                times[label, kind].append(time.perf_counter() - start)
    medians = {
        label: (statistics.median(times[label, "refresh"]), statistics.median(times[label, "normal"])) for label in optimizers
    }
    base = medians["fixed rank 128"]
    print(f"budget B = {budget:,d} bytes (rank 128's state)")
    print(f"{'run':16s} {'refresh step':>20s} {'normal step':>20s}")
    for label, (refresh_s, normal_s) in medians.items():
        refresh_cell = f"{refresh_s * 1e3:10.1f} ms {refresh_s / base[0]:5.2f}x"
        print(f"{label:16s} {refresh_cell} {normal_s * 1e3:10.1f} ms {normal_s / base[1]:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_run_arguments(parser, seeds=[0, 1, 2], repeats=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--moment-format", default="full", choices=("full", "8bit"))
    args = start(parser)
    if args.part in ("all", "time"):
        step_time(args)
    if args.part == "time":
        return
    config = LlamaConfig.from_name_or_path("tiny")
    preset = load_presets("tiny")["galore"]
    stream = TokenStream(stdlib_corpus(), args.seq_len)
    print(
        f"tiny, {args.steps} updates x {args.batch_size} x {args.seq_len} tokens, GaLore lr {preset.lr}, "
        f"gap {preset.update_proj_gap}, scale {preset.scale}, moment_format {args.moment_format}, seeds {args.seeds}"
    )

    def factory(rank: int | str, budget: int | None) -> Callable[[nn.Module], GaLoreAdamW]:
        def make(model: nn.Module) -> GaLoreAdamW:
            groups = param_groups(model, rank=1, update_proj_gap=preset.update_proj_gap, scale=preset.scale)
            groups[1]["rank"] = rank
            if budget is not None:
                groups[1]["state_budget"] = budget
            groups[0]["lr"] = preset.other_lr if preset.other_lr is not None else preset.lr
            return GaLoreAdamW(groups, lr=preset.lr, weight_decay=0.0, moment_format=args.moment_format)

        return make

    for rank in args.ranks:
        probe = factory(rank, None)(build_model(config, preset=preset, seed=0))
        group = probe.param_groups[1]
        budget = sum(probe.rank_state_bytes(group, p, min(rank, *p.shape)) for p in group["params"])
        print(f"\n## fixed rank {rank} vs rank='auto' at its state budget B = {budget:,d} bytes")
        print(f"{'run':22s} {'final eval loss':>18s} {'max held / B':>13s} {'tokens/s vs fixed':>18s}")
        runs = {f"fixed rank {rank}": factory(rank, None), "auto": factory("auto", budget)}
        results: dict[str, dict[str, Any]] = {
            label: {"losses": [], "speeds": [], "held": 0, "ranks": defaultdict(list)} for label in runs
        }
        # Interleaved (seed by seed), so that a drift of the machine's speed reaches both runs alike.
        for seed in args.seeds:
            for label, make in runs.items():
                found = results[label]
                settings = TrainSettings(
                    steps=args.steps,
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                    eval_batches=8,
                    seed=seed,
                    measure_memory=False,
                )
                built: list[GaLoreAdamW] = []

                def keep(
                    model: nn.Module, make: Callable[[nn.Module], GaLoreAdamW] = make, built: list[GaLoreAdamW] = built
                ) -> GaLoreAdamW:
                    built.append(make(model))
                    return built[-1]

                def watch(update: int, model: nn.Module, built: list[GaLoreAdamW] = built, found: dict = found) -> None:
                    found["held"] = max(found["held"], _held_bytes(built[-1]))

                model = build_model(config, preset=preset, seed=seed)
                result = pretrain(model, keep, stream, settings, callbacks=[watch], log=lambda line: None)
                found["losses"].append(result["final_eval_loss"])
                found["speeds"].append(result["tokens_per_s"])
                optimizer = built[-1]
                if seed == args.seeds[-1]:
                    names = {id(p): n for n, p in model.named_parameters()}
                    for p in optimizer.param_groups[1]["params"]:
                        held_rank = optimizer.state[p]["matrix_rank"] if label == "auto" else min(rank, *p.shape)
                        found["ranks"][_kind(names[id(p)])].append(int(held_rank))
        base = results[f"fixed rank {rank}"]["speeds"]
        for label, found in results.items():
            losses = found["losses"]
            spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
            ratio = statistics.mean(s / b for s, b in zip(found["speeds"], base))
            print(f"{label:22s} {statistics.mean(losses):>9.4f}{spread:>9s} {found['held'] / budget:>13.3f} {ratio:>17.2f}x")
        print(f"final ranks of the auto run (seed {args.seeds[-1]}), per matrix kind: mean [min, max] over layers")
        for kind, ranks in results["auto"]["ranks"].items():
            print(f"  {kind:10s} {statistics.mean(ranks):6.1f} [{min(ranks)}, {max(ranks)}]")
        print("per-seed losses: " + "; ".join(f"{k}: {', '.join(f'{x:.4f}' for x in v['losses'])}" for k, v in results.items()))


if __name__ == "__main__":
    main()
