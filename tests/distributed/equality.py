"""Worker run by torchrun: DeepSpeed ZeRO runs of the low-rank optimizers against a single-process run.

Every case trains a small model for 7 steps (refreshes at steps 0, 3, 6) on a fixed global batch split
over the ranks (and over micro-batches with gradient accumulation), then compares all parameters with
the same optimizer run in one process on the whole batch. Rank 0 prints one JSON line per case:
``{"case": ..., "max_diff": ..., "tolerance": ...}``. Usage: ``equality.py CASE [CASE ...]`` where CASE
is ``optimizer:stage[:option[+option]]``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from teardown import end_worker
from torch import nn

from lowrank_optim import APOLLOAdamW
from lowrank_optim.deepspeed import (
    bind,
    initialize,
    load_lowrank_state,
    optimizer_factory,
    param_groups_for,
    save_lowrank_state,
)

STEPS = 7
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
GLOBAL_BATCH = 12
SECTIONS = {
    "galore": {"optimizer": "galore_adamw", "scale": 0.25},
    "fira": {"optimizer": "fira_adamw", "alpha": 0.25},
    "dct": {"optimizer": "dct_adamw", "scale": 0.25},
}


class Net(nn.Module):
    """Right-projected (36x20), left-projected (28x36, 10x28) matrices, a norm and biases."""

    def __init__(self, hidden: int = 28) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(20, 36)
        self.norm = nn.LayerNorm(36)
        self.mlp_mid = nn.Linear(36, hidden)
        self.mlp_out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(torch.tanh(self.mlp_mid(self.norm(torch.tanh(self.mlp_in(x))))))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(STEPS, GLOBAL_BATCH, 20, generator=generator)
    targets = torch.randn(STEPS, GLOBAL_BATCH, 10, generator=generator)
    return inputs, targets


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x).float() - y) ** 2).mean()


def section_for(name: str, options: set[str] = frozenset()) -> dict:
    """The plugin section of a case; option ``random``: the seeded random projector (its 63-bit seeds must
    survive ZeRO's checkpoints, whose loader casts nested state to fp32)."""
    section = {**SECTIONS[name], "rank": 4, "update_proj_gap": 3, "lr": 1e-2, "weight_decay": 0.01, "target_modules": ["mlp"]}
    if "random" in options:
        section["projector"] = "random"
    if "8bit" in options:
        # Blocks of 4 and no size threshold: every moment of Net is quantized, in many blocks, and ZeRO's
        # cuts fall inside rows and blocks.
        section["moment_format"] = {"name": "8bit", "block_size": 4, "min_size": 0}
    if "auto" in options:
        # rank="auto" at 6000 bytes (rank 4 in fp32 costs 4128 for Net's three mlp matrices).
        section.update(rank="auto", state_budget=6000)
    return section


def apollo_groups(model: nn.Module) -> list[dict]:
    """``apollo``: APOLLOAdamW built by hand and bound (the plugin builds it too:
    tests/test_distributed_plugin.py), on the mlp matrices, with apollo-torch's random projection (seeds
    by position) and its channel-wise scaling."""
    matrices = [p for n, p in model.named_parameters() if "mlp" in n and p.dim() == 2]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest}, {"params": matrices, "rank": 4, "update_proj_gap": 3, "proj": "random"}]


def make_optimizer(name: str, groups: list[dict], options: set[str] = frozenset()) -> torch.optim.Optimizer:
    if name == "apollo":
        return APOLLOAdamW(groups, lr=1e-2, weight_decay=0.01)
    return optimizer_factory(section_for(name, options))(groups)


def reference(
    name: str, clip: float, bf16: bool, hidden: int, options: set[str] = frozenset(), split: int = 1
) -> list[torch.Tensor]:
    """One process, whole batch; bf16: a bf16 model with fp32 master weights, as DeepSpeed keeps them.
    ``split``: the gradient is the mean of the gradients of ``split`` equal slices of the batch (the ranks'
    shares), summed in rank order, so that the reference rounds as an all-reduce does: 8-bit moments can
    flip a code on a 1e-8 change of a gradient (one flip moves a parameter by ~1e-5), which is no
    difference between the distributed and the one-process step."""
    torch.manual_seed(0)
    model = Net(hidden)
    inputs, targets = data()
    if bf16:
        model = model.bfloat16()
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    by_id = {id(p): m for p, m in zip(model.parameters(), masters)}
    built = apollo_groups(model) if name == "apollo" else param_groups_for(model, section_for(name, options))
    groups = [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in built]
    optimizer = make_optimizer(name, groups, options)
    for step in range(STEPS):
        size = GLOBAL_BATCH // split
        for part in range(split):
            model.zero_grad()
            x = inputs[step, part * size : (part + 1) * size].to(next(model.parameters()).dtype)
            loss_fn(model, x, targets[step, part * size : (part + 1) * size]).backward()
            for p, m in zip(model.parameters(), masters):
                m.grad = p.grad.float() if part == 0 else m.grad + p.grad.float()
        if split > 1:
            for m in masters:
                m.grad /= split
        if clip:
            torch.nn.utils.clip_grad_norm_(masters, clip)
        optimizer.step()
        with torch.no_grad():
            for p, m in zip(model.parameters(), masters):
                p.copy_(m)
    return [p.detach().float() for p in model.parameters()]


def resume_single_process(name: str, directory: Path, steps: range, options: set[str]) -> list[torch.Tensor]:
    """A plain optimizer in one process resumed from the weights and the name-keyed state of a DeepSpeed run."""
    model = Net()
    model.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
    section = section_for(name, options)
    optimizer = optimizer_factory(section)(param_groups_for(model, section))
    load_lowrank_state(optimizer, directory, model=model)
    inputs, targets = data()
    for step in steps:
        model.zero_grad()
        loss_fn(model, inputs[step], targets[step]).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def run_config_case(case: str) -> dict:
    """``config:S``: the shipped ``configs/deepspeed/zeroS_bf16.json`` on ``Net``, two steps (no skipped step,
    no extra one: at stage 0 DeepSpeed's wrapper steps once while it is built, which bind undoes)."""
    stage = int(case.split(":")[1])
    path = CONFIGS / f"zero{stage}_bf16.json"
    torch.manual_seed(0)
    engine, optimizer, _, scheduler = initialize(Net(), str(path))
    inputs, targets = data()
    micro = engine.train_micro_batch_size_per_gpu()
    for step in range(2):
        x = inputs[step].repeat(micro // GLOBAL_BATCH + 1, 1)[:micro].bfloat16()
        y = targets[step].repeat(micro // GLOBAL_BATCH + 1, 1)[:micro]
        engine.backward(loss_fn(engine, x, y))
        engine.step()
    base = engine.basic_optimizer
    steps = [int(state["step"].item()) for state in base.state.values()]
    outcome = {
        "case": case,
        "zero_stage": engine.zero_optimization_stage(),
        "global_steps": engine.global_steps,
        "optimizer_steps": sorted(set(steps)),
        "bound": type(base.layout).__name__,
        "scheduler": type(scheduler).__name__,
    }
    engine.destroy()
    return outcome


def auto_ranks(engine) -> list[int]:
    """rank="auto": every matrix's rank, from the partitions' rank tables, sorted."""
    return sorted(value for state in engine.basic_optimizer.state.values() for value in state.get("ranks", {}).values())


def run_case(case: str) -> dict:
    if case.startswith("config:"):
        return run_config_case(case)
    name, stage, *rest = case.split(":")
    stage = int(stage)
    options = set(rest[0].split("+")) if rest else set()
    world = dist.get_world_size()
    rank = dist.get_rank()
    gas = 2 if "gas2" in options else 1
    clip = 0.5 if "clip" in options else 0.0
    bf16 = "bf16" in options
    # "wide": the middle matrix (36x60) is larger than two ZeRO-1/2 partitions at 3 ranks.
    hidden = 60 if "wide" in options else 28
    micro = GLOBAL_BATCH // world // gas
    zero: dict = {"stage": stage}
    if stage in (1, 2):
        zero.update(reduce_bucket_size=300, allgather_bucket_size=300)
    if "overlap" in options:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if "rr" in options:
        zero["round_robin_gradients"] = True
    if "noalign" in options:
        zero["parameter_alignment"] = False
    if "offload" in options:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:
        # Small sub-groups (several per param group: a rank="auto" group is allocated as a whole at its first
        # sub-group's refresh); "onesub": the group in one sub-group.
        sub_group_size = 10_000 if "onesub" in options else 300
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0, sub_group_size=sub_group_size)
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "zero_optimization": zero,
        "gradient_clipping": clip,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    if name != "apollo":
        config["lowrank_optim"] = {
            **section_for(name, options), **({"zero3_moments": "replicated"} if "replicated" in options else {})
        }

    def start(model: nn.Module):
        if name != "apollo":
            return initialize(model, config)[0]
        # What a trainer that calls deepspeed.initialize itself does: its own optimizer, then bind.
        engine = deepspeed.initialize(
            model=model,
            optimizer=lambda groups: make_optimizer(name, groups),
            model_parameters=apollo_groups(model),
            config={**config, "zero_allow_untested_optimizer": True},
        )[0]
        bind(engine)
        return engine

    def build():
        torch.manual_seed(0)
        if "zinit" in options:
            with deepspeed.zero.Init(config_dict_or_path={k: v for k, v in config.items() if k != "lowrank_optim"}):
                return start(Net(hidden))
        return start(Net(hidden))

    inputs, targets = data()
    dtype = torch.bfloat16 if bf16 else torch.float32

    def train(engine, steps: range) -> None:
        for step in steps:
            for micro_step in range(gas):
                start = (rank * gas + micro_step) * micro
                x = inputs[step, start : start + micro].to(dtype)
                loss = loss_fn(engine, x, targets[step, start : start + micro])
                engine.backward(loss)
                engine.step()

    def parameters(engine) -> list[torch.Tensor]:
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                return [p.detach().float().clone() for p in engine.module.parameters()]
        return [p.detach().float().clone() for p in engine.module.parameters()]

    # "names": save the name-keyed state after 4 steps; "resume": continue such a save (made at another
    # number of ranks) for the last 3 steps and compare with that run's uninterrupted result.
    named = Path(os.environ["CKPT_DIR"]) / (
        f"named_{name}_{stage}{'_8bit' if '8bit' in options else ''}{'_auto' if 'auto' in options else ''}"
    )
    if "resume" in options:
        torch.manual_seed(0)
        model = Net(hidden)
        model.load_state_dict(torch.load(named / "model.pt", weights_only=True))
        engine = initialize(model, config)[0]
        load_lowrank_state(engine, named)
        train(engine, range(4, STEPS))
        expected = [t.float() for t in torch.load(named / "final.pt", weights_only=True)]
        diff = max((a - b).abs().max().item() for a, b in zip(parameters(engine), expected))
        outcome = {"case": case, "world": world, "max_diff": diff}
        if "auto" in options:
            outcome["ranks"] = auto_ranks(engine)
        engine.destroy()
        return outcome
    engine = build()
    if "names" in options:
        train(engine, range(4))
        save_lowrank_state(engine, named)
        weights = {n: p for n, p in zip([n for n, _ in engine.module.named_parameters()], parameters(engine))}
        if rank == 0:
            torch.save(weights, named / "model.pt")
        train(engine, range(4, STEPS))
        result = parameters(engine)
        if rank == 0:
            torch.save(result, named / "final.pt")
            resumed = resume_single_process(name, named, range(4, STEPS), options)
        dist.barrier()
    elif "ckpt" in options:
        # Save after 4 steps, resume in a fresh engine, and require the same bits as the uninterrupted run.
        train(engine, range(4))
        directory = os.environ["CKPT_DIR"] + "/" + case.replace(":", "_").replace("+", "_")
        engine.save_checkpoint(directory, tag="step4")
        train(engine, range(4, STEPS))
        uninterrupted = parameters(engine)
        engine.destroy()
        engine = build()
        engine.load_checkpoint(directory, tag="step4")
        train(engine, range(4, STEPS))
        resumed = parameters(engine)
        bitwise = all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))
        result = resumed
    else:
        train(engine, range(STEPS))
        result = parameters(engine)
    expected = reference(name, clip, bf16, hidden, options, split=world if "split" in options else 1)
    diff = max((a - b).abs().max().item() for a, b in zip(result, expected))
    torch.manual_seed(0)
    moved = max((a - b).abs().max().item() for a, b in zip(result, [p.detach().float() for p in Net(hidden).parameters()]))
    outcome = {"case": case, "world": world, "max_diff": diff, "moved": moved}
    if "ckpt" in options:
        outcome["bitwise_resume"] = bitwise
    if "names" in options and rank == 0:
        outcome["single_process_resume_diff"] = max((a - b).abs().max().item() for a, b in zip(result, resumed))
    if bf16:
        # Per tensor, in units of the bf16 ulp of its largest reference value: 2^(floor(log2 max|w|) - 7).
        outcome["max_ulps"] = max(
            (a - b).abs().max().item() / 2.0 ** (torch.tensor(b.abs().max().item()).log2().floor().item() - 7)
            for a, b in zip(result, expected)
        )
    layout = engine.basic_optimizer.layout if stage else None
    holders = [len(m.holders) for _, part in getattr(layout, "_partitions", {}).values() for m in part.plan.matrices]
    outcome["max_holders"] = max(holders, default=1)
    # How many flat partitions (ZeRO-3: sub-groups) the projected group is stepped in.
    outcome["projected_partitions"] = len(layout.projected_partitions()) if stage else 1
    if "auto" in options and stage:
        outcome["ranks"] = auto_ranks(engine)
    engine.destroy()
    return outcome


def main() -> None:
    warnings.filterwarnings("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    for case in sys.argv[1:]:
        outcome = run_case(case)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(outcome), flush=True)
    end_worker()


if __name__ == "__main__":
    main()
