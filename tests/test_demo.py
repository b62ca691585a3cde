"""The ``demo`` command, run in-process on the ``test`` model."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from lowrank_optim.__main__ import main
from lowrank_optim.demo import cosine_with_warmup, format_table, run_demo

RESULT_KEYS = {
    "method",
    "hyperparameters",
    "initial_eval_loss",
    "final_eval_loss",
    "final_perplexity",
    "optimizer_state_bytes",
    "mean_step_ms",
    "tokens_per_s",
    "train_seconds",
}


def test_demo_compares_methods_from_the_same_start() -> None:
    report = run_demo(steps=5, batch_size=4, seq_len=32, config="test", eval_batches=2, log=lambda line: None)
    adamw, galore = report["results"]
    assert (adamw["method"], galore["method"]) == ("adamw", "galore")
    for result in (adamw, galore):
        assert set(result) == RESULT_KEYS
        assert result["final_eval_loss"] < result["initial_eval_loss"]
        assert result["final_perplexity"] == pytest.approx(math.exp(result["final_eval_loss"]))
        assert result["mean_step_ms"] > 0 and result["tokens_per_s"] > 0
    assert adamw["initial_eval_loss"] == galore["initial_eval_loss"]
    # GaLore keeps the attention/MLP moments in a rank-8 subspace instead of full 32 x 64 matrices.
    assert 0 < galore["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert report["settings"]["steps"] == 5
    table = format_table(report["results"])
    assert table.splitlines()[0].split()[:2] == ["method", "initial"]
    assert len(table.splitlines()) == 4


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.json"
    argv = [
        "demo",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--config",
        "test",
        "--methods",
        "adamw",
        "--eval-batches",
        "1",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    assert "adamw" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [result["method"] for result in report["results"]] == ["adamw"]


def test_cli_rejects_unknown_method_and_too_long_sequences(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "adamw,sgd"])
    assert "choose a comma-separated list from adamw, galore" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--config", "test", "--seq-len", "64"])
    assert "seq_len (64) must be < max_seq_len (64) of config 'test'" in capsys.readouterr().err


def test_run_demo_validates_arguments() -> None:
    with pytest.raises(ValueError, match=re.escape("steps (0) must be >= 1")):
        run_demo(steps=0, config="test")


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in itertools.pairwise(lrs[9:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
