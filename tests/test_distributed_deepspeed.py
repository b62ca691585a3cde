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
]
BF16 = ["galore:1:bf16", "galore:2:bf16", "galore:3:bf16", "fira:2:bf16", "dct:3:bf16"]
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
]
THREE_RANKS = ["galore:1:wide", "galore:2:wide+rr", "fira:2:wide", "dct:2:wide", "galore:3:wide"]


def _launch(world_size: int, cases: list[str], tmp_path: Path) -> dict[str, dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CKPT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--nproc_per_node", str(world_size), "--master_port", str(29600 + world_size), str(WORKER)]
    completed = subprocess.run(command + cases, env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line[len("RESULT ") :])
            results[outcome["case"]] = outcome
    if completed.returncode != 0 or len(results) != len(cases):
        raise AssertionError(f"torchrun failed (rc {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}")
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, dict]:
    return _launch(2, EQUALITY + BF16 + CHECKPOINT, tmp_path_factory.mktemp("ckpt2"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> dict[str, dict]:
    return _launch(3, THREE_RANKS, tmp_path_factory.mktemp("ckpt3"))


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


@pytest.mark.parametrize("case", THREE_RANKS)
def test_three_ranks_matrix_spans_three_partitions(three_ranks: dict[str, dict], case: str) -> None:
    outcome = three_ranks[case]
    assert outcome["max_holders"] == 3, outcome
    # Averaging gradients over 3 ranks rounds differently from the single-process mean (stage 0 at 3 ranks
    # differs by 7e-7 here already); the low-rank step adds no more than that again.
    assert outcome["max_diff"] <= 2e-6, outcome
    _check_moved(outcome)
