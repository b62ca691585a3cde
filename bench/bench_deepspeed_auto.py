"""``rank="auto"`` under DeepSpeed ZeRO against a fixed rank of equal state memory, LLaMA-60M, 2 ranks (issue 17).

The budget is ``B = sum_i rank_state_bytes(group, W_i, min(128, m_i, n_i))`` over the 56 projected matrices:
exactly the rank-dependent state GaLoreAdamW keeps at rank 128 (counted as one process holds it). Each
configuration runs GaLoreAdamW at rank 128 and at ``rank="auto", state_budget=B``, both bound by
``lowrank_optim.deepspeed.initialize``, 7 steps with ``update_proj_gap=2`` (refreshes at steps 0, 2, 4, 6).
Printed per rank: the low-rank state this rank holds (MiB, the tensors really there), the whole-tensor
bytes the rank tables add up to against ``B`` (``held/B``, must be <= 1), the optimizer's own elements sent
at a refresh step (step 2) and at a normal step (step 3), the median ``engine.step()`` time over the
refresh steps 2, 4, 6 and over the normal steps 1, 3, 5, and both times as a ratio to the fixed-rank run
of the same configuration in this process. ZeRO-3 runs twice: the projected group in one sub-group
(``sub_group_size`` 1e9, DeepSpeed's default) and cut into sub-groups of at most 4M elements (the first
sub-group's refresh then gathers every sub-group's gradient once more to allocate the whole group).
Run: ``python bench/bench_deepspeed_auto.py`` (relaunches itself with torchrun, ``DS_ACCELERATOR=cpu``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from bench_deepspeed import _model, _tensor_bytes  # this folder is on the path (run as a script)

RANK = 128
# 4 x 128 tokens per rank: 1024 per step, more than any projected side (512), so every gradient has full rank
# (with fewer tokens than that, rank="auto" rightly stops at the gradient's rank and leaves budget unused).
SEQ, MICRO_BATCH = 128, 4
STEPS = 7
GAP = 2


def _budget() -> int:
    """Rank 128's rank-dependent state over the projected matrices, as one process holds it."""
    from lowrank_optim import GaLoreAdamW
    from lowrank_optim.deepspeed import param_groups_for

    groups = param_groups_for(_model(), {"rank": RANK})
    optimizer = GaLoreAdamW(groups, lr=1e-3)
    group = optimizer.param_groups[-1]
    return sum(optimizer.rank_state_bytes(group, p, min(RANK, *p.shape)) for p in group["params"])


def _run(stage: int, rank: int | str, budget: int, sub_group_size: int) -> dict:
    from lowrank_optim.deepspeed import initialize

    model = _model()
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["sub_group_size"] = sub_group_size
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "lowrank_optim": {"rank": rank, "update_proj_gap": GAP, "lr": 1e-3},
    }
    if rank == "auto":
        config["lowrank_optim"]["state_budget"] = budget
    engine, *_ = initialize(model, config)
    base = engine.basic_optimizer
    layout = base.layout
    counters = layout.communicators
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    elements, seconds = [], []
    for _ in range(STEPS):
        tokens = torch.randint(0, 32000, (MICRO_BATCH, SEQ), generator=generator)
        loss = engine(tokens, labels=tokens).loss
        engine.backward(loss)
        before = sum(c.elements for c in counters)
        start = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - start)
        elements.append(sum(c.elements for c in counters) - before)
    projected = layout.projected_partitions()
    lowrank = sum(_tensor_bytes(base.state[flat]) for flat, _ in projected)
    # Whole-tensor bytes of the ranks the tables hold (every matrix once), as the budget counts them.
    group_index = projected[0][1].group_index
    group = base.param_groups[group_index]
    ranks: dict[str, tuple[tuple[int, int], int]] = {}
    for flat, part in projected:
        table = base.state[flat].get("ranks")
        for mp in part.plan.matrices:
            ranks[mp.name] = (tuple(mp.shape), table[mp.name] if table else min(RANK, *mp.shape))
    held = sum(
        base.rank_state_bytes(group, torch.empty(shape, dtype=torch.float32, device="meta"), max(r, 1))
        for shape, r in ranks.values()
    )
    engine.destroy()
    values = sorted(r for _, r in ranks.values())
    return {
        "lowrank": lowrank,
        "held": held,
        "partitions": len(projected),
        "refresh_comm": elements[2],
        "normal_comm": elements[3],
        "refresh_ms": 1e3 * statistics.median(seconds[2::2]),
        "normal_ms": 1e3 * statistics.median(seconds[1::2]),
        "ranks": (values[0], statistics.mean(values), values[-1]),
    }


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        torchrun = Path(sys.executable).parent / "torchrun"
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        sys.exit(subprocess.call([str(torchrun), "--standalone", "--nproc_per_node", "2", __file__], env=env))
    warnings.filterwarnings("ignore")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    budget = _budget()
    configurations = [("ZeRO-2", 2, 10**9), ("ZeRO-3 one sub-group", 3, 10**9), ("ZeRO-3 sub-groups <= 4M", 3, 4_000_000)]
    rows = []
    for label, stage, sub_group_size in configurations:
        for rank in (RANK, "auto"):
            outcome = _run(stage, rank, budget, sub_group_size)
            gathered: list = [None, None]
            torch.distributed.all_gather_object(gathered, outcome)
            rows.append((label, rank, gathered))
    if torch.distributed.get_rank() != 0:
        return
    mib = 2.0**20
    print(f"LLaMA-60M, 2 ranks (CPU, gloo), 56 projected matrices, budget B = {budget:,} bytes (rank {RANK}'s state), "
          f"{STEPS} steps, gap {GAP}")
    print(f"{'configuration':24s} {'run':>8s} {'rank':>4s} {'parts':>5s} {'ranks min/mean/max':>20s} {'low-rank MiB':>12s} "
          f"{'held/B':>6s} {'comm refresh':>12s} {'comm normal':>11s} {'refresh ms':>10s} {'x fixed':>7s} "
          f"{'normal ms':>9s} {'x fixed':>7s}")
    fixed = {(label, index): outcome for label, rank, per_rank in rows if rank == RANK for index, outcome in enumerate(per_rank)}
    for label, rank, per_rank in rows:
        for index, outcome in enumerate(per_rank):
            base = fixed[(label, index)]
            low, mean, high = outcome["ranks"]
            print(f"{label:24s} {str(rank):>8s} {index:>4d} {outcome['partitions']:>5d} {f'{low}/{mean:.1f}/{high}':>20s} "
                  f"{outcome['lowrank'] / mib:>12.2f} {outcome['held'] / budget:>6.3f} {outcome['refresh_comm']:>12d} "
                  f"{outcome['normal_comm']:>11d} {outcome['refresh_ms']:>10.1f} "
                  f"{outcome['refresh_ms'] / base['refresh_ms']:>7.2f} {outcome['normal_ms']:>9.1f} "
                  f"{outcome['normal_ms'] / base['normal_ms']:>7.2f}")
    most = max(outcome["held"] for _, _, per_rank in rows for outcome in per_rank)
    print(f"most whole-tensor state held by any run: {most:,} bytes <= B: {most <= budget}")
    assert most <= budget, (most, budget)


if __name__ == "__main__":
    main()
