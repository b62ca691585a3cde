"""One target rule (lowrank_optim.targets) for param_groups, convert_to_sltrain, the plugin and the
Trainer integration, and defaults that find the attention and MLP projections of the common
architectures (tiny models built from transformers configs; nothing is downloaded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_optim import GaLoreAdamW, param_groups
from lowrank_optim.deepspeed import param_groups_for
from lowrank_optim.nn import SLTrainLinear, convert_to_sltrain, merge_sltrain
from lowrank_optim.targets import DEFAULT_TARGET_MODULES, find_targets

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)

#: architecture: (model built from a config, projected weights per layer by the defaults: regexes that
#: each layer's names end with)
ARCHITECTURES = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, num_key_value_heads=2)),
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_key_value_heads=2)),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL)),
                 ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                                                          n_positions=32)),
             ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(**SMALL)),
             ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", r"layer\.\d+\.output\.dense"]),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_defaults_find_the_attention_and_mlp_projections(arch: str) -> None:
    build, per_layer = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = build()
    report = find_targets(model)
    names = [target.name for target in report.targets]
    assert len(names) == 2 * len(per_layer), names
    for suffix in per_layer:
        assert sum(bool(re.search(rf"(^|\.){suffix}$", name)) for name in names) == 2, (suffix, names)
    # Embeddings and heads stay full-rank, and the report says so.
    left_out = {name for name, _, _ in report.left_out}
    assert not any("embed" in name or "wte" in name or "wpe" in name or "lm_head" in name for name in names)
    assert any("embed" in name or "wte" in name for name in left_out)
    assert "matrices" in str(report) and "not matched by target_modules" in str(report)
    # param_groups, the plugin and convert_to_sltrain agree.
    groups = param_groups(model, rank=4)
    assert [id(p) for p in groups[-1]["params"]] == [id(t.weight) for t in report.targets]
    plugin = param_groups_for(model, {"rank": 4})
    assert [id(p) for p in plugin[-1]["params"]] == [id(t.weight) for t in report.targets]
    # A GaLore step over them runs and fills every projected matrix's state.
    optimizer = GaLoreAdamW(groups, lr=1e-3)
    ids = torch.randint(0, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    assert all("exp_avg" in optimizer.state[p] for p in groups[-1]["params"])
    converted = convert_to_sltrain(build(), rank=4, delta=0.05)
    assert list(converted.converted) == names


def test_gpt2_conv1d_converts_and_merges_back(tmp_path: Path) -> None:
    """GPT-2's Conv1D (weight in x out): SLTrain computes the same function as the Conv1D it replaces (dense
    init), and merge_sltrain gives a Conv1D back that save_pretrained / from_pretrained keep."""
    build, _ = ARCHITECTURES["gpt2"]
    torch.manual_seed(0)
    model = build()
    model.eval()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    # rank = min(in, out) and full density would reproduce W exactly; a dense init at full rank does.
    convert_to_sltrain(model, rank=32, delta=0.01, init="dense")
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SLTrainLinear) and (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)
        with torch.no_grad():
            layer.B.add_(0.01)
        changed = model(input_ids=ids).logits
    merge_sltrain(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    model.save_pretrained(tmp_path)
    loaded = build().from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, changed, atol=1e-5)


def test_user_patterns_are_checked_and_defaults_are_lenient() -> None:
    build, _ = ARCHITECTURES["gpt_neox"]
    model = build()
    # The GaLore scripts' ("attn", "mlp") on GPT-NeoX: "attn" matches nothing, which is said, not skipped.
    with pytest.raises(ValueError, match="target_modules pattern 'attn' matches no module name of GPTNeoXForCausalLM"):
        param_groups(model, rank=4, target_modules=("attn", "mlp"))
    with pytest.raises(ValueError, match="target_modules pattern 'attn' matches no module name"):
        convert_to_sltrain(build(), rank=4, target_modules=("attn", "mlp"))
    # A pattern that matches an embedding: an error for the user's patterns.
    with pytest.raises(
        TypeError, match="module 'gpt_neox.embed_in' matches target_modules=\\('embed',\\) but its type is Embedding"
    ):
        find_targets(model, ("embed",))
    # Frozen weights are reported and left alone.
    model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.requires_grad_(False)
    report = find_targets(model)
    assert len(report.targets) == 7
    assert any("frozen" in why for _, _, why in report.left_out)
    assert find_targets(model, DEFAULT_TARGET_MODULES).targets == report.targets


def test_a_default_match_that_is_not_linear_is_reported_not_projected() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.Module()
            self.attention.q = nn.Linear(4, 4)
            self.attention.relative_attention_bias = nn.Embedding(8, 2)

    report = find_targets(Block())
    assert [t.name for t in report.targets] == ["attention.q"]
    assert ("attention.relative_attention_bias.weight", (8, 2),
            "matches 'attention' but Embedding is not a linear layer") in report.left_out
