"""Per-rank optimizer state and the optimizer's own communication under DeepSpeed ZeRO, LLaMA-60M, 2 ranks.

Compares GaLoreAdamW (rank 128, std projection) bound to ZeRO-2 and ZeRO-3 (sharded and replicated
low-rank moments) with single-process GaLoreAdamW and with DeepSpeed running torch's AdamW at the same
stage. State bytes exclude DeepSpeed's fp32 master partition (the same for every optimizer). The
communication column counts the elements this rank sends in the optimizer's own collectives at a
refresh step (step 1) and at a normal step (step 2), as bandwidth-optimal algorithms send them: an
all-reduce of ``x`` elements ``2(W-1)/W·x``, an all-gather or reduce-scatter ``(W-1)·chunk`` (so a
full-gradient all-reduce, the reference, counts as ``Σ m·n`` at 2 ranks). DeepSpeed's gradient reduction
comes on top and is the same for every optimizer. The 8-bit rows store every moment as
``moment_format="8bit"`` (blocks of 256, moments of 4096 elements or more); ``step ms`` is the median
time of ``engine.step()`` over the normal steps 2-4 on this rank, and ``x fp32`` its ratio to the fp32
GaLore row of the same stage, run in the same process. Run: ``python bench/bench_deepspeed.py`` (relaunches
itself with torchrun, ``DS_ACCELERATOR=cpu``).
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

RANK = 128
SEQ, MICRO_BATCH = 32, 1


def _tensor_bytes(state: dict) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _tensor_bytes(value)
        elif isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def _state_bytes(optimizer) -> tuple[int, int]:
    """``(low-rank bytes, full-rank bytes)``: the state of the projected groups' partitions vs the rest."""
    projected = {id(flat) for flat, _ in optimizer.layout.projected_partitions()}
    lowrank = sum(_tensor_bytes(state) for flat, state in optimizer.state.items() if id(flat) in projected)
    full = sum(_tensor_bytes(state) for flat, state in optimizer.state.items() if id(flat) not in projected)
    return lowrank, full


def _model():
    from lowrank_optim.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.from_name_or_path("60m"))


def _projected_shapes(model) -> list[tuple[int, int]]:
    from lowrank_optim.deepspeed import param_groups_for

    return [tuple(p.shape) for p in param_groups_for(model, {"rank": RANK})[-1]["params"]]


def _single_process() -> tuple[int, int]:
    """Dense GaLoreAdamW state after one step, split into projected-group and full-rank-group bytes."""
    from lowrank_optim import GaLoreAdamW
    from lowrank_optim.deepspeed import param_groups_for

    model = _model()
    groups = param_groups_for(model, {"rank": RANK})
    optimizer = GaLoreAdamW(groups, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    projected = {id(p) for p in groups[-1]["params"]}
    lowrank = full = 0
    for param, state in optimizer.state.items():
        size = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        if id(param) in projected:
            lowrank += size
        else:
            full += size
    return lowrank, full


def _run(stage: int, optimizer: str, moments: str = "sharded", moment_format: str = "full") -> dict:
    import deepspeed

    from lowrank_optim.deepspeed import initialize

    model = _model()
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if optimizer == "adamw":
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config
        )
        counters = []
    else:
        config["lowrank_optim"] = {
            "rank": RANK, "update_proj_gap": 200, "lr": 1e-3, "zero3_moments": moments, "moment_format": moment_format
        }
        engine, *_ = initialize(model, config)
        counters = engine.basic_optimizer.layout.communicators
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    elements, seconds = [], []
    for _ in range(5):
        tokens = torch.randint(0, 32000, (MICRO_BATCH, SEQ), generator=generator)
        before = sum(c.elements for c in counters)
        loss = engine(tokens, labels=tokens).loss
        engine.backward(loss)
        start = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - start)
        elements.append(sum(c.elements for c in counters) - before)
    base = engine.basic_optimizer if optimizer != "adamw" else engine.optimizer.optimizer
    if optimizer == "adamw":
        lowrank, full = 0, sum(
            t.numel() * t.element_size() for s in base.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )
    else:
        lowrank, full = _state_bytes(base)
    engine.destroy()
    step_ms = 1e3 * statistics.median(seconds[2:])
    return {"lowrank": lowrank, "full": full, "refresh": elements[0], "normal": elements[1], "step_ms": step_ms}


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        torchrun = Path(sys.executable).parent / "torchrun"
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        sys.exit(subprocess.call([str(torchrun), "--nproc_per_node", "2", __file__], env=env))
    warnings.filterwarnings("ignore")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    rows = []
    for label, stage, optimizer, moments, moment_format in [
        ("ZeRO-2 AdamW (DeepSpeed)", 2, "adamw", "", "full"),
        ("ZeRO-2 GaLoreAdamW", 2, "galore", "sharded", "full"),
        ("ZeRO-2 GaLoreAdamW 8-bit", 2, "galore", "sharded", "8bit"),
        ("ZeRO-3 AdamW (DeepSpeed)", 3, "adamw", "", "full"),
        ("ZeRO-3 GaLoreAdamW sharded", 3, "galore", "sharded", "full"),
        ("ZeRO-3 GaLoreAdamW sharded 8-bit", 3, "galore", "sharded", "8bit"),
        ("ZeRO-3 GaLoreAdamW replicated", 3, "galore", "replicated", "full"),
    ]:
        outcome = _run(stage, optimizer, moments, moment_format)
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, outcome)
        rows.append((label, gathered))
    if rank != 0:
        return
    single_lowrank, single_full = _single_process()
    shapes = _projected_shapes(_model())
    full_grad = sum(m * n for m, n in shapes)
    # Size of the low-rank gradients R (std projection: m x r for m >= n, else r x n): r/min(m, n) of G each.
    bound = sum(m * RANK if m >= n else RANK * n for m, n in shapes)
    mib = 2.0**20
    print(f"LLaMA-60M, 2 ranks (CPU, gloo), GaLore rank {RANK}, {len(shapes)} projected matrices, "
          f"full projected gradient = {full_grad} elements")
    print(f"single-process GaLoreAdamW: low-rank state {single_lowrank / mib:.2f} MiB, full-rank-group Adam state "
          f"{single_full / mib:.2f} MiB")
    print(f"{'configuration':32s} {'rank':>4s} {'low-rank MiB':>12s} {'x single':>8s} {'full-rank MiB':>13s} "
          f"{'comm refresh':>12s} {'comm normal':>11s} {'normal/full grad':>16s} {'step ms':>8s} {'x fp32':>6s}")
    fp32 = {label.split()[0]: per_rank for label, per_rank in rows if label.endswith("GaLoreAdamW sharded")
            or label == "ZeRO-2 GaLoreAdamW"}
    for label, per_rank in rows:
        for index, outcome in enumerate(per_rank):
            ratio = outcome["lowrank"] / single_lowrank if outcome["lowrank"] else 0.0
            base = fp32[label.split()[0]][index]["step_ms"]
            print(f"{label:32s} {index:>4d} {outcome['lowrank'] / mib:>12.2f} {ratio:>8.3f} {outcome['full'] / mib:>13.2f} "
                  f"{outcome['refresh']:>12d} {outcome['normal']:>11d} {outcome['normal'] / full_grad:>16.4f} "
                  f"{outcome['step_ms']:>8.1f} {outcome['step_ms'] / base:>6.2f}")
    print(f"goal: normal-step communication <= r/min(m,n) of a full gradient all-reduce; with std projection the "
          f"low-rank gradient is {bound} elements = {bound / full_grad:.4f} of the full gradient")


if __name__ == "__main__":
    main()
