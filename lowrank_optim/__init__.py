"""lowrank_optim: memory-efficient pretraining optimizers (GaLore, ...) as drop-ins for torch.optim.AdamW."""

from . import _layouts  # noqa: F401  (registers the layouts found from parameters, e.g. FSDP2's)
from .optim import (
    APOLLOAdamW,
    Blockwise8bit,
    DCTAdamW,
    FiraAdamW,
    FullPrecision,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    MomentFormat,
    fira_adamw,
    galore_adamw,
    optimizer_state_bytes,
    param_groups,
    register_moment_format,
)
from .projection import DCTProjector, Projector, RandomizedSVDProjector, RandomProjector, SVDProjector, register_projector

__version__ = "0.1.0"

__all__ = [
    "APOLLOAdamW",
    "Blockwise8bit",
    "DCTAdamW",
    "DCTProjector",
    "FiraAdamW",
    "FullPrecision",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "MomentFormat",
    "Projector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "__version__",
    "fira_adamw",
    "galore_adamw",
    "optimizer_state_bytes",
    "param_groups",
    "register_moment_format",
    "register_projector",
]
