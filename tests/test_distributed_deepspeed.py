"""DeepSpeed ZeRO stages 0-3 on 2 (and 3) CPU ranks against single-process runs; see tests/distributed/equality.py.

All cases of one world size run in a single torchrun launch (DeepSpeed's start-up dominates).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

WORKER = Path(__file__).parent / "distributed" / "equality.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"

EQUALITY = [
    f"{optimizer}:{stage}{option}"
    for optimizer in ("galore", "fira", "dct")
    for stage in (0, 1, 2, 3)
    for option in ("", ":gas2", ":clip")
] + [
    "galore:1:overlap",
    "galore:2:overlap+gas2",
    "galore:1:rr",
    "galore:2:rr+noalign",
    "fira:2:rr",
    "dct:2:rr",
    "galore:2:noalign",
    "galore:1:offload",
    "galore:2:offload+gas2",
    "fira:2:offload",
    "galore:3:zinit",
    "fira:3:zinit",
    "dct:3:zinit",
    "galore:3:replicated",
    "galore:2:random",
    "galore:3:random",
    # APOLLOAdamW built by the trainer, then bind (the plugin builds the GaLore family only).
    "apollo:0",
    "apollo:1",
    "apollo:2",
    "apollo:3",
    "apollo:2:gas2",
    "apollo:3:clip",
]
# galore:3:auto+bf16: the later sub-groups' spectra come from their bf16 reduced gradients (averaged_gradients).
BF16 = [
    "galore:0:bf16",
    "fira:0:bf16",
    "galore:1:bf16",
    "galore:2:bf16",
    "galore:3:bf16",
    "fira:2:bf16",
    "dct:3:bf16",
    "galore:3:auto+bf16",
]
CHECKPOINT = [
    "galore:0:ckpt",
    "galore:1:ckpt",
    "galore:2:ckpt",
    "galore:3:ckpt",
    "galore:1:ckpt+offload",
    "galore:2:ckpt+offload",
    "fira:3:ckpt",
    "dct:2:ckpt",
    "dct:3:ckpt",
    "galore:1:ckpt+random",
    "galore:3:ckpt+random",
    "apollo:1:ckpt",
    "apollo:3:ckpt",
]
# 8-bit moments (block size 4, every moment quantized): projected groups sharded at ZeRO-3 (or replicated),
# duplicated at 1/2, and the full-rank partitions (biases, norm) stepped per piece.
QUANTIZED = ["galore:1:8bit", "galore:2:8bit", "galore:3:8bit", "fira:3:8bit", "dct:2:8bit", "galore:3:replicated+8bit"]
QUANTIZED_CHECKPOINT = ["galore:2:ckpt+8bit", "galore:3:ckpt+8bit"]
# rank="auto" with state_budget (issue 17): every rank allocates over all of a partition's matrices.
# "split": the one-process reference sums the ranks' gradients as the all-reduce does. galore's 8-bit moments
# need it: against the whole-batch gradient (a 1.9e-8 difference) one exp_avg code flips at step 2 and a
# parameter moves 1.7e-5 apart, in one process alike (averaging two half-batch gradients there differs from
# the whole batch by the same 1.68e-5); with the split reference it is 6e-8.
AUTO_RANK = [
    "galore:1:auto",
    "galore:2:auto",
    "galore:3:auto",
    "fira:3:auto+8bit",
    "dct:2:auto",
    "galore:3:replicated+auto",
    "galore:2:auto+8bit+split",
    "galore:3:auto+8bit+split",
    "galore:3:auto+onesub",
    # With the engine options the other cases cover: CPU offload, gradient accumulation with round-robin
    # gradients, clipping (ZeRO-3's later sub-groups' spectra are read before their clipping: a scale), zero.Init.
    "galore:2:auto+offload",
    "galore:2:auto+gas2+rr",
    "galore:3:auto+clip",
    "galore:3:auto+zinit",
]
AUTO_RANK_CHECKPOINT = [
    "galore:2:ckpt+auto", "galore:3:ckpt+auto", "galore:3:ckpt+auto+8bit+split", "galore:2:ckpt+auto+offload"
]
THREE_RANKS = [
    "galore:1:wide", "galore:2:wide+rr", "fira:2:wide", "dct:2:wide", "galore:3:wide", "galore:2:wide+rr+auto",
    "dct:3:wide+auto",
]
# Name-keyed state saved at 2 ranks after 4 steps, resumed in one process (plain optimizer) and at 3 ranks.
CONFIGS = [f"config:{stage}" for stage in (0, 1, 2, 3)]
# rank="auto" too: each matrix's rank is saved, and the 3-rank engine's rank tables are rebuilt from the files.
NAMED = [
    "galore:0:names",
    "galore:2:names",
    "galore:3:names",
    "fira:3:names",
    "dct:2:names",
    "galore:3:names+8bit",
    "galore:2:names+auto",
    "galore:3:names+auto",
]
RESUME = [
    "galore:2:resume",
    "galore:3:resume",
    "fira:3:resume",
    "dct:2:resume",
    "galore:3:resume+8bit",
    "galore:2:resume+auto",
    "galore:3:resume+auto",
]


def _launch(world_size: int, cases: list[str], tmp_path: Path) -> dict[str, dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CKPT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    # --standalone: a free port, so that concurrent launches (other test sessions) cannot collide.
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(world_size), str(WORKER)]
    completed = subprocess.run(command + cases, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line[len("RESULT ") :])
            results[outcome["case"]] = outcome
    if completed.returncode != 0 or len(results) != len(cases):
        raise AssertionError(
            f"torchrun failed (rc {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
        )
    return results


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def two_ranks(checkpoints: Path) -> dict[str, dict]:
    cases = EQUALITY + BF16 + CHECKPOINT + QUANTIZED + QUANTIZED_CHECKPOINT + AUTO_RANK + AUTO_RANK_CHECKPOINT
    return _launch(2, cases + NAMED + CONFIGS, checkpoints)


@pytest.fixture(scope="module")
def three_ranks(two_ranks: dict[str, dict], checkpoints: Path) -> dict[str, dict]:
    # After two_ranks: the resume cases read its name-keyed saves.
    return _launch(3, THREE_RANKS + RESUME, checkpoints)


def _check_moved(outcome: dict) -> None:
    assert outcome["moved"] > 1e-2, f"{outcome['case']}: parameters barely moved ({outcome['moved']})"


@pytest.mark.parametrize("case", EQUALITY)
def test_matches_single_process_fp32(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["max_diff"] <= 1e-6, outcome
    _check_moved(outcome)
    if not case.split(":")[1] == "0":
        assert outcome["max_holders"] == 2, "some matrix should be split between the ranks"


@pytest.mark.parametrize("case", BF16)
def test_matches_single_process_bf16_within_two_ulps(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["max_ulps"] <= 2.0, outcome
    _check_moved(outcome)


@pytest.mark.parametrize("case", CHECKPOINT)
def test_checkpoint_resume_is_bitwise(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["bitwise_resume"], outcome
    assert outcome["max_diff"] <= 1e-6, outcome


@pytest.mark.parametrize("case", QUANTIZED)
def test_8bit_moments_match_single_process(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["max_diff"] <= 1e-6, outcome
    _check_moved(outcome)
    assert outcome["max_holders"] == 2, "some matrix should be split between the ranks"


@pytest.mark.parametrize("case", AUTO_RANK)
def test_auto_ranks_match_single_process(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["max_diff"] <= 1e-6, outcome
    _check_moved(outcome)
    assert outcome["max_holders"] == 2, "some matrix should be split between the ranks"
    assert len(set(outcome["ranks"])) > 1, outcome  # the budget is spread unevenly
    if case.split(":")[1] == "3":  # ZeRO-3 cuts the group into sub-groups (sub_group_size 300), but "onesub"
        assert (outcome["projected_partitions"] == 1) == ("onesub" in case), outcome


@pytest.mark.parametrize("case", AUTO_RANK_CHECKPOINT)
def test_auto_rank_checkpoint_resume_is_bitwise(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["bitwise_resume"], outcome
    assert outcome["max_diff"] <= 1e-6, outcome


@pytest.mark.parametrize("case", QUANTIZED_CHECKPOINT)
def test_8bit_checkpoint_resume_is_bitwise(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["bitwise_resume"], outcome
    assert outcome["max_diff"] <= 1e-6, outcome


@pytest.mark.parametrize("case", THREE_RANKS)
def test_three_ranks_matrix_spans_three_partitions(three_ranks: dict[str, dict], case: str) -> None:
    outcome = three_ranks[case]
    assert outcome["max_holders"] == 3, outcome
    # Averaging gradients over 3 ranks rounds differently from the single-process mean (stage 0 at 3 ranks
    # differs by 7e-7 here already); the low-rank step adds no more than that again.
    assert outcome["max_diff"] <= 2e-6, outcome
    _check_moved(outcome)
    if "auto" in case:
        assert len(set(outcome["ranks"])) > 1, outcome


@pytest.mark.parametrize("case", NAMED)
def test_named_state_resumes_in_one_process(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    assert outcome["max_diff"] <= 1e-6, outcome
    assert outcome["single_process_resume_diff"] <= 1e-6, outcome
    _check_moved(outcome)


@pytest.mark.parametrize("case", RESUME)
def test_named_state_resumes_at_three_ranks(two_ranks: dict[str, dict], three_ranks: dict[str, dict], case: str) -> None:
    # Same tolerance as the other 3-rank cases: 3-rank gradient averaging rounds differently.
    assert three_ranks[case]["max_diff"] <= 2e-6, three_ranks[case]
    if "auto" in case:  # the ranks the 2-rank run ended with, unequal ones
        saved = two_ranks[case.replace("resume", "names")]
        assert three_ranks[case]["ranks"] == saved["ranks"] and len(set(saved["ranks"])) > 1, (saved, three_ranks[case])


@pytest.mark.parametrize("case", CONFIGS)
def test_example_config_initializes_and_steps(two_ranks: dict[str, dict], case: str) -> None:
    outcome = two_ranks[case]
    stage = int(case.split(":")[1])
    assert outcome["zero_stage"] == stage
    assert outcome["global_steps"] == 2 and outcome["optimizer_steps"] == [2], outcome
    assert outcome["bound"] == ("DenseLayout" if stage == 0 else "FragmentLayout"), outcome
    assert outcome["scheduler"] == "WarmupCosineLR", outcome
