"""Optimizer classes: thin shells (validation, state) over functional steps."""

from ._state import optimizer_state_bytes
from .adafactor import GaLoreAdafactor
from .adamw8bit import GaLoreAdamW8bit
from .apollo import APOLLOAdamW
from .dct import DCTAdamW
from .fira import FiraAdamW, fira_adamw
from .galore import GaLoreAdamW, galore_adamw
from .groups import param_groups
from .moments import Blockwise8bit, FullPrecision, MomentFormat, register_moment_format

__all__ = [
    "APOLLOAdamW",
    "Blockwise8bit",
    "DCTAdamW",
    "FiraAdamW",
    "FullPrecision",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "MomentFormat",
    "fira_adamw",
    "galore_adamw",
    "optimizer_state_bytes",
    "param_groups",
    "register_moment_format",
]
