"""Hugging Face ``Trainer`` with the low-rank optimizers (lowrank_optim.integrations.transformers): the
optimizer really runs (state, groups, schedule), equals a hand-written loop, resumes from a Trainer
checkpoint bit-identically, and under DeepSpeed ZeRO 0/2/3 on 2 CPU ranks equals the one-process run
(tests/distributed/hf_trainer.py holds the cases)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import hf_trainer as cases  # noqa: E402

from lowrank_optim import APOLLOAdamW, FiraAdamW, GaLoreAdamW  # noqa: E402
from lowrank_optim.integrations.transformers import LowRankTrainer, build_optimizer  # noqa: E402

TORCHRUN = Path(sys.executable).parent / "torchrun"


class _Recording(LowRankTrainer):
    """Records the batches it trains on and the lr of every group at every step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[torch.Tensor] = []
        self.lrs: list[list[float]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.batches.append(inputs["input_ids"].clone())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, *args, **kwargs):
        self.lrs.append([group["lr"] for group in self.optimizer.param_groups])
        return super().training_step(*args, **kwargs)


def _recording(tmp_path: Path, optimizer=GaLoreAdamW, options=None, **changes) -> _Recording:
    return _Recording(
        model=cases.tiny_model(), args=cases.arguments(tmp_path, 1, None, **changes), train_dataset=cases.dataset(),
        lowrank_optimizer=optimizer, lowrank_options=options or {"rank": 4, "update_proj_gap": 3, "scale": 0.5},
    )


def test_the_low_rank_optimizer_runs_with_the_trainers_schedule(tmp_path: Path) -> None:
    trainer = _recording(tmp_path)
    trainer.train()
    base = trainer.optimizer.optimizer  # Accelerate's wrapper around ours
    assert type(base) is GaLoreAdamW
    projected = [p for group in base.param_groups if "rank" in group for p in group["params"]]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert len(projected) == 2 * 7 and all(("self_attn" in names[id(p)] or "mlp" in names[id(p)]) for p in projected)
    for p in projected:
        state = base.state[p]
        assert int(state["step"]) == cases.STEPS and ("basis_left" in state or "basis_right" in state)
        assert state["exp_avg"].shape != p.shape  # low-rank moments
    # The Trainer's weight-decay split for the full-rank parameters; the projected ones decay.
    decays = [(group["weight_decay"], "rank" in group) for group in base.param_groups]
    assert decays == [(0.1, False), (0.0, False), (0.1, True)]
    assert all("norm" in names[id(p)] for p in base.param_groups[1]["params"])
    # lr: TrainingArguments' peak with its cosine warmup schedule, the same in every group.
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = transformers.get_cosine_schedule_with_warmup(reference, num_warmup_steps=2, num_training_steps=cases.STEPS)
    expected = []
    for _ in range(cases.STEPS):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert [lrs[0] for lrs in trainer.lrs] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(lrs)) == 1 for lrs in trainer.lrs)


@pytest.mark.parametrize("name", ["galore", "fira", "apollo"])
def test_equals_a_hand_written_loop(name: str, tmp_path: Path) -> None:
    optimizer, options = {
        "galore": (GaLoreAdamW, {"rank": 4, "update_proj_gap": 3, "scale": 0.5}),
        "fira": (FiraAdamW, {"rank": 4, "update_proj_gap": 3, "alpha": 0.5}),
        "apollo": (APOLLOAdamW, {"rank": 4, "update_proj_gap": 3, "proj": "random"}),
    }[name]
    trainer = _recording(tmp_path, optimizer, options)
    trainer.train()
    model = cases.tiny_model()
    args = cases.arguments(tmp_path, 1, None)
    ours = build_optimizer(model, args, optimizer, options)
    schedule = transformers.get_cosine_schedule_with_warmup(ours, num_warmup_steps=2, num_training_steps=cases.STEPS)
    assert len(trainer.batches) == cases.STEPS
    for ids in trainer.batches:
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ours.step()
        schedule.step()
        ours.zero_grad()
    difference = max((a - b).abs().max().item() for a, b in zip(trainer.model.parameters(), model.parameters()))
    assert difference <= 1e-6, difference
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), cases.tiny_model().parameters()))
    assert moved > 1e-3


def test_resume_from_a_trainer_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    resumed = cases.run_case(tmp_path, "plain:ckpt", 1)
    half = len(resumed) // 2
    assert all(torch.equal(a, b) for a, b in zip(resumed[:half], resumed[half:]))


def test_an_optimizer_passed_as_optimizers_is_kept(tmp_path: Path) -> None:
    model = cases.tiny_model()
    optimizer = build_optimizer(model, cases.arguments(tmp_path, 1, None), GaLoreAdamW, {"rank": 4})
    trainer = LowRankTrainer(
        model=model, args=cases.arguments(tmp_path, 1, None), train_dataset=cases.dataset(), optimizers=(optimizer, None)
    )
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer and len(optimizer.state) > 0


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("hf_ds")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(Path(cases.__file__)), str(out)]
    command += ["zero0", "zero2", "zero3", "zero3:fira", "zero2:ckpt", "zero3:ckpt", "zero0:bf16", "zero2:auto", "zero3:auto"]
    command += ["zero3:ckpt:auto"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        raise AssertionError(
            f"torchrun failed (rc {completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
        )
    for case in ("plain", "plain:fira", "plain:auto"):
        torch.save(cases.run_case(out, case, 1), out / f"{case}.pt")
    return out


@pytest.mark.parametrize(
    "case", ["zero0", "zero2", "zero3", "zero3:fira", "zero2:ckpt", "zero3:ckpt", "zero2:auto", "zero3:auto", "zero3:ckpt:auto"]
)
def test_deepspeed_on_two_ranks_equals_one_process(deepspeed_runs: Path, case: str) -> None:
    result = torch.load(deepspeed_runs / f"{case}.pt", weights_only=True)
    if "ckpt" in case:  # the resumed run continues the uninterrupted one bit for bit
        half = len(result) // 2
        assert all(torch.equal(a, b) for a, b in zip(result[:half], result[half:])), case
        result = result[:half]
    reference = "plain:fira" if "fira" in case else "plain:auto" if "auto" in case else "plain"
    plain = torch.load(deepspeed_runs / f"{reference}.pt", weights_only=True)
    if "auto" in case and "ckpt" not in case:  # rank="auto": the same ranks as one process, unequal ones
        assert torch.equal(result[-1], plain[-1]) and len(set(plain[-1].tolist())) > 1, (result[-1], plain[-1])
        result, plain = result[:-1], plain[:-1]
    elif "auto" in case:
        plain = plain[:-1]
    difference = max((a - b).abs().max().item() for a, b in zip(result, plain))
    # Fira: one process folds the residual into the back-projection, the pieces of a matrix split between
    # ranks form it explicitly (tests/test_distributed_fragments.py, TOLERANCES): a few ulps apart.
    assert difference <= (4e-6 if "fira" in case else 1e-6), (case, difference)


def test_deepspeed_stage0_bf16_warm_up_step_is_undone(deepspeed_runs: Path) -> None:
    """DeepSpeed's stage-0 bf16 wrapper steps the optimizer once with zero gradients while it is built; a
    Trainer whose create_optimizer returned our optimizer without binding counted 7 steps for 6 updates."""
    (steps,) = torch.load(deepspeed_runs / "zero0:bf16.pt", weights_only=True)
    assert steps.tolist() == [float(cases.STEPS)]


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_accelerate_with_deepspeed_equals_one_process(tmp_path_factory: pytest.TempPathFactory, stage: int) -> None:
    """Accelerate's DeepSpeed plugin through lowrank_optim.integrations.accelerate.prepare (which binds the
    engine) on 2 ranks equals Accelerate in one process."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp(f"accelerate{stage}")
    worker = str(Path(cases.__file__).parent / "accelerate_case.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for command in ([sys.executable, worker, str(out), "-1"],
                    [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", worker, str(out), str(stage)]):
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-6000:]
    plain = torch.load(out / "accelerate_-1.pt", weights_only=True)
    sharded = torch.load(out / f"accelerate_{stage}.pt", weights_only=True)
    difference = max((a - b).abs().max().item() for a, b in zip(plain, sharded))
    assert difference <= 1e-6, difference


def test_accelerate_prepare_needs_the_optimizer() -> None:
    from lowrank_optim.integrations.accelerate import prepare

    with pytest.raises(ValueError, match="needs exactly one lowrank_optim optimizer among the objects; got 0 \\(Linear\\)"):
        prepare(object(), torch.nn.Linear(2, 2))


# --- refusals -------------------------------------------------------------------------------------------


def _build(tmp_path: Path, stage: int | None = None, ds_extra: dict | None = None, **kwargs) -> LowRankTrainer:
    args = cases.arguments(tmp_path, 1, stage)
    if ds_extra:
        args.hf_deepspeed_config.config.update(ds_extra)
    kwargs.setdefault("lowrank_optimizer", GaLoreAdamW)
    kwargs.setdefault("lowrank_options", {"rank": 4})
    return LowRankTrainer(model=cases.tiny_model(), args=args, train_dataset=cases.dataset(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lowrank_optimizer": None}, "needs lowrank_optimizer=<class> .* or optimizers=.*would train the Trainer's AdamW"),
        (
            {"lowrank_optimizer": torch.optim.AdamW},
            "must be a lowrank_optim optimizer class .* not <class 'torch.optim.adamw.AdamW'>",
        ),
        (
            {"lowrank_options": {"update_proj_gap": 3}},
            r"lowrank_options \(\{'update_proj_gap': 3\}\) must give the projected group's rank",
        ),
        ({"target_modules": "mlp"}, "target_modules must be a sequence of strings, not the string 'mlp'"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        _build(tmp_path, **kwargs)


def test_settings_of_the_training_arguments_are_refused_in_the_options(tmp_path: Path) -> None:
    message = r"sets \['eps', 'lr'\], which come from the TrainingArguments \(adam_epsilon, learning_rate\)"
    with pytest.raises(ValueError, match=message):  # at construction, before any training
        _build(tmp_path, lowrank_options={"rank": 4, "lr": 0.1, "eps": 1e-8})
    with pytest.raises(ValueError, match=message):  # and for build_optimizer used on its own
        build_optimizer(cases.tiny_model(), cases.arguments(tmp_path, 1, None), GaLoreAdamW, {"rank": 4, "lr": 0.1, "eps": 1e-8})
    with pytest.raises(ValueError, match="must not give 'params'"):
        _build(tmp_path, lowrank_options={"rank": 4, "params": []})


def test_both_an_optimizer_and_a_class_are_refused(tmp_path: Path) -> None:
    model = cases.tiny_model()
    optimizer = build_optimizer(model, cases.arguments(tmp_path, 1, None), GaLoreAdamW, {"rank": 4})
    with pytest.raises(ValueError, match="got both lowrank_optimizer and optimizers"):
        _build(tmp_path, optimizers=(optimizer, None))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "an 'optimizer' section \\('AdamW'\\).*Remove the section"),
        ({"lowrank_optim": {"rank": 4}}, "a 'lowrank_optim' section, which only lowrank_optim.deepspeed.initialize reads"),
    ],
)
def test_deepspeed_sections_that_would_replace_the_optimizer_are_refused(tmp_path: Path, section: dict, message: str) -> None:
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with pytest.raises(ValueError, match=message):
        _build(tmp_path, stage=2, ds_extra=section)
