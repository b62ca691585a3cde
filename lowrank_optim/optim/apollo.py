"""APOLLOAdamW: SGD-like memory, AdamW-level performance (Zhu et al., 2024, arXiv 2412.05270).

APOLLO keeps Adam's moments of a *random* projection ``R`` of each projected gradient (no SVD) only to
estimate how Adam would rescale each channel, and applies that scaling to the raw full-rank gradient,
as the reference package ``apollo-torch`` 1.0.3 computes it (see ``notes/apollo.md``)::

    R = G Pᵀ (or Pᵀ G),  P Gaussian N(0, 1/r), re-drawn every update_proj_gap steps from a seed chain
    M = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R² ;  N = M / (sqrt(V) + eps)
    s = ||N_k|| / (||R_k|| + 1e-8)       per channel k of the unprojected dimension ("channel"),
        ||N||_F / (||R||_F + 1e-8)       or per matrix ("tensor")
    U = limited(G ∘ s) · sqrt(scale)     norm growth capped at gamma = 1.01 per step (not with disable_nl)
    W -= lr · sqrt(1 - b2^t) / (1 - b1^t) · U ;  W -= lr · weight_decay · W

APOLLO-Mini is ``rank=1, scale_type="tensor", scale=128``. The step, its refresh schedule (steps 1,
gap+1, ...), moments, non-finite handling and kernels are GaLore's (:func:`~lowrank_optim.optim.galore_adamw`
with an :class:`~lowrank_optim.optim.galore.ApolloTerm`); the projector is any of ours
(``projector="random"`` by default, apollo-torch's ``proj="svd"`` is GaLore's SVD basis with LAPACK's signs).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ..projection import FIRA_GAMMA, Projector, SVDProjector, resolve_projector
from ..state_keys import UPDATE_NORM
from ._validation import check_finite_number, check_limiter_gamma, check_no_deprecation_warning, normalize_scalars
from .galore import ApolloTerm, GaLoreAdamW, _Batch, group_projector
from .moments import MomentFormat, resolve_moment_format

__all__ = ["APOLLO_SCALE_TYPES", "APOLLOAdamW"]

#: apollo-torch's ``scale_type``: one factor per channel, or one per matrix.
APOLLO_SCALE_TYPES: tuple[str, ...] = ("channel", "tensor")

#: apollo-torch's group key ``proj``: its projector names, as ours.
_PROJ = {"random": "random", "svd": SVDProjector(sign="lapack")}


class APOLLOAdamW(GaLoreAdamW):
    """A drop-in for ``apollo_torch.APOLLOAdamW``: param groups that carry ``rank`` (with ``proj``,
    ``scale_type``, ``scale``, ``update_proj_gap``, ``proj_type``) get APOLLO's update, the others plain
    AdamW (HF style, as apollo-torch's). Unlike apollo-torch, every group key has a default (below), the
    state is plain tensors (``torch.load(weights_only=True)``), ``add_param_group`` works, and bad settings
    are refused at construction.

    Args (beyond :class:`~lowrank_optim.GaLoreAdamW`'s; its ``scale`` is APOLLO's):
        scale: the update is multiplied by ``sqrt(scale)`` (1 for APOLLO, 128 for APOLLO-Mini).
        scale_type: ``channel`` (one factor per row of a right-projected matrix, per column of a
            left-projected one: the unprojected dimension) or ``tensor`` (one per matrix).
        projector: ``random`` (APOLLO's seeded Gaussian projection; matrix ``i``'s first seed is its
            1-based position among the optimizer's parameters, as in apollo-torch) or any projector;
            a group's ``proj`` (apollo-torch's key: ``random`` or ``svd``) sets it too.
        gamma: the norm-growth limiter's bound per step (1.01, as apollo-torch's).
        scale_front: multiply by ``sqrt(scale)`` before the limiter instead of after (apollo-torch's
            option; the limiter is scale-invariant, so this changes only rounding).
        disable_nl: switch the norm-growth limiter off (apollo-torch's option).

    ``proj_type="full"`` is refused (no unprojected channel; apollo-torch raises too). Where apollo-torch's
    channel factor follows the weight's shape rather than the projected side (``reverse_std``, ``left`` on
    tall or ``right`` on wide matrices), it crashes unless ``rank`` is 1; here the factor follows the
    unprojected dimension. Runs on whole tensors, under DeepSpeed ZeRO 1-3 (build it, then
    :func:`lowrank_optim.distributed.bind` the engine) and under FSDP2.
    """

    _limiter_key = UPDATE_NORM

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        no_deprecation_warning: bool = True,
        *,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        scale_type: str = "channel",
        proj_type: str = "std",
        projector: str | Projector = "random",
        gamma: float = FIRA_GAMMA,
        moment_dtype: torch.dtype | None = None,
        moment_policy: str = "keep",
        moment_format: str | MomentFormat = "full",
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite: str = "skip",
    ) -> None:
        check_no_deprecation_warning(no_deprecation_warning)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            update_proj_gap=update_proj_gap,
            scale=scale,
            scale_type=scale_type,
            proj_type=proj_type,
            projector=group_projector(projector),
            gamma=gamma,
            scale_front=scale_front,
            disable_nl=disable_nl,
            moment_dtype=moment_dtype,
            moment_policy=moment_policy,
            moment_format=resolve_moment_format(moment_format),
            foreach=foreach,
            fused=fused,
            nonfinite=nonfinite,
        )
        normalize_scalars(defaults)
        _check_apollo_options(defaults, "")
        self._setup(params, defaults)

    def _prepare_group(self, param_group: dict[str, Any], index: int) -> None:
        """apollo-torch names the projector ``proj``."""
        if "proj" not in param_group:
            return
        proj = param_group.pop("proj")
        if proj not in _PROJ:
            raise ValueError(f"Invalid proj in param group {index}: {proj!r}. Must be one of {', '.join(_PROJ)}.")
        if "projector" in param_group and resolve_projector(param_group["projector"]) != resolve_projector(_PROJ[proj]):
            raise ValueError(
                f"Param group {index} sets proj={proj!r} and projector={param_group['projector']!r}: they are the "
                "same setting; give one."
            )
        param_group["projector"] = _PROJ[proj]

    def _check_method_options(self, group: dict[str, Any], where: str) -> None:
        _check_apollo_options(group, where)
        if "rank" in group and group["proj_type"] == "full":
            raise ValueError(
                f"Invalid proj_type{where}: 'full'. APOLLOAdamW supports std, reverse_std, left, right: its "
                "channel scaling needs one unprojected dimension."
            )

    def _update_terms(self, group: dict[str, Any], batch: _Batch) -> dict[str, Any]:
        apollo = ApolloTerm(
            [state.get(UPDATE_NORM) for state in batch.states],
            channel=group["scale_type"] == "channel",
            multiplier=math.sqrt(group["scale"]),
            multiplier_first=group["scale_front"],
            limit=not group["disable_nl"],
            gamma=group["gamma"],
        )
        return {"scale": 1.0, "apollo": apollo}  # nothing is back-projected



def _check_apollo_options(options: dict[str, Any], where: str) -> None:
    """``scale`` (>= 0: the update is multiplied by its square root), ``scale_type``, ``gamma`` and the two
    flags."""
    check_finite_number("scale", options["scale"], where)
    if options["scale"] < 0:
        raise ValueError(f"Invalid scale{where}: {options['scale']!r}. Must be >= 0 (the update is multiplied by sqrt(scale)).")
    if options["scale_type"] not in APOLLO_SCALE_TYPES:
        raise ValueError(
            f"Invalid scale_type{where}: {options['scale_type']!r}. Must be one of {', '.join(APOLLO_SCALE_TYPES)}."
        )
    check_limiter_gamma(options["gamma"], where)
    for name in ("scale_front", "disable_nl"):
        if not isinstance(options[name], bool):
            raise ValueError(f"Invalid {name}{where}: {options[name]!r}. Must be True or False.")
