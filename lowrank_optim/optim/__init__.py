"""Optimizer classes: thin shells (validation, state) over functional steps."""

from ._state import optimizer_state_bytes
from .galore import GaLoreAdamW, galore_adamw
from .groups import param_groups

__all__ = ["GaLoreAdamW", "galore_adamw", "optimizer_state_bytes", "param_groups"]
