"""GaLoreAdamW under FSDP2 (``fully_shard``), LLaMA-60M, 2 ranks (CPU, gloo): state, communication, refreshes.

Per rank: the low-rank state (the projected group's moments and bases, local shards) against the same
optimizer in one process; the elements the optimizer's own collectives send on a normal step against
FSDP2's reduce-scatter of the full gradient (``(W-1)·ceil(m/W)·n`` elements per parameter, every
parameter); and the wall time of a refresh step's ``optimizer.step()`` with the projectors' owners
spread over the ranks against all on rank 0 (the same process, alternating, median of 5). Counting as
:class:`lowrank_optim.distributed.comm.TorchCommunicator` does (bandwidth-optimal algorithms). Run:
``python bench/bench_fsdp2.py`` (relaunches itself with torchrun).
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
import torch.distributed as dist

RANK, SEQ, BATCH, REPEATS = 128, 32, 1, 5


def _model():
    from lowrank_optim.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.from_name_or_path("60m"))


def _lowrank_elements(optimizer) -> int:
    """Elements of the projected group's state this rank holds (a DTensor's local shard)."""
    projected = {id(p) for g in optimizer.param_groups if "rank" in g for p in g["params"]}
    return sum(
        (t.to_local() if hasattr(t, "to_local") else t).numel()
        for p, s in optimizer.state.items()
        if id(p) in projected
        for k, t in s.items()
        if isinstance(t, torch.Tensor) and k != "step"
    )


def _backward(model, generator) -> None:
    tokens = torch.randint(0, 32000, (BATCH, SEQ), generator=generator)
    model(tokens, labels=tokens).loss.backward()


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        torchrun = Path(sys.executable).parent / "torchrun"
        sys.exit(subprocess.call([str(torchrun), "--nproc_per_node", "2", __file__]))
    warnings.filterwarnings("ignore")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lowrank_optim import GaLoreAdamW, param_groups

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    single = _model()
    single_opt = GaLoreAdamW(param_groups(single, rank=RANK), lr=1e-3)
    for p in single.parameters():
        p.grad = torch.zeros_like(p)
    single_opt.step()
    single_elements = _lowrank_elements(single_opt)
    del single, single_opt

    model = _model()
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = GaLoreAdamW(param_groups(model, rank=RANK, update_proj_gap=200), lr=1e-3)
    layout = optimizer.layout
    generator = torch.Generator().manual_seed(rank)
    elements = []
    for _ in range(2):  # step 1 refreshes, step 2 is a normal step
        optimizer.zero_grad()
        _backward(model, generator)
        before = layout.comm.elements
        optimizer.step()
        elements.append(layout.comm.elements - before)
    full_rs = sum((world - 1) * -(-p.shape[0] // world) * (p.numel() // max(p.shape[0], 1)) for p in model.parameters())
    state = _lowrank_elements(optimizer)

    for group in optimizer.param_groups:  # every step a refresh, for timing
        group["update_proj_gap"] = 1
    times: dict[str, list[float]] = {"balanced": [], "first": []}
    optimizer.zero_grad()
    _backward(model, generator)
    for _ in range(REPEATS):
        for policy in ("balanced", "first"):
            layout.owners = policy
            dist.barrier()
            start = time.perf_counter()
            optimizer.step()
            dist.barrier()
            times[policy].append(time.perf_counter() - start)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"state": state, "normal": elements[1], "refresh": elements[0]})
    if rank == 0:
        print(f"GaLoreAdamW rank {RANK} under FSDP2, LLaMA-60M, {world} ranks (CPU, gloo), torch {torch.__version__}")
        print(f"single-process low-rank state: {single_elements} elements")
        for index, row in enumerate(gathered):
            print(f"rank {index}: low-rank state {row['state']} elements = {row['state'] / single_elements:.3f}x single "
                  f"(goal <= 0.55); optimizer comm, refresh step {row['refresh']}, normal step {row['normal']} "
                  f"= {row['normal'] / full_rs:.4f} of the full-gradient reduce-scatter ({full_rs}) (goal <= 0.25)")
        balanced, first = statistics.median(times["balanced"]), statistics.median(times["first"])
        print(f"refresh step (optimizer.step, median of {REPEATS}): owners balanced {balanced * 1e3:.1f} ms, "
              f"all on rank 0 {first * 1e3:.1f} ms, ratio {balanced / first:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
