"""A compact LLaMA-style causal language model for the benchmarks and the demo.

Architecture as in LLaMA (Touvron et al., 2023): pre-norm decoder layers with RMSNorm, rotary position
embeddings, causal multi-head attention, a SwiGLU MLP, no biases and an untied ``lm_head``.

Module names are part of the interface: the optimizers pick their low-rank parameters by module-name
substring (``"attn"``, ``"mlp"``), so the norms are deliberately named ``input_norm`` and
``post_attention_norm`` and never contain either word.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "CONFIG_DIR",
    "IGNORE_INDEX",
    "MLP",
    "Attention",
    "CausalLMOutput",
    "DecoderLayer",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "available_configs",
]

#: Label value that the loss skips (same convention as ``F.cross_entropy``'s default).
IGNORE_INDEX = -100

#: Packaged configs (shipped as package data; ``configs/README.md`` at the repo root points here).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "llama"


def available_configs() -> list[str]:
    """Names of the packaged configs, e.g. ``["130m", "1b", ..., "test", "tiny"]``."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and initialisation of a :class:`LlamaForCausalLM`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    max_seq_len: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_seq_len"):
            value = getattr(self, name)
            # bool is an int subclass; a JSON ``true`` must not pass as 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be an integer >= 1")
        for name in ("rms_norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} ({value!r}) must be a number > 0")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 != 0:
            # Rotary embeddings rotate pairs of channels.
            raise ValueError(
                f"head_dim = hidden_size / num_heads ({self.hidden_size} / {self.num_heads} = {self.head_dim}) "
                "must be even for rotary embeddings"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (nothing is allocated)."""
        h, i = self.hidden_size, self.intermediate_size
        attention = 4 * h * h  # q, k, v, o projections
        mlp = 3 * h * i  # gate, up, down projections
        norms = 2 * h  # input_norm, post_attention_norm
        embeddings = 2 * self.vocab_size * h  # embed_tokens and the untied lm_head
        return embeddings + self.num_layers * (attention + mlp + norms) + h  # + final norm

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LlamaConfig:
        """Build from a mapping, naming unknown keys instead of failing with a bare ``TypeError``. A Hugging
        Face ``config.json`` (it has ``model_type`` or ``num_hidden_layers``) is read by :meth:`from_hf_dict`."""
        if "model_type" in values or "num_hidden_layers" in values:
            return cls.from_hf_dict(values)
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys {unknown}; allowed keys are {sorted(known)}")
        required = (field.name for field in dataclasses.fields(cls) if field.default is dataclasses.MISSING)
        missing = sorted(name for name in required if name not in values)
        if missing:
            raise ValueError(f"LlamaConfig is missing required keys {missing}")
        return cls(**values)

    @classmethod
    def from_hf_dict(cls, values: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``LlamaConfig`` (``config.json``, transformers 4.x or 5.x field names).

        Renamed: ``num_attention_heads`` -> ``num_heads``, ``num_hidden_layers`` -> ``num_layers``,
        ``max_position_embeddings`` -> ``max_seq_len``, ``initializer_range`` -> ``init_std``,
        ``rope_parameters.rope_theta`` (5.x) or ``rope_theta`` (4.x) -> ``rope_theta``. Refused, naming the
        field: anything our model would build differently (grouped-query attention, tied embeddings,
        biases, another activation, RoPE scaling, dropout, another head_dim), and unknown fields. Ignored:
        the metadata in :data:`HF_METADATA_KEYS` (token ids, dtype, versions, ``use_cache``), which do not
        change the model's shapes or arithmetic.
        """
        values = dict(values)
        if values.get("model_type", "llama") != "llama":
            raise ValueError(
                f"model_type ({values['model_type']!r}) is not 'llama': only LLaMA configs describe this package's "
                "model (for other architectures, build the model with transformers and pass its parameters to "
                "the optimizers)"
            )
        heads = values.get("num_attention_heads")
        hidden = values.get("hidden_size")
        same = {  # field: (value our model has, how to say it)
            "num_key_value_heads": (heads, "num_attention_heads (no grouped-query attention)"),
            "head_dim": (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None,
                         "hidden_size / num_attention_heads"),
            "tie_word_embeddings": (False, "false (the lm_head is untied)"),
            "hidden_act": ("silu", "'silu' (SwiGLU MLP)"),
            "attention_bias": (False, "false (no biases)"),
            "mlp_bias": (False, "false (no biases)"),
            "attention_dropout": (0.0, "0.0 (no dropout)"),
            "pretraining_tp": (1, "1"),
            "rope_scaling": (None, "null (plain RoPE)"),
        }
        for key, (ours, allowed) in same.items():
            if values.get(key) is not None and values[key] != ours:
                raise ValueError(f"Hugging Face config field {key} ({values[key]!r}) is not supported; must be {allowed}")
        rope = values.pop("rope_parameters", None)
        if rope is not None:
            if (
                not isinstance(rope, dict)
                or rope.get("rope_type", "default") != "default"
                or set(rope) - {"rope_theta", "rope_type"}
            ):
                raise ValueError(f"Hugging Face config field rope_parameters ({rope!r}) is not supported; must be "
                                 "{'rope_type': 'default', 'rope_theta': <number>} (plain RoPE)")
            if "rope_theta" in rope:
                if "rope_theta" in values and values["rope_theta"] != rope["rope_theta"]:
                    raise ValueError(f"rope_theta ({values['rope_theta']!r}) and rope_parameters.rope_theta "
                                     f"({rope['rope_theta']!r}) differ; give one")
                values["rope_theta"] = rope["rope_theta"]
        renamed = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
                   "max_position_embeddings": "max_seq_len", "initializer_range": "init_std"}
        ours = {field.name for field in dataclasses.fields(cls)}
        converted: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            if key in renamed:
                converted[renamed[key]] = value
            elif key in ours and key not in renamed.values():
                converted[key] = value
            elif key not in same and key not in HF_METADATA_KEYS:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"unknown Hugging Face LlamaConfig fields {sorted(unknown)}; read are "
                f"{sorted(set(renamed) | (ours - set(renamed.values())) | {'rope_parameters'})}, checked "
                f"{sorted(same)}, ignored {sorted(HF_METADATA_KEYS)}"
            )
        missing = [hf for hf, name in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                                       ("intermediate_size", "intermediate_size"), ("num_attention_heads", "num_heads"),
                                       ("num_hidden_layers", "num_layers"), ("max_position_embeddings", "max_seq_len"))
                   if name not in converted]
        if missing:
            raise ValueError(f"Hugging Face LlamaConfig is missing fields {missing}")
        return cls(**converted)

    @classmethod
    def from_name_or_path(cls, name_or_path: str | os.PathLike[str]) -> LlamaConfig:
        """Load a packaged config by name (``"tiny"``, ``"60m"``, ..., ``"llama_60m"``) or a JSON file path."""
        text = str(name_or_path)
        if text.endswith(".json") or os.path.sep in text:
            with open(name_or_path, encoding="utf-8") as file:
                return cls.from_dict(json.load(file))
        name = text.lower().removeprefix("llama_")
        if name not in available_configs():
            raise ValueError(
                f"config ({text!r}) is neither a JSON file path nor a packaged config; "
                f"packaged configs are {available_configs()}"
            )
        return cls.from_dict(json.loads((CONFIG_DIR / f"{name}.json").read_text(encoding="utf-8")))


#: Fields of a Hugging Face ``config.json`` that describe neither shapes nor arithmetic of the model.
HF_METADATA_KEYS: frozenset[str] = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "_name_or_path", "output_attentions", "output_hidden_states",
    "return_dict",
})


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain (no bias, no mean subtraction)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32: the mean of squares loses too much precision in bf16.
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(j, j + head_dim/2)`` of ``x`` (``..., seq, head_dim``) by position angles."""
    return x * cos + _rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotary position embeddings (Su et al., 2021)."""

    cos: Tensor  # buffers, registered in __init__
    sin: Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # matches _rotate_half's channel pairing
        # Non-persistent: derived from the config, so checkpoints stay weights-only.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """The ``(seq_len, head_dim)`` cos and sin tables for positions ``0 .. seq_len-1``."""
        return self.cos[:seq_len], self.sin[:seq_len]


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings on queries and keys."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq_len, hidden = x.shape

        def heads(projected: Tensor) -> Tensor:
            return projected.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, seq_len, hidden))


class MLP(nn.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attention_norm(x))


class CausalLMOutput(NamedTuple):
    logits: Tensor  # (batch, seq_len, vocab_size)
    loss: Tensor | None  # mean next-token cross-entropy; None without labels


class LlamaForCausalLM(nn.Module):
    """LLaMA decoder stack with token embeddings and an untied output projection.

    Set ``gradient_checkpointing = True`` to recompute each decoder layer in the backward pass
    instead of storing its activations.
    """

    def __init__(self, config: LlamaConfig, *, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every linear and embedding weight, ones for the norm gains."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> CausalLMOutput:
        """Logits for ``input_ids`` (``batch, seq_len``), plus the loss when ``labels`` are given.

        ``labels`` are aligned with ``input_ids`` (usually the same tensor); the shift that makes
        position ``t`` predict token ``t + 1`` happens here. Labels equal to -100 are ignored.
        """
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"sequence length ({seq_len}) must be <= max_seq_len ({self.config.max_seq_len})")
        cos, sin = self.rotary(seq_len)
        hidden = self.embed_tokens(input_ids)
        # Checkpointing only pays off when a backward pass will follow.
        use_checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpointing:
                hidden = checkpoint(layer, hidden, cos, sin, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin)
        logits = self.lm_head(self.norm(hidden))
        if labels is None:
            return CausalLMOutput(logits, None)
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels[:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
        )
        return CausalLMOutput(logits, loss)
