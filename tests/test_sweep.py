"""Learning-rate sweeps (lowrank_optim.train.sweep, ``compare --sweep-lr``): the grid around each preset,
the best point rerun with more seeds, mean ± std, JSON and plot; refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain
from lowrank_optim.train.sweep import DEFAULT_OFFSETS, format_sweep_table, sweep_learning_rates

SETTINGS = TrainSettings(steps=3, batch_size=2, seq_len=16, eval_batches=1, seed=4, measure_memory=False)


@pytest.fixture(scope="module")
def stream() -> TokenStream:
    return TokenStream(stdlib_corpus()[:20000], 16)


def test_grid_best_point_and_seeds(stream: TokenStream) -> None:
    config, presets = LlamaConfig.from_name_or_path("test"), load_presets("test")
    lines: list[str] = []
    report = sweep_learning_rates(config, presets, stream, SETTINGS, ["adamw", "galore"], offsets=(-0.5, 0.0, 0.5), seeds=2,
                                  log=lines.append)
    assert report["seeds"] == [4, 5]
    assert sum("sweep run" in line for line in lines) == 2 * (3 + 1)
    assert lines[0] == f"sweep run 1 of 8: adamw lr {presets['adamw'].lr * 10**-0.5:.3g} seed 4"
    for method in ("adamw", "galore"):
        entry = report["methods"][method]
        lrs = [point["lr"] for point in entry["grid"]]
        assert lrs == pytest.approx([presets[method].lr * 10**o for o in (-0.5, 0.0, 0.5)])
        best = min(entry["grid"], key=lambda point: point["final_eval_loss"])
        assert entry["best_lr"] == best["lr"] and entry["seed_losses"][0] == best["final_eval_loss"]
        assert entry["best_at_edge"] == (best["lr"] in (lrs[0], lrs[-1]))
        assert len(entry["seed_losses"]) == 2 and entry["seed_losses"][0] != entry["seed_losses"][1]
        assert entry["mean_loss"] == pytest.approx(sum(entry["seed_losses"]) / 2)
        assert entry["std_loss"] == pytest.approx(abs(entry["seed_losses"][0] - entry["seed_losses"][1]) / math.sqrt(2))
    # The second seed's run is an ordinary run at the best lr with that seed.
    entry = report["methods"]["galore"]
    import dataclasses

    again = pretrain(config, dataclasses.replace(presets["galore"], lr=entry["best_lr"]), stream,
                     dataclasses.replace(SETTINGS, seed=5), log=lambda line: None)
    assert again["final_eval_loss"] == entry["seed_losses"][1]
    table = format_sweep_table(report)
    assert table.splitlines()[2].split()[0] in ("adamw", "galore") and "± " in table


def test_default_grid_is_five_points_over_a_decade_and_a_half() -> None:
    assert len(DEFAULT_OFFSETS) == 5 and max(DEFAULT_OFFSETS) - min(DEFAULT_OFFSETS) == 1.5 and 0.0 in DEFAULT_OFFSETS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seeds": 0}, r"seeds \(0\) must be >= 1"),
        ({"grid_seeds": 0}, r"grid_seeds \(0\) must be >= 1"),
        ({"offsets": (0.0, 0.0)}, r"offsets \(\[0.0, 0.0\]\) must be distinct finite numbers"),
        ({"offsets": ()}, r"offsets \(\[\]\) must be distinct"),
        ({"methods": ["lion"]}, r"methods \['lion'\] have no preset"),
    ],
)
def test_refusals(stream: TokenStream, kwargs: dict, message: str) -> None:
    methods = kwargs.pop("methods", ["adamw"])
    with pytest.raises(ValueError, match=message):
        sweep_learning_rates(LlamaConfig.from_name_or_path("test"), load_presets("test"), stream, SETTINGS, methods, **kwargs)


def test_compare_sweep_lr_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_optim.__main__ import main

    out = tmp_path / "not" / "yet"  # created (a 9-minute sweep once lost its JSON to a missing --out)
    assert main(["compare", "--config", "test", "--methods", "dct", "--sweep-lr", "--seeds", "2", "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--out", str(out)]) == 0
    tmp_path = out
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert list(report["methods"]) == ["dct"] and len(report["methods"]["dct"]["grid"]) == 5
    assert report["presets"] == "test" and (tmp_path / "sweep_lr.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "sweep run 6 of 6: dct" in out and "final eval loss (mean ± std, n)" in out
    with pytest.raises(SystemExit):
        main(["compare", "--sweep-lr", "--seeds", "0"])


def test_compare_sweep_offsets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_optim.__main__ import main

    assert main(["compare", "--config", "test", "--methods", "adamw", "--sweep-lr", "--sweep-offsets=-0.5,0.5",
                 "--seeds", "1", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report["offsets"] == [-0.5, 0.5]
    assert [point["lr"] for point in report["methods"]["adamw"]["grid"]] == pytest.approx([1e-3 * 10**-0.5, 1e-3 * 10**0.5])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compare", "--sweep-offsets", "0,1"])
    assert "--sweep-offsets sets the grid of --sweep-lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--grid-seeds", "2"])
    assert "--grid-seeds sets the grid of --sweep-lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--sweep-lr", "--sweep-offsets", "0,x"])
    assert "'0,x': must be comma-separated numbers" in capsys.readouterr().err


def test_grid_seeds_pick_the_best_mean(stream: TokenStream) -> None:
    config, presets = LlamaConfig.from_name_or_path("test"), load_presets("test")
    lines: list[str] = []
    report = sweep_learning_rates(config, presets, stream, SETTINGS, ["adamw"], offsets=(-0.5, 0.5), seeds=3, grid_seeds=2,
                                  log=lines.append)
    assert sum("sweep run" in line for line in lines) == 2 * 2 + 1 and report["grid_seeds"] == [4, 5]
    entry = report["methods"]["adamw"]
    for point in entry["grid"]:
        assert len(point["seed_losses"]) == 2 and point["final_eval_loss"] == pytest.approx(sum(point["seed_losses"]) / 2)
    best = min(entry["grid"], key=lambda point: point["final_eval_loss"])
    assert entry["best_lr"] == best["lr"] and entry["seed_losses"][:2] == best["seed_losses"] and len(entry["seed_losses"]) == 3


def test_sweeping_other_lr(stream: TokenStream, capsys: pytest.CaptureFixture[str]) -> None:
    config, presets = LlamaConfig.from_name_or_path("test"), load_presets("test")
    report = sweep_learning_rates(config, presets, stream, SETTINGS, ["galore"], offsets=(0.0, 1.0), seeds=1,
                                  field="other_lr", log=lambda line: None)
    entry = report["methods"]["galore"]
    assert report["field"] == "other_lr" and entry["preset_lr"] == presets["galore"].lr  # unset: centred on lr
    assert [p["lr"] for p in entry["grid"]] == pytest.approx([presets["galore"].lr, 10 * presets["galore"].lr])
    # The grid point at offset 0 is the preset itself (other_lr = lr): the same run as without the field.
    plain = pretrain(config, presets["galore"], stream, SETTINGS, log=lambda line: None)
    assert entry["grid"][0]["final_eval_loss"] == plain["final_eval_loss"]
    assert "best other_lr" in format_sweep_table(report)
    with pytest.raises(ValueError, match=r"field \('alpha'\) must be one of lr, other_lr"):
        sweep_learning_rates(config, presets, stream, SETTINGS, ["galore"], field="alpha")
    from lowrank_optim.__main__ import main

    with pytest.raises(SystemExit):
        main(["compare", "--sweep-field", "other_lr"])
    assert "--sweep-field sets the grid of --sweep-lr" in capsys.readouterr().err
