"""Worker for tests/reliability/test_per_layer_refusals.py: per-layer updates under data-parallel wrappers.

Two modes, one launch each:

* ``torchrun --standalone --nproc_per_node 2 per_layer_refusals.py ranks``: DDP over 2 gloo ranks, each rank
  on its own data. Every rank prints one line per case.
* ``python per_layer_refusals.py single``: one process in a gloo group of world size 1 (FSDP2, DeepSpeed and
  DDP at world size 1). Prints one line per case.

A line is ``RESULT {"case", "rank", "error", ...}``: ``error`` is the exception a case raised (type and
message) or ``None``. A case that is not refused trains for ``STEPS`` updates and reports what it measured
(``drift``: the largest weight difference between the ranks; ``max_diff``: against a normal run), so the
same worker shows what the code before the refusals did.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from lowrank_optim.models import LlamaConfig
from lowrank_optim.train import PerLayerUpdates
from lowrank_optim.train.methods import build_model, build_optimizer, load_presets

STEPS = 10
CONFIG = LlamaConfig.from_name_or_path("test")
PRESET = load_presets("test")["galore"]  # lr 1e-2, refreshes every 2 updates


def batch(rank: int, step: int) -> torch.Tensor:
    """Each rank its own micro-batch, as a data-parallel sampler gives it."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(0, CONFIG.vocab_size, (2, 17), generator=generator)


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, labels=tokens).loss


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([param.detach().reshape(-1) for param in model.parameters()])


def drift(model: nn.Module) -> float:
    """Largest difference between any rank's weights and rank 0's (0.0 for exact replicas)."""
    mine = flat(model)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return max((other - everyone[0]).abs().max().item() for other in everyone)


def train_per_layer(model: nn.Module, updates: PerLayerUpdates, rank: int) -> None:
    for step in range(STEPS):
        updates.backward(loss_of(model, batch(rank, step)))


def train_normal(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> None:
    for step in range(STEPS):
        loss_of(model, batch(rank, step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def galore(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = build_model(CONFIG, preset=PRESET, seed=seed)
    return model, build_optimizer(model, PRESET)


def attempt(case: str, body: Callable[[], dict[str, Any]]) -> None:
    """Run one case and print its line; an exception is the case's result, not the worker's failure."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        outcome = {"error": None, **body()}
    except Exception as error:  # noqa: BLE001 - every refusal (and every unexpected error) is reported
        outcome = {"error": f"{type(error).__name__}: {error}"}
    # One write per line: the ranks share torchrun's stdout, and print() writes the newline separately,
    # so two ranks' lines could run together.
    sys.stdout.write("RESULT " + json.dumps({"case": case, "rank": rank, **outcome}) + "\n")
    sys.stdout.flush()


# --- 2 ranks ---------------------------------------------------------------------------------------------


def run_ranks() -> None:
    # Built before the process group exists (nothing to refuse yet), wrapped in DDP afterwards: the check
    # at backward() has to catch it.
    early_model, early_optimizer = galore()
    early_updates = PerLayerUpdates(early_optimizer)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def ddp() -> dict[str, Any]:
        model, optimizer = galore()
        wrapped = nn.parallel.DistributedDataParallel(model)
        updates = PerLayerUpdates(optimizer)
        train_per_layer(wrapped, updates, rank)
        return {"drift": drift(model)}

    def wrapped_after_construction() -> dict[str, Any]:
        wrapped = nn.parallel.DistributedDataParallel(early_model)
        train_per_layer(wrapped, early_updates, rank)
        return {"drift": drift(early_model)}

    def normal_step() -> dict[str, Any]:
        # The control: DDP with a normal step keeps the replicas identical, so ``drift`` can tell.
        model, optimizer = galore()
        train_normal(nn.parallel.DistributedDataParallel(model), optimizer, rank)
        return {"drift": drift(model)}

    attempt("ddp", ddp)
    attempt("ddp_wrapped_after_construction", wrapped_after_construction)
    attempt("ddp_normal_step", normal_step)
    dist.barrier()
    dist.destroy_process_group()


# --- 1 process, world size 1 -----------------------------------------------------------------------------


def deepspeed_config(stage: int, **section: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if section:
        config["lowrank_optim"] = section
    return config


def run_single() -> None:
    # What torchrun would set for one process; DeepSpeed reads them even when the group exists already.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    reference, reference_optimizer = galore()
    train_normal(reference, reference_optimizer, 0)

    def against_normal_run(model: nn.Module) -> dict[str, Any]:
        initial, _ = galore()
        return {
            "max_diff": (flat(model) - flat(reference)).abs().max().item(),
            "moved": (flat(reference) - flat(initial)).abs().max().item(),
        }

    def world_size_1() -> dict[str, Any]:
        # Allowed: per-layer updates are exact in one process, and a group of one changes nothing.
        model, optimizer = galore()
        train_per_layer(model, PerLayerUpdates(optimizer), 0)
        return against_normal_run(model)

    def ddp_world_size_1() -> dict[str, Any]:
        # DDP's reducer copies the reduced gradients back after the hooks have stepped and freed them.
        model, optimizer = galore()
        train_per_layer(nn.parallel.DistributedDataParallel(model), PerLayerUpdates(optimizer), 0)
        return against_normal_run(model)

    def fsdp2() -> dict[str, Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = build_model(CONFIG, seed=0)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        updates = PerLayerUpdates(torch.optim.AdamW(model.parameters(), lr=1e-3))
        train_per_layer(model, updates, 0)
        plain = build_model(CONFIG, seed=0)
        train_normal(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3), 0)
        mine = torch.cat([param.full_tensor().detach().reshape(-1) for param in model.parameters()])
        return {"max_diff": (mine - flat(plain)).abs().max().item()}

    attempt("world_size_1", world_size_1)
    attempt("ddp_world_size_1", ddp_world_size_1)
    attempt("fsdp2", fsdp2)
    try:
        import deepspeed
    except ImportError:  # an optional dependency: the test skips the DeepSpeed cases then
        dist.destroy_process_group()
        return

    from lowrank_optim.deepspeed import initialize

    def deepspeed_wrapper() -> dict[str, Any]:
        model = build_model(CONFIG, seed=0)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=deepspeed_config(2)
        )
        initial = flat(model)
        try:
            train_per_layer(engine, PerLayerUpdates(ds_optimizer), 0)
        finally:
            engine.destroy()
        return {"moved": (flat(model) - initial).abs().max().item()}

    def deepspeed_bound_lowrank() -> dict[str, Any]:
        model = build_model(CONFIG, seed=0)
        initial = flat(model)
        engine, _, _, _ = initialize(model, deepspeed_config(2, rank=4, target_modules=["mlp"]))
        try:
            train_per_layer(engine, PerLayerUpdates(engine.basic_optimizer), 0)
        finally:
            engine.destroy()
        return {"moved": (flat(model) - initial).abs().max().item()}

    def deepspeed_after_construction() -> dict[str, Any]:
        # The user's own optimizer, hooked first, then handed to DeepSpeed: its params become ZeRO's.
        model = build_model(CONFIG, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        updates = PerLayerUpdates(optimizer)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(2))
        try:
            train_per_layer(engine, updates, 0)
        finally:
            engine.destroy()
        return {}

    def deepspeed_zero3_params() -> dict[str, Any]:
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(3)):
            model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
        PerLayerUpdates(torch.optim.AdamW(model.parameters(), lr=1e-3))
        return {}

    attempt("deepspeed_wrapper", deepspeed_wrapper)
    attempt("deepspeed_bound_lowrank", deepspeed_bound_lowrank)
    attempt("deepspeed_after_construction", deepspeed_after_construction)
    attempt("deepspeed_zero3_params", deepspeed_zero3_params)
    dist.destroy_process_group()


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    {"ranks": run_ranks, "single": run_single}[sys.argv[1]]()
