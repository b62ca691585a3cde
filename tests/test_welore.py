"""WeLore (lowrank_optim.welore): spectra and stable ranks, the non-uniform rank rule against planted
ranks and the uniform baseline, compression into LowRankLinear factors, LRC fine-tuning, export."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import build_model, load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain
from lowrank_optim.welore import (
    LowRankLinear,
    MatrixSpectrum,
    SpectrumTracker,
    analyze,
    compress,
    freeze_for_lrc_finetune,
    merge_welore,
    spectra_of,
    uniform_plan,
    weight_spectra,
    welore_plan,
)

TEST = LlamaConfig.from_name_or_path("test")


def planted(m: int, n: int, values: list[float], seed: int) -> torch.Tensor:
    """An ``m x n`` fp64 matrix with exactly these singular values (the rest 0), as fp32."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(values), generator=generator, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


class Blocks(nn.Module):
    """Two "layers" of attention/MLP-named linears: the default target rule finds all six."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for index in range(2):
            layer = nn.Module()
            layer.attn = nn.Module()
            layer.mlp = nn.Module()
            for group, name in (("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "up_proj")):
                weight = weights[f"layers.{index}.{group}.{name}"]
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=name == "up_proj")
                with torch.no_grad():
                    linear.weight.copy_(weight)
                    if linear.bias is not None:
                        linear.bias.uniform_(-1, 1)
                setattr(getattr(layer, group), name, linear)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for layer in self.layers:
            out.append(layer.mlp.up_proj(layer.attn.o_proj(layer.attn.q_proj(x))))
        return torch.cat(out, -1)


PLANTED_RANKS = {"layers.0.attn.q_proj": 3, "layers.0.attn.o_proj": 10, "layers.0.mlp.up_proj": 5,
                 "layers.1.attn.q_proj": 1, "layers.1.attn.o_proj": 7, "layers.1.mlp.up_proj": 2}


def planted_model() -> Blocks:
    weights = {}
    for seed, (name, rank) in enumerate(PLANTED_RANKS.items()):
        shape = (48, 32) if "up_proj" in name else (32, 32)
        values = [4.0 - 2.0 * i / max(1, rank - 1) for i in range(rank)]  # 4 .. 2: well above the zeros
        weights[name] = planted(*shape, values, seed).float()
    return Blocks(weights)


def test_analysis_recovers_planted_ranks() -> None:
    model = planted_model()
    report = analyze(model, energy=(0.999999,))
    assert list(report) == list(PLANTED_RANKS)
    for name, rank in PLANTED_RANKS.items():
        entry = report[name]
        assert entry["energy_ranks"]["0.999999"] == rank
        assert 1.0 <= entry["stable_rank"] <= rank + 1e-4
        assert len(entry["singular_values"]) == 32 and entry["singular_values"][rank] < 1e-5
    json.dumps(report)  # JSON-ready


def test_welore_at_the_planted_target_recovers_the_ranks_and_is_lossless() -> None:
    model = planted_model()
    spectra = weight_spectra(model)
    target = sum(32 - rank for rank in PLANTED_RANKS.values()) / (32 * 6)
    plan = welore_plan(spectra, target)
    assert {m.name: m.rank for m in plan.matrices} == PLANTED_RANKS and all(m.lrc for m in plan.matrices)
    assert plan.rank_reduction == pytest.approx(target) and plan.achieved >= target
    x = torch.randn(5, 32)
    with torch.no_grad():
        before = model(x)
        report = compress(model, plan)
        after = model(x)
    assert report.compressed == tuple(PLANTED_RANKS) and report.dense == ()
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5), (after - before).abs().max()
    layer = model.layers[0].mlp.up_proj
    assert isinstance(layer, LowRankLinear) and layer.rank == 5 and layer.bias is not None
    assert report.parameters_before - report.parameters_after == plan.parameters_before - plan.parameters_after


def test_worked_example_of_the_rank_rule() -> None:
    """notes/welore.md §1: normalized A = [1, .556, .222, .111, .056, .022, .011, 0], B evenly spaced."""
    a = MatrixSpectrum("a", (64, 8), torch.tensor([10, 6, 3, 2, 1.5, 1.2, 1.1, 1.0]))
    b = MatrixSpectrum("b", (64, 8), torch.tensor([4, 3.8, 3.6, 3.4, 3.2, 3.0, 2.8, 2.6]))
    plan = welore_plan([a, b], 6 / 16)
    assert [(m.rank, m.lrc) for m in plan.matrices] == [(3, True), (7, True)]
    assert 1 / 9 < plan.threshold < 1 / 7 and plan.rank_reduction == 6 / 16
    # min_ratio: an LRC must drop more than that share of its ranks (B's 1 of 8 does not).
    gated = welore_plan([a, b], 5 / 16, min_ratio=0.4999)
    assert [(m.rank, m.lrc) for m in gated.matrices] == [(3, True), (8, False)] and gated.rank_reduction == 5 / 16
    # A flat spectrum has no tail: it is never cut.
    flat = MatrixSpectrum("flat", (64, 8), torch.full((8,), 2.0))
    assert torch.equal(flat.normalized(), torch.ones(8, dtype=torch.float64))
    plan = welore_plan([a, flat], 5 / 16)
    assert [m.rank for m in plan.matrices] == [3, 8]


def test_welore_beats_uniform_at_equal_parameters_on_unequal_spectra() -> None:
    """A matrix with a fast-decaying spectrum and one with a slow one: WeLore cuts the first deeper."""
    fast = planted(64, 64, [0.5**i for i in range(64)], 0).float()
    slow = planted(64, 64, [1.0 - i / 80 for i in range(64)], 1).float()
    spectra = spectra_of([("fast", fast), ("slow", slow)])

    def error(plan: object) -> float:
        total = 0.0
        for matrix, entry in zip((fast, slow), plan.matrices):  # type: ignore[attr-defined]
            approx = LowRankLinear.from_weight(matrix, entry.rank).dense_weight() if entry.lrc else matrix
            total += float((approx - matrix).norm() ** 2)
        return math.sqrt(total / float(fast.norm() ** 2 + slow.norm() ** 2))

    for target in (0.3, 0.5):
        ours, uniform = welore_plan(spectra, target, by="parameters"), uniform_plan(spectra, target, by="parameters")
        assert ours.parameter_reduction >= target and uniform.parameter_reduction >= target
        assert ours.parameters_after <= uniform.parameters_after
        assert error(ours) < 0.9 * error(uniform), (error(ours), error(uniform))  # 0.48 vs 0.70 at 50 %
        assert ours.matrices[0].rank < ours.matrices[1].rank  # non-uniform


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: welore_plan(s, 0.0), "target (0.0) must be a fraction in (0, 1) of the target matrices' ranks"),
        (lambda s: welore_plan(s, 1.0, by="parameters"),
         "target (1.0) must be a fraction in (0, 1) of the target matrices' parameters"),
        (lambda s: welore_plan(s, 0.3, by="bytes"), "by ('bytes') must be one of ranks, parameters"),
        (lambda s: uniform_plan(s, 0.3, min_ratio=1.0), "min_ratio (1.0) must be in [0, 1)"),
        (lambda s: welore_plan(s, 0.99), "target (99.0%) is out of reach: the most WeLore can remove here is"),
    ],
)
def test_plan_refusals(call: object, message: str) -> None:
    spectra = [MatrixSpectrum("a", (64, 8), torch.tensor([10, 6, 3, 2, 1.5, 1.2, 1.1, 1.0]))]
    with pytest.raises(ValueError, match=re.escape(message)):
        call(spectra)  # type: ignore[operator]


def test_compress_refuses_a_plan_of_another_model() -> None:
    model = build_model(TEST)
    plan = welore_plan(weight_spectra(model), 0.3)
    other = Blocks({name: torch.zeros((48, 32) if "up" in name else (32, 32)) for name in PLANTED_RANKS})
    with pytest.raises(ValueError, match="plan does not match the model's target matrices"):
        compress(other, plan)
    with pytest.raises(ValueError, match=re.escape("rank (0) must be in [1, 8] for 16 x 8")):
        LowRankLinear(8, 16, 0)


def test_llama_compress_finetune_and_merge(tmp_path: Path) -> None:
    model = build_model(TEST, seed=1)
    names = {name for name, _ in model.named_parameters()}
    batch = torch.randint(0, TEST.vocab_size, (2, 17))
    plan = welore_plan(weight_spectra(model, ("attn", "mlp")), 0.5, min_ratio=0.4999)
    report = compress(model, plan, ("attn", "mlp"))
    assert report.parameters_after < report.parameters_before and len(report.compressed) > 0
    assert "compressed" in str(report) and "welore plan" in str(plan)
    trainable = freeze_for_lrc_finetune(model)
    assert {id(p) for p in trainable} == {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()}
    assert not model.lm_head.weight.requires_grad and not model.embed_tokens.weight.requires_grad
    with_norms = freeze_for_lrc_finetune(model, train_norms=True)
    assert len(with_norms) > len(trainable)
    optimizer = torch.optim.AdamW(freeze_for_lrc_finetune(model), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        tuned = model(batch, labels=batch).logits
    merged = merge_welore(model)
    assert sorted(merged) == sorted(report.compressed)
    assert {name for name, _ in model.named_parameters()} == names  # the dense model's keys again
    with torch.no_grad():
        assert torch.allclose(model(batch, labels=batch).logits, tuned, atol=1e-5)
    fresh = build_model(TEST)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="has no LowRankLinear; compress it first"):
        freeze_for_lrc_finetune(fresh)
    with pytest.raises(ValueError, match="has no LowRankLinear to merge"):
        merge_welore(fresh)


def test_gpt2_conv1d_compresses_and_merges_back() -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    model.eval()
    ids = torch.randint(0, 64, (2, 8))
    spectra = weight_spectra(model)
    assert spectra[0].name == "transformer.h.0.attn.c_attn" and spectra[0].shape == (96, 32)  # out x in
    plan = welore_plan(spectra, 0.2)
    compress(model, plan)
    with torch.no_grad():
        compressed = model(input_ids=ids).logits
    merge_welore(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, compressed, atol=1e-5)


def test_spectrum_tracker_in_pretraining(tmp_path: Path) -> None:
    tracker = SpectrumTracker(2, target_modules=("attn", "mlp"))
    stream = TokenStream(stdlib_corpus()[:20000], 16)
    settings = TrainSettings(steps=4, batch_size=2, seq_len=16, eval_batches=1, measure_memory=False)
    pretrain(TEST, load_presets("test")["galore"], stream, settings, callbacks=[tracker], log=lambda line: None)
    assert [record["step"] for record in tracker.records] == [2, 4]
    tracker.write(tmp_path / "spectra.json", tmp_path / "spectra.png")
    saved = json.loads((tmp_path / "spectra.json").read_text())
    first = saved["records"][0]["matrices"]["layers.0.attn.q_proj"]
    assert first["max_rank"] == 32 and len(first["singular_values"]) == 32 and first["stable_rank"] > 1
    assert (tmp_path / "spectra.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=re.escape("every (0) must be an integer >= 1")):
        SpectrumTracker(0)
    with pytest.raises(ValueError, match="nothing recorded yet"):
        SpectrumTracker(3).write(tmp_path / "x.json")
    with pytest.raises(ValueError, match=re.escape("energy fraction (1.5) must be in (0, 1]")):
        MatrixSpectrum("a", (2, 2), torch.tensor([1.0, 0.5])).energy_rank(1.5)


def test_cli_welore_on_a_pretrain_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lowrank_optim.__main__ import main
    from lowrank_optim.train.pretrain import load_trained_model

    checkpoint = tmp_path / "run.pt"
    assert main(["pretrain", "--config", "test", "--method", "sltrain", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--eval-batches", "1", "--checkpoint", str(checkpoint)]) == 0
    model, run = load_trained_model(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert run["method"] == "sltrain" and all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    capsys.readouterr()
    out = tmp_path / "welore.json"
    assert main(["welore", "--checkpoint", str(checkpoint), "--targets", "0.2", "--eval-batches", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out tokens of the run" in text and "welore 20% of parameters" in text and "uniform 20% of parameters" in text
    report = json.loads(out.read_text())
    assert [row["rule"] for row in report["results"]] == ["dense", "welore", "uniform"]
    assert report["results"][1]["plan"]["parameter_reduction"] >= 0.2
    with pytest.raises(SystemExit):
        main(["welore", "--checkpoint", str(checkpoint), "--targets", "1.5"])
    assert "--targets: 1.5 must be a fraction in (0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["welore", "--checkpoint", str(tmp_path / "none.pt")])
    assert "does not exist or is not a file" in capsys.readouterr().err
