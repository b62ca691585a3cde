"""lowrank_optim: memory-efficient pretraining optimizers (GaLore, ...) as drop-ins for torch.optim.AdamW."""

from . import _layouts  # noqa: F401  (registers the layouts found from parameters, e.g. FSDP2's)
from .optim import (
    APOLLOAdamW,
    DCTAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    fira_adamw,
    galore_adamw,
    optimizer_state_bytes,
    param_groups,
)
from .projection import DCTProjector, Projector, RandomizedSVDProjector, RandomProjector, SVDProjector, register_projector

__version__ = "0.1.0"

__all__ = [
    "APOLLOAdamW",
    "DCTAdamW",
    "DCTProjector",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "Projector",
    "RandomProjector",
    "RandomizedSVDProjector",
    "SVDProjector",
    "__version__",
    "fira_adamw",
    "galore_adamw",
    "optimizer_state_bytes",
    "param_groups",
    "register_projector",
]
