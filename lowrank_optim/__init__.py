"""lowrank_optim: memory-efficient pretraining optimizers (GaLore, ...) as drop-ins for torch.optim.AdamW."""

from .optim import GaLoreAdamW, galore_adamw, optimizer_state_bytes, param_groups

__version__ = "0.1.0"

__all__ = ["GaLoreAdamW", "__version__", "galore_adamw", "optimizer_state_bytes", "param_groups"]
