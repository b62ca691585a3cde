"""The CLI on a user's own model: ``--config my.json`` without ``--presets`` (it used to read the model config
as presets and fail with a ``TypeError`` in every subcommand), a Hugging Face ``config.json``, and what is
refused in one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lowrank_optim.__main__ import build_parser, main
from lowrank_optim.models import LlamaConfig
from lowrank_optim.models.llama import CONFIG_DIR
from lowrank_optim.train.methods import load_presets, presets_for_config

TEST_CONFIG = json.loads((CONFIG_DIR / "test.json").read_text())


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


@pytest.fixture
def my_config(tmp_path: Path) -> Path:
    path = tmp_path / "my_model.json"
    path.write_text(json.dumps({**TEST_CONFIG, "hidden_size": 48, "intermediate_size": 96}))
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.npy"
    np.save(path, (np.arange(3000) % 200).astype(np.int32))
    return path


NEAREST = "presets: test (the packaged size nearest to {}'s"


@pytest.mark.parametrize(
    "command",
    [
        ["estimate", "--methods", "galore,sltrain"],
        ["measure", "--methods", "fira", "--seq-len", "16"],
        ["pretrain", "--method", "dct", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"],
        ["compare", "--methods", "galore", "--per-layer-methods", "", "--steps", "2", "--batch-size", "2",
         "--seq-len", "16", "--eval-batches", "1", "--no-estimate"],
    ],
    ids=lambda command: command[0],
)
def test_every_command_runs_on_a_config_file_without_presets(
    command: list[str], my_config: Path, tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"pretrain": ["--tokens", str(tokens)], "compare": ["--out", str(tmp_path / "out")]}.get(command[0], [])
    assert _run(command + ["--config", str(my_config)] + extra) == 0
    assert NEAREST.format(my_config) in capsys.readouterr().out


def test_the_nearest_packaged_presets_by_parameter_count(my_config: Path) -> None:
    config = LlamaConfig.from_name_or_path(my_config)
    presets, name, line = presets_for_config(str(my_config), config)
    assert name == "test" and presets == load_presets("test")
    assert f"{config.num_parameters() / 1e6:.1f}M parameters" in line
    # A packaged size with presets keeps its own; one without (3b) takes the nearest (1b: 2.0x, 7b: 2.5x away).
    assert presets_for_config("60m", LlamaConfig.from_name_or_path("60m"))[1] == "60m"
    assert presets_for_config("3b", LlamaConfig.from_name_or_path("3b"))[1] == "1b"
    # --presets wins.
    assert presets_for_config(str(my_config), config, "tiny")[:2] == (load_presets("tiny"), "tiny")


def test_a_model_config_given_as_presets_is_named(my_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["estimate", "--config", "test", "--presets", str(my_config)])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "are not method presets (it looks like a model config: pass it as --config)" in err
    assert "'vocab_size'" in err and "Traceback" not in err


# --- Hugging Face config.json --------------------------------------------------------------------------

#: What transformers 5.x's ``LlamaConfig(...).save_pretrained`` writes for the packaged ``test`` shape.
HF_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "float32",
    "eos_token_id": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "pad_token_id": None,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False,
    "transformers_version": "5.24.0",
    "use_cache": True,
    "vocab_size": 257,
}


def test_hugging_face_config_json_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(HF_CONFIG))
    assert LlamaConfig.from_name_or_path(path) == LlamaConfig.from_name_or_path("test")
    # transformers 4.x: rope_theta at the top level, torch_dtype; other eps, theta and init are read.
    old = {k: v for k, v in HF_CONFIG.items() if k not in ("rope_parameters", "dtype")}
    old.update(rope_theta=500000.0, torch_dtype="bfloat16", rms_norm_eps=1e-5, initializer_range=0.01)
    config = LlamaConfig.from_dict(old)
    assert (config.rope_theta, config.rms_norm_eps, config.init_std) == (500000.0, 1e-5, 0.01)


def test_the_config_transformers_writes_is_read(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    fields = dict(vocab_size=257, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=64)
    transformers.LlamaConfig(**fields).save_pretrained(tmp_path)
    assert LlamaConfig.from_name_or_path(tmp_path / "config.json") == LlamaConfig.from_name_or_path("test")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 2}, r"num_key_value_heads \(2\) is not supported; must be num_attention_heads"),
        ({"tie_word_embeddings": True}, r"tie_word_embeddings \(True\) is not supported; must be false"),
        ({"hidden_act": "gelu"}, r"hidden_act \('gelu'\) is not supported; must be 'silu'"),
        ({"attention_bias": True}, r"attention_bias \(True\) is not supported"),
        ({"mlp_bias": True}, r"mlp_bias \(True\) is not supported"),
        ({"attention_dropout": 0.1}, r"attention_dropout \(0.1\) is not supported; must be 0.0"),
        ({"head_dim": 16}, r"head_dim \(16\) is not supported; must be hidden_size / num_attention_heads"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling .* must be null"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, r"rope_parameters .* \(plain RoPE\)"),
        ({"rope_theta": 5e5}, r"rope_theta \(500000.0\) and rope_parameters.rope_theta \(10000.0\) differ"),
        ({"model_type": "mistral"}, r"model_type \('mistral'\) is not 'llama'"),
        ({"sliding_window": 4096}, r"unknown Hugging Face LlamaConfig fields \['sliding_window'\]"),
        ({"num_hidden_layers": None}, r"missing fields \['num_hidden_layers'\]"),
    ],
)
def test_what_our_model_would_build_differently_is_refused(change: dict[str, Any], message: str) -> None:
    values = {**HF_CONFIG, **change}
    if change.get("num_hidden_layers", 0) is None:
        del values["num_hidden_layers"]
        values["model_type"] = "llama"
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_dict(values)
