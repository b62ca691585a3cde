"""Worker run by torchrun: FSDP2 (``fully_shard``) runs of the optimizers against a single-process run.

Every case builds the same small model (seed 0), shards it with ``fully_shard`` (each Linear, then the
root, on a 1-D CPU mesh over all ranks, gloo), builds the optimizer the ordinary way after sharding from
``lowrank_optim.param_groups`` (projected group: the Linear weights), trains 7 steps (refreshes at steps
0, 3, 6) on a fixed global batch split over the ranks, gathers every parameter (``full_tensor()``) and
compares it with the same optimizer run in one process (no FSDP, plain model) on the whole batch. The
reference runs in-process on every rank (it is tiny). Rank 0 prints one line per case::

    RESULT {"case": ..., "world": ..., "max_diff": ..., "tolerance": ..., ...}

Usage: ``fsdp2_worker.py CASE [CASE ...]``; CASE is ``optimizer:option[+option]`` with optimizer
``adamw`` (torch.optim.AdamW: the harness's self-check), ``galore``, ``fira`` or ``dct`` and options

* ``plain``: the above, fp32, tolerance 1e-6.
* ``accum``: 2 micro-batches per step, ``set_requires_gradient_sync(False)`` on the first.
* ``clip``: ``clip_grad_norm_(model.parameters(), 0.5)`` before every step (``min_grad_norm`` reports the
  smallest pre-clip norm, which must exceed 0.5 for the clipping to bite).
* ``bf16``: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``. The reference mimics it: a
  bf16 copy of the fp32 master model runs forward/backward on each rank's share of the batch (inputs
  cast to bf16, as FSDP2 casts them), each share's bf16 gradient is cast to fp32 and the shares are
  averaged in fp32 (FSDP2's fp32 reduce-scatter), and the optimizer steps the fp32 masters. Compared:
  the fp32 sharded (master) parameters, gathered, with the reference's fp32 masters; tolerance 2 bf16
  ulps of the largest parameter magnitude, ``2 * 2**-8 * max|param|`` (``max_ulps``: the worst tensor's
  difference in ulps of its own largest magnitude, for information).
* ``dcp``: 4 steps, save model and optimizer with ``torch.distributed.checkpoint``
  (``get_state_dict`` + ``dcp.save``), build a fresh model and optimizer, load (``get_state_dict``,
  ``dcp.load``, ``set_state_dict``), train the last 3 steps; compared with the uninterrupted 7-step FSDP2
  run, bit for bit (tolerance 0); ``reference_diff`` is the uninterrupted run against one process.
* ``reshard``: as ``plain`` (compared with one process), saving after step 4 into
  ``$CKPT_DIR/reshard_<optimizer>``; ``resume`` (another launch, at another world size) loads that save
  into a fresh FSDP2 model and optimizer, trains the last 3 steps and compares with the uninterrupted
  single-process run (1e-6).

and the case ``nonfinite`` (a NaN in one rank's shard: that matrix skipped alike on every rank, see
``run_nonfinite``), and the case ``nondivisible``: asserts that some projected weight's rows are split unevenly (some rank
holds fewer rows than another) and reports each one's rows per rank.

The case ``refusals`` checks, for each low-rank optimizer, what the FSDP2 layout refuses (nothing is
trained against the reference): it reports, per check, the exception raised on this rank
(``{"type", "message"}``, or ``{"type": null}`` if none was raised) and whether every rank raised the same
(``ranks_agree``); the driver asserts the messages. The checks:

* ``plain_among_fullrank`` / ``plain_among_projected``: the sharded model's parameters plus one plain
  ``nn.Parameter`` (3x4 appended to ``model.parameters()``; 8x6 appended to the projected group);
* ``replicated_alone`` / ``replicated_among_projected``: a DTensor with placements ``(Replicate(),)``
  (``distribute_tensor``, 8x6) as the only parameter, or appended to the projected group;
* ``flat_projected`` / ``flat_among_fsdp2``: a 1-D tensor (24 elements, as FSDP1 without
  ``use_orig_params=True`` flattens) in a group with ``rank``, alone or as a third group after the
  sharded model's two;
* ``replaced_after_construction``: after 2 steps, the projected group's first DTensor (``mlp_in.weight``)
  is replaced in ``param_groups`` by a plain tensor (its gathered value, with a gradient) and
  ``step()`` is called with every gradient in place; ``unchanged`` says whether every parameter
  (``full_tensor()``) and every state tensor (gathered) is bit for bit what it was before that step.
  The DTensor is then put back and a step must go through (``moved_after_restore``: the largest change
  of a parameter, which shows that the refused step had gradients to apply; ``comparison_sees_a_step``:
  the same comparison tells that step's parameters and state from those before it); ``state_tensors``
  counts the state tensors compared, ``plain_in_state`` whether the plain tensor got state.

Every optimizer case also reports ``state_numel``: per rank, the elements of the optimizer state of the
projected group (sum of ``numel`` of every tensor in its parameters' state, of ``to_local()`` for
DTensors) and ``reference_state_numel``, the same sum in the single-process run, so that the sharding of
the low-rank state can be checked, and ``exchanges``: the exchange types the one per-matrix step
(``lowrank_optim.optim.galore._galore_adamw_impl``) was called with (the reference's and the shards').

Before each case rank 0 prints ``START <case>`` (only rank 0 writes to stdout). A case that raises
writes ``CASE FAILED <case> (rank R of W)``, its traceback and ``END CASE FAILED <case>`` to stderr; if
it raised on every rank, rank 0 prints ``RESULT {"case", "world", "error"}`` and the launch goes on with
the next case, otherwise (some ranks only, or ranks that never meet again) the launch ends with exit 1.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from teardown import end_worker
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from lowrank_optim import APOLLOAdamW, DCTAdamW, FiraAdamW, GaLoreAdamW, optimizer_state_bytes, param_groups
from lowrank_optim.distributed.dcp import match_saved_ranks
from lowrank_optim.optim import galore as galore_module
from lowrank_optim.optim.moments import Blockwise8bit

#: The exchanges the one per-matrix step (``galore._galore_adamw_impl``) was called with during a case:
#: the single-process reference's and the sharded run's must both appear (one step for every layout).
EXCHANGES: set[str] = set()
_STEP = galore_module._galore_adamw_impl


def _recording_step(*args, exchange, **kwargs):
    EXCHANGES.add(f"{type(exchange).__module__}.{type(exchange).__qualname__}")
    return _STEP(*args, exchange=exchange, **kwargs)


galore_module._galore_adamw_impl = _recording_step

STEPS = 7
SAVE_AFTER = 4
GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 ranks times 2 micro-batches
LR = 1e-2
WEIGHT_DECAY = 0.01
MAX_NORM = 0.5
FP32_TOLERANCE = 1e-6
TARGETS = ("mlp",)
OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "galore": GaLoreAdamW,
    "fira": FiraAdamW,
    "dct": DCTAdamW,
    # Projectors and moment policies beyond the defaults (tests/test_fsdp2.py, plain cases).
    "galore_rotate": functools.partial(GaLoreAdamW, moment_policy="rotate"),
    "dct_rotate": functools.partial(DCTAdamW, moment_policy="rotate"),
    "fira_rotate": functools.partial(FiraAdamW, moment_policy="rotate"),
    "rsvd": functools.partial(GaLoreAdamW, projector="rsvd"),
    "fira_rsvd": functools.partial(FiraAdamW, projector="rsvd"),
    "random": functools.partial(GaLoreAdamW, projector="random"),
    "apollo": APOLLOAdamW,
    "apollo_mini": functools.partial(APOLLOAdamW, scale_type="tensor"),
    # 8-bit moments in blocks of 4 along stored rows (left-projected moments stored transposed): every
    # block lies in one rank's rows, so the shards quantize exactly what the single process does. The
    # vectors (at most 37 elements) stay below min_size: FSDP2 splits them anywhere (refused otherwise).
    "galore_8bit": functools.partial(GaLoreAdamW, moment_format=Blockwise8bit(block_size=4, min_size=38)),
    "dct_rotate_8bit": functools.partial(
        DCTAdamW, moment_policy="rotate", moment_format=Blockwise8bit(block_size=4, min_size=38)
    ),
    "fira_8bit": functools.partial(FiraAdamW, moment_format=Blockwise8bit(block_size=4, min_size=38)),
    "apollo_8bit": functools.partial(APOLLOAdamW, moment_format=Blockwise8bit(block_size=4, min_size=38)),
    # Blocks of one element: every split of a vector falls on a block boundary, so the biases' and the
    # norm's 1-D moments are quantized under FSDP2 too.
    "galore_8bit_vectors": functools.partial(GaLoreAdamW, moment_format=Blockwise8bit(block_size=1, min_size=0)),
}


def _auto(cls, **options):
    """``cls`` with the projected group at ``rank="auto"`` under the state budget of rank 3 (whole-tensor
    bytes, ``rank_state_bytes``): the ranks the sharded run allocates must be the single process's."""

    def build(groups, **kwargs):
        probe = cls([dict(g) for g in groups], **kwargs, **options)
        group = next(g for g in probe.param_groups if "rank" in g)
        budget = sum(probe.rank_state_bytes(group, p, min(AUTO_RANK, *p.shape)) for p in group["params"])
        for g in groups:
            if "rank" in g:
                g.update(rank="auto", state_budget=budget)
        return cls(groups, **kwargs, **options)

    return build


AUTO_RANK = 3
OPTIMIZERS.update(
    {
        # rank="auto" (issue 17): ranks chosen at each refresh from the owners' spectra, shared by all ranks.
        "galore_auto": _auto(GaLoreAdamW),
        "galore_auto_rotate": _auto(GaLoreAdamW, moment_policy="rotate"),
        "dct_auto": _auto(DCTAdamW),
        "fira_auto_8bit": _auto(FiraAdamW, moment_format=Blockwise8bit(block_size=4, min_size=38)),
    }
)
#: The final rank of each projected matrix in the last single-process reference (rank="auto" cases).
REFERENCE_RANKS: list[int] = []


def auto_ranks(optimizer: torch.optim.Optimizer) -> list[int]:
    group = next(g for g in optimizer.param_groups if "rank" in g)
    return [int(optimizer.state[p].get("matrix_rank", -1)) for p in group["params"]]


OPTIONS = {"plain", "accum", "clip", "bf16", "dcp", "reshard", "resume"}


class Net(nn.Module):
    """Projected weights 37x20 (m >= n: right-side projection), 29x37 and 10x29 (m < n: left-side), whose
    rows (37, 29, 10) do not all divide by 2 or 3; a LayerNorm and biases stay full-rank."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(20, 37)
        self.norm = nn.LayerNorm(37)
        self.mlp_mid = nn.Linear(37, 29)
        self.mlp_out = nn.Linear(29, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(torch.tanh(self.mlp_mid(self.norm(torch.tanh(self.mlp_in(x))))))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(STEPS, GLOBAL_BATCH, 20, generator=generator)
    targets = torch.randn(STEPS, GLOBAL_BATCH, 10, generator=generator)
    return inputs, targets


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the samples given: with equal shares per rank, FSDP2's averaging reduce-scatter turns
    the per-rank means into the global mean, which is what the single process differentiates."""
    return ((model(x).float() - y) ** 2).mean()


def build_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, rank=4, update_proj_gap=3, scale=0.25, target_modules=TARGETS)
    return OPTIMIZERS[name](groups, lr=LR, weight_decay=WEIGHT_DECAY)


def sharded_model(mesh, bf16: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    options = {"mesh": mesh}
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in (model.mlp_in, model.mlp_mid, model.mlp_out):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(p.detach()).float().clone() for name, p in model.named_parameters()}


def projected_state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the state of the projected group (the one carrying ``rank``) held by this rank."""
    group = next(g for g in optimizer.param_groups if "rank" in g)
    return sum(
        local(value).numel()
        for p in group["params"]
        for value in optimizer.state.get(p, {}).values()
        if isinstance(value, torch.Tensor)
    )


def max_diff(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert result.keys() == expected.keys(), (sorted(result), sorted(expected))
    return max((result[n] - expected[n]).abs().max().item() for n in expected)


def train_sharded(model, optimizer, steps: range, options: set[str], norms: list[float] | None = None) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    inputs, targets = data()
    gas = 2 if "accum" in options else 1
    share = GLOBAL_BATCH // world
    micro = share // gas
    for step in steps:
        for k in range(gas):
            if gas > 1:
                model.set_requires_gradient_sync(k == gas - 1)
            start = rank * share + k * micro
            loss = loss_fn(model, inputs[step, start : start + micro], targets[step, start : start + micro])
            (loss / gas).backward()
        if "clip" in options:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            if norms is not None:
                norms.append(full(norm).item())
        optimizer.step()
        optimizer.zero_grad()


def reference(name: str, options: set[str], world: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """One process, no FSDP: (parameters after all steps, initial parameters, projected-state elements)."""
    torch.manual_seed(0)
    model = Net()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(name, model)
    inputs, targets = data()
    bf16 = "bf16" in options
    shadow = copy.deepcopy(model).bfloat16() if bf16 else None
    gas = 2 if "accum" in options else 1
    for step in range(STEPS):
        optimizer.zero_grad()
        if bf16:
            # FSDP2 under the bf16 policy: each rank's micro-batches run on bf16 copies of the fp32
            # masters; their bf16 gradients are accumulated and averaged over the ranks in fp32.
            with torch.no_grad():
                for s, p in zip(shadow.parameters(), model.parameters()):
                    s.copy_(p)
            grads = [torch.zeros_like(p) for p in model.parameters()]
            chunk = GLOBAL_BATCH // world // gas
            for start in range(0, GLOBAL_BATCH, chunk):
                shadow.zero_grad()
                x = inputs[step, start : start + chunk].bfloat16()
                (loss_fn(shadow, x, targets[step, start : start + chunk]) / gas).backward()
                for g, s in zip(grads, shadow.parameters()):
                    g += s.grad.float()
            for p, g in zip(model.parameters(), grads):
                p.grad = g / world
        else:
            loss_fn(model, inputs[step], targets[step]).backward()
        if "clip" in options:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
    REFERENCE_RANKS[:] = auto_ranks(optimizer)
    return gathered(model), initial, projected_state_numel(optimizer)


def save(model, optimizer, directory: Path) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load(model, optimizer, directory: Path) -> None:
    # get_state_dict on a fresh optimizer first initializes its state (a zero-gradient step at lr 0):
    # dcp.load fills the tensors of that state in place, set_state_dict then hands them to the optimizer.
    model_state, optim_state = get_state_dict(model, optimizer)
    # rank="auto": the state made at the saved ranks first (a no-op for fixed ranks).
    match_saved_ranks(optimizer, optim_state, str(directory))
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def run_nondivisible(mesh) -> dict:
    model = sharded_model(mesh, bf16=False)
    projected = param_groups(model, rank=4, target_modules=TARGETS)[-1]["params"]
    names = {id(p): n for n, p in model.named_parameters()}
    mine = {names[id(p)]: list(local(p).shape) for p in projected}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    rows = {name: [shapes[name][0] for shapes in everyone] for name in mine}
    uneven = [name for name, r in rows.items() if min(r) < max(r)]
    assert uneven, f"every projected weight splits evenly over {dist.get_world_size()} ranks: {rows}"
    return {"case": "nondivisible", "world": dist.get_world_size(), "rows": rows, "uneven": uneven,
            "global_shapes": {names[id(p)]: list(p.shape) for p in projected}}


def _raised(build) -> dict:
    """What calling ``build`` raised on this rank: ``{"type", "message"}``, or ``{"type": None}``."""
    try:
        build()
    except Exception as exc:  # noqa: BLE001 - any exception is reported, the driver checks its type
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None}


def _snapshot(value):
    """A gathered, detached copy of a parameter or (nested) optimizer state, for a bitwise comparison."""
    if isinstance(value, dict):
        return {key: _snapshot(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_snapshot(item) for item in value]
    if isinstance(value, torch.Tensor):
        return full(value.detach()).clone()
    return value


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        def bits(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).contiguous().view(torch.uint8)

        return (
            isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))
        )
    return a == b


def _refused_step(name: str, mesh) -> dict:
    """``replaced_after_construction``: a step refused by the layout's ``check_group`` changes nothing."""
    model = sharded_model(mesh, bf16=False)
    optimizer = build_optimizer(name, model)
    train_sharded(model, optimizer, range(2), set())
    inputs, targets = data()
    share = GLOBAL_BATCH // dist.get_world_size()
    start = dist.get_rank() * share
    loss_fn(model, inputs[2, start : start + share], targets[2, start : start + share]).backward()
    group = next(g for g in optimizer.param_groups if "rank" in g)
    original = group["params"][0]
    assert original is model.mlp_in.weight and isinstance(original, DTensor), "mlp_in.weight first"
    plain = nn.Parameter(original.detach().full_tensor().clone())
    plain.grad = original.grad.full_tensor().clone()
    params_before = _snapshot(dict(model.named_parameters()))
    state_before = _snapshot([optimizer.state[p] for g in optimizer.param_groups for p in g["params"]])
    group["params"][0] = plain
    outcome = _raised(optimizer.step)
    group["params"][0] = original
    params_after = _snapshot(dict(model.named_parameters()))
    state_after = _snapshot([optimizer.state[p] for g in optimizer.param_groups for p in g["params"]])
    outcome["unchanged"] = _same(params_before, params_after) and _same(state_before, state_after)
    outcome["plain_in_state"] = plain in optimizer.state
    outcome["state_tensors"] = sum(1 for t in _flat(state_before) if isinstance(t, torch.Tensor))
    optimizer.step()  # the restored group steps as before
    restored = gathered(model)
    outcome["moved_after_restore"] = max(
        (restored[n] - params_after[n].float()).abs().max().item() for n in restored
    )
    # The comparison can see a step: the one that went through changed the parameters and the state.
    params_stepped = _snapshot(dict(model.named_parameters()))
    state_stepped = _snapshot([optimizer.state[p] for g in optimizer.param_groups for p in g["params"]])
    outcome["comparison_sees_a_step"] = (
        not _same(params_after, params_stepped) and not _same(state_after, state_stepped)
    )
    return outcome


def _flat(value):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _flat(item)
    else:
        yield value


def _refusal_checks(cls, model, fullrank, projected, replicated) -> dict:
    """Constructions that `cls` must refuse, each built only when called."""
    return {
        "plain_among_fullrank": lambda: cls([*model.parameters(), nn.Parameter(torch.randn(3, 4))], lr=LR),
        "plain_among_projected": lambda: cls(
            [fullrank, {**projected, "params": [*projected["params"], nn.Parameter(torch.randn(8, 6))]}], lr=LR
        ),
        "replicated_alone": lambda: cls([replicated], lr=LR),
        "replicated_among_projected": lambda: cls(
            [fullrank, {**projected, "params": [*projected["params"], replicated]}], lr=LR
        ),
        "flat_projected": lambda: cls([{"params": [nn.Parameter(torch.randn(24))], "rank": 2}], lr=LR),
        "flat_among_fsdp2": lambda: cls(
            [fullrank, projected, {"params": [nn.Parameter(torch.randn(24))], "rank": 2}], lr=LR
        ),
    }


def run_refusals(mesh) -> dict:
    world = dist.get_world_size()
    report: dict = {}
    for name in ("galore", "fira", "dct"):
        cls = OPTIMIZERS[name]
        model = sharded_model(mesh, bf16=False)
        fullrank, projected = param_groups(model, rank=4, update_proj_gap=3, target_modules=TARGETS)
        assert "rank" in projected and "rank" not in fullrank, (fullrank.keys(), projected.keys())
        torch.manual_seed(1)  # the same replicated tensor on every rank
        replicated = nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Replicate()]))
        checks = _refusal_checks(cls, model, fullrank, projected, replicated)
        results = {check: _raised(build) for check, build in checks.items()}
        results["replaced_after_construction"] = _refused_step(name, mesh)
        report[name] = results
    everyone: list = [None] * world
    dist.all_gather_object(everyone, report)
    return {"case": "refusals", "world": world, "ranks_agree": all(r == everyone[0] for r in everyone),
            "report": report}


def run_nonfinite(mesh) -> dict:
    """A NaN in the last rank's shard of one projected weight's gradient, at a normal step (2) and at a
    refresh step (3): that weight is skipped on every rank (its pieces decide alike), everything else is
    updated, and every rank counts the skips."""
    world, rank = dist.get_world_size(), dist.get_rank()
    report = {}
    for name in ("galore", "fira", "dct"):
        model = sharded_model(mesh, bf16=False)
        optimizer = build_optimizer(name, model)
        train_sharded(model, optimizer, range(2), {"plain"})
        outcome = {}
        for step in (2, 3):
            inputs, targets = data()
            share = GLOBAL_BATCH // world
            mine = slice(rank * share, (rank + 1) * share)
            loss_fn(model, inputs[step, mine], targets[step, mine]).backward()
            if rank == world - 1:
                local(model.mlp_mid.weight.grad).view(-1)[0] = float("nan")
            before = gathered(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                optimizer.step()
            optimizer.zero_grad()
            after = gathered(model)
            outcome[step] = {
                "skipped_unchanged": bool(torch.equal(before["mlp_mid.weight"], after["mlp_mid.weight"])),
                "others_moved": all(not torch.equal(before[n], after[n]) for n in before if n != "mlp_mid.weight"),
                "finite": all(bool(torch.isfinite(t).all()) for t in after.values()),
            }
        counts: list = [None] * world
        dist.all_gather_object(counts, {str(k): v for k, v in optimizer.skipped_updates().items()})
        outcome["skipped_updates"] = counts
        report[name] = outcome
    return {"case": "nonfinite", "world": world, "report": report}


def run_case(case: str, mesh) -> dict:
    if case == "nonfinite":
        return run_nonfinite(mesh)
    if case == "nondivisible":
        return run_nondivisible(mesh)
    if case == "refusals":
        return run_refusals(mesh)
    EXCHANGES.clear()
    name, _, rest = case.partition(":")
    options = set((rest or "plain").split("+"))
    if name not in OPTIMIZERS or not options <= OPTIONS:
        raise ValueError(f"unknown case {case!r}")
    world = dist.get_world_size()
    bf16 = "bf16" in options
    directory = Path(os.environ["CKPT_DIR"])
    expected, initial, reference_numel = reference(name, options - {"dcp", "reshard", "resume"}, world)
    outcome: dict = {"case": case, "world": world}
    model = sharded_model(mesh, bf16)
    optimizer = build_optimizer(name, model)
    norms: list[float] = []
    if "resume" in options:
        load(model, optimizer, directory / f"reshard_{name}")
        train_sharded(model, optimizer, range(SAVE_AFTER, STEPS), options)
        result = gathered(model)
        outcome.update(max_diff=max_diff(result, expected), tolerance=FP32_TOLERANCE)
    elif "dcp" in options:
        train_sharded(model, optimizer, range(SAVE_AFTER), options)
        path = directory / f"dcp_{name}_{world}_{'_'.join(sorted(options))}"
        save(model, optimizer, path)
        train_sharded(model, optimizer, range(SAVE_AFTER, STEPS), options)
        uninterrupted = gathered(model)
        fresh = sharded_model(mesh, bf16)
        fresh_optimizer = build_optimizer(name, fresh)
        load(fresh, fresh_optimizer, path)
        train_sharded(fresh, fresh_optimizer, range(SAVE_AFTER, STEPS), options)
        result = gathered(fresh)
        model, optimizer = fresh, fresh_optimizer
        outcome.update(max_diff=max_diff(result, uninterrupted), tolerance=0.0,
                       reference_diff=max_diff(uninterrupted, expected))
    else:
        if "reshard" in options:
            train_sharded(model, optimizer, range(SAVE_AFTER), options)
            save(model, optimizer, directory / f"reshard_{name}")
            train_sharded(model, optimizer, range(SAVE_AFTER, STEPS), options)
        else:
            train_sharded(model, optimizer, range(STEPS), options, norms)
        result = gathered(model)
        outcome["max_diff"] = max_diff(result, expected)
        if bf16:
            outcome["tolerance"] = 2 * 2.0**-8 * max(t.abs().max().item() for t in expected.values())
            outcome["max_ulps"] = max(
                (result[n] - t).abs().max().item() / (2.0**-8 * t.abs().max().item()) for n, t in expected.items()
            )
        else:
            outcome["tolerance"] = FP32_TOLERANCE
    if norms:
        outcome["min_grad_norm"] = min(norms)
    outcome["moved"] = max_diff(result, initial)
    if name != "adamw":  # what the package reports as this rank's state: the local shards
        expected_bytes = sum(
            local(v).numel() * v.element_size()
            for st in optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
        assert optimizer_state_bytes(optimizer) == expected_bytes, (optimizer_state_bytes(optimizer), expected_bytes)
    numel: list = [None] * world
    dist.all_gather_object(numel, projected_state_numel(optimizer))
    outcome["state_numel"] = numel
    outcome["reference_state_numel"] = reference_numel
    outcome["exchanges"] = sorted(EXCHANGES)
    if "auto" in name:
        outcome["ranks"], outcome["reference_ranks"] = auto_ranks(optimizer), list(REFERENCE_RANKS)
        group = next(g for g in optimizer.param_groups if "rank" in g)
        outcome["budget"] = group["state_budget"]
        outcome["whole_bytes"] = sum(
            optimizer.rank_state_bytes(group, p, rank) for p, rank in zip(group["params"], outcome["ranks"])
        )
    return outcome


def main() -> None:
    warnings.filterwarnings("ignore")
    # A bounded collective timeout: a rank left waiting for one that failed gives up instead of hanging.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    # After every case the ranks compare notes on a group of their own, with a shorter timeout: a rank
    # whose case raised may meet ranks still blocked in that case's collectives on the default group.
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=30))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank, world = dist.get_rank(), dist.get_world_size()
    for case in sys.argv[1:]:
        if rank == 0:  # only rank 0 writes to stdout: lines of several ranks would interleave
            print(f"START {case}", flush=True)
        error = None
        try:
            outcome = run_case(case, mesh)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500] if str(exc) else type(exc).__name__
            # One write per block (the driver cuts these blocks out of the ranks' shared stderr).
            sys.stderr.write(
                f"CASE FAILED {case} (rank {rank} of {world})\n{traceback.format_exc()}END CASE FAILED {case}\n"
            )
            sys.stderr.flush()
        errors: list = [None] * world
        try:
            dist.all_gather_object(errors, error, group=control)
        except Exception:
            # Some rank never arrived (still blocked inside the case): end the launch; torchrun stops
            # the other ranks and the driver relaunches the cases after this one.
            sys.stderr.write(f"CASE FAILED {case} (rank {rank} of {world}): the ranks did not meet after it\n")
            sys.stderr.flush()
            os._exit(1)
        if any(e is not None for e in errors) and not all(e is not None for e in errors):
            # Raised on some ranks only: the default group may hold unmatched collectives.
            sys.stderr.write(f"CASE FAILED {case}: raised on ranks {[r for r, e in enumerate(errors) if e]} only\n")
            sys.stderr.flush()
            os._exit(1)
        if rank == 0:
            if errors[0] is not None:
                # Raised on every rank at the same collective boundary: report it and go on.
                outcome = {"case": case, "world": world, "error": errors[0]}
            print("RESULT " + json.dumps(outcome), flush=True)
    end_worker()


if __name__ == "__main__":
    main()
