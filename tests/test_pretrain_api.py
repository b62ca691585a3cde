"""``pretrain`` on a user's own model and optimizer, and ``compare``'s seeds, token budget and target loss."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowrank_optim import GaLoreAdamW
from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.demo import format_table, resolve_budget, run_comparison, tokens_to_target
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import build_model, build_optimizer, load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain

TEST = LlamaConfig.from_name_or_path("test")
PRESETS = load_presets("test")
SETTINGS = TrainSettings(steps=4, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False, eval_every=2)
QUIET = {"log": lambda line: None}


@pytest.fixture(scope="module")
def stream() -> TokenStream:
    return TokenStream(stdlib_corpus()[:20000], 16)


class Bigram(nn.Module):
    """A model that is not ours: an embedding and a head, HF-style ``(input_ids, labels) -> .loss``."""

    def __init__(self, vocab: int = 257, width: int = 24) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(vocab, width)
        self.mlp = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        logits = self.head(torch.relu(self.mlp(self.embed(input_ids))))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss)


@pytest.mark.parametrize("method", ["galore", "apollo", "adamw"])
def test_own_model_and_optimizer_equal_the_built_in_run(method: str, stream: TokenStream) -> None:
    """Our LLaMA passed as a module with its optimizer trains bit-identically to pretrain(config, preset)."""
    preset = PRESETS[method]
    builtin = pretrain(TEST, preset, stream, SETTINGS, **QUIET)
    model = build_model(TEST, preset=preset, seed=SETTINGS.seed)
    own = pretrain(model, build_optimizer(model, preset), stream, SETTINGS, name=method, **QUIET)
    assert own["train_curve"] == builtin["train_curve"] and own["eval_curve"] == builtin["eval_curve"]
    model = build_model(TEST, preset=preset, seed=SETTINGS.seed)
    as_preset = pretrain(model, preset, stream, SETTINGS, **QUIET)  # a preset builds the optimizer over it
    assert as_preset["train_curve"] == builtin["train_curve"]


def test_any_module_with_a_factory_and_scheduler(stream: TokenStream) -> None:
    model = Bigram()
    seen: list[int] = []

    def schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler:
        seen.append(total)
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)

    result = pretrain(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.5), stream, SETTINGS, scheduler=schedule, **QUIET)
    assert seen == [4] and result["method"] == "SGD" and result["final_eval_loss"] < result["initial_eval_loss"]
    assert result["preset"]["optimizer"] == "torch.optim.sgd.SGD" and result["preset"]["defaults"]["lr"] == 0.5
    assert [step for step, _ in result["train_curve"]] == [1, 2, 3, 4]


def test_own_model_resumes_bit_identically_and_is_verified(stream: TokenStream, tmp_path: Path) -> None:
    def run(path: Path, **kwargs: object) -> dict:
        model = Bigram()
        optimizer = GaLoreAdamW([{"params": [model.embed.weight, model.head.weight]},
                                 {"params": [model.mlp.weight], "rank": 4, "update_proj_gap": 2}], lr=1e-2)
        return pretrain(model, optimizer, stream, SETTINGS, checkpoint=path, **kwargs)  # type: ignore[arg-type]

    full = run(tmp_path / "full.pt", **QUIET)
    part = tmp_path / "part.pt"

    def stop(line: str) -> None:
        if "update 3/" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(part, checkpoint_every=2, log=stop)
    resumed = run(part, resume=True, **QUIET)
    assert resumed["train_curve"] == full["train_curve"] and resumed["final_eval_loss"] == full["final_eval_loss"]
    # Another model (shapes) or optimizer (defaults) is refused, naming the difference.
    other = Bigram(width=16)
    optimizer = GaLoreAdamW([{"params": [other.embed.weight, other.head.weight]},
                             {"params": [other.mlp.weight], "rank": 4, "update_proj_gap": 2}], lr=1e-2)
    with pytest.raises(ValueError, match="model config field 'shapes_sha256'"):
        pretrain(other, optimizer, stream, SETTINGS, checkpoint=part, resume=True, **QUIET)
    with pytest.raises(ValueError, match="was written by method 'GaLoreAdamW'; this run asks for method 'AdamW'"):
        pretrain(other, torch.optim.AdamW(other.parameters()), stream, SETTINGS, checkpoint=part, resume=True, **QUIET)
    model = Bigram()
    optimizer = GaLoreAdamW([{"params": [model.embed.weight, model.head.weight]},
                             {"params": [model.mlp.weight], "rank": 4, "update_proj_gap": 2}], lr=2e-2)
    with pytest.raises(ValueError, match=r"checkpoint .* does not match this run, so it is not resumed: preset field 'defaults'"):
        pretrain(model, optimizer, stream, SETTINGS, checkpoint=part, resume=True, **QUIET)
    model = Bigram()  # the same defaults, another rank in one group
    optimizer = GaLoreAdamW([{"params": [model.embed.weight, model.head.weight]},
                             {"params": [model.mlp.weight], "rank": 2, "update_proj_gap": 2}], lr=1e-2)
    with pytest.raises(ValueError, match=r"not resumed: preset field 'groups'"):
        pretrain(model, optimizer, stream, SETTINGS, checkpoint=part, resume=True, **QUIET)


def test_own_model_refusals(stream: TokenStream) -> None:
    model = Bigram()
    adamw = torch.optim.AdamW(model.parameters())
    cases = [
        (lambda: pretrain(model.to(torch.bfloat16), adamw, stream, SETTINGS, **QUIET),
         "settings.dtype ('float32') must be the dtype of the model's parameters (['bfloat16'])"),
        (lambda: pretrain(Bigram(), adamw, stream, dataclasses.replace(SETTINGS, device="meta"), **QUIET),
         "settings.device ('meta') must be where the model's parameters are (['cpu'])"),
        (lambda: pretrain(Bigram(), adamw, stream, dataclasses.replace(SETTINGS, gradient_checkpointing=True), **QUIET),
         "settings.gradient_checkpointing=True applies to the built-in LLaMA"),
        (lambda: pretrain(Bigram(), PRESETS["sltrain"], stream, SETTINGS, **QUIET),
         "method 'sltrain' replaces the target linears (Method.layer), which pretrain does not do to a model you pass"),
        (lambda: pretrain(Bigram(), adamw, stream, SETTINGS, **QUIET),
         "the optimizer (AdamW) must update exactly the model's trainable parameters: 3 of the model's 3 trainable "
         "parameters are not in it (first: ['embed.weight', 'mlp.weight', 'head.weight']); it holds 3 tensor(s)"),
        (lambda: pretrain(TEST, torch.optim.AdamW(Bigram().parameters()), stream, SETTINGS, **QUIET),
         "method (AdamW) must be a MethodPreset when model is a LlamaConfig"),
        (lambda: pretrain({"hidden_size": 8}, PRESETS["adamw"], stream, SETTINGS, **QUIET),  # type: ignore[arg-type]
         "model (dict) must be a LlamaConfig or an nn.Module"),
        (lambda: pretrain(Bigram(), "adamw", stream, SETTINGS, **QUIET),  # type: ignore[arg-type]
         "method (str) must be a MethodPreset, an optimizer, or a callable model -> optimizer"),
        (lambda: pretrain(Bigram(), lambda m: None, stream, SETTINGS, **QUIET),  # type: ignore[arg-type,return-value]
         "the optimizer factory returned NoneType, not a torch.optim.Optimizer"),
        (lambda: pretrain(Bigram(), lambda m: torch.optim.SGD(m.parameters(), lr=0.1), stream, SETTINGS, name="", **QUIET),
         "name ('') must be a non-empty string"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call()
    model = Bigram()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError):
        pretrain(model, lambda m: torch.optim.SGD([m.mlp.weight], lr=0.1), stream, SETTINGS, **QUIET)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # refused before training


def test_budget_and_target_helpers() -> None:
    assert resolve_budget(None, None, 16, 128) == 200
    assert resolve_budget(7, None, 16, 128) == 7
    assert resolve_budget(None, 10 * 16 * 128 + 5, 16, 128) == 10
    with pytest.raises(ValueError, match=re.escape("steps (7) and tokens_budget (2048) both set the budget; give one")):
        resolve_budget(7, 2048, 16, 128)
    with pytest.raises(ValueError, match=re.escape("tokens_budget (100) is less than one update (16 x 128 = 2,048 tokens)")):
        resolve_budget(None, 100, 16, 128)
    with pytest.raises(ValueError, match=re.escape("steps (0) must be >= 1")):
        resolve_budget(0, None, 16, 128)
    curve = [(0, 5.0), (2, 3.0), (4, 2.0)]
    assert tokens_to_target(curve, 3.0, 32) == 64 and tokens_to_target(curve, 1.0, 32) is None


def test_comparison_with_seeds_budget_and_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_comparison(config="test", methods=("adamw", "apollo"), per_layer_methods=(), tokens_budget=4 * 2 * 32,
                            batch_size=2, seq_len=32, eval_batches=1, seeds=2, eval_every=1, target_loss=5.4, **QUIET)
    results = report["results"]
    assert [(r["method"], r["seed"], r["steps"]) for r in results] == [
        ("adamw", 0, 4), ("adamw", 1, 4), ("apollo", 0, 4), ("apollo", 1, 4)
    ]
    assert results[0]["final_eval_loss"] != results[1]["final_eval_loss"]  # another seed, another run
    assert report["settings"]["seeds"] == [0, 1] and report["settings"]["tokens_per_run"] == 256
    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 and "tokens to 5.4" in lines[0] and "s to 5.4" in lines[0]
    adamw = [r["final_eval_loss"] for r in results[:2]]
    mean, std = sum(adamw) / 2, abs(adamw[0] - adamw[1]) / 2**0.5
    assert f"{mean:.4f} ± {std:.4f}" in lines[2] and " 0,1 " in lines[2]
    for result in results:
        first = next((step for step, loss in result["eval_curve"] if loss <= 5.4), None)
        assert result["tokens_to_target"] == (None if first is None else first * 64)
    from lowrank_optim.__main__ import main

    with pytest.raises(SystemExit):
        main(["compare", "--config", "test", "--steps", "3", "--tokens-budget", "4096"])
    assert "steps (3) and tokens_budget (4096) both set the budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--config", "test", "--sweep-lr", "--target-loss", "2.0", "--out", str(tmp_path)])
    assert "--target-loss: not used by --sweep-lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--target-loss", "-1"])
    assert "'-1': must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--config", "60m", "--methods", "apollo", "--out", str(tmp_path)])
    assert "methods (['apollo']): presets '60m' have no preset for ['apollo']" in capsys.readouterr().err


def test_cli_compare_writes_seeds_into_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_optim.__main__ import main

    assert main(["compare", "--config", "test", "--methods", "dct", "--per-layer-methods", "", "--seeds", "2",
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-estimate",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["method"], r["seed"]) for r in results] == [("dct", 0), ("dct", 1)]
    assert "seed 1" in capsys.readouterr().out
