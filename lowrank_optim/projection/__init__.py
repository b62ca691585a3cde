"""Pure tensor functions for low-rank gradient projection (shared by every optimizer and layout)."""

from .dct import (
    DCT_SCORING,
    FFT_SCORING_MIN_SIZE,
    DCTSelection,
    carry_moment_,
    dct_ii,
    dct_matrix,
    dct_scores,
    dct_subspace,
    refresh_dct_selection_,
    resolve_scoring,
    scoring_input,
    select_dct_indices,
)
from .fira import (
    FIRA_GAMMA,
    FIRA_RESIDUALS,
    fira_coefficients,
    fira_residual,
    fira_scaling,
    limit_norm_growth_,
    scale_and_limit_residual_,
)
from .subspace import (
    PROJ_TYPES,
    Side,
    Subspace,
    add_project_back_,
    all_finite,
    basis_shapes,
    effective_rank,
    lowrank_shape,
    project,
    project_back,
    resolve_side,
)
from .svd import refresh_svd_basis_, svd_basis

#: The subspaces a projected param group can use: GaLore's SVD basis or selected DCT-II frequencies.
PROJECTORS: tuple[str, ...] = ("svd", "dct")

__all__ = [
    "DCT_SCORING",
    "DCTSelection",
    "FFT_SCORING_MIN_SIZE",
    "FIRA_GAMMA",
    "FIRA_RESIDUALS",
    "PROJECTORS",
    "PROJ_TYPES",
    "Side",
    "Subspace",
    "add_project_back_",
    "all_finite",
    "basis_shapes",
    "carry_moment_",
    "dct_ii",
    "dct_matrix",
    "dct_scores",
    "dct_subspace",
    "effective_rank",
    "fira_coefficients",
    "fira_residual",
    "fira_scaling",
    "limit_norm_growth_",
    "lowrank_shape",
    "project",
    "project_back",
    "refresh_dct_selection_",
    "resolve_scoring",
    "scoring_input",
    "refresh_svd_basis_",
    "resolve_side",
    "scale_and_limit_residual_",
    "select_dct_indices",
    "svd_basis",
]
