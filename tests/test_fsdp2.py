"""FSDP2 (``fully_shard``) on 1, 2 and 3 CPU ranks against single-process runs; see tests/distributed/fsdp2_worker.py.

One torchrun launch per world size runs every selected case of that size (start-up dominates): 2 ranks
(every case, and the ``reshard`` saves), 3 ranks (every case but those saves, and the 2->3 resumes),
1 rank (the 2->1 resumes). Only the cases of this file's selected, unskipped tests are launched
(``-k galore`` launches only GaLore's cases, plus the 2-rank saves its resumes read).

A case that raises on every rank is reported by the worker, which goes on with the next case; any other
failure (a crash, a case that raised on some ranks only) ends the launch, and the cases after the failed
one are relaunched. Either way the failed case's test fails with the case name, the world size and the
failing ranks' tracebacks (or the worker's stderr tail).

``refusals`` (2 ranks) checks what the FSDP2 layout refuses, and the whole message of each refusal.

``adamw`` (torch.optim.AdamW) is the harness's own check: FSDP2 must give it the single-process
parameters; the low-rank optimizers must then do the same (lowrank_optim.distributed.fsdp2).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:
    pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

WORKER = Path(__file__).parent / "distributed" / "fsdp2_worker.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
TIMEOUT = 600  # seconds per world size, relaunches included
FP32_TOLERANCE = 1e-6

OPTIMIZERS = ("adamw", "galore", "fira", "dct")


def _case(optimizer: str, option: str) -> str:
    return optimizer if option == "plain" else f"{optimizer}:{option}"


def _params(worlds: tuple[int, ...], options: tuple[str, ...]) -> list:
    return [
        pytest.param(
            world,
            _case(optimizer, option),
            id=f"{world}ranks-{_case(optimizer, option)}",
        )
        for world in worlds
        for optimizer in OPTIMIZERS
        for option in options
    ]


def _skipped(item: pytest.Item) -> bool:
    if any(True for _ in item.iter_markers("skip")):
        return True
    for mark in item.iter_markers("skipif"):
        condition = mark.args[0] if mark.args else mark.kwargs.get("condition", True)
        if not isinstance(condition, str) and condition:
            return True
    return False


def _selected(items: list[pytest.Item]) -> dict[int, list[str]]:
    """Per world size, the cases of this module's selected, unskipped tests (in order, plus the saves
    that the selected resumes read)."""
    module = sys.modules[__name__]
    chosen: dict[int, list[str]] = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if getattr(item, "module", None) is not module or not {"world", "case"} <= params.keys() or _skipped(item):
            continue
        world, case = params["world"], params["case"]
        if case.endswith(":resume"):
            save = case.replace(":resume", ":reshard")
            if save not in chosen.setdefault(2, []):
                chosen[2].append(save)
        if case not in chosen.setdefault(world, []):
            chosen[world].append(case)
    return chosen


def _torchrun(world: int, cases: list[str], directory: Path, timeout: float) -> tuple[str, str, int, bool]:
    env = {**os.environ, "CKPT_DIR": str(directory), "OMP_NUM_THREADS": "1"}
    # --standalone: a free port, so that concurrent launches (other test sessions) cannot collide.
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(world), str(WORKER), *cases]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=max(timeout, 1))
            return stdout, stderr, process.returncode, False
        except subprocess.TimeoutExpired:
            # SIGTERM lets torchrun stop its workers (each runs in its own session); then make sure.
            process.send_signal(signal.SIGTERM)
            try:
                stdout, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
            return stdout, stderr, process.returncode, True


def _stderr_excerpt(stderr: str, case: str) -> str:
    """The failing ranks' tracebacks of ``case`` (the worker's ``CASE FAILED`` blocks; a rank's traceback
    that repeats an earlier one is only named), else the tail of ``stderr``."""
    pattern = rf"^(CASE FAILED {re.escape(case)} \(.*?\)\n)(.*?)(?:^END CASE FAILED {re.escape(case)}$|\Z)"
    blocks = re.findall(pattern, stderr, re.S | re.M)
    if not blocks:
        text = stderr
    else:
        seen: set[str] = set()
        parts = []
        for header, body in blocks:
            parts.append(header.rstrip() + (": the same traceback" if body in seen else "\n" + body.rstrip()))
            seen.add(body)
        text = "\n".join(parts)
    return text if len(text) <= 12000 else text[:9000] + "\n[...]\n" + text[-3000:]


class Launches:
    """Runs each world size's cases once, on first demand, and hands out their outcomes."""

    def __init__(self, selected: dict[int, list[str]], directory: Path) -> None:
        self.selected = selected
        self.directory = directory
        self.results: dict[tuple[int, str], dict] = {}
        self.failures: dict[tuple[int, str], str] = {}
        self.launched: set[int] = set()

    def outcome(self, world: int, case: str) -> dict:
        if world != 2 and any(c.endswith(":resume") for c in self.selected.get(world, [])):
            self._launch(2)  # the resumes read the 2-rank saves
        self._launch(world)
        if (world, case) in self.results:
            return self.results[world, case]
        pytest.fail(self.failures.get((world, case), f"{case} at {world} ranks was not launched"), pytrace=False)

    def _launch(self, world: int) -> None:
        if world in self.launched:
            return
        self.launched.add(world)
        remaining = list(self.selected.get(world, []))
        deadline = time.monotonic() + TIMEOUT
        while remaining:
            stdout, stderr, rc, timed_out = _torchrun(world, remaining, self.directory, deadline - time.monotonic())
            started = [line[len("START ") :] for line in stdout.splitlines() if line.startswith("START ")]
            for line in stdout.splitlines():
                if line.startswith("RESULT "):
                    outcome = json.loads(line[len("RESULT ") :])
                    self.results[world, outcome["case"]] = outcome
            report = (
                f"torchrun --nproc_per_node {world} (rc {rc}{', timed out' if timed_out else ''}) on cases {remaining}\n"
                f"--- worker stdout, tail ---\n{stdout[-1500:]}\n--- worker stderr ---\n"
            )
            for case in remaining:
                outcome = self.results.get((world, case))
                if outcome is not None and "error" in outcome:  # raised on every rank; the launch went on
                    del self.results[world, case]
                    self.failures[world, case] = (
                        f"case {case} failed at {world} ranks: {outcome['error']}\n{report}{_stderr_excerpt(stderr, case)}"
                    )
            missing = [c for c in remaining if (world, c) not in self.results and (world, c) not in self.failures]
            if rc == 0 and not missing:
                return
            if not missing:  # every case reported, yet the launch failed (e.g. at teardown)
                for case in [c for c in remaining if (world, c) in self.results]:
                    del self.results[world, case]
                    self.failures[world, case] = (
                        f"{case} at {world} ranks: the launch failed after its result.\n{report}{stderr[-6000:]}"
                    )
                return
            # Cases run in order: the first one without a result is the one that failed.
            failed = missing[0]
            self.failures[world, failed] = f"case {failed} failed at {world} ranks.\n{report}{_stderr_excerpt(stderr, failed)}"
            rest = remaining[remaining.index(failed) + 1 :]
            if timed_out or not started or time.monotonic() >= deadline:
                # No relaunch after a timeout or a failure before the first case.
                for case in rest:
                    self.failures[world, case] = (
                        f"{case} at {world} ranks was not run: case {failed} failed first.\n{report}{stderr[-6000:]}"
                    )
                return
            remaining = rest


@pytest.fixture(scope="module")
def fsdp2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Launches:
    return Launches(_selected(request.session.items), tmp_path_factory.mktemp("fsdp2"))


def _check_common(outcome: dict, world: int) -> None:
    assert outcome["moved"] > 1e-2, f"{outcome['case']}: parameters barely moved: {outcome}"
    assert len(outcome["state_numel"]) == world, outcome
    if outcome["case"].startswith("adamw"):
        return
    # The low-rank state is sharded as the parameters are: every element is held by some rank, and no
    # rank holds more than an even share (10% for chunk rounding, plus the replicated scalars and indices).
    reference = outcome["reference_state_numel"]
    assert sum(outcome["state_numel"]) >= reference, outcome
    assert max(outcome["state_numel"]) <= 1.1 * reference / world + 16, outcome
    # One per-matrix step for every layout: the sharded run and the single-process reference both ran it.
    local = "lowrank_optim.optim.exchange.LocalExchange"
    sharded = "lowrank_optim.distributed.fsdp2._Exchange" if world > 1 else local
    assert local in outcome["exchanges"] and sharded in outcome["exchanges"], outcome


@pytest.mark.parametrize(("world", "case"), [(2, "nondivisible"), (3, "nondivisible")], ids=["2ranks", "3ranks"])
def test_projected_rows_split_unevenly(fsdp2: Launches, world: int, case: str) -> None:
    # The worker asserts it; the driver checks the report as well.
    outcome = fsdp2.outcome(world, case)
    assert outcome["uneven"], outcome
    assert all(sum(rows) == outcome["global_shapes"][name][0] for name, rows in outcome["rows"].items()), outcome


@pytest.mark.parametrize(("world", "case"), _params((2, 3), ("plain", "accum", "clip")))
def test_matches_single_process_fp32(fsdp2: Launches, world: int, case: str) -> None:
    outcome = fsdp2.outcome(world, case)
    assert outcome["tolerance"] == FP32_TOLERANCE, outcome
    assert outcome["max_diff"] <= outcome["tolerance"], outcome
    if case.endswith(":clip"):
        assert outcome["min_grad_norm"] > 0.5, f"the clipping never bit: {outcome}"
    _check_common(outcome, world)


#: Projectors and moment policies beyond each optimizer's defaults, as plain cases.
VARIANTS = (
    "galore_rotate", "dct_rotate", "fira_rotate", "rsvd", "fira_rsvd", "random", "apollo", "apollo_mini",
    "galore_8bit", "dct_rotate_8bit", "fira_8bit", "apollo_8bit", "galore_8bit_vectors",
)
#: rank="auto" (the worker's budget: rank 3's state), its ranks allocated alike on every rank.
AUTO_VARIANTS = ("galore_auto", "galore_auto_rotate", "dct_auto", "fira_auto_8bit")


@pytest.mark.parametrize(
    ("world", "case"), [pytest.param(world, case, id=f"{world}ranks-{case}") for world in (2, 3) for case in VARIANTS]
)
def test_projectors_and_policies_match_single_process_fp32(fsdp2: Launches, world: int, case: str) -> None:
    outcome = fsdp2.outcome(world, case)
    assert outcome["max_diff"] <= outcome["tolerance"] == FP32_TOLERANCE, outcome
    _check_common(outcome, world)


@pytest.mark.parametrize(
    ("world", "case"), [pytest.param(world, case, id=f"{world}ranks-{case}") for world in (2, 3) for case in AUTO_VARIANTS]
)
def test_auto_ranks_match_single_process_fp32(fsdp2: Launches, world: int, case: str) -> None:
    """The owners' spectra reach every rank, so the sharded run allocates the single process's ranks
    (non-uniform ones here), stays within the budget, and steps as one process does."""
    outcome = fsdp2.outcome(world, case)
    assert outcome["max_diff"] <= outcome["tolerance"] == FP32_TOLERANCE, outcome
    assert outcome["ranks"] == outcome["reference_ranks"] and len(set(outcome["ranks"])) > 1, outcome
    assert outcome["whole_bytes"] <= outcome["budget"], outcome
    _check_common(outcome, world)


@pytest.mark.parametrize(("world", "case"), _params((2, 3), ("bf16",)))
def test_bf16_policy_within_two_ulps(fsdp2: Launches, world: int, case: str) -> None:
    # Tolerance 2 * 2**-8 * max|param| over the fp32 masters; see the worker's docstring for the reference.
    outcome = fsdp2.outcome(world, case)
    assert 0 < outcome["tolerance"] < 0.05, outcome
    assert outcome["max_diff"] <= outcome["tolerance"], outcome
    _check_common(outcome, world)


#: 8-bit moments (uint8 codes and fp32 scales as DTensors) through DCP saves, resumes and reshards too.
_EIGHT_BIT_CHECKPOINTS = [pytest.param(w, "galore_8bit:dcp", id=f"{w}ranks-galore_8bit:dcp") for w in (2, 3)]
_EIGHT_BIT_RESHARDS = [pytest.param(w, "galore_8bit:resume", id=f"{w}ranks-galore_8bit:resume") for w in (1, 3)]
#: rank="auto": the fresh optimizer's state is rebuilt at the saved ranks before dcp.load (match_saved_ranks).
_AUTO_CHECKPOINTS = [pytest.param(w, "galore_auto:dcp", id=f"{w}ranks-galore_auto:dcp") for w in (2, 3)]
_AUTO_RESHARDS = [pytest.param(w, "galore_auto:resume", id=f"{w}ranks-galore_auto:resume") for w in (1, 3)]


@pytest.mark.parametrize(("world", "case"), _params((2, 3), ("dcp",)) + _EIGHT_BIT_CHECKPOINTS + _AUTO_CHECKPOINTS)
def test_dcp_resume_is_bitwise(fsdp2: Launches, world: int, case: str) -> None:
    outcome = fsdp2.outcome(world, case)
    assert outcome["tolerance"] == 0.0 and outcome["max_diff"] == 0.0, outcome
    assert outcome["reference_diff"] <= FP32_TOLERANCE, outcome
    _check_common(outcome, world)


@pytest.mark.parametrize(("world", "case"), _params((1, 3), ("resume",)) + _EIGHT_BIT_RESHARDS + _AUTO_RESHARDS)
def test_reshard_from_two_ranks(fsdp2: Launches, world: int, case: str) -> None:
    """Saved at 2 ranks after 4 steps (``X:reshard``, itself compared with one process), resumed at
    ``world`` ranks for the last 3, compared with the uninterrupted single-process run."""
    saved = fsdp2.outcome(2, case.replace(":resume", ":reshard"))
    assert saved["max_diff"] <= FP32_TOLERANCE, saved
    outcome = fsdp2.outcome(world, case)
    assert outcome["tolerance"] == FP32_TOLERANCE, outcome
    assert outcome["max_diff"] <= outcome["tolerance"], outcome
    _check_common(outcome, world)


_AT_CONSTRUCTION = "parameter {position} of the optimizer (counted over all its param groups) (shape {shape})"
_PLAIN = (
    _AT_CONSTRUCTION + " is a plain tensor among FSDP2 (DTensor) parameters; allowed: every parameter "
    "of the optimizer sharded by fully_shard on one mesh (apply fully_shard to the root module too)."
)
_PLACEMENTS = _AT_CONSTRUCTION + " has placements (Replicate(),); allowed: (Shard(dim=0),), as fully_shard makes."
_REPLACED = (
    "{optimizer}: param 0 of param group 1 (shape (37, 20)) is a plain tensor, but the optimizer was built on FSDP2 "
    "(DTensor) parameters: it was replaced after construction. Keep the parameters fully_shard made (build the "
    "optimizer after wrapping, and do not swap its groups' tensors afterwards)."
)
_FLAT = (
    "Param 0 of param group {group} has shape (24,): only 2-D tensors can be projected. Put it in a group without "
    "'rank' (lowrank_optim.param_groups does this). If it is a flattened parameter (FSDP1 without "
    "use_orig_params=True, or another engine's flat buffer), projecting it is impossible: wrap the model with "
    "FSDP2's fully_shard (or FSDP1 with use_orig_params=True), or bind to DeepSpeed ZeRO with lowrank_optim.deepspeed."
)
#: check -> the ValueError's whole message. Positions at construction count over every parameter of the
#: optimizer (the worker's model has 8: 5 full-rank, then the 3 projected weights); at step() the message
#: names the group and the position in it.
_REFUSALS = {
    "plain_among_fullrank": _PLAIN.format(position=8, shape=(3, 4)),
    "plain_among_projected": _PLAIN.format(position=8, shape=(8, 6)),
    "replicated_alone": _PLACEMENTS.format(position=0, shape=(8, 6)),
    "replicated_among_projected": _PLACEMENTS.format(position=8, shape=(8, 6)),
    "flat_projected": _FLAT.format(group=0),
    "flat_among_fsdp2": _FLAT.format(group=2),
    "replaced_after_construction": _REPLACED,
}
_NAMES = {"galore": "GaLoreAdamW", "fira": "FiraAdamW", "dct": "DCTAdamW"}


@pytest.mark.parametrize(("world", "case"), [(2, "refusals")], ids=["2ranks"])
def test_refusals(fsdp2: Launches, world: int, case: str) -> None:
    """What the FSDP2 layout refuses, at construction and at step(), with its whole message (see the
    worker's ``refusals``): a plain tensor among DTensors, a Replicate DTensor, a flattened 1-D tensor
    in a projected group, a projected DTensor replaced by a plain tensor after construction (the refused
    step changes no parameter and no state)."""
    outcome = fsdp2.outcome(world, case)
    assert outcome["ranks_agree"], outcome
    assert sorted(outcome["report"]) == ["dct", "fira", "galore"], outcome
    for optimizer, report in outcome["report"].items():
        assert report.keys() == _REFUSALS.keys(), (optimizer, report)
        for check, message in _REFUSALS.items():
            raised = report[check]
            assert raised["type"] == "ValueError", (optimizer, check, raised)
            assert raised["message"] == message.format(optimizer=_NAMES[optimizer]), (optimizer, check, raised)
        replaced = report["replaced_after_construction"]
        assert replaced["unchanged"], (optimizer, replaced)
        assert not replaced["plain_in_state"], (optimizer, replaced)
        assert replaced["state_tensors"] > 0 and replaced["comparison_sees_a_step"], (optimizer, replaced)
        assert replaced["moved_after_restore"] > 1e-4, (optimizer, replaced)


@pytest.mark.parametrize(("world", "case"), [(2, "nonfinite"), (3, "nonfinite")], ids=["2ranks", "3ranks"])
def test_a_nan_in_one_shard_skips_that_matrix_on_every_rank(fsdp2: Launches, world: int, case: str) -> None:
    """The worker's ``nonfinite``: a NaN in the last rank's shard of ``mlp_mid.weight``'s gradient at a
    normal step and at a refresh step. Its skip flag is combined over the shards, so the whole matrix
    keeps its values on every rank while the other tensors step, and every rank counts both skips."""
    outcome = fsdp2.outcome(world, case)
    assert sorted(outcome["report"]) == ["dct", "fira", "galore"], outcome
    for name, report in outcome["report"].items():
        for step in ("2", "3"):
            assert report[step] == {"skipped_unchanged": True, "others_moved": True, "finite": True}, (name, step, report)
        assert report["skipped_updates"] == [{"(1, 1)": 2}] * world, (name, report)
