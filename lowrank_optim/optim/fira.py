"""FiraAdamW: GaLore plus Fira's scaled full-rank residual (Chen et al., 2024, arXiv 2410.01623).

Same projection, refresh schedule and Adam arithmetic as :class:`~lowrank_optim.GaLoreAdamW` (the
functional step is shared); the update gains the residual term of :mod:`lowrank_optim.projection.fira`,
as the reference package ``fira`` 1.0.2 computes it::

    phi = ||N||_k / (||R||_k + 1e-8)          # per row (right projection) / column (left), un-bias-corrected N
    S   = limited((G - alpha · back(R)) · phi)  # norm growth per step capped at gamma = 1.01
    W  -= lr · sqrt(1 - b2^t) / (1 - b1^t) · (alpha · back(N) + S)
    W  -= lr · weight_decay · W
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..ops.fira import FIRA_FOLDED_DTYPES, FIRA_RESIDUAL_DTYPES, fira_folded_accepts, fira_residual_accepts
from ..projection import FIRA_GAMMA, Projection, Projector, fira_coefficients
from ..state_keys import RESIDUAL_NORM
from ._validation import check_fira_options, check_no_deprecation_warning, normalize_scalars, resolve_alpha_alias
from .exchange import Exchange
from .galore import FiraTerm, GaLoreAdamW, _Batch, _foldable_dtypes, galore_adamw, group_projector
from .moments import MomentFormat, resolve_moment_format

__all__ = ["FiraAdamW", "fira_adamw"]

class FiraAdamW(GaLoreAdamW):
    """GaLoreAdamW plus Fira's norm-scaled full-rank residual and its norm-growth limiter.

    A drop-in for ``fira.FiraAdamW``: param groups with ``rank`` are projected (keys ``rank``,
    ``update_proj_gap``, ``alpha``, ``proj_type``, and this package's ``projector``); the others get plain
    Adam. ``scale`` is accepted as an alias of ``alpha`` in a group (so GaLore groups, e.g. from
    :func:`lowrank_optim.param_groups`, work unchanged) and renamed to ``alpha``; a group giving both with
    different values is refused.

    Args (beyond :class:`~lowrank_optim.GaLoreAdamW`'s, which has ``scale`` where this has ``alpha``):
        alpha: default multiplier of the back-projected update, also subtracted inside the residual.
        residual: ``code`` (reference package, default): ``S = (G - alpha·back(R))·phi`` and update
            ``alpha·back(N) + S``; ``paper`` (Algorithm 1): ``S = (G - back(R))·phi`` and update
            ``alpha·(back(N) + S)``. Both take phi from the un-bias-corrected ``N``.
        gamma: the limiter's bound on the residual's norm growth per step (1.01 in the paper and code).
        fold_residual: ``True`` (default): a whole matrix with fp32/fp64 weights and moments takes the
            folded update (the ``fira_folded_`` op; math in
            :func:`~lowrank_optim.projection.fira.fira_folded_update_`): ``||S||`` from row or column norms
            of ``G`` and ``R``, the residual added by one ``addcmul_`` of ``G``, no ``m x n`` residual
            formed — the same update to rounding, at about GaLore's cost. ``||S||`` (hence the limiter's
            divisor and stored norm) is then rounded to about ``ulp · ||G||² / ||S||²`` relative instead of
            ``ulp · ||G|| / ||S||``: 2e-5 when ``||G - back(R)||`` is 1 % of ``||G||``, up to 1e-3 at 0.1 %
            (fp32); through the limiter alone it moves the residual's share of the update by as much.
            bf16/fp16 weights (a basis orthonormal only to ~1e-2 breaks the norm identity) and pieces of a
            matrix split over processes (whose channels are not whole) take the explicit form.
            ``False``: the explicit form everywhere — ``S`` formed as an ``m x n`` tensor, the reference
            package's order of operations (and the compiled ``fira_residual_`` kernel when fused). A
            state dict saved before this option existed loads with ``False``, so it continues
            bit-identically; set ``group["fold_residual"] = True`` after loading to switch.

    ``proj_type="full"`` is refused: phi scales the channels of the one unprojected dimension, and a
    two-sided projection has none.
    """

    _limiter_key = RESIDUAL_NORM
    # A state dict saved before fold_residual existed was stepped by the explicit form.
    _values_before_option = {"fold_residual": False}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = True,
        *,
        update_proj_gap: int = 200,
        alpha: float = 1.0,
        residual: str = "code",
        gamma: float = FIRA_GAMMA,
        proj_type: str = "std",
        projector: str | Projector = "svd",
        scoring: str = "auto",
        moment_dtype: torch.dtype | None = None,
        moment_policy: str = "keep",
        moment_format: str | MomentFormat = "full",
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str = "skip",
        fold_residual: bool = True,
    ) -> None:
        check_no_deprecation_warning(no_deprecation_warning)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            update_proj_gap=update_proj_gap,
            alpha=alpha,
            residual=residual,
            gamma=gamma,
            proj_type=proj_type,
            projector=group_projector(projector, scoring),
            moment_dtype=moment_dtype,
            moment_policy=moment_policy,
            moment_format=resolve_moment_format(moment_format),
            foreach=foreach,
            fused=fused,
            nonfinite=nonfinite,
            fold_residual=fold_residual,
        )
        normalize_scalars(defaults)
        check_fira_options(
            alpha=defaults["alpha"], residual=residual, gamma=defaults["gamma"], fold_residual=fold_residual
        )
        self._setup(params, defaults)

    def _prepare_group(self, param_group: dict[str, Any], index: int) -> None:
        resolve_alpha_alias(param_group, index)

    def _check_method_options(self, group: dict[str, Any], where: str) -> None:
        check_fira_options(
            alpha=group["alpha"],
            residual=group["residual"],
            gamma=group["gamma"],
            fold_residual=group["fold_residual"],
            where=where,
        )
        if "rank" in group and not group["projector"].orthonormal:
            raise ValueError(
                f"Invalid projector{where}: {group['projector'].name!r}. FiraAdamW's residual G - P Pᵀ G is the part "
                "of G outside the subspace only for an orthonormal basis; this projector's is not."
            )
        if "rank" in group and group["proj_type"] == "full":
            raise ValueError(
                f"Invalid proj_type{where}: 'full'. FiraAdamW supports std, reverse_std, left, right: its "
                "residual scaling needs one unprojected dimension."
            )

    def _check_step_tensors(self, group: dict[str, Any], index: int, params: list[Tensor]) -> None:
        """``fused=True`` demands the compiled kernel of the form each matrix takes: the folded update's
        (fp32/fp64 weights with moments of their dtype or fp32) or the explicit residual's (fp32/bf16/fp64
        weights with moments of their dtype or fp32); ``fused=None`` runs pure functions for other dtypes."""
        if group["fused"] is not True or "rank" not in group:
            return
        for position, param in enumerate(params):
            dtypes: tuple[torch.dtype, ...]
            moment_dtype = self._compute_dtype(group, param, self.state.get(param))
            if group["fold_residual"] and _foldable_dtypes(param.dtype, moment_dtype):
                accepted, kernel = fira_folded_accepts(param.dtype, moment_dtype, param.dtype), "folded Fira update"
                dtypes = FIRA_FOLDED_DTYPES
            else:
                accepted, kernel = fira_residual_accepts(param.dtype, moment_dtype), "Fira residual"
                dtypes = FIRA_RESIDUAL_DTYPES
            if not accepted:
                raise ValueError(
                    f"Invalid fused in param group {index}: True. Param {position} is {param.dtype} with "
                    f"{moment_dtype} moments, which the compiled {kernel} kernel does not take (it takes "
                    f"{', '.join(map(str, dtypes))} weights with moments of their dtype or "
                    "torch.float32). Use fused=None (kernels where they apply) or fused=False."
                )

    def _update_terms(self, group: dict[str, Any], batch: _Batch) -> dict[str, Any]:
        residual_norms = [state.get(RESIDUAL_NORM) for state in batch.states]
        term = _fira_term(residual_norms, group["alpha"], group["residual"], group["gamma"], group["fold_residual"])
        return {"scale": group["alpha"], "fira": term}


def _fira_term(
    residual_norms: list[Tensor | None], alpha: float, residual: str, gamma: float, fold_residual: bool
) -> FiraTerm:
    """The step's Fira term for ``alpha`` and the ``residual`` form (:func:`fira_coefficients`)."""
    subtract, residual_scale = fira_coefficients(alpha, residual)
    return FiraTerm(residual_norms, subtract, residual_scale, gamma, fold_residual)


def fira_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    projections: list[Projection | None],
    residual_norms: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    update_proj_gap: int,
    alpha: float,
    residual: str = "code",
    gamma: float = FIRA_GAMMA,
    fold_residual: bool = True,
    moment_policy: str = "keep",
    nonfinite: str = "skip",
    foreach: bool | None = None,
    fused: bool | None = None,
    on_nonfinite_refresh: Callable[[int, int, str], None] | None = None,
    skip_counts: list[Tensor] | None = None,
    found_inf: Tensor | None = None,
    exchange: Exchange | None = None,
) -> None:
    """Functional Fira-AdamW step: :func:`~lowrank_optim.optim.galore_adamw` with the residual term.

    ``residual_norms[i]`` is the limiter state (0-dim fp32 tensor) of projected parameter ``i``, updated
    in place; ``None`` for full-rank parameters. Its first step (``state_steps[i] == 0``) only stores the
    norm. ``fold_residual`` as in :class:`FiraAdamW`. ``nonfinite``, ``on_nonfinite_refresh``, ``skip_counts``, ``found_inf``
    and ``exchange`` as in :func:`~lowrank_optim.optim.galore_adamw`.
    """
    galore_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        projections,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        correct_bias=correct_bias,
        update_proj_gap=update_proj_gap,
        scale=alpha,
        moment_policy=moment_policy,
        nonfinite=nonfinite,
        foreach=foreach,
        fused=fused,
        on_nonfinite_refresh=on_nonfinite_refresh,
        skip_counts=skip_counts,
        found_inf=found_inf,
        exchange=exchange,
        fira=_fira_term(residual_norms, alpha, residual, gamma, fold_residual),
    )
