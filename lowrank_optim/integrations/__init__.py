"""Integrations with training frameworks; each submodule imports its framework only when imported itself:
:mod:`lowrank_optim.integrations.transformers` (Hugging Face ``Trainer``, with or without DeepSpeed)."""
