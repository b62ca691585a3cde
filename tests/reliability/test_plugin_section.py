"""The DeepSpeed plugin's ``lowrank_optim`` section: a JSON object of the right types, the same on every rank.

Types are checked in one process (``read_config``, ``LowRankSection``); the agreement between ranks under
torchrun with 2 CPU ranks (workers/plugin_ranks.py, one launch for every case).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_optim.deepspeed import LowRankSection, optimizer_factory, param_groups_for, read_config

WORKER = Path(__file__).parent / "workers" / "plugin_ranks.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def _config(section) -> dict:
    return {"train_batch_size": 4, "zero_optimization": {"stage": 2}, "lowrank_optim": section}


NOT_AN_OBJECT = "The 'lowrank_optim' section must be a JSON object of settings .*, not {}: {}. Allowed keys: optimizer, rank"


@pytest.mark.parametrize(
    "section, message",
    [
        ([], NOT_AN_OBJECT.format("an array", r"\[\]")),
        ([{"rank": 4}], NOT_AN_OBJECT.format("an array", r"\[\{'rank': 4\}\]")),
        (None, NOT_AN_OBJECT.format("null", "None")),
        ("rank=4", NOT_AN_OBJECT.format("a string", "'rank=4'")),
        (4, NOT_AN_OBJECT.format("a number", "4")),
        (0.5, NOT_AN_OBJECT.format("a number", "0.5")),
        (True, NOT_AN_OBJECT.format("a boolean", "True")),
    ],
)
def test_section_must_be_an_object(section, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_config(_config(section))


POSITIVE_INT = "Must be a positive integer."
NUMBER = "Must be a finite number."


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rank", "4", POSITIVE_INT),
        ("rank", 4.0, POSITIVE_INT),
        ("rank", True, POSITIVE_INT),
        ("rank", 0, POSITIVE_INT),
        ("rank", -2, POSITIVE_INT),
        ("rank", None, POSITIVE_INT),
        ("update_proj_gap", 2.5, POSITIVE_INT),
        ("update_proj_gap", False, POSITIVE_INT),
        ("scale", "0.25", NUMBER),
        ("lr", "0.01", NUMBER),
        ("lr", True, NUMBER),
        ("lr", None, NUMBER),
        ("lr", [0.01], NUMBER),
        ("lr", math.nan, NUMBER),
        ("lr", math.inf, NUMBER),
        ("eps", "1e-8", NUMBER),
        ("weight_decay", None, NUMBER),
        ("gamma", "1.01", NUMBER),
        ("betas", 0.9, r"Must be a list of two numbers \[beta1, beta2\]\."),
        ("betas", "0.9,0.999", r"Must be a list of two numbers \[beta1, beta2\]\."),
        ("betas", [0.9], r"Must be a list of two numbers \[beta1, beta2\]\."),
        ("betas", [0.9, 0.99, 0.999], r"Must be a list of two numbers \[beta1, beta2\]\."),
        ("betas", {"beta1": 0.9, "beta2": 0.999}, r"Must be a list of two numbers \[beta1, beta2\]\."),
        ("target_modules", "attn", "Must be a non-empty list of non-empty strings"),
        ("target_modules", [], "Must be a non-empty list of non-empty strings"),
        ("target_modules", ["attn", 3], "Must be a non-empty list of non-empty strings"),
        ("target_modules", [""], r"Must be a non-empty list of non-empty strings .*'' would match every module"),
        ("target_modules", None, "Must be a non-empty list of non-empty strings"),
        ("correct_bias", "true", "Must be true or false."),
        ("correct_bias", 1, "Must be true or false."),
        ("correct_bias", None, "Must be true or false."),
        ("fold_residual", "false", "Must be true or false."),
        ("fold_residual", 0, "Must be true or false."),
        ("optimizer", 3, "Must be one of galore_adamw, fira_adamw, dct_adamw."),
        ("optimizer", None, "Must be one of galore_adamw, fira_adamw, dct_adamw."),
        ("proj_type", "middle", "Must be one of std, reverse_std, left, right, full."),
        ("proj_type", 1, "Must be one of std, reverse_std, left, right, full."),
        ("projector", "svdd", r"Must be null \(the optimizer's default\) or one of svd, rsvd, dct, random\."),
        ("projector", 5, r"Must be null \(the optimizer's default\) or one of svd, rsvd, dct, random\."),
        ("moment_policy", "drop", "Must be one of keep, reset, rotate."),
        ("residual", "both", "Must be one of code, paper."),
        ("residual", None, "Must be one of code, paper."),
        ("zero3_moments", True, "Must be one of sharded, replicated."),
    ],
)
def test_field_types(key: str, value, message: str) -> None:
    expected = rf"Invalid 'lowrank_optim\.{key}': {re.escape(repr(value))}\. {message}"
    with pytest.raises(ValueError, match=expected):
        read_config(_config({key: value}))
    with pytest.raises(ValueError, match=expected):  # the dataclass itself, whoever builds it
        LowRankSection(**{key: value})


@pytest.mark.parametrize(
    "key, value, index",
    [("betas", [0.9, "0.999"], 1), ("betas", [True, 0.999], 0), ("betas", [None, 0.999], 0), ("alpha", "0.25", None)],
)
def test_numbers_inside_betas_and_alpha(key: str, value, index) -> None:
    where = r"'lowrank_optim\.betas' at index " + str(index) if key == "betas" else r"'lowrank_optim\.alpha'"
    bad = value[index] if key == "betas" else value
    with pytest.raises(ValueError, match=rf"Invalid {where}: {re.escape(repr(bad))}\. Must be a finite number\."):
        read_config(_config({"optimizer": "fira_adamw", key: value}))


def test_valid_sections_are_accepted_and_normalised() -> None:
    _, section = read_config(
        _config({"rank": 4, "lr": 1, "betas": [0, 0.5], "projector": None, "correct_bias": False, "alpha": 0.5})
    )
    assert section.rank == 4 and section.lr == 1 and section.betas == (0, 0.5) and section.scale == 0.5
    assert section.projector is None and section.correct_bias is False
    built = LowRankSection(target_modules=["attn"], betas=[0.8, 0.9], projector="dct")
    assert built.target_modules == ("attn",) and built.betas == (0.8, 0.9)  # frozen and hashable
    hash(built)
    assert LowRankSection() == LowRankSection.from_dict({})  # the defaults pass their own checks


def test_param_groups_and_factory_check_the_section_they_are_given() -> None:
    model = nn.Sequential()
    model.add_module("mlp", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"Invalid 'lowrank_optim\.rank': '2'\. Must be a positive integer\."):
        param_groups_for(model, {"rank": "2"})
    with pytest.raises(ValueError, match=r"Invalid 'lowrank_optim\.lr': '0\.1'\. Must be a finite number\."):
        optimizer_factory({"lr": "0.1"})


def test_a_config_file_that_is_not_an_object(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps([{"lowrank_optim": {"rank": 4}}]))
    with pytest.raises(ValueError, match=r"The DeepSpeed config must be a JSON object, not an array: \[\{'lowrank_optim'"):
        read_config(path)


# --- The ranks must agree ---------------------------------------------------------------------------------

# case (rank 1's change, workers/plugin_ranks.py) -> the message on rank 0 and on rank 1. The first case
# lets initialize() create the process group itself.
DIFFERS = (
    r"The 'lowrank_optim' section differs between the ranks: 'lowrank_optim\.{}' is {} on rank\(s\) \[0\], "
    r"{} on rank\(s\) \[1\]\. Every rank must get the same section"
)
DISAGREEMENTS = {
    "rank": (DIFFERS.format("rank", 4, 2),) * 2,
    "lr": (DIFFERS.format("lr", 0.001, 0.01),) * 2,
    "unreadable": (
        r"The DeepSpeed config could not be read on rank\(s\) \[1\], so no rank starts: rank 1: ValueError: "
        r"Invalid 'lowrank_optim\.lr': '0\.01'\. Must be a finite number\.",
        r"^Invalid 'lowrank_optim\.lr': '0\.01'\. Must be a finite number\.$",
    ),
}
CASES = [*DISAGREEMENTS, "same"]  # "same" last: equal sections still start, after the refusals
#: A refusal costs one all_gather_object (about 0.01 s here); the bound is wide because the first case also
#: waits for the other rank to join the new process group, which takes seconds on a loaded machine. Before
#: the check, a rank whose config failed to read left the other one waiting until the launch timed out.
QUICK_S = 30.0


@pytest.fixture(scope="module")
def two_ranks() -> dict[tuple[str, int], dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), *CASES]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    results = {}
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line[len("RESULT ") :])
            results[outcome["case"], outcome["rank"]] = outcome
    if completed.returncode != 0 or len(results) != 2 * len(CASES):
        raise AssertionError(
            f"torchrun failed (rc {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
        )
    return results


def _raise_reported(outcome: dict) -> None:
    """Raise again, in this process, the error a worker case reported (nothing if it reported none)."""
    if outcome["error"] is None:
        return
    kind, _, message = outcome["error"].partition(": ")
    if kind != "ValueError":
        raise AssertionError(f"{outcome['case']} (rank {outcome['rank']}) raised {outcome['error']}")
    raise ValueError(message)


@needs_deepspeed
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_ranks_with_different_sections_all_fail_at_initialize(two_ranks: dict, case: str, rank: int) -> None:
    outcome = two_ranks[case, rank]
    with pytest.raises(ValueError, match=DISAGREEMENTS[case][rank]):
        _raise_reported(outcome)
    assert outcome["seconds"] < QUICK_S, outcome


@needs_deepspeed
def test_ranks_with_the_same_section_start_and_train(two_ranks: dict) -> None:
    for rank in (0, 1):
        assert two_ranks["same", rank]["error"] is None, two_ranks["same", rank]


@needs_deepspeed
def test_single_process_without_a_launcher_reports_the_config_error() -> None:
    """No process group can be made (no launcher, no MPI): the section's error, not DeepSpeed's."""
    code = (
        "from lowrank_optim.deepspeed import initialize\n"
        "from torch import nn\n"
        "try:\n"
        "    initialize(nn.Linear(2, 2), {'train_batch_size': 1, 'lowrank_optim': {'rank': '4'}})\n"
        "except Exception as error:\n"
        "    print('ERROR', type(error).__name__, error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    completed = subprocess.run(
        [sys.executable, "-c", code], env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=120
    )
    reported = [line for line in completed.stdout.splitlines() if line.startswith("ERROR ")]
    assert reported, completed.stdout[-2000:] + completed.stderr[-3000:]
    kind, _, message = reported[-1][len("ERROR ") :].partition(" ")
    with pytest.raises(ValueError, match=r"Invalid 'lowrank_optim\.rank': '4'\. Must be a positive integer\."):
        if kind == "ValueError":
            raise ValueError(message)
        raise AssertionError(reported[-1])


def test_the_section_sets_the_non_finite_policy() -> None:
    from lowrank_optim.deepspeed import LowRankSection, optimizer_factory

    section = LowRankSection.from_dict({"nonfinite": "propagate"})
    optimizer = optimizer_factory(section)([torch.nn.Parameter(torch.randn(4, 3))])
    assert optimizer.param_groups[0]["nonfinite"] == "propagate"
    with pytest.raises(ValueError, match=r"Invalid 'lowrank_optim.nonfinite': 'ignore'"):
        LowRankSection.from_dict({"nonfinite": "ignore"})


# --- rank="auto" (issue 17) ---------------------------------------------------------------------------------


AUTO_REFUSALS = [
    ({"rank": "auto"}, r"state_budget': None\. Must be a positive integer \(bytes\) when 'rank' is \"auto\"\."),
    ({"rank": "auto", "state_budget": 0}, r"Invalid 'lowrank_optim\.state_budget': 0\. Must be a positive integer"),
    ({"rank": "auto", "state_budget": True}, r"Invalid 'lowrank_optim\.state_budget': True\."),
    ({"rank": 8, "state_budget": 4096}, r"state_budget': 4096\. Must be null unless 'rank' is \"auto\" \(it is 8\)\."),
    (
        {"rank": "Auto"},
        r"Invalid 'lowrank_optim\.rank': 'Auto'\. Must be a positive integer\. Also allowed: \"auto\" with "
        r"'lowrank_optim\.state_budget'",
    ),
]


@pytest.mark.parametrize("section, message", AUTO_REFUSALS)
def test_auto_rank_section_refusals(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LowRankSection.from_dict(section)


def test_auto_rank_section_reaches_the_projected_group() -> None:
    model = nn.Sequential()
    model.add_module("mlp", nn.Linear(8, 6))
    groups = param_groups_for(model, {"rank": "auto", "state_budget": 4096})
    projected = groups[-1]
    assert projected["rank"] == "auto" and projected["state_budget"] == 4096
    optimizer = optimizer_factory({"rank": "auto", "state_budget": 4096})(groups)
    assert optimizer.param_groups[-1]["state_budget"] == 4096
    fixed = param_groups_for(model, {"rank": 4})[-1]
    assert "state_budget" not in fixed
