"""Training progress: a bar redrawn in place on a terminal (updates, loss, tokens/s, ETA), plain lines
elsewhere; periodic evaluations are printed; ``compare`` says which method of how many it is training."""

from __future__ import annotations

import io

import pytest

from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain
from lowrank_optim.train.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place() -> None:
    terminal = _Terminal()
    progress = Progress(4, "galore", stream=terminal)
    assert progress.tty
    progress.update(1, 3.5, 1e-2, 1234.0)
    progress.message("[galore] update 1/4  eval loss 3.4000")
    for step in (2, 3, 4):
        progress.update(step, 3.0, 1e-3, 2000.0)
    text = terminal.getvalue()
    assert text.count("\r") >= 4 and text.endswith("\n")
    assert "[galore] 1/4 █████" in text and " 25%" in text and "100%" in text
    assert "loss 3.5000  lr 1.00e-02  1,234 tok/s  ETA " in text
    # The message sits on its own line: the bar is erased first, then redrawn below it.
    assert "\r\x1b[K[galore] update 1/4  eval loss 3.4000\n\r[galore] 2/4" in text


def test_plain_output_gets_lines_every_so_often() -> None:
    lines: list[str] = []
    progress = Progress(10, "fira", log=lines.append, every=4)
    assert not progress.tty
    for step in range(1, 11):
        progress.update(step, 2.0, 1e-3, 100.0)
    assert [line.split("  ")[0] for line in lines] == ["[fira] update 4/10", "[fira] update 8/10", "[fira] update 10/10"]
    assert all("\r" not in line and "ETA 0:00:0" in line for line in lines)
    stream = io.StringIO()  # not a terminal: lines too
    Progress(2, "dct", stream=stream).update(2, 1.0, 1e-3, 10.0)
    assert stream.getvalue().startswith("[dct] update 2/2  loss 1.0000") and "\r" not in stream.getvalue()


@pytest.mark.parametrize("total, every, message", [(0, 1, r"total \(0\) must be >= 1"), (3, 0, r"every \(0\) must be >= 1")])
def test_bad_settings(total: int, every: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Progress(total, "x", every=every)


def test_periodic_evaluations_are_printed() -> None:
    lines: list[str] = []
    settings = TrainSettings(steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, measure_memory=False)
    stream = TokenStream(stdlib_corpus()[:20000], 16)
    result = pretrain(LlamaConfig.from_name_or_path("test"), load_presets("test")["galore"], stream, settings, log=lines.append)
    evals = [line for line in lines if "eval loss" in line]
    assert [line.split("  ")[0] for line in evals[:2]] == ["[galore] update 0/4", "[galore] update 2/4"]
    assert evals[2].startswith("[galore] final eval loss ") and len(evals) == 3
    assert [step for step, _ in result["eval_curve"]] == [0, 2, 4]
    assert f"eval loss {result['eval_curve'][1][1]:.4f}" in evals[1]


def test_compare_says_which_method_of_how_many(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_optim.__main__ import main

    assert main(["compare", "--config", "test", "--methods", "adamw,galore", "--per-layer-methods", "galore",
                 "--steps", "2", "--per-layer-steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
                 "--no-estimate", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "method 1 of 3: adamw, 2 updates" in out
    assert "method 2 of 3: galore, 2 updates" in out
    assert "method 3 of 3: galore with per-layer updates, 2 updates" in out
