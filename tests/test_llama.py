"""The LLaMA model and its configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lowrank_optim.models import LlamaConfig, LlamaForCausalLM, RotaryEmbedding, apply_rotary, available_configs

PAPER_SIZES = {"60m": 58.07, "130m": 134.11, "350m": 367.97, "1b": 1339.08, "7b": 6738.42}


def small_config(**overrides: object) -> LlamaConfig:
    values = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2, max_seq_len=16)
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.from_name_or_path("test")).eval()


def test_logits_shape_and_no_loss_without_labels(model: LlamaForCausalLM) -> None:
    input_ids = torch.randint(model.config.vocab_size, (3, 10))
    output = model(input_ids)
    assert output.logits.shape == (3, 10, model.config.vocab_size)
    assert output.loss is None


def test_changing_a_later_token_leaves_earlier_logits_unchanged(model: LlamaForCausalLM) -> None:
    input_ids = torch.randint(model.config.vocab_size, (2, 12))
    changed = input_ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % model.config.vocab_size
    with torch.no_grad():
        original_logits, changed_logits = model(input_ids).logits, model(changed).logits
    torch.testing.assert_close(original_logits[:, :7], changed_logits[:, :7])
    assert not torch.allclose(original_logits[:, 7:], changed_logits[:, 7:])


def test_loss_is_shifted_cross_entropy(model: LlamaForCausalLM) -> None:
    input_ids = torch.randint(model.config.vocab_size, (2, 9))
    labels = input_ids.clone()
    labels[0, 4] = -100
    output = model(input_ids, labels=labels)
    targets = labels[:, 1:]
    log_probs = output.logits[:, :-1].log_softmax(dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    kept = targets != -100
    torch.testing.assert_close(output.loss, -picked[kept].mean())


def test_initial_loss_is_near_uniform(model: LlamaForCausalLM) -> None:
    input_ids = torch.randint(model.config.vocab_size, (4, 32))
    loss = model(input_ids, labels=input_ids).loss
    assert abs(loss.item() - torch.log(torch.tensor(float(model.config.vocab_size))).item()) < 0.1


def test_rotary_preserves_norms_and_relative_position() -> None:
    rotary = RotaryEmbedding(head_dim=16, max_seq_len=32, theta=10000.0)
    cos, sin = rotary(32)
    x = torch.randn(2, 3, 32, 16)
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # q·k depends only on the position difference: same vectors at (5, 2) and (20, 17).
    q, k = torch.randn(16), torch.randn(16)
    at = lambda v, position: apply_rotary(v, cos[position], sin[position])  # noqa: E731
    torch.testing.assert_close(at(q, 5) @ at(k, 2), at(q, 20) @ at(k, 17))


def test_rotary_tables_are_not_saved(model: LlamaForCausalLM) -> None:
    assert not any("rotary" in key for key in model.state_dict())


def test_module_names_select_attention_and_mlp_only(model: LlamaForCausalLM) -> None:
    selected = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ("attn" in name or "mlp" in name)
    }
    projections = (
        "attn.q_proj",
        "attn.k_proj",
        "attn.v_proj",
        "attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    assert selected == {
        f"layers.{i}.{projection}" for i in range(model.config.num_layers) for projection in projections
    }
    norm_names = [name for name, module in model.named_modules() if "norm" in name.split(".")[-1]]
    assert norm_names and not any("attn" in name or "mlp" in name for name in norm_names)
    assert all(module.bias is None for module in model.modules() if isinstance(module, torch.nn.Linear))


def test_initialisation() -> None:
    torch.manual_seed(0)
    config = LlamaConfig.from_name_or_path("tiny")
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    for name, parameter in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(parameter, torch.ones_like(parameter)), name
        else:
            assert abs(parameter.std().item() - config.init_std) < 0.1 * config.init_std, name


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig.from_name_or_path("test"))
    checkpointed = LlamaForCausalLM(plain.config, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    input_ids = torch.randint(plain.config.vocab_size, (2, 16))
    for model in (plain, checkpointed):
        model(input_ids, labels=input_ids).loss.backward()
    for (name, expected), actual in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(actual.grad, expected.grad, msg=name)


def test_too_long_input_is_rejected(model: LlamaForCausalLM) -> None:
    too_long = model.config.max_seq_len + 1
    with pytest.raises(
        ValueError,
        match=re.escape(f"sequence length ({too_long}) must be <= max_seq_len ({model.config.max_seq_len})"),
    ):
        model(torch.zeros(1, too_long, dtype=torch.long))


@pytest.mark.parametrize("name", ["test", "tiny"])
def test_parameter_formula_matches_allocated_model(name: str) -> None:
    config = LlamaConfig.from_name_or_path(name)
    assert config.num_parameters() == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


@pytest.mark.parametrize(("name", "millions"), PAPER_SIZES.items())
def test_parameter_formula_matches_published_sizes_without_allocating(name: str, millions: float) -> None:
    config = LlamaConfig.from_name_or_path(name)
    assert round(config.num_parameters() / 1e6, 2) == millions
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()


def test_packaged_configs() -> None:
    assert set(available_configs()) == {"test", "tiny", "60m", "130m", "350m", "1b", "3b", "7b"}
    assert LlamaConfig.from_name_or_path("llama_60m") == LlamaConfig.from_name_or_path("60m")
    seven_b = LlamaConfig.from_name_or_path("7b")
    assert (seven_b.hidden_size, seven_b.intermediate_size, seven_b.num_layers, seven_b.max_seq_len) == (
        4096,
        11008,
        32,
        2048,
    )
    for name in ("test", "tiny"):
        assert LlamaConfig.from_name_or_path(name).vocab_size >= 257  # byte tokenizer + eos


def test_config_from_json_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(small_config(rope_theta=500000.0).to_dict()))
    assert LlamaConfig.from_name_or_path(path) == small_config(rope_theta=500000.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 100, "num_heads": 3}, "hidden_size (100) must be divisible by num_heads (3)"),
        (
            {"hidden_size": 36, "num_heads": 4},
            "head_dim = hidden_size / num_heads (36 / 4 = 9) must be even for rotary embeddings",
        ),
        ({"num_layers": 0}, "num_layers (0) must be an integer >= 1"),
        ({"vocab_size": 2.5}, "vocab_size (2.5) must be an integer >= 1"),
        ({"max_seq_len": True}, "max_seq_len (True) must be an integer >= 1"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps (0.0) must be a number > 0"),
        ({"init_std": -0.02}, "init_std (-0.02) must be a number > 0"),
    ],
)
def test_config_validation_names_field_value_and_range(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        small_config(**overrides)


def test_config_is_frozen_and_keyword_only() -> None:
    config = small_config()
    with pytest.raises(AttributeError):
        config.hidden_size = 64  # type: ignore[misc]
    with pytest.raises(TypeError):
        LlamaConfig(50, 32, 48, 4, 2, 16)  # type: ignore[misc]


def test_config_loading_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=re.escape("config ('huge') is neither a JSON file path nor a packaged config")
    ):
        LlamaConfig.from_name_or_path("huge")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({**small_config().to_dict(), "hiden_size": 3}))
    with pytest.raises(ValueError, match=re.escape("unknown LlamaConfig keys ['hiden_size']")):
        LlamaConfig.from_name_or_path(path)
    with pytest.raises(ValueError, match=re.escape("LlamaConfig is missing required keys ['num_layers']")):
        LlamaConfig.from_dict({key: value for key, value in small_config().to_dict().items() if key != "num_layers"})


def test_trains_on_a_repeated_sequence() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = torch.randint(50, (2, 16))
    losses = []
    for _ in range(30):
        loss = model(input_ids, labels=input_ids).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.2 * losses[0]
