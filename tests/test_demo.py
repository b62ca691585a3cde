"""The ``compare``/``demo`` command, the pretraining runner with resume, the CLI and the GPU bench's dry run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lowrank_optim.__main__ import main
from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.demo import format_table, run_comparison, write_plots
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import build_model, cosine_with_warmup, load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain

ROOT = Path(__file__).resolve().parents[1]
TEST = LlamaConfig.from_name_or_path("test")


def test_comparison_table_and_plots(tmp_path: Path) -> None:
    report = run_comparison(
        config="test", methods=("adamw", "galore"), per_layer_methods=("galore",), steps=6,
        per_layer_steps=2, batch_size=2, seq_len=32, eval_batches=1, log=lambda line: None,
    )
    results = report["results"]
    assert [r["method"] for r in results] == ["adamw", "galore", "galore+per-layer"]
    for result in results:
        assert result["final_eval_loss"] < result["initial_eval_loss"]
        assert result["peak_bytes"] > result["weight_bytes"] + result["optimizer_state_bytes"]
    assert results[1]["optimizer_state_bytes"] < results[0]["optimizer_state_bytes"]
    # Per-layer updates: no full gradient set, a lower peak in the weight-dominated regime.
    assert results[2]["peak_bytes_batch1_checkpointed"] < results[1]["peak_bytes_batch1_checkpointed"]
    assert len(format_table(results).splitlines()) == 2 + len(results)
    paths = write_plots(results, tmp_path)
    assert all(path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG" for path in paths)


def test_resume_continues_bit_identically(tmp_path: Path) -> None:
    stream = TokenStream(stdlib_corpus(200_000), 16)
    settings = TrainSettings(steps=6, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False, accumulation=2)
    preset = load_presets("test")["galore"]
    quiet = {"log": lambda line: None}
    full = pretrain(TEST, preset, stream, settings, checkpoint=tmp_path / "full.pt", **quiet)
    # Stop after 3 updates (checkpoint at 3), then resume to 6 from the checkpoint.
    part = tmp_path / "part.pt"
    with pytest.raises(_Stop):
        pretrain(TEST, preset, stream, settings, checkpoint=part, checkpoint_every=3, log=_stop_after(3))
    resumed = pretrain(TEST, preset, stream, settings, checkpoint=part, resume=True, **quiet)
    assert resumed["train_curve"] == full["train_curve"]
    assert resumed["final_eval_loss"] == full["final_eval_loss"]
    a = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    b = torch.load(part, weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


class _Stop(Exception):
    pass


def _stop_after(update: int) -> Callable[[str], None]:
    """A log function that interrupts training (like a killed job) once update ``update + 1`` is logged."""

    def log(line: str) -> None:
        if f"update {update + 1}/" in line:
            raise _Stop

    return log


def test_cli_help_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("estimate", "measure", "pretrain", "compare", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--per-layer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "adamw,sgd"])
    assert "choose a comma-separated list from adamw, galore" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--config", "test", "--seq-len", "64"])
    assert "seq_len (64) must be < max_seq_len (64) of config 'test'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", "test", "--seq-len", "64"])
    assert "seq_len (64) must be < max_seq_len (64) of config 'test': a training window is seq_len + 1" in (
        capsys.readouterr().err
    )


def test_cli_estimate_and_pretrain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--config", "1b", "--methods", "adamw"]) == 0
    assert "weights+states 8.03" in capsys.readouterr().out
    tokens = tmp_path / "tokens.npy"
    import numpy as np

    np.save(tokens, np.arange(3000) % 200)
    out = tmp_path / "result.json"
    assert main(["pretrain", "--config", "test", "--method", "dct", "--tokens", str(tokens), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["method"] == "dct"


@pytest.mark.parametrize("method", ["galore", "fira", "dct", "sltrain"])
def test_cli_pretrains_in_bfloat16(method: str, tmp_path: Path) -> None:
    """bf16 weights and gradients end to end on CPU (fp32 low-rank moments by default), finite losses."""
    import numpy as np

    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.arange(3000) % 200)
    out = tmp_path / "result.json"
    assert main(["pretrain", "--config", "test", "--method", method, "--tokens", str(tokens), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--dtype", "bfloat16",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["dtype"] == "bfloat16"
    assert result["gradient_bytes"] == 2 * result["parameters"]  # bf16 gradients
    losses = [result["initial_eval_loss"], result["final_eval_loss"]] + [point[-1] for point in result["train_curve"]]
    assert len(losses) == 5 and all(math.isfinite(loss) for loss in losses), losses


def test_meta_build_matches_device_and_dtype() -> None:
    model = build_model(TEST, preset=load_presets("test")["sltrain"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = cosine_with_warmup(optimizer, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_gpu_bench_dry_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu_memory.py"), "--dry-run", "--steps", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "gpu-memory-dry-run.json").read_text())["rows"]
    assert len(rows) == 6 and all(row["peak_gb"] > 0 for row in rows)
