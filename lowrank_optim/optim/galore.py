"""GaLoreAdamW: Adam with moments kept in a low-rank gradient subspace (arXiv 2403.03507).

Three layers, as in ``torch.optim.adamw``: the :class:`GaLoreAdamW` class validates arguments and owns
state; :func:`galore_adamw` is the functional entry point that resolves ``fused``/``foreach``;
``_galore_adamw_impl`` is the one step, written once on local blocks: it does the arithmetic with the
ops of :mod:`lowrank_optim.ops` and the pure functions of :mod:`lowrank_optim.projection`, and calls an
:class:`~lowrank_optim.optim.exchange.Exchange` where the pieces of a matrix held by different
processes meet (identities for whole tensors; FSDP2 and DeepSpeed ZeRO supply theirs, see
:mod:`lowrank_optim.optim.layout`). FiraAdamW and DCTAdamW reuse all three layers.

Arithmetic of the reference package ``galore-torch`` 1.0 (Hugging Face AdamW style), per step ``t``::

    R = project(G)                          # G itself for params without ``rank``
    M = b1 M + (1 - b1) R ;  V = b2 V + (1 - b2) R²
    N = M / (sqrt(V) + eps)                 # eps outside the bias correction
    W -= lr · sqrt(1 - b2^t) / (1 - b1^t) · scale · project_back(N)
    W -= lr · weight_decay · W              # after the update, raw lr

The subspace is chosen by a projector (:mod:`lowrank_optim.projection.projector`): GaLore's top-``rank``
SVD basis of the gradient (``"svd"``), a warm-started randomized SVD (``"rsvd"``), or the ``rank`` DCT-II
frequencies carrying most of the gradient (``"dct"``, arXiv 2505.17967). It is refreshed when the
per-param step counter *before* incrementing is a multiple of ``update_proj_gap`` (optimizer steps 1,
gap+1, 2·gap+1, ...). At a refresh the moments follow ``moment_policy``, whatever the projector: ``keep``
(reference: they carry over unchanged, except that DCT frequencies which stay selected keep theirs at
their new position), ``reset`` (zeroed) or ``rotate`` (expressed in the new basis,
:func:`~lowrank_optim.projection.rotate_moments_`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, ClassVar, Iterable, Mapping, NamedTuple, Sequence, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..ops import fira_folded_, fira_residual_, kernels_available, lowrank_adam_
from ..ops.fira import fira_folded_accepts, fira_residual_accepts
from ..projection import (
    DCT_SCORING,
    Projection,
    Projector,
    ProjectorTensor,
    Side,
    Subspace,
    add_project_back_,
    effective_rank,
    fira_folded_update_,
    fira_residual,
    fira_scaling,
    limit_norm_growth_,
    lowrank_shape,
    nonfinite_flag,
    project,
    project_back,
    projector_state_dtypes,
    refresh_specs,
    resolve_projector,
    resolve_side,
    rotate_moments_,
    rotated_moments,
    rotates,
    rotations,
)
from ..state_keys import EXP_AVG, EXP_AVG_SQ, MATRIX_RANK, STEP
from ._state import StateDtypeKeeper, state_mismatch
from ._validation import (
    add_checked_group,
    check_adam_hyperparameters,
    check_finite_number,
    check_group_keys,
    check_implementation_options,
    check_moment_options,
    check_no_deprecation_warning,
    check_no_duplicates,
    check_nonfinite_policy,
    check_param_tensors,
    check_projection_group,
    group_tensors,
    matrix_shape,
    normalize_scalars,
)
from .exchange import LOCAL, AdaptiveExchange, Exchange, refresh_due
from .layout import Layout, layout_for
from .moments import (
    FullPrecision,
    MomentFormat,
    QuantizedMoments,
    moment_state_bytes,
    quantized_moments,
    quantized_state_dtypes,
    resolve_moment_format,
)
from .ranks import AUTO, allocate_ranks, charged_bytes, spectrum_of

__all__ = ["NONFINITE_REFRESH_OUTCOMES", "GaLoreAdamW", "galore_adamw", "nonfinite_flag"]

#: What happened to a parameter whose gradient held a NaN/Inf at a projector refresh (the projector is
#: never built from it): ``deferred`` (no projector yet: update skipped, first refresh retried at the next
#: step), ``skipped`` (``nonfinite="skip"``: update skipped, state kept, refresh retried at the next step),
#: ``applied`` (``nonfinite="propagate"``: previous projector kept, the non-finite update applied).
NONFINITE_REFRESH_OUTCOMES: dict[str, str] = {
    "deferred": "it has no projector yet, so its update was skipped and the first refresh is retried at the next step",
    "skipped": "its update was skipped, its moments and projector are kept, and the refresh is retried at the next step",
    "applied": "the previous projector is kept and the non-finite update was applied (nonfinite='propagate')",
}

_NONFINITE_REFRESH = (
    "{name}: a gradient with NaN/Inf arrived at a projector refresh of {subject} at step {step}: {outcome}. "
    "This warning is shown once per optimizer; skipped_updates() counts every skipped update."
)


class _Batch(NamedTuple):
    """The parallel lists one param group hands to the functional step."""

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    projections: list[Projection | None]
    states: list[dict[str, Any]]
    skip_counts: list[Tensor]
    #: The parameters as ``param_groups`` hold them (``params`` are their local blocks, see ``Layout.local``).
    sources: list[Tensor]
    #: Each block's quantized moments (``moment_format``), or ``None`` where they are plain tensors.
    moments: list[QuantizedMoments | None]


class _Resized(NamedTuple):
    """A matrix's rebuilt rank-dependent state (``rank="auto"``), as the step continues with it."""

    projection: Projection
    exp_avg: Tensor
    exp_avg_sq: Tensor
    moments: QuantizedMoments | None


class GaLoreAdamW(Optimizer):
    """AdamW whose moments live in a low-rank subspace of each projected gradient (GaLore).

    A drop-in for ``galore_torch.GaLoreAdamW``: param groups that carry the key ``rank`` are projected
    (with their ``update_proj_gap``, ``scale``, ``proj_type`` and ``projector``), all other groups get the
    same Adam arithmetic on full-rank gradients. :func:`lowrank_optim.param_groups` builds the usual two
    groups. A group's ``rank`` may be ``"auto"`` with ``state_budget=B`` (bytes): at each refresh every
    matrix's rank is chosen from its gradient spectrum so that the group's rank-dependent state (moments
    and projector tensors, :meth:`rank_state_bytes`) never exceeds ``B`` (:mod:`lowrank_optim.optim.ranks`).

    Args:
        params: parameters or param groups. A group with ``rank`` must hold 2-D tensors only.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to ``sqrt(V)`` before dividing (reference default 1e-6, not torch's 1e-8).
        weight_decay: decoupled decay ``W -= lr · wd · W`` applied *after* the update (reference order).
        correct_bias: fold Adam's bias corrections into the step size (reference default True).
        update_proj_gap: default refresh period of projected groups that do not set it.
        scale: default multiplier of the back-projected update (``galore_scale``).
        proj_type: default side rule: ``std`` (project the smaller side), ``reverse_std``, ``left``,
            ``right`` or ``full`` (both sides).
        projector: default subspace: a registered name (``svd``: GaLore's SVD basis with canonical signs;
            ``rsvd``: randomized SVD warm-started from the previous basis; ``dct``: top-``rank`` DCT-II
            frequencies, whose state is ``rank`` int64 indices per side instead of a basis) or a
            projector object with options (``SVDProjector(sign="lapack")`` for galore-torch's exact
            signs, ``RandomizedSVDProjector(...)``, ``DCTProjector(scoring=...)``). A group may set its own.
        scoring: the ``scoring`` option of the default projector when it is given by name (``dct``:
            ``matmul``, ``fft`` or ``auto``); kept for scripts written before projectors were objects.
        moment_dtype: dtype of the moments; ``None`` keeps the parameter's dtype like the reference
            (e.g. ``torch.float32`` keeps fp32 moments for bf16 weights).
        moment_policy: at a projector refresh, ``keep`` the moments (reference; for ``dct`` they follow
            their frequencies), ``reset`` them, or ``rotate`` them into the new basis
            (:func:`~lowrank_optim.projection.rotate_moments_`).
        moment_format: how the moments are stored (:mod:`lowrank_optim.optim.moments`): ``"full"``
            (plain tensors in ``moment_dtype``) or ``"8bit"`` (block-wise dynamic 8-bit codes with one
            fp32 scale per 256 elements, about 0.26x the bytes of fp32 moments; moments of fewer than
            4096 elements stay in ``moment_dtype``), or a format object with options
            (``Blockwise8bit(block_size=128, min_size=0)``). A group may set its own. 8-bit moments are
            stepped on whole tensors (one process, per-layer updates), FSDP2 shards and DeepSpeed
            ZeRO 1-3 fragments.
        foreach: use the multi-tensor implementation; ``None`` picks it where torch would (CUDA) unless
            the step is fused.
        fused: use the compiled kernels of :mod:`lowrank_optim.ops` (moment update, Fira's residual, DCT
            scoring); ``None`` uses them where they loaded for the parameters' device, ``True`` requires
            them (refused at construction with the load error when missing), ``False`` runs the ops'
            pure-PyTorch default kernels. Cannot be ``True`` together with ``foreach``. The same on
            every backend (one process, FSDP2, DeepSpeed ZeRO).
        nonfinite: what a step does with a parameter whose gradient holds a NaN/Inf. ``skip`` (default):
            that parameter is not updated and its moments, projector and limiter are kept; decided on the
            device between refreshes (no host sync; its step counter still advances, so its bias
            correction counts the skipped step) and on the host at a refresh (where its counter stays, so
            the refresh is retried at the next step); :meth:`skipped_updates` counts them. ``propagate``:
            apply the update as ``torch.optim.AdamW`` does (the NaN reaches the weights and the moments).
            Either way a projector is never built from a non-finite gradient.

    A step checks everything that can refuse it (sparse or meta gradients, dtypes the requested kernels do
    not take, parameters that changed shape) for every group before it updates anything, so a step that
    raises leaves the parameters and the state as they were.
    """

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
        scale: float = 1.0,
        proj_type: str = "std",
        projector: str | Projector = "svd",
        scoring: str = "auto",
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
            proj_type=proj_type,
            projector=group_projector(projector, scoring),
            moment_dtype=moment_dtype,
            moment_policy=moment_policy,
            moment_format=resolve_moment_format(moment_format),
            foreach=foreach,
            fused=fused,
            nonfinite=nonfinite,
        )
        normalize_scalars(defaults)
        check_finite_number("scale", defaults["scale"])
        self._setup(params, defaults)

    def _setup(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        """Validate the defaults shared by every variant, then build the optimizer over ``params``."""
        check_adam_hyperparameters(
            lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"], weight_decay=defaults["weight_decay"]
        )
        check_moment_options(moment_dtype=defaults["moment_dtype"], moment_policy=defaults["moment_policy"])
        check_implementation_options(fused=defaults["fused"], foreach=defaults["foreach"])
        check_nonfinite_policy(defaults["nonfinite"])
        self._warned_nonfinite = False
        #: Per parameter, how many of its updates were skipped for a non-finite gradient (0-dim int64
        #: tensors on its device; counted since construction, not saved in state_dict()).
        self._skip_counts: dict[Tensor, Tensor] = {}
        #: id(param) -> (param group index, position), as the groups were built (for messages).
        self._origin: dict[int, tuple[int, int]] = {}
        #: id(param) -> its 1-based position among all parameters, in the order the groups were given.
        self._ordinals: dict[int, int] = {}
        #: What _init_state builds per kind of parameter, for _check_state.
        self._expected_states: dict[tuple, dict[str, tuple[torch.Size, torch.dtype]]] = {}
        Optimizer.__init__(self, params, defaults)
        #: How ``param_groups`` map onto whole matrices: whole tensors, or FSDP2's DTensor shards (found
        #: from the parameters, :func:`~lowrank_optim.optim.layout.layout_for`); DeepSpeed binding replaces
        #: it (lowrank_optim.deepspeed.bind).
        self.layout: Layout = layout_for([p for group in self.param_groups for p in group["params"]])
        StateDtypeKeeper(self, self._intended_state_dtype)
        self._register_projector_hooks()

    def _register_projector_hooks(self) -> None:
        """A state dict holds each group's projector as plain values (:meth:`Projector.to_state`), so that
        ``torch.load(weights_only=True)`` reads it; loading turns them (and the ``scoring`` key of state
        dicts saved before projectors were objects) back into projectors."""
        self.register_state_dict_post_hook(_projectors_to_state)
        self.register_load_state_dict_pre_hook(_projectors_from_state, prepend=True)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also what ``load_state_dict`` calls with the loaded groups: a group saved by an earlier version
        lacks the options added since (e.g. ``nonfinite``), which take this optimizer's defaults, as
        torch's optimizers do for theirs. Unpickling (``copy.deepcopy``, ``pickle``) restores only
        ``defaults``, ``state`` and ``param_groups`` (``Optimizer.__getstate__``): the rest is rebuilt (a
        DeepSpeed binding is not carried over)."""
        unpickled = "defaults" in state
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._values_before_option.items():
                group.setdefault(key, value)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if unpickled:
            self._warned_nonfinite = False
            self._skip_counts = {}
            self._expected_states = {}
            self._origin = {
                id(param): (index, position)
                for index, group in enumerate(self.param_groups)
                for position, param in enumerate(group["params"])
            }
            self._ordinals = {
                id(param): ordinal + 1
                for ordinal, param in enumerate(p for group in self.param_groups for p in group["params"])
            }
            self.layout = layout_for([p for group in self.param_groups for p in group["params"]])
            StateDtypeKeeper(self, self._intended_state_dtype)
            self._register_projector_hooks()

    def param_ordinal(self, param: Tensor) -> int | None:
        """``param``'s 1-based position among the parameters this optimizer was built with (in group
        order, as given), or ``None`` for a tensor it was not: what a projector's initial state may depend
        on (the random projector's seed), and what a layout that replaces the groups' tensors (DeepSpeed
        ZeRO's flat partitions) records for each matrix so that its state starts the same."""
        return self._ordinals.get(id(param))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating it here so that ``step()`` never meets a bad setting."""
        tensors = group_tensors(param_group)
        index = len(self.param_groups)
        check_no_duplicates(tensors, self.param_groups)
        self._prepare_group(param_group, index)
        normalize_scalars(param_group)
        check_group_keys(param_group, [*self.defaults, "rank", "scoring", "state_budget"], index)
        check_param_tensors(tensors, index)
        where = f" in param group {index}"
        if "projector" in param_group or "scoring" in param_group:
            param_group["projector"] = group_projector(
                param_group.get("projector", self.defaults["projector"]), param_group.pop("scoring", _NOT_GIVEN), where
            )
        if "moment_format" in param_group:
            param_group["moment_format"] = resolve_moment_format(param_group["moment_format"], where)
        add_checked_group(self, param_group, lambda group: self._check_group(group, index))
        self._origin.update({id(param): (index, position) for position, param in enumerate(tensors)})
        start = len(self._ordinals)
        self._ordinals.update({id(param): start + position + 1 for position, param in enumerate(tensors)})

    def _prepare_group(self, param_group: dict[str, Any], index: int) -> None:
        """Normalize a user's group before the defaults are filled in (Fira renames ``scale``)."""

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        where = f" in param group {index}"
        check_adam_hyperparameters(
            lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"], where=where
        )
        check_moment_options(moment_dtype=group["moment_dtype"], moment_policy=group["moment_policy"], where=where)
        check_implementation_options(
            fused=group["fused"], foreach=group["foreach"], devices=[p.device for p in group["params"]], where=where
        )
        check_nonfinite_policy(group["nonfinite"], where)
        self._check_method_options(group, where)
        self._check_step_tensors(group, index, group["params"])
        if "rank" not in group:
            return
        check_projection_group(group, index)
        if group["moment_policy"] == "rotate" and not group["projector"].orthonormal:
            raise ValueError(
                f"Invalid moment_policy{where}: 'rotate'. The {group['projector'].name!r} projector's basis is not "
                "orthonormal, so there is no change of coordinates to rotate the moments by: use 'keep' or 'reset'."
            )
        shapes = [matrix_shape(p) for p in group["params"]]
        if group["rank"] == AUTO:
            least = sum(self.rank_state_bytes(group, param, 1) for param in group["params"])
            if least > group["state_budget"]:
                raise ValueError(
                    f"Invalid state_budget{where}: {group['state_budget']}. Rank 1 for each of its {len(shapes)} "
                    f"matrices already needs {least} bytes of state: allowed is at least {least}."
                )
            return
        clamped = [shape for shape in shapes if group["rank"] > min(shape)]
        if clamped:
            warnings.warn(
                f"rank {group['rank']} in param group {index} exceeds min(m, n) of {len(clamped)} param(s) "
                f"(e.g. shape {clamped[0]}); their rank is clamped to min(m, n).",
                stacklevel=4,
            )

    def _check_method_options(self, group: dict[str, Any], where: str) -> None:
        """The options of this optimizer's update rule (GaLore: ``scale``)."""
        check_finite_number("scale", group["scale"], where)

    def _check_step_tensors(self, group: dict[str, Any], index: int, params: list[Tensor]) -> None:
        """Checks of the tensors themselves that must pass before a step updates anything (run at
        construction and again before every step, since a model can change dtype or device after the
        optimizer is built). Subclasses add their kernels' requirements."""

    def _check_step(self, group: dict[str, Any], index: int) -> None:
        """Everything that can make a step of ``group`` raise, checked before any group is stepped."""
        for position, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
            if param.is_meta or param.grad.is_meta:
                raise RuntimeError(
                    f"{type(self).__name__}: param {position} of param group {index} (shape {tuple(param.shape)}) "
                    "is on the meta device and has no data to update. Materialize the model first (e.g. "
                    "module.to_empty(device=...) and initialize it), then step."
                )
        check_param_tensors(group["params"], index)
        self._check_step_tensors(group, index, group["params"])

    def _check_moment_format(self, group: dict[str, Any], index: int) -> None:
        """Quantized moments need a layout that keeps every stored row of a state tensor on one process
        (``Layout.steps_quantized_moments``: whole tensors, FSDP2's row shards, DeepSpeed's fragments); refuse
        a quantizing format under another rather than run it wrongly."""
        fmt: MomentFormat = group["moment_format"]
        if isinstance(fmt, FullPrecision):
            return
        if getattr(self.layout, "steps_quantized_moments", False):
            pieces = getattr(self.layout, "vector_pieces", None)  # a layout that splits 1-D tensors
            if pieces is None:
                return
            for position, param in enumerate(group["params"]):
                shape = _moment_placement(group, matrix_shape(param))[0]
                if len(shape) != 1 or not fmt.quantizes(shape):
                    continue
                if fmt.splits_on_blocks(shape[0], pieces):
                    continue
                codes = pieces(shape[0])
                raise ValueError(
                    f"Invalid moment_format in param group {index}: {fmt.to_state()!r}. Param {position} is 1-D "
                    f"(shape {shape}), and {type(self.layout).__name__} splits it between processes at offsets "
                    f"{[start for start, _ in codes[1:]]}, which are not all on its quantization blocks' boundaries, "
                    "so its moments cannot be quantized. Allowed: put the 1-D parameters in a param group with "
                    f"moment_format='full', or give this group Blockwise8bit(min_size={math.prod(shape) + 1}) or more."
                )
            return
        raise ValueError(
            f"Invalid moment_format in param group {index}: {fmt.to_state()!r}. Quantized moments are not yet "
            f"supported under {type(self.layout).__name__} (it does not declare steps_quantized_moments: whole "
            "stored rows of every state tensor on one process); allowed there: moment_format='full' (use "
            "moment_dtype=torch.bfloat16 to halve the moments instead)."
        )

    def _check_adaptive_rank(self, group: dict[str, Any], index: int) -> None:
        """``rank="auto"`` rebuilds a matrix's state at a refresh, which a layout must declare it can
        (``Layout.steps_adaptive_ranks``); refuse it under another rather than run it wrongly."""
        if group.get("rank") != AUTO or getattr(self.layout, "steps_adaptive_ranks", False):
            return
        raise ValueError(
            f"Invalid rank in param group {index}: 'auto'. Adaptive ranks are not yet supported under "
            f"{type(self.layout).__name__} (it does not declare steps_adaptive_ranks); allowed there: a positive "
            "integer rank. rank='auto' runs on whole tensors (one process), under FSDP2 (fully_shard) and "
            "DeepSpeed ZeRO (lowrank_optim.deepspeed.bind)."
        )

    def _check_state(self, group: dict[str, Any]) -> None:
        """The state a parameter already has must still fit it: a model changed after the first step
        (``model.to(dtype or device)``, a resized layer) would otherwise fail half-way through a step (a
        matmul of mismatched dtypes) or mix devices. Compared with the state :meth:`_init_state` would
        build now (on the meta device, once per kind of parameter)."""
        for param in group["params"]:
            state = self.state.get(param)
            if param.grad is None or not state:
                continue
            mismatch = state_mismatch(param, state, self._expected_state(group, param, state.get(MATRIX_RANK)))
            if mismatch is not None:
                key, found, shape, dtype = mismatch
                index, position = self._where(param)
                raise RuntimeError(
                    f"{type(self).__name__}: param {position} of param group {index} is {param.dtype} on "
                    f"{param.device} with shape {tuple(param.shape)}, but its state {key!r} {found} (this "
                    f"parameter needs {dtype} on {param.device} with shape {tuple(shape)}): the parameter changed "
                    "after the optimizer's first step. Build the optimizer for the model as it is now (and load "
                    "a state dict into it, which converts dtypes and devices)."
                )

    def _expected_state(
        self, group: dict[str, Any], param: Tensor, rank: int | None = None
    ) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """``{key: (shape, dtype)}`` of the state :meth:`_init_state` builds for ``param`` (``step`` aside),
        at the matrix's current ``rank`` in a ``rank="auto"`` group."""
        options = tuple(group.get(key) for key in ("rank", "proj_type", "projector", "moment_dtype", "moment_format"))
        cache_key = (tuple(param.shape), param.dtype, "rank" in group, options, rank)
        expected = self._expected_states.get(cache_key)
        if expected is None:
            built: dict[str, Any] = {} if rank is None else {MATRIX_RANK: rank}
            self._init_state(group, torch.empty(param.shape, dtype=param.dtype, device="meta"), built)
            expected = {
                key: (value.shape, value.dtype) for key, value in built.items() if key != STEP and isinstance(value, Tensor)
            }
            self._expected_states[cache_key] = expected
        return expected

    #: Options whose default changes the arithmetic, with the value that reproduces what a group saved
    #: before the option existed did: such a group continues bit-identically (e.g. Fira's
    #: ``fold_residual=False``). Options not listed take :attr:`defaults`.
    _values_before_option: ClassVar[dict[str, Any]] = {}

    #: The state key of this optimizer's norm-growth limiter (Fira's residual norm, APOLLO's update norm):
    #: a 0-dim fp32 tensor per projected matrix (a bf16 copy would change the limit), or ``None``.
    _limiter_key: str | None = None

    @classmethod
    def _intended_state_dtype(
        cls, group: dict[str, Any], param: Tensor, key: str, state: Mapping[str, Any] | None = None
    ) -> torch.dtype | None:
        """Moments are kept in ``moment_dtype`` (8-bit moments: ``uint8`` codes and fp32 scales), a
        projector's fixed-dtype tensors (DCT indices: int64) in their dtype and the limiter's norm in fp32;
        everything else follows the parameter. ``state``: the parameter's (saved) state, whose
        ``matrix_rank`` decides a ``rank="auto"`` matrix's moment shape."""
        if key in (EXP_AVG, EXP_AVG_SQ):
            fmt = resolve_moment_format(group.get("moment_format", "full"))
            # A layout's flat partitions never hold quantized moments (refused at step), and have no matrix shape.
            shape = _moment_placement(group, param.shape, _stored_rank(state))[0]
            if not isinstance(fmt, FullPrecision) and fmt.quantizes(shape):
                return torch.uint8
            return group["moment_dtype"] or param.dtype
        if key == cls._limiter_key:
            return torch.float32
        return {**projector_state_dtypes(), **quantized_state_dtypes()}.get(key)

    @staticmethod
    def _compute_dtype(group: dict[str, Any], param: Tensor, state: Mapping[str, Any] | None = None) -> torch.dtype:
        """The dtype the step computes ``M``, ``V`` and ``N`` of ``param`` in: fp32 for quantized moments
        (the ``blockwise_adam_`` op's), else the moments' own dtype."""
        fmt = group["moment_format"]
        shape = _moment_placement(group, param.shape, _stored_rank(state))[0]
        if not isinstance(fmt, FullPrecision) and fmt.quantizes(shape):
            return torch.float32
        return group["moment_dtype"] or param.dtype

    def _init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """The state of one parameter, every tensor made by the layout (:meth:`Layout.new_state`) from its
        whole shape and how it lines up with the parameter: ``rows`` (dimension 0 runs along the
        parameter's rows), ``columns`` (dimension 1 along its columns) or ``replicated``."""
        # A CPU scalar like torch's Adam: reading it for the refresh decision never syncs a device.
        state[STEP] = torch.tensor(0.0, dtype=torch.float32)
        if group.get("rank") == AUTO:
            # Rank 0 (no moments, no basis) until the first refresh allocates one (optim.ranks).
            state.setdefault(MATRIX_RANK, 0)
        self._init_rank_state(group, param, state)
        if "rank" in group and self._limiter_key is not None:
            state[self._limiter_key] = torch.zeros((), dtype=torch.float32, device=param.device)

    def _init_rank_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """The state tensors whose shapes follow the rank (the projector's and the moments), at the rank
        :func:`matrix_rank` reads (also what a ``rank="auto"`` refresh rebuilds at a new rank)."""
        moment_dtype = group["moment_dtype"] or param.dtype
        new = self.layout.new_state
        moment_shape, moments = _moment_placement(group, param.shape, state.get(MATRIX_RANK))
        if "rank" in group:
            side = resolve_side(group["proj_type"], param.shape)
            rank = matrix_rank(group, param.shape, state)
            projector: Projector = group["projector"]
            # A layout's stand-in for a piece of a matrix (DeepSpeed's fragments) carries the position.
            ordinal = self._ordinals.get(id(param), getattr(param, "ordinal", None))
            for spec in projector.tensors(cast("tuple[int, int]", tuple(param.shape)), rank, side):
                value = projector.initial(spec, param.device, ordinal)
                if value is None:
                    value = new(param, spec.shape, spec.dtype or param.dtype, spec.sharding, column_major=spec.column_major)
                state[spec.key] = value
        fmt: MomentFormat = group["moment_format"]
        for spec in fmt.tensors(moment_shape, moment_dtype, moments):
            state[spec.key] = new(param, spec.shape, spec.dtype or moment_dtype, spec.sharding)
            fmt.initial(spec, state[spec.key])

    def _rank_state_keys(self, group: dict[str, Any], shape: tuple[int, ...], rank: int) -> list[str]:
        """The keys :meth:`_init_rank_state` makes for a matrix of ``shape`` at ``rank``."""
        side = resolve_side(group["proj_type"], shape)
        matrix = cast("tuple[int, int]", shape)
        moment_shape, sharding = _moment_placement(group, shape, rank)
        specs = group["projector"].tensors(matrix, rank, side)
        specs += group["moment_format"].tensors(moment_shape, torch.float32, sharding)
        return [spec.key for spec in specs]

    def rank_state_bytes(self, group: dict[str, Any], param: Tensor, rank: int) -> int:
        """Bytes of the rank-dependent state of one projected matrix of ``group`` at ``rank``: its
        projector's tensors and its two moments as ``moment_format`` stores them in ``moment_dtype``
        (what ``state_budget`` bounds in a ``rank="auto"`` group, :mod:`lowrank_optim.optim.ranks`)."""
        shape = matrix_shape(param)
        side = resolve_side(group["proj_type"], shape)
        total = 0
        for spec in group["projector"].tensors(cast("tuple[int, int]", shape), rank, side):
            total += math.prod(spec.shape) * torch.empty((), dtype=spec.dtype or param.dtype).element_size()
        moment_shape, sharding = _moment_placement(group, shape, rank)
        return total + moment_state_bytes(group["moment_format"], moment_shape, group["moment_dtype"] or param.dtype, sharding)

    @staticmethod
    def _projection(group: dict[str, Any], shape: tuple[int, ...], state: dict[str, Any]) -> Projection | None:
        """The state's view of a matrix's projector (a transient tuple of its state tensors)."""
        if "rank" not in group:
            return None
        side = resolve_side(group["proj_type"], shape)
        rank = matrix_rank(group, shape, state)
        projector: Projector = group["projector"]
        matrix_shape = cast("tuple[int, int]", tuple(shape))  # a projected group holds matrices
        tensors = tuple(state[spec.key] for spec in projector.tensors(matrix_shape, rank, side))
        return Projection(projector, side, rank, tensors)

    def _where(self, param: Tensor) -> tuple[int, int]:
        """``(param group index, position)`` of ``param`` as the user built the groups (also while
        :class:`~lowrank_optim.train.PerLayerUpdates` steps it through a one-parameter group)."""
        if id(param) in self._origin:
            return self._origin[id(param)]
        for index, group in enumerate(self.param_groups):
            for position, other in enumerate(group["params"]):
                if other is param:
                    return index, position
        return -1, -1

    def _warn_nonfinite(self, subject: str, step: int, outcome: str) -> None:
        """The warning for a refresh that met a NaN/Inf gradient (once per optimizer): which tensor
        (``subject``), at which optimizer step, and what was done (:data:`NONFINITE_REFRESH_OUTCOMES`)."""
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        message = _NONFINITE_REFRESH.format(
            name=type(self).__name__, subject=subject, step=step, outcome=NONFINITE_REFRESH_OUTCOMES[outcome]
        )
        warnings.warn(message, RuntimeWarning, stacklevel=7)

    def _nonfinite_refresh_callback(self, batch: _Batch) -> Callable[[int, int, str], None]:
        """What the functional step calls when a refresh meets a NaN/Inf gradient."""

        def report(index: int, step: int, outcome: str) -> None:
            param = batch.sources[index]
            group, position = self._where(param)
            self._warn_nonfinite(f"param {position} in param group {group} (shape {tuple(param.shape)})", step + 1, outcome)

        return report

    def skipped_updates(self) -> dict[tuple[int, int], int]:
        """How many updates were skipped for a non-finite gradient (``nonfinite="skip"``), per
        ``(param group index, position in the group)``, for the parameters with at least one; counted
        since this optimizer was built (not part of ``state_dict()``). Reads each counter from its
        device: call it when you log, not every step."""
        counts = {}
        for param, count in self._skip_counts.items():
            value = int(count.item())
            if value:
                counts[self._where(param)] = value
        return counts

    def _collect(self, group: dict[str, Any]) -> _Batch | None:
        """The group's matrices (and full-rank tensors) whose parameter has a gradient, as the local blocks
        the layout gives (:meth:`Layout.blocks`), with their state (initialized on first use)."""
        batch = _Batch([], [], [], [], [], [], [], [], [], [])

        def init(like: Any, state: dict[str, Any]) -> None:
            self._init_state(group, like, state)

        for param in group["params"]:
            if param.grad is None:
                continue
            blocks = self.layout.blocks(group, param, self.state[param], init)
            count = self._skip_counts.get(param)
            if blocks and (count is None or count.device != blocks[0].param.device):
                count = self._skip_counts[param] = torch.zeros((), dtype=torch.int64, device=blocks[0].param.device)
            for block in blocks:
                batch.params.append(block.param)
                batch.grads.append(block.grad)
                batch.exp_avgs.append(block.state[EXP_AVG])
                batch.exp_avg_sqs.append(block.state[EXP_AVG_SQ])
                batch.steps.append(block.step)
                batch.projections.append(self._projection(group, block.shape, block.state))
                batch.states.append(block.state)
                batch.skip_counts.append(cast(Tensor, count))  # set above for a parameter with blocks
                batch.sources.append(param)
                shape, sharding = _moment_placement(group, block.shape, block.state.get(MATRIX_RANK))
                batch.moments.append(quantized_moments(group["moment_format"], shape, sharding, block.state))
        return batch if batch.params else None

    def _allocated_ranks(
        self, group: dict[str, Any], batch: _Batch, exchange: AdaptiveExchange, found_inf: Tensor | None
    ) -> list[int | None] | None:
        """``rank="auto"``: the rank each matrix due for a refresh now takes (``None``: not due, or its
        gradient is not finite, so it keeps its rank), chosen under the group's ``state_budget`` by
        :func:`~lowrank_optim.optim.ranks.allocate_ranks` from the gradients' energies. The group's other
        matrices are charged the state they hold (at least their rank-1 cost), so the total never exceeds
        the budget whichever matrices refresh together.

        Each spectrum is computed by the matrix's refresh owner from its whole gradient
        (:meth:`Exchange.refresh_gradients`) and shared with every process (:meth:`AdaptiveExchange.spectra`),
        so that all of them allocate the same ranks from the same fp64 values: a sharded run chooses what
        one process would. The budget counts whole tensors, as one process holds them (a layout that
        shards the state holds about ``1/world`` of it per process)."""
        gap = group["update_proj_gap"]
        due = [
            i
            for i, projection in enumerate(batch.projections)
            if projection is not None and refresh_due(int(batch.steps[i].item()), gap)
        ]
        if not due or (found_inf is not None and bool(found_inf)):  # a skipped step refreshes nothing
            return None
        wholes, finite = exchange.refresh_gradients(due, [batch.grads[i] for i in due])
        sizes = [min(exchange.shape(i, batch.grads[i])) for i in due]
        owned: list[Tensor | None] = []
        for i, whole, ok, size in zip(due, wholes, finite, sizes):
            projection = cast(Projection, batch.projections[i])
            if whole is None or not ok:
                owned.append(None)
                continue
            owned.append(spectrum_of(projection.projector, whole, projection.side, size))
        spectra = exchange.spectra(due, owned, sizes)
        # The matrices of this allocation with no block here (a ZeRO partition's other matrices).
        remote = exchange.elsewhere()
        # An empty matrix (a rank's placeholder block holding only padding) has no direction: it stays at rank 0.
        refreshing = [k for k, (ok, size) in enumerate(zip(finite, sizes)) if ok and size > 0]
        remote_refreshing = [j for j, entry in enumerate(remote) if entry.spectrum is not None and min(entry.shape) > 0]
        if not refreshing and not remote_refreshing:
            return None
        # The greedy asks for many (matrix, rank) costs, which depend only on the shape and dtype:
        # computed once per kind of matrix (a model's matrices come in a few shapes).
        known: dict[tuple[tuple[int, ...], torch.dtype, int], int] = {}

        def cost_of(shape: tuple[int, ...], dtype: torch.dtype) -> Callable[[int], int]:
            like = torch.empty(shape, dtype=dtype, device="meta")

            def cost(rank: int) -> int:
                key = (shape, dtype, rank)
                if key not in known:
                    known[key] = self.rank_state_bytes(group, like, rank)
                return known[key]

            return cost

        def held_bytes(shape: tuple[int, ...], dtype: torch.dtype, rank: int | None) -> int:
            return charged_bytes(cost_of(shape, dtype), rank)

        # Every matrix not refreshing now is charged the state it holds (at least its rank-1 cost).
        held = 0
        stepped = {id(source) for source in batch.sources}
        for param in group["params"]:
            if id(param) not in stepped:  # no gradient this step: a whole matrix, as the optimizer holds it
                held += held_bytes(tuple(param.shape), param.dtype, _stored_rank(self.state.get(param)))
        chosen_here = {due[k] for k in refreshing}
        for i, maybe in enumerate(batch.projections):
            if maybe is None or i in chosen_here:
                continue
            shape = exchange.shape(i, batch.grads[i])
            if min(shape) > 0:
                held += held_bytes(shape, batch.params[i].dtype, _stored_rank(batch.states[i]))
        for j, entry in enumerate(remote):
            if j not in remote_refreshing and min(entry.shape) > 0:
                held += held_bytes(entry.shape, entry.dtype, entry.rank)
        # The pool in the exchange's order, alike on every process (the greedy breaks ties by position).
        pool: list[tuple[int, Tensor, Callable[[int], int], int | None, int | None]] = [
            (exchange.position(due[k]), spectra[k],
             cost_of(exchange.shape(due[k], batch.grads[due[k]]), batch.params[due[k]].dtype), due[k], None)
            for k in refreshing
        ]
        pool += [
            (remote[j].position, cast(Tensor, remote[j].spectrum), cost_of(remote[j].shape, remote[j].dtype), None, j)
            for j in remote_refreshing
        ]
        pool.sort(key=lambda entry: entry[0])
        chosen = allocate_ranks([entry[1] for entry in pool], [entry[2] for entry in pool], group["state_budget"] - held)
        ranks: list[int | None] = [None] * len(batch.params)
        remote_ranks: list[int | None] = [None] * len(remote)
        for (_, _, _, here, there), rank in zip(pool, chosen):
            if here is not None:
                ranks[here] = rank
            else:
                remote_ranks[cast(int, there)] = rank
        here_indices = [i for i in range(len(ranks)) if ranks[i] is not None]
        exchange.assign_ranks(here_indices, [cast(int, ranks[i]) for i in here_indices], remote_ranks)
        return ranks

    def _rebuild_rank_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any], rank: int) -> None:
        """Replace ``param``'s rank-dependent state tensors by zero ones at ``rank`` (made by the layout)."""
        for key in self._rank_state_keys(group, tuple(param.shape), state[MATRIX_RANK]):
            state.pop(key, None)
        state[MATRIX_RANK] = rank
        self._init_rank_state(group, param, state)

    def set_matrix_rank(self, param: Tensor, rank: int) -> None:
        """Rebuild the state of ``param`` (a matrix of a ``rank="auto"`` group, with state) at ``rank``:
        its projector's tensors and its moments become zero tensors of the new shapes, placed by the
        layout as at the first step; the step counter and limiters stay. For loading a checkpoint in
        place whose ranks differ from this optimizer's, as ``torch.distributed.checkpoint`` does
        (:func:`lowrank_optim.distributed.dcp.match_saved_ranks` calls it); the values come from the
        checkpoint, so a call with nothing loaded after it loses this matrix's moments."""
        where = next(((i, g) for i, g in enumerate(self.param_groups) if any(p is param for p in g["params"])), None)
        if where is None:
            raise ValueError(f"set_matrix_rank: the tensor (shape {tuple(param.shape)}) is not in this optimizer's param groups.")
        index, group = where
        if group.get("rank") != AUTO:
            raise ValueError(
                f"set_matrix_rank: param group {index} has rank {group.get('rank')!r}; allowed: a group with "
                "rank='auto' (a fixed rank is the group's, not the matrix's)."
            )
        largest = min(matrix_shape(param))
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= largest:
            raise ValueError(
                f"Invalid rank for a matrix of shape {tuple(param.shape)}: {rank!r}. Must be an integer in "
                f"[0, {largest}] (0: before its first refresh)."
            )
        state = self.state.get(param)
        if not state:
            raise ValueError(
                f"set_matrix_rank: the matrix (shape {tuple(param.shape)}) has no state yet; allowed after its "
                "first step (torch.distributed.checkpoint.state_dict.get_state_dict makes it)."
            )
        if state[MATRIX_RANK] != rank:
            self._rebuild_rank_state(group, param, state, rank)

    def _resizer(self, group: dict[str, Any], batch: _Batch, exchange: Exchange) -> Callable[[int, int], _Resized]:
        """What the step calls to rebuild matrix ``index``'s rank-dependent state at a new ``rank``
        (``rank="auto"``): the old tensors leave the parameter's state (the step still holds their local
        pieces to move the moments), new zero ones of the new shapes take their keys, made by the layout
        as at the first step (:meth:`_init_rank_state`, through :meth:`Layout.rebuilt_state`, which also
        gives their local pieces)."""

        def resize(index: int, rank: int) -> _Resized:
            source = batch.sources[index]
            shape = exchange.shape(index, batch.grads[index])

            def rebuild(like: Any, state: dict[str, Any]) -> None:
                self._rebuild_rank_state(group, like, state, rank)

            # The layout finds the matrix whose local state the step holds, and rebuilds it as at its first step.
            batch.states[index] = local = self.layout.rebuilt_state(
                group, source, self.state[source], batch.states[index], rank, rebuild
            )
            placement, sharding = _moment_placement(group, shape, rank)
            return _Resized(
                cast(Projection, self._projection(group, shape, local)),
                local[EXP_AVG],
                local[EXP_AVG_SQ],
                quantized_moments(group["moment_format"], placement, sharding, local),
            )

        return resize

    def _step_group(self, group: dict[str, Any], batch: _Batch, found_inf: Tensor | None = None) -> None:
        beta1, beta2 = group["betas"]
        auto = group.get("rank") == AUTO
        exchange = self.layout.exchange(group, batch.sources)
        # The layout declared steps_adaptive_ranks for an auto group (_check_adaptive_rank): its exchange shares spectra.
        ranks = self._allocated_ranks(group, batch, cast(AdaptiveExchange, exchange), found_inf) if auto else None
        galore_adamw(
            batch.params,
            batch.grads,
            batch.exp_avgs,
            batch.exp_avg_sqs,
            batch.steps,
            batch.projections,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            correct_bias=group["correct_bias"],
            update_proj_gap=group["update_proj_gap"],
            moment_policy=group["moment_policy"],
            nonfinite=group["nonfinite"],
            foreach=group["foreach"],
            fused=group["fused"],
            on_nonfinite_refresh=self._nonfinite_refresh_callback(batch),
            skip_counts=batch.skip_counts,
            found_inf=found_inf,
            exchange=exchange,
            quantized=batch.moments,
            ranks=ranks,
            resize=self._resizer(group, batch, exchange) if auto else None,
            **self._update_terms(group, batch),
        )

    def _update_terms(self, group: dict[str, Any], batch: _Batch) -> dict[str, Any]:
        """What this optimizer's update adds to the shared step (GaLore: the back-projection's ``scale``;
        Fira: its residual term; APOLLO: its scaled gradient)."""
        return {"scale": group["scale"]}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss.

        Every group is checked before any is stepped, so a step that raises changes nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if self.layout.check_group(self, group):
                self._check_state(group)
            self._check_step(group, index)
            self._check_moment_format(group, index)
            self._check_adaptive_rank(group, index)
        found_inf = self.layout.begin_step(self.param_groups)
        for group in self.param_groups:
            batch = self._collect(group)
            if batch is not None:
                self._step_group(group, batch, found_inf if group["nonfinite"] == "skip" else None)
        return loss


class FiraTerm(NamedTuple):
    """Fira's residual term for the functional step (see :mod:`lowrank_optim.projection.fira`).

    ``residual_norms[i]`` is the limiter's 0-dim fp32 state of projected parameter ``i`` (``None`` for
    full-rank ones). The residual ``(G - subtract · back(R)) · phi`` enters the update times
    ``residual_scale``.
    """

    residual_norms: list[Tensor | None]
    subtract: float
    residual_scale: float
    gamma: float
    #: Whole fp32/fp64 matrices take the folded update (the ``fira_folded_`` op, :func:`_fira_folded`).
    fold: bool = True


class ApolloTerm(NamedTuple):
    """APOLLO's update for the functional step (Zhu et al., 2024, arXiv 2412.05270; see
    :mod:`lowrank_optim.optim.apollo`): the full-rank gradient scaled by ``||N|| / (||R|| + 1e-8)`` per
    channel of the unprojected dimension (``channel``) or per matrix, norm-growth limited (``limit``,
    ``update_norms[i]``: 0-dim fp32 limiter state of projected parameter ``i``), times ``multiplier``
    (applied before the limiter when ``multiplier_first``); nothing is back-projected."""

    update_norms: list[Tensor | None]
    channel: bool
    multiplier: float
    multiplier_first: bool
    limit: bool
    gamma: float


def _apollo_updates_(
    indices: list[int],
    params: list[Tensor],
    grads: list[Tensor],
    block_terms: tuple[dict[int, Tensor], dict[int, Tensor]],
    moment_terms: tuple[dict[int, Tensor], dict[int, Tensor]],
    sides: dict[int, Side],
    apollo: ApolloTerm,
    *,
    steps: list[int],
    step_sizes: dict[int, float],
    skips: dict[int, Tensor | None],
    exchange: Exchange,
) -> None:
    """``W -= step_size · limited(G ∘ s) · multiplier`` for the projected blocks ``indices`` (:class:`ApolloTerm`).

    The channel factor of a block comes from ``N`` and ``R`` as its back-projection would read them
    (``block_terms``: its rows' on the right, all of them on the left); the matrix-wise factor and the
    limiter's norm from sums of squares over the pieces that partition the matrix (``moment_terms``: the
    moments' pieces, combined by :meth:`Exchange.lowrank_norms`; the blocks' updates, by
    :meth:`Exchange.residual_norms`), which every process calls alike."""
    block_n, block_r = block_terms
    moment_n, moment_r = moment_terms
    if not apollo.channel:
        n_norms = exchange.lowrank_norms(indices, [moment_n[i] for i in indices])
        r_norms = exchange.lowrank_norms(indices, [moment_r[i] for i in indices])
    updates = {}
    for k, i in enumerate(indices):
        if apollo.channel:
            factor = fira_scaling(block_n[i], block_r[i], sides[i])  # the unprojected dimension's channels
        else:
            factor = n_norms[k] / (r_norms[k] + 1e-8)
        updates[i] = grads[i] * factor
        if apollo.multiplier_first and apollo.multiplier != 1.0:
            updates[i].mul_(apollo.multiplier)
    if apollo.limit:
        norms = exchange.residual_norms(indices, [updates[i] for i in indices])
        for i, norm in zip(indices, norms):
            update_norm = cast(Tensor, apollo.update_norms[i])  # a projected matrix's limiter state
            limit_norm_growth_(updates[i], update_norm, gamma=apollo.gamma, first=steps[i] == 0, norm=norm, skip=skips[i])
    for i in indices:
        update = updates.pop(i)
        if not apollo.multiplier_first and apollo.multiplier != 1.0:
            update.mul_(apollo.multiplier)
        skip = skips[i]
        if skip is not None:
            update.masked_fill_(skip, 0.0)
        params[i].add_(update, alpha=-step_sizes[i])


def galore_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    projections: list[Projection | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    update_proj_gap: int,
    scale: float,
    moment_policy: str = "keep",
    nonfinite: str = "skip",
    foreach: bool | None = None,
    fused: bool | None = None,
    on_nonfinite_refresh: Callable[[int, int, str], None] | None = None,
    skip_counts: list[Tensor] | None = None,
    found_inf: Tensor | None = None,
    fira: FiraTerm | None = None,
    apollo: ApolloTerm | None = None,
    exchange: Exchange | None = None,
    quantized: list[QuantizedMoments | None] | None = None,
    ranks: list[int | None] | None = None,
    resize: Callable[[int, int], _Resized] | None = None,
) -> None:
    """Functional GaLore-AdamW step over parallel lists; see the module docstring for the math.

    ``ranks[i]``, where given and not ``None``, is the rank projected parameter ``i`` takes at the refresh
    due now (``rank="auto"``, :mod:`lowrank_optim.optim.ranks`); where it differs from its current rank,
    ``resize(i, rank)`` rebuilds its state at the new rank and the moments move into it by the moment
    policy: ``reset`` zeros them, ``rotate`` rotates them by the ``r_old x r_new`` change of coordinates,
    ``keep`` carries them by :meth:`Projector.carry` (by position; DCT frequencies by identity).

    ``quantized[i]``, where given and not ``None``, holds parameter ``i``'s 8-bit moments
    (:class:`~lowrank_optim.optim.moments.QuantizedMoments`; ``exp_avgs[i]`` and ``exp_avg_sqs[i]`` are then
    its code tensors): the step computes in fp32 and updates them with the ``blockwise_adam_`` op, and a
    refresh's moment policy works on their dequantized values.

    ``projections[i]`` is ``None`` for a full-rank parameter, else its projector with its stored tensors
    (:class:`~lowrank_optim.projection.Projection`), refreshed in place at refresh steps. ``fira`` adds Fira's residual term
    (:func:`lowrank_optim.optim.fira_adamw` is the entry point for that).

    Non-finite gradients (``nonfinite``, one of ``optim._validation.NONFINITE_POLICIES``): with ``"skip"``
    a parameter whose (projected) gradient holds a NaN/Inf is not updated and keeps its state, decided on the device between
    refreshes (no host sync; its step counter still advances) and on the host at a refresh (which syncs
    anyway; the counter then stays, so the refresh is retried at the next step); ``skip_counts[i]`` (0-dim
    int64 tensors) count the skipped updates. ``"propagate"`` applies the update as ``torch.optim.AdamW``
    would. A refresh never builds a projector from a non-finite gradient: it keeps the previous one (or,
    before the first exists, defers the update). ``on_nonfinite_refresh(i, step, outcome)`` is told of
    each such refresh, ``outcome`` one of :data:`NONFINITE_REFRESH_OUTCOMES`. ``found_inf`` (a 0-dim bool
    tensor on the parameters' device, like torch's fused Adam's) skips every update where set, whatever
    ``nonfinite`` says: a decision made outside, e.g. over all ranks.

    ``fused`` (compiled kernels, see :class:`GaLoreAdamW`) and ``foreach`` are resolved here, once per
    call: ``fused=None`` means fused when kernels loaded for every parameter's device and ``foreach`` is
    not ``True``. The step calls the ops of :mod:`lowrank_optim.ops` either way: fused, through the
    dispatcher (which picks the compiled kernel); otherwise their pure-PyTorch default kernels
    (``ops._library.run``). Fira's residual for dtypes its op does not take (fp16) runs as pure functions.

    ``exchange`` (:mod:`lowrank_optim.optim.exchange`) says how the tensors map onto whole matrices:
    ``None`` for whole tensors; a distributed layout passes local blocks (its rows of each matrix, the
    local pieces of its state) with the collectives that combine them. The arithmetic is the same.
    """
    if fused and foreach:
        raise ValueError("`fused` and `foreach` cannot be `True` together.")
    check_nonfinite_policy(nonfinite)
    if fused is None:
        fused = not foreach and bool(params) and all(kernels_available(p.device) for p in params)
    if foreach is None:
        foreach = not fused and bool(params) and all(p.device.type == "cuda" for p in params)
    exchange = LOCAL if exchange is None else exchange
    report = on_nonfinite_refresh or (lambda index, step, outcome: None)
    # Where nothing is combined (whole tensors) and nothing is batched (not foreach), the matrices go
    # through the phases one at a time: a step's temporaries (R, N, the SVD's) are one matrix's at a time.
    if foreach or exchange.batched:
        chunks = [slice(0, len(params))]
    else:
        chunks = [slice(i, i + 1) for i in range(len(params))]
    for chunk in chunks:

        def on_refresh(index: int, step: int, outcome: str, offset: int = chunk.start) -> None:
            report(offset + index, step, outcome)

        _galore_adamw_impl(
            params[chunk],
            grads[chunk],
            exp_avgs[chunk],
            exp_avg_sqs[chunk],
            state_steps[chunk],
            projections[chunk],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            update_proj_gap=update_proj_gap,
            scale=scale,
            moment_policy=moment_policy,
            skip_nonfinite=nonfinite == "skip",
            on_nonfinite_refresh=on_refresh,
            skip_counts=None if skip_counts is None else skip_counts[chunk],
            found_inf=found_inf,
            fira=None if fira is None else fira._replace(residual_norms=fira.residual_norms[chunk]),
            apollo=None if apollo is None else apollo._replace(update_norms=apollo.update_norms[chunk]),
            quantized=[None] * (chunk.stop - chunk.start) if quantized is None else quantized[chunk],
            ranks=[None] * (chunk.stop - chunk.start) if ranks is None else ranks[chunk],
            resize=None if resize is None else functools.partial(_offset_resize, resize, chunk.start),
            fused=fused,
            foreach=foreach,
            exchange=exchange,
        )


def _offset_resize(resize: Callable[[int, int], _Resized], offset: int, index: int, rank: int) -> _Resized:
    """``resize`` of the whole lists, called with an index into one chunk of them."""
    return resize(offset + index, rank)


def _step_size(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> float:
    """``lr · sqrt(1 - b2^t) / (1 - b1^t)``: the bias corrections folded into the step size."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def _decay_(param: Tensor, lr: float, weight_decay: float, skip: Tensor | None) -> None:
    """``W -= lr · weight_decay · W``, not applied where ``skip`` (0-dim bool) is set.

    One op whatever the policy, ``addcmul_`` with a 0-dim fp64 coefficient on the parameter's device
    (``-lr · wd``, or ``0`` where skipped, built from the flag without a host read), so that a step that
    skips nothing rounds exactly as one without the flag. It equals the reference's
    ``add_(W, alpha=-lr · wd)`` bit for bit in fp32/fp64 (tested); in bf16/fp16 ATen's scalar tail loops of
    the two ops may round the last elements of a thread's range differently.
    """
    if skip is None:
        coefficient = torch.full((), -lr * weight_decay, dtype=torch.float64, device=param.device)
    else:
        coefficient = skip.logical_not().to(torch.float64).mul_(-lr * weight_decay)
    param.addcmul_(param, coefficient)


def _update_moments_foreach_(
    lowranks: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    beta1: float,
    beta2: float,
    skips: list[Tensor] | None,
) -> None:
    """The moment update of the ``foreach`` implementation (``torch._foreach_*``, whose CPU ops round a
    scalar to the tensors' dtype first, unlike the single-tensor ops). With skip flags the same in-place
    foreach ops run on a copy, one tensor at a time (one moment-sized temporary, as
    :func:`lowrank_optim.ops.adam.update_moments_`), and the result is kept where no flag is set."""
    if skips is None:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, lowranks, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, lowranks, lowranks, value=1.0 - beta2)
        return
    for lowrank, exp_avg, exp_avg_sq, skip in zip(lowranks, exp_avgs, exp_avg_sqs, skips):
        # In place on a copy: the out-of-place foreach ops round their scalar differently.
        update = exp_avg.clone()
        torch._foreach_mul_([update], beta1)
        torch._foreach_add_([update], [lowrank], alpha=1.0 - beta1)
        exp_avg.copy_(torch.where(skip, exp_avg, update, out=update))
        update = exp_avg_sq.clone()
        torch._foreach_mul_([update], beta2)
        torch._foreach_addcmul_([update], [lowrank], [lowrank], value=1.0 - beta2)
        exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, update, out=update))


def _limit_residual(
    residual: Tensor, fira: FiraTerm, residual_norm: Tensor, *, first: bool, norm: Tensor | None, skip: Tensor | None
) -> Tensor:
    """Fira after ``S = (G - subtract · back(R)) · phi``, in place: the norm-growth limiter (``norm``: the
    whole matrix's ``||S||_F`` when ``S`` is a piece of it), ``residual_scale``, zero where skipped."""
    limit_norm_growth_(residual, residual_norm, gamma=fira.gamma, first=first, norm=norm, skip=skip)
    if fira.residual_scale != 1.0:
        residual.mul_(fira.residual_scale)
    if skip is not None:
        residual.masked_fill_(skip, 0.0)
    return residual


#: Weight and moment dtypes whose basis is orthonormal closely enough for the folded Fira update's norm
#: identity (a bf16/fp16 basis is orthonormal to ~1e-2 only).
_FOLDABLE_DTYPES = (torch.float32, torch.float64)


def _foldable_dtypes(param_dtype: torch.dtype, moment_dtype: torch.dtype) -> bool:
    """Whether a whole matrix of these dtypes takes Fira's folded update (``FiraAdamW``'s ``fold_residual``)."""
    return param_dtype in _FOLDABLE_DTYPES and moment_dtype in _FOLDABLE_DTYPES


def _foldable(param: Tensor, normalized: Tensor) -> bool:
    return _foldable_dtypes(param.dtype, normalized.dtype)


def _fira_folded(
    param: Tensor,
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    subspace: Subspace,
    fira: FiraTerm,
    scale: float,
    index: int,
    first: bool,
    step_size: float,
    skip: Tensor | None,
    fused: bool,
) -> None:
    """Fira's folded update of a whole fp32/fp64 matrix: the ``fira_folded_`` op, or, for dtypes it does not
    take (fp64 moments of fp32 weights), the same arithmetic as pure functions."""
    basis = subspace.right if subspace.side is Side.RIGHT else subspace.left
    assert basis is not None  # Fira projects one side, whose basis the subspace carries
    residual_norm = cast(Tensor, fira.residual_norms[index])  # a projected matrix's limiter state
    options: dict[str, Any] = dict(
        subtract=fira.subtract, scale=scale, residual_scale=fira.residual_scale, gamma=fira.gamma, first=first,
        step_size=step_size, skip=skip,
    )
    if grad.dtype == param.dtype and fira_folded_accepts(param.dtype, lowrank.dtype, basis.dtype):
        dim = 1 if subspace.side is Side.RIGHT else 0
        fira_folded_(param, grad, lowrank, normalized, basis, residual_norm, dim=dim, fused=fused, **options)
    else:
        fira_folded_update_(param, grad, lowrank, normalized, subspace, residual_norm, **options)


def _fira_residual(
    grad: Tensor,
    lowrank: Tensor,
    normalized: Tensor,
    subspace: Subspace,
    residual_norm: Tensor,
    fira: FiraTerm,
    *,
    first: bool,
    skip: Tensor | None,
    fused: bool,
) -> Tensor:
    """Fira's scaled, limited residual of a whole matrix, a new ``m x n`` tensor: the ``fira_residual_`` op
    on the fresh ``back(R)`` (which it overwrites), or, for dtypes the op does not take (fp16 weights,
    fp64 moments of fp32 weights; ``fused=True`` refuses them before the first step), the same steps as
    pure functions."""
    if not fira_residual_accepts(grad.dtype, lowrank.dtype):
        residual = fira_residual(grad, lowrank, normalized, subspace, subtract=fira.subtract)
        return _limit_residual(residual, fira, residual_norm, first=first, norm=None, skip=skip)
    back = project_back(lowrank.to(grad.dtype), subspace)
    return fira_residual_(
        grad,
        back,
        normalized,
        lowrank,
        residual_norm,
        dim=1 if subspace.side is Side.RIGHT else 0,
        subtract=fira.subtract,
        gamma=fira.gamma,
        first=first,
        scale=fira.residual_scale,
        skip=skip,
        fused=fused,
    )


def _install_projector(
    projection: Projection, new: list[Tensor], moments: tuple[Tensor, ...], rotation: list[Tensor] | None
) -> None:
    """Store a new projector (this process's pieces of it) in the projection's state tensors, after the
    moments (this process's pieces) are moved to the new coordinates: by the projector's ``keep`` rule
    (``moments`` given, ``rotation`` ``None``) or rotated (``rotation``: :func:`rotations`)."""
    if rotation is not None:
        rotate_moments_(moments[0], moments[1], projection.side, rotation)
    elif moments:
        projection.projector.follow_(moments, projection.tensors, new, projection.side)
    for stored, value in zip(projection.tensors, new):
        stored.copy_(value)


def _install_resized(
    old: Projection,
    resized: _Resized,
    new: list[Tensor],
    moments: tuple[Tensor, ...],
    rotation: list[Tensor] | None,
    *,
    fused: bool,
) -> None:
    """:func:`_install_projector` across a rank change (``rank="auto"``): the new projector goes into the
    rebuilt state (``resized``), and the old moments (``moments``, in the old coordinates; empty where
    they start at zero) into its new moments, rotated (``rotation``: ``r_old x r_new``) or carried by the
    projector's ``keep`` rule (:meth:`Projector.carry`)."""
    for stored, value in zip(resized.projection.tensors, new):
        stored.copy_(value)
    if not moments:
        return  # the rebuilt moments are zero, as a first refresh or "reset" wants
    if rotation is not None:
        values = list(rotated_moments(moments[0], moments[1], old.side, rotation))
    else:
        values = old.projector.carry(moments, old.tensors, new, old.side, resized.projection.rank)
    if resized.moments is not None:
        resized.moments.store_(values[0], values[1], fused=fused)
    else:
        resized.exp_avg.copy_(values[0])
        resized.exp_avg_sq.copy_(values[1])


def _count_skips(skip_counts: list[Tensor] | None, indices: list[int], skips: Mapping[int, Tensor | int | None]) -> None:
    """Add each skip to its tensor's counter, once per counter (the matrices of one flat partition share
    one, and one shared decision)."""
    if skip_counts is None:
        return
    counted: set[int] = set()
    for i in indices:
        skip = skips[i]
        if skip is not None and id(skip_counts[i]) not in counted:
            counted.add(id(skip_counts[i]))
            skip_counts[i].add_(skip)


def _refresh_due(
    due: list[int],
    grads: list[Tensor],
    projections: list[Projection | None],
    steps: list[int],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    moment_policy: str,
    skip_nonfinite: bool,
    on_nonfinite_refresh: Callable[[int, int, str], None],
    found_inf: Tensor | None,
    fused: bool,
    exchange: Exchange,
    quantized: list[QuantizedMoments | None],
    ranks: list[int | None],
    resize: Callable[[int, int], _Resized] | None,
) -> set[int]:
    """Refresh the projectors of the matrices ``due`` now; return those whose update must be skipped
    (their counter stays, so the refresh is retried at the next step): a refresh that met a NaN/Inf
    gradient with no projector to fall back on (or with ``nonfinite="skip"``), or every one when
    ``found_inf`` is set (read on the host: a refresh synchronizes anyway).

    The owner of each matrix (:meth:`Exchange.refresh_gradients`) computes the new projector from the
    whole gradient, and for ``moment_policy="rotate"`` the change of coordinates from the old subspace
    (:func:`~lowrank_optim.projection.rotations`); both reach every holder through
    :meth:`Exchange.share_projectors`. A projector that reads the one it replaces (a warm start, a seed
    chain), and ``rotate``, get the whole previous projector on the owner (:meth:`Exchange.gather_projectors`)."""
    # Looked up only at the matrices due, which are all projected.
    projected = cast("list[Projection]", projections)
    if found_inf is not None and bool(found_inf):  # a skipped step must not refresh the state either
        for index in due:
            on_nonfinite_refresh(index, steps[index], "deferred" if steps[index] == 0 else "skipped")
        return set(due)
    skipped = set()
    # One matrix at a time where nothing is bucketed: one new projector alive at a time.
    for chunk in [due] if exchange.batched else [[index] for index in due]:
        wholes, finite = exchange.refresh_gradients(chunk, [grads[index] for index in chunk])
        # The first refresh replaces placeholders: nothing to rotate (a seed chain still reads its start).
        rotate = {index: rotates(moment_policy, steps[index]) for index in chunk}
        # The rank each refresh computes at (rank="auto" may change it).
        target = {index: projected[index].rank if ranks[index] is None else cast(int, ranks[index]) for index in chunk}
        # What each refresh shares: the projector's tensors, then the rotations (refresh_specs).
        shared_specs = {
            index: refresh_specs(
                projected[index].projector, exchange.shape(index, grads[index]), target[index],
                projected[index].side, rotate[index], projected[index].rank,
            )
            for index in chunk
        }
        specs = {index: shared_specs[index][: len(projected[index].tensors)] for index in chunk}
        wanted = [i for i in chunk if rotate[i] or projected[i].projector.uses_previous]
        previous: dict[int, list[Tensor] | None] = dict.fromkeys(chunk)
        if wanted:
            # The stored projectors are at the current rank (a rank="auto" refresh may be about to change it).
            stored_specs = [_projector_specs(projected[i], exchange.shape(i, grads[i])) for i in wanted]
            gathered = exchange.gather_projectors(wanted, stored_specs, [projected[i].tensors for i in wanted])
            previous.update(zip(wanted, gathered))
        new: list[list[Tensor] | None] = []
        for index, whole, ok in zip(chunk, wholes, finite):
            if whole is None or not ok:
                new.append(None)
                continue
            projection = projected[index]
            shape = exchange.shape(index, grads[index])
            old = previous[index] if projection.projector.uses_previous else None
            tensors = projection.projector.refresh(
                whole, target[index], projection.side, old, fused=fused, first=steps[index] == 0
            )
            if rotate[index]:
                subspace = projection.projector.subspace
                # Gathered here: this process, which has the whole gradient, is the matrix's owner.
                before = cast("list[Tensor]", previous[index])
                tensors += rotations(
                    subspace(before, projection.side, shape, projection.rank, torch.float32, whole.device),
                    subspace(tensors, projection.side, shape, target[index], torch.float32, whole.device),
                )
            new.append(tensors)
        local = exchange.share_projectors(chunk, [shared_specs[index] for index in chunk], new, finite)
        for index, ok, pieces in zip(chunk, finite, local):
            step = steps[index]
            if not ok:
                if step == 0:  # no projector to fall back on yet: defer the first refresh to the next step
                    on_nonfinite_refresh(index, step, "deferred")
                    skipped.add(index)
                elif skip_nonfinite:
                    on_nonfinite_refresh(index, step, "skipped")
                    skipped.add(index)
                else:
                    on_nonfinite_refresh(index, step, "applied")
                continue
            if pieces is None:  # this process keeps no piece of the projector
                continue
            count = len(specs[index])
            projector_pieces, rotation = pieces[:count], (pieces[count:] if rotate[index] else None)
            # The first refresh finds zero moments, and "reset" zeroes them anyway: nothing to move.
            moves = step > 0 and moment_policy != "reset"
            moments = quantized[index]
            if moments is None:
                carried: tuple[Tensor, ...] = (exp_avgs[index], exp_avg_sqs[index]) if moves else ()
            else:  # the policy works on fp32 values, requantized below (a refresh is rare)
                carried = moments.load(fused=fused) if moves else ()
            if target[index] != projected[index].rank:
                assert resize is not None  # given with the ranks
                resized = resize(index, target[index])
                _install_resized(projected[index], resized, projector_pieces, carried, rotation, fused=fused)
                projections[index], quantized[index] = resized.projection, resized.moments
                exp_avgs[index], exp_avg_sqs[index] = resized.exp_avg, resized.exp_avg_sq
                continue
            _install_projector(projected[index], projector_pieces, carried, rotation)
            if moments is not None and carried:
                moments.store_(*carried, fused=fused)
            if step > 0 and moment_policy == "reset":
                if moments is None:
                    exp_avgs[index].zero_()
                    exp_avg_sqs[index].zero_()
                else:
                    moments.zero_()
    return skipped


def _projector_specs(projection: Projection, shape: tuple[int, int]) -> list[ProjectorTensor]:
    """The whole shapes of a matrix's projector tensors."""
    return projection.projector.tensors(cast("tuple[int, int]", tuple(shape)), projection.rank, projection.side)


def _galore_adamw_impl(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    projections: list[Projection | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    update_proj_gap: int,
    scale: float,
    moment_policy: str,
    skip_nonfinite: bool,
    on_nonfinite_refresh: Callable[[int, int, str], None],
    skip_counts: list[Tensor] | None,
    found_inf: Tensor | None,
    fira: FiraTerm | None,
    apollo: ApolloTerm | None,
    quantized: list[QuantizedMoments | None],
    ranks: list[int | None],
    resize: Callable[[int, int], _Resized] | None,
    fused: bool,
    foreach: bool,
    exchange: Exchange,
) -> None:
    """The one GaLore/Fira/DCT step, on local blocks, in phases; between phases ``exchange`` combines
    what the pieces of a matrix share (identities for whole tensors, see :mod:`.exchange`).

    1. refresh the projections due now (owner computes, holders install);  2. project each block and
    combine the partial projections into ``R``;  3. skip flags;  4. the moments and ``N`` (the
    ops, or ``torch._foreach_*`` batched over the group);  5. ``N`` (and ``R``) for each block,
    back-projection, Fira's residual (its norm combined over pieces), decay. ``foreach`` is never fused.

    :func:`galore_adamw` hands it the matrices one at a time where nothing is bucketed.
    """
    steps = [int(step_t.item()) for step_t in state_steps]
    due = [i for i, projection in enumerate(projections) if projection is not None and refresh_due(steps[i], update_proj_gap)]
    skipped: set[int] = set()
    if due:
        skipped = _refresh_due(
            due,
            grads,
            projections,
            steps,
            exp_avgs,
            exp_avg_sqs,
            moment_policy=moment_policy,
            skip_nonfinite=skip_nonfinite,
            on_nonfinite_refresh=on_nonfinite_refresh,
            found_inf=found_inf,
            fused=fused,
            exchange=exchange,
            quantized=quantized,
            ranks=ranks,
            resize=resize,
        )
    if skipped:
        # Matrices that share a step counter (one flat partition) are deferred together: the counter stays.
        shared = {id(state_steps[i]) for i in skipped}
        skipped = {i for i in range(len(params)) if id(state_steps[i]) in shared}
        _count_skips(skip_counts, sorted(skipped), {i: 1 for i in skipped})
    active = [i for i in range(len(params)) if i not in skipped]
    if not active:
        return

    # 2. R = project(G) as the moments hold it, in their dtype.
    projected = [i for i in active if projections[i] is not None]
    projection_of = cast("list[Projection]", projections)  # looked up only at the projected indices
    sides = [projection_of[i].side for i in projected]
    stored = [
        projection_of[i].projector.subspace(
            projection_of[i].tensors,
            sides[k],
            exchange.shape(i, grads[i]),
            projection_of[i].rank,
            grads[i].dtype,
            grads[i].device,
        )
        for k, i in enumerate(projected)
    ]
    specs = [_projector_specs(projection_of[i], exchange.shape(i, grads[i])) for i in projected]
    subspaces: dict[int, Subspace] = dict(zip(projected, exchange.subspaces(projected, specs, stored)))
    partials = [project(grads[i], subspaces[i]) for i in projected]
    lowranks: dict[int, Tensor] = dict(zip(projected, exchange.lowranks(projected, sides, partials)))
    for i in active:
        lowrank = lowranks.get(i, grads[i])
        dtype = torch.float32 if quantized[i] is not None else exp_avgs[i].dtype
        lowranks[i] = lowrank if lowrank.dtype == dtype else lowrank.to(dtype)

    # 3. Whether each update is skipped (decided on the device, alike for every piece of a matrix).
    skips: dict[int, Tensor | None]
    if skip_nonfinite:
        flags = exchange.flags(active, [nonfinite_flag(lowranks[i]) for i in active])
        skips = {i: flag if found_inf is None else flag.logical_or_(found_inf) for i, flag in zip(active, flags)}
    else:
        skips = {i: found_inf for i in active}
    _count_skips(skip_counts, active, skips)

    # 4. Moments and N = M / (sqrt(V) + eps).
    normalized: dict[int, Tensor] = {}
    for i in active:
        moments = quantized[i]
        if moments is not None:  # one fused op per tensor, whether or not the rest is foreach
            normalized[i] = moments.update_(lowranks[i], beta1, beta2, eps, skips[i], fused=fused)
    plain = [i for i in active if quantized[i] is None]
    if foreach and plain:
        moments_m = [exp_avgs[i] for i in plain]
        moments_v = [exp_avg_sqs[i] for i in plain]
        skip_flags = [skips[i] for i in plain]
        # All tensors or all None (step 3 decides them alike).
        _update_moments_foreach_(
            [lowranks[i] for i in plain],
            moments_m,
            moments_v,
            beta1,
            beta2,
            None if skip_flags[0] is None else cast("list[Tensor]", skip_flags),
        )
        denominators = torch._foreach_sqrt(moments_v)
        torch._foreach_add_(denominators, eps)
        for i, exp_avg, update in zip(plain, moments_m, denominators):
            # Divide per tensor into the denominator's buffer: no second list of temporaries, and the
            # same rounding as the single-tensor path.
            torch.div(exp_avg, update, out=update)
            skip = skips[i]
            if skip is not None:
                update.masked_fill_(skip, 0.0)
            normalized[i] = update
    elif not foreach:
        for i in plain:
            normalized[i] = lowrank_adam_(
                lowranks[i], exp_avgs[i], exp_avg_sqs[i], torch.empty_like(exp_avgs[i]), beta1, beta2, eps, skips[i], fused=fused
            )
    for step_t in {id(state_steps[i]): state_steps[i] for i in active}.values():
        step_t += 1

    # 5. The update of each block: W -= step · (scale · back(N) [+ Fira's residual]), then decay.
    n_blocks, r_blocks = exchange.block_terms(
        projected,
        sides,
        [normalized[i] for i in projected],
        None if fira is None and apollo is None else [lowranks[i] for i in projected],
    )
    block_n = dict(zip(projected, n_blocks))
    block_r: dict[int, Tensor] = {} if r_blocks is None else dict(zip(projected, r_blocks))
    step_sizes = {i: _step_size(lr, beta1, beta2, steps[i] + 1, correct_bias) for i in active}
    split_residuals: dict[int, Tensor] = {}
    for i in active:
        param, subspace = params[i], subspaces.get(i)
        if subspace is None:
            param.add_(normalized[i], alpha=-step_sizes[i])
        elif apollo is not None:
            continue  # below, with the collectives its norms need
        elif fira is None:
            add_project_back_(param, block_n[i], subspace, alpha=-step_sizes[i] * scale)
        elif exchange.whole(i) and fira.fold and _foldable(param, block_n[i]):
            _fira_folded(
                param, grads[i], block_r[i], block_n[i], subspace, fira, scale, i, steps[i] == 0, step_sizes[i], skips[i], fused
            )
        elif exchange.whole(i):
            residual = _fira_residual(
                grads[i],
                block_r[i],
                block_n[i],
                subspace,
                cast(Tensor, fira.residual_norms[i]),  # a projected matrix's limiter state
                fira,
                first=steps[i] == 0,
                skip=skips[i],
                fused=fused,
            )
            # The reference adds back(N)·alpha + S first and applies it in one step; so do we.
            param.add_(add_project_back_(residual, block_n[i], subspace, alpha=scale), alpha=-step_sizes[i])
        else:
            split_residuals[i] = fira_residual(grads[i], block_r[i], block_n[i], subspace, subtract=fira.subtract)
    if apollo is not None:  # every process calls it, whether or not it holds a split matrix
        _apollo_updates_(
            projected, params, grads, (block_n, block_r), (normalized, lowranks), dict(zip(projected, sides)), apollo,
            steps=steps, step_sizes=step_sizes, skips=skips, exchange=exchange,
        )
    if fira is not None:  # every process calls it, whether or not it holds a split matrix
        # A matrix split over processes: ||S||_F from every piece's sum of squares, then the same limiter.
        indices = list(split_residuals)
        norms = exchange.residual_norms(indices, [split_residuals[i] for i in indices])
        for i, norm in zip(indices, norms):
            residual_norm = cast(Tensor, fira.residual_norms[i])  # a projected matrix's limiter state
            residual = _limit_residual(split_residuals[i], fira, residual_norm, first=steps[i] == 0, norm=norm, skip=skips[i])
            update = add_project_back_(residual, block_n[i], subspaces[i], alpha=scale)
            params[i].add_(update, alpha=-step_sizes[i])
    if weight_decay > 0.0:
        for i in active:
            _decay_(params[i], lr, weight_decay, skips[i])
    exchange.finish()


def matrix_rank(group: dict[str, Any], shape: Sequence[int], state: Mapping[str, Any] | None = None) -> int:
    """The rank a projected matrix of whole ``shape`` has now: ``min(rank, m, n)``, or in a ``rank="auto"``
    group the one its state records (0 before its first refresh, :mod:`lowrank_optim.optim.ranks`)."""
    if group["rank"] == AUTO:
        return _stored_rank(state) or 0
    return effective_rank(group["rank"], tuple(shape))


def _stored_rank(state: Mapping[str, Any] | None) -> int | None:
    """The ``matrix_rank`` a (saved) state records, or ``None``."""
    return None if state is None else state.get(MATRIX_RANK)


def _moment_placement(group: dict[str, Any], shape: Sequence[int], rank: int | None = None) -> tuple[tuple[int, ...], str]:
    """The whole shape of a parameter's moments in ``group`` and how they line up with it
    (``optim.layout.SHARDINGS``): the low-rank gradient's (``r x n`` along the columns for a left
    projection, ``m x r`` along the rows for a right one), or the parameter's own. ``rank``: the matrix's
    current rank in a ``rank="auto"`` group (its ``matrix_rank``)."""
    whole = tuple(shape)
    if "rank" not in group:
        return whole, "rows"
    side = resolve_side(group["proj_type"], whole)
    rank = matrix_rank(group, whole) if rank is None else rank
    sharding = {Side.RIGHT: "rows", Side.LEFT: "columns", Side.FULL: "replicated"}[side]
    return tuple(lowrank_shape(whole, rank, side)), sharding


#: ``scoring`` was not given (``None`` is a value, and refused).
_NOT_GIVEN: Any = object()


def group_projector(projector: Any, scoring: Any = _NOT_GIVEN, where: str = "") -> Projector:
    """The projector of a param group (or of the defaults): ``projector`` resolved
    (:func:`~lowrank_optim.projection.resolve_projector`), with ``scoring`` (the optimizers' argument
    from before projectors were objects) set on a projector given by name that has that option. A
    ``scoring`` other than ``"auto"`` next to a projector without that option, or next to a projector
    object whose own differs, is refused rather than ignored."""
    resolved = resolve_projector(projector, where)
    if scoring is _NOT_GIVEN:
        return resolved
    if scoring not in DCT_SCORING:
        raise ValueError(f"Invalid scoring{where}: {scoring!r}. Must be one of {', '.join(DCT_SCORING)}.")
    own = getattr(resolved, "scoring", None)
    if scoring == "auto" or scoring == own:
        if isinstance(projector, Projector) or own is None:
            return resolved
        # own is not None: a projector class with a scoring field, which the base class Projector lacks.
        return dataclasses.replace(resolved, scoring=scoring)  # type: ignore[call-arg]
    if own is None:
        raise ValueError(
            f"Invalid scoring{where}: {scoring!r}. The {resolved.name!r} projector has no scoring option "
            "(scoring applies to projector='dct')."
        )
    if isinstance(projector, Projector):
        raise ValueError(
            f"Invalid scoring{where}: {scoring!r} contradicts the projector's own scoring {own!r}: set it on "
            "the projector only."
        )
    # own is not None: a projector class with a scoring field, which the base class Projector lacks.
    return dataclasses.replace(resolved, scoring=scoring)  # type: ignore[call-arg]


def _projectors_to_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict()`` post-hook: each group's projector as plain values."""
    for group in state_dict["param_groups"]:
        if isinstance(group.get("projector"), Projector):
            group["projector"] = group["projector"].to_state()
        if isinstance(group.get("moment_format"), MomentFormat):
            group["moment_format"] = group["moment_format"].to_state()
    return state_dict


def _projectors_from_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``load_state_dict()`` pre-hook: the saved groups' projectors (and the ``scoring`` key of older
    state dicts) as projector objects; the caller's dict is not modified."""
    groups = []
    for index, group in enumerate(state_dict["param_groups"]):
        group = dict(group)
        if "projector" in group or "scoring" in group:
            group["projector"] = group_projector(
                group.get("projector", optimizer.defaults["projector"]),
                group.pop("scoring", _NOT_GIVEN),
                f" in saved param group {index}",
            )
        if "moment_format" in group:
            group["moment_format"] = resolve_moment_format(group["moment_format"], f" in saved param group {index}")
        groups.append(group)
    return {**state_dict, "param_groups": groups}
