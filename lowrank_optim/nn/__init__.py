"""Parametrized layers: SLTrain sparse-plus-low-rank linears, model conversion and high-rank restarts."""

from .restart import MOMENT_KEYS, HighRankRestart, LRRewarmup, reset_momentum_
from .sltrain import (
    DEFAULT_ALPHA,
    ConversionReport,
    SLTrainLinear,
    balanced_factors,
    check_support,
    convert_to_sltrain,
    derive_seed,
    index_dtype_for,
    merge_sltrain,
    refactorize_,
    sample_support,
    support_size,
)

__all__ = [
    "DEFAULT_ALPHA",
    "MOMENT_KEYS",
    "ConversionReport",
    "HighRankRestart",
    "LRRewarmup",
    "SLTrainLinear",
    "balanced_factors",
    "check_support",
    "convert_to_sltrain",
    "derive_seed",
    "index_dtype_for",
    "merge_sltrain",
    "refactorize_",
    "reset_momentum_",
    "sample_support",
    "support_size",
]
