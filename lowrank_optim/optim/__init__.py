"""Optimizer classes: thin shells (validation, state) over functional steps."""

from ._state import optimizer_state_bytes
from .adafactor import GaLoreAdafactor
from .apollo import APOLLOAdamW
from .dct import DCTAdamW
from .fira import FiraAdamW, fira_adamw
from .galore import GaLoreAdamW, galore_adamw
from .groups import param_groups

__all__ = [
    "APOLLOAdamW",
    "DCTAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "fira_adamw",
    "galore_adamw",
    "optimizer_state_bytes",
    "param_groups",
]
