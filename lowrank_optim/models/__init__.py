"""Models used by the benchmarks and the demo."""

from .llama import (
    CONFIG_DIR,
    IGNORE_INDEX,
    MLP,
    Attention,
    CausalLMOutput,
    DecoderLayer,
    LlamaConfig,
    LlamaForCausalLM,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    available_configs,
)

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
