"""Per-layer updates refuse data parallelism (DDP, FSDP, DeepSpeed) instead of letting the replicas drift.

The distributed cases run in two launches started together (workers/per_layer_refusals.py): 2 gloo ranks
under torchrun (DDP), and one process in a gloo group of world size 1 (DDP, FSDP2 and DeepSpeed there;
a bare group of one is allowed). FSDP1 needs an accelerator, so its markers are tested in this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrank_optim.models import LlamaConfig
from lowrank_optim.train import PerLayerUpdates
from lowrank_optim.train.methods import build_model

WORKER = Path(__file__).parent / "workers" / "per_layer_refusals.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
CONFIG = LlamaConfig.from_name_or_path("test")
REMEDY = r"Use a normal step instead: loss\.backward\(\) then optimizer\.step\(\)"
REPLICAS = r"world size 2, so the parameters are data-parallel replicas"

# case -> what its refusal says (every message also carries REMEDY).
TWO_RANKS = {
    "ddp": REPLICAS,  # refused at construction
    "ddp_wrapped_after_construction": REPLICAS,  # built before the process group existed: refused at backward
}
ONE_RANK = {
    "ddp_world_size_1": r"gradients of \d+ parameter\(s\) .* were written again after per-layer updates had stepped them"
    r".*as DDP does even at world size 1",
    "fsdp2": r"parameter 0 of the optimizer \(shape \(257, 32\)\) is a DTensor: the model is sharded by FSDP2",
}
DEEPSPEED = {
    "deepspeed_wrapper": r"the optimizer is DeepSpeed's DeepSpeedZeroOptimizer \(the engine's wrapper\)",
    "deepspeed_bound_lowrank": r"the optimizer steps a DeepSpeed engine's ZeRO partitions \(FragmentLayout",
    "deepspeed_after_construction": r"parameter 0 of the optimizer \(shape \(257, 32\)\) belongs to a DeepSpeed engine",
    "deepspeed_zero3_params": r"parameter 0 of the optimizer \(shape \(8, 8\)\) is partitioned by DeepSpeed ZeRO-3",
}


def _results(completed: subprocess.CompletedProcess, what: str, expected: set[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    results = {}
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line[len("RESULT ") :])
            results[outcome["case"], outcome["rank"]] = outcome
    if completed.returncode != 0 or set(results) != expected:
        raise AssertionError(
            f"{what} failed (rc {completed.returncode}, missing {sorted(expected - set(results))}):\n"
            f"{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
        )
    return results


@pytest.fixture(scope="module")
def launches() -> dict[tuple[str, int], dict]:
    """Both launches, run at the same time (each is mostly start-up)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    commands = {
        "torchrun (2 ranks)": [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), "ranks"],
        "single process": [sys.executable, str(WORKER), "single"],
    }
    one_rank = ["world_size_1", *ONE_RANK, *(DEEPSPEED if importlib.util.find_spec("deepspeed") else ())]
    expected = {
        "torchrun (2 ranks)": {(case, rank) for case in [*TWO_RANKS, "ddp_normal_step"] for rank in (0, 1)},
        "single process": {(case, 0) for case in one_rank},
    }
    running = {
        what: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for what, command in commands.items()
    }
    results = {}
    for what, process in running.items():
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        results.update(_results(completed, what, expected[what]))
    return results


def _raise_reported(outcome: dict) -> None:
    """Raise again, in this process, the error a worker case reported (nothing if it reported none)."""
    error = outcome["error"]
    if error is None:
        return
    kind, _, message = error.partition(": ")
    if kind != "ValueError":
        raise AssertionError(f"{outcome['case']} (rank {outcome['rank']}) raised {error}")
    raise ValueError(message)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", TWO_RANKS)
def test_ddp_over_two_ranks_is_refused_on_every_rank(launches: dict, case: str, rank: int) -> None:
    outcome = launches[case, rank]
    with pytest.raises(ValueError, match=f"PerLayerUpdates cannot be used here: .*{TWO_RANKS[case]}.*{REMEDY}"):
        _raise_reported(outcome)


def test_ddp_with_a_normal_step_keeps_the_replicas_identical(launches: dict) -> None:
    # The control for the drift measurement the refused cases would report.
    for rank in (0, 1):
        assert launches["ddp_normal_step", rank] == {"case": "ddp_normal_step", "rank": rank, "error": None, "drift": 0.0}


@pytest.mark.parametrize("case", list(ONE_RANK) + list(DEEPSPEED))
def test_wrappers_are_refused_at_world_size_1(launches: dict, case: str) -> None:
    if case in DEEPSPEED and importlib.util.find_spec("deepspeed") is None:  # not imported here: it is slow
        pytest.skip("deepspeed is not installed")
    with pytest.raises(ValueError, match=f"{ONE_RANK.get(case) or DEEPSPEED[case]}.*{REMEDY}"):
        _raise_reported(launches[case, 0])


def test_a_process_group_of_one_is_allowed_and_exact(launches: dict) -> None:
    outcome = launches["world_size_1", 0]
    assert outcome["error"] is None, outcome
    assert outcome["max_diff"] == 0.0, outcome  # bit-identical to the same optimizer's normal steps
    assert outcome["moved"] > 1e-2, outcome


# FSDP1 (FullyShardedDataParallel) refuses to run without an accelerator; what it leaves on the tensors is
# made here by torch's own FSDP code: a FlatParameter, and the mark it sets on the parameters it flattens.


def test_fsdp1_flat_parameter_is_refused_at_construction() -> None:
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = FlatParameter(torch.zeros(12), requires_grad=True)
    with pytest.raises(ValueError, match=rf"parameter 0 of the optimizer \(shape \(12,\)\) has been flattened by FSDP.*{REMEDY}"):
        PerLayerUpdates(torch.optim.AdamW([flat]))


@pytest.mark.parametrize("step", [True, False])
def test_parameters_flattened_after_construction_are_refused_at_backward(step: bool) -> None:
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    model = build_model(CONFIG, seed=0)
    updates = PerLayerUpdates(torch.optim.AdamW(model.parameters()))
    before = [param.detach().clone() for param in model.parameters()]
    _set_fsdp_flattened(model.lm_head.weight)  # what FSDP1 does to each parameter it wraps
    position = [param is model.lm_head.weight for param in model.parameters()].index(True)
    batch = torch.randint(0, CONFIG.vocab_size, (2, 17))
    with pytest.raises(ValueError, match=rf"parameter {position} of the optimizer .* has been flattened by FSDP.*{REMEDY}"):
        updates.backward(model(batch, labels=batch).loss, step=step)
    # Refused before anything ran: no gradient, no update.
    assert all(param.grad is None for param in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
