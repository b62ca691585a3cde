"""Exporting SLTrain models: ``merge_sltrain`` turns every SLTrainLinear back into an ``nn.Linear`` holding
``W = s·B A + S``, so a converted Hugging Face model saves with ``save_pretrained`` and loads with
``LlamaForCausalLM.from_pretrained`` computing the trained loss (before, every converted weight was
re-initialised on load), and our own model loads into a dense one; ``convert_to_sltrain(init="dense")``
goes back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_optim.models import LlamaConfig, LlamaForCausalLM
from lowrank_optim.nn import SLTrainLinear, convert_to_sltrain, merge_sltrain


def _train(model: nn.Module, batches: list[torch.Tensor], loss) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for ids in batches:
        loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()


def _batches(vocab: int, count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (4, 16), generator=generator) for _ in range(count)]


def test_hugging_face_model_round_trips_through_save_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    report = convert_to_sltrain(model, rank=4, delta=0.1, seed=7)
    assert len(report.converted) == 2 * 7

    def loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(input_ids=ids, labels=ids).loss

    _train(model, _batches(64), loss)
    held_out = _batches(64, 5)[-1]
    with torch.no_grad():
        trained = loss(model, held_out).item()
        merged_report = merge_sltrain(model)
        assert merged_report.converted == report.converted
        assert not any(isinstance(m, SLTrainLinear) for m in model.modules())
        assert loss(model, held_out).item() == trained  # the same W, composed once
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert loss(loaded, held_out).item() == pytest.approx(trained, abs=1e-6)
        fresh = loss(transformers.LlamaForCausalLM(config), held_out).item()
    assert abs(fresh - trained) > 1e-2  # the trained weights are what was loaded


def test_our_model_loads_into_a_dense_one() -> None:
    config = LlamaConfig.from_name_or_path("test")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    convert_to_sltrain(model, rank=4, delta=0.05, seed=1)

    def loss(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return m(ids, labels=ids).loss

    _train(model, _batches(config.vocab_size), loss)
    ids = _batches(config.vocab_size, 5)[-1]
    with torch.no_grad():
        expected = model(ids).logits
        merge_sltrain(model)
        dense = LlamaForCausalLM(config)
        dense.load_state_dict(model.state_dict())  # strict: exactly the dense model's keys
        assert torch.equal(dense(ids).logits, expected)


def test_dense_init_goes_back_with_the_same_support() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mlp", nn.Linear(24, 16))
    convert_to_sltrain(model, rank=3, delta=0.2, seed=5, target_modules=("mlp",))
    with torch.no_grad():
        model.mlp.B.normal_()
    support = model.mlp.indices.clone()
    weight = model.mlp.dense_weight()
    merge_sltrain(model)
    assert type(model.mlp) is nn.Linear and torch.equal(model.mlp.weight, weight)
    convert_to_sltrain(model, rank=3, delta=0.2, seed=5, target_modules=("mlp",), init="dense")
    layer = model.mlp
    assert torch.equal(layer.indices, support)  # the earlier conversion's support
    rebuilt = layer.dense_weight()
    on_support = torch.zeros(weight.numel(), dtype=torch.bool)
    on_support[support.long()] = True
    on_support = on_support.view_as(weight)
    assert torch.allclose(rebuilt[on_support], weight[on_support], atol=1e-6)
    # Elsewhere the best rank-3 approximation of W.
    u, s, vh = torch.linalg.svd(weight)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(rebuilt[~on_support], best[~on_support], atol=1e-5)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="merge_sltrain: Sequential has no SLTrainLinear module to merge"):
        merge_sltrain(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="the model is itself an SLTrainLinear; use its to_linear"):
        merge_sltrain(SLTrainLinear(4, 4, rank=1, seed=0))
    with pytest.raises(ValueError, match="Invalid init: 'svd'. Must be one of reference, dense."):
        convert_to_sltrain(nn.Sequential(nn.Linear(2, 2)), rank=1, target_modules=("0",), init="svd")
