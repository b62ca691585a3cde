"""Training utilities: per-layer updates, method presets, the pretraining loop and step measurements."""

from .per_layer import PerLayerUpdates

__all__ = ["PerLayerUpdates"]
