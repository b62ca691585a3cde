"""SLTrain sparse-plus-low-rank linear layers (Han et al., arXiv 2406.02214) and model conversion.

A layer holds ``W = s · B A + S`` without ever storing the dense ``W``: ``B`` (``out x r``), ``A``
(``r x in``), ``s = alpha / r`` (or ``tanh`` of a learnable scalar), and ``S``, zero except at a fixed
random support of ``floor(delta · out · in)`` flat positions that hold the trainable ``values``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..ops import sddmm, sparse_gather, sparse_row_pointers, sparse_scatter_add_, spmm_add_, spmm_t_add_
from ..targets import DEFAULT_TARGET_MODULES, find_targets

__all__ = [
    "DEFAULT_ALPHA",
    "PATHS",
    "SPARSE_FLOP_COST",
    "ConversionReport",
    "SLTrainLinear",
    "balanced_factors",
    "check_support",
    "convert_to_sltrain",
    "derive_seed",
    "index_dtype_for",
    "path_costs",
    "refactorize_",
    "sample_support",
]

# Reference CLI default (`--lora_alpha 32`), also the published LLaMA-60M recipe (r=128 → s=0.25).
DEFAULT_ALPHA = 32.0
# The reference starts the learnable scale's pre-activation at 1.0, i.e. s = tanh(1) ≈ 0.7616.
TRAINABLE_SCALE_INIT = 1.0
_NAMES_SHOWN_IN_ERRORS = 8
#: convert_to_sltrain's ``init``: the reference init (pretraining) or from the dense weight.
_INITS: tuple[str, ...] = ("reference", "dense")
#: SLTrainLinear's ``path``: chosen per call by :func:`path_costs`, or always one of the two.
PATHS: tuple[str, ...] = ("auto", "dense", "factored")
#: The cost rule's ``kappa``: the time of one multiply-add of the compiled sparse kernels (``spmm_add_``,
#: ``spmm_t_add_``, ``sddmm``) over the time of one multiply-add of a dense GEMM, by (device type, dtype),
#: as bench/bench_sltrain_layer.py measures it: the median over its three shapes on this project's 2-core
#: AVX-512 machine (fp32: 4.39, 5.21, 6.63; bf16: 28.76, 31.62, 58.59, where the GEMMs run on AMX and the
#: kernels compute in fp32). Where a pair has no entry (CUDA: its kernels have not been measured; fp64,
#: fp16), or its device has no compiled sparse kernels, ``path="auto"`` runs the dense path.
SPARSE_FLOP_COST: dict[tuple[str, torch.dtype], float] = {
    ("cpu", torch.float32): 5.21,
    ("cpu", torch.bfloat16): 31.62,
}


def index_dtype_for(numel: int) -> torch.dtype:
    """``int32`` when every flat index of a ``numel``-element matrix fits (numel < 2³¹), else ``int64``."""
    return torch.int32 if numel < 2**31 else torch.int64


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta!r} is outside the allowed range (0, 1)")


def _check_rank(rank: int, in_features: int, out_features: int, module_name: str | None = None) -> None:
    limit = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        where = f"module {module_name!r} " if module_name is not None else ""
        raise ValueError(
            f"rank={rank!r} is outside the allowed range [1, min(in_features, out_features)] = [1, {limit}] "
            f"for {where}in_features={in_features}, out_features={out_features}"
        )


def _make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError(f"pass seed or generator, not both (got seed={seed!r} and a generator)")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator.device={generator.device}; a CPU generator is required")
    if seed is None:
        return generator
    return torch.Generator().manual_seed(seed)


def support_size(out_features: int, in_features: int, delta: float) -> int:
    """``nnz = int(delta · out · in)``, the number of sparse entries, exactly as the reference computes it."""
    return int(delta * (out_features * in_features))  # delta · total, in this order: float products differ


def sample_support(
    out_features: int, in_features: int, delta: float, generator: torch.Generator | None = None
) -> Tensor:
    """Sorted flat row-major indices of ``int(delta · out · in)`` entries drawn uniformly without replacement.

    Drawn on the CPU from ``generator`` (the global CPU generator when None), so the same seed gives the
    same support on every rank and device. ``nnz`` is ``int(delta · total)`` exactly as the reference
    computes it. Memory is one transient ``out·in`` permutation in the index dtype (:func:`index_dtype_for`).
    """
    _check_delta(delta)
    total = out_features * in_features
    nnz = support_size(out_features, in_features, delta)
    permutation = torch.randperm(total, generator=generator, dtype=index_dtype_for(total))
    return permutation[:nnz].sort().values


def check_support(indices: Any, out_features: int, in_features: int, nnz: int, where: str = "support") -> None:
    """Refuse ``indices`` unless it is a support :func:`sample_support` could have drawn for this shape.

    That is: a 1-D ``int32``/``int64`` tensor of exactly ``nnz`` strictly increasing (sorted, unique)
    flat indices in ``[0, out_features · in_features)``. Raises ``ValueError`` naming ``where``, the
    first offending entry and what is allowed. One pass over the indices, on their device.
    """
    total = out_features * in_features
    if not isinstance(indices, Tensor):
        raise ValueError(f"{where}: expected a tensor of flat indices, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: dtype {indices.dtype}; allowed: torch.int32, torch.int64")
    if indices.dim() != 1:
        raise ValueError(f"{where}: shape {tuple(indices.shape)}; must be 1-D")
    if indices.numel() != nnz:
        raise ValueError(
            f"{where}: {indices.numel()} entries; this layer has nnz={nnz} "
            f"(int(delta · out_features · in_features) for {out_features} x {in_features})"
        )
    if nnz == 0 or indices.is_meta:  # a meta tensor has no values to check
        return
    wide = indices.long()
    outside = (wide < 0) | (wide >= total)
    if bool(outside.any()):
        position = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"{where}: entry {position} is {int(wide[position])}, outside the allowed range [0, {total}) "
            f"of a {out_features} x {in_features} weight"
        )
    not_increasing = wide[1:] <= wide[:-1]
    if bool(not_increasing.any()):
        position = int(not_increasing.nonzero()[0, 0]) + 1
        raise ValueError(
            f"{where}: entry {position} is {int(wide[position])} after {int(wide[position - 1])}; a support "
            "must be strictly increasing (sorted, without repeats)"
        )


def derive_seed(base_seed: int, name: str) -> int:
    """A stable 63-bit seed for the module ``name`` (independent of Python's per-process ``hash`` salt)."""
    digest = hashlib.blake2b(f"{base_seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _dense_weight(B: Tensor, A: Tensor, values: Tensor, indices: Tensor, scale: float | Tensor) -> Tensor:
    """``s·B A + scatter(values)``; ``indices`` is a support the layer has checked (check_support), so the
    kernels skip their own per-call check (on CUDA a host synchronization)."""
    # Scale the smaller factor rather than the out x in product: a temporary of min(out, in)·r entries.
    weight = torch.mm(B * scale, A) if B.shape[0] <= A.shape[1] else torch.mm(B, A * scale)
    sparse_scatter_add_(weight, indices, values, check_indices=False)
    return weight


class _SparsePlusLowRankLinear(torch.autograd.Function):
    """``y = x Wᵀ + bias`` with ``W = s·B A + scatter(values)``, storing only ``x`` and the factors.

    Backward, with ``G`` the output gradient and ``X`` the input, both flattened over batch dims:
    ``dX = G W``, ``dW = Gᵀ X`` (formed once), ``dB = s·dW Aᵀ``, ``dA = s·Bᵀ dW``,
    ``d values = dW[support]``, ``ds = <Bᵀ dW, A>``, ``d bias = Σ G``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        B: Tensor,
        A: Tensor,
        values: Tensor,
        indices: Tensor,
        scale: float | Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        output = F.linear(x, _dense_weight(B, A, values, indices, scale), bias)
        # The dense weight is deliberately not saved: backward rebuilds it (one GEMM) instead of keeping
        # an out x in tensor alive per layer between forward and backward.
        scale_tensor = scale if isinstance(scale, Tensor) else None
        ctx.save_for_backward(x, B, A, values, indices, scale_tensor)
        ctx.scale_float = None if isinstance(scale, Tensor) else scale
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, B, A, values, indices, scale_tensor = ctx.saved_tensors
        scale = scale_tensor if scale_tensor is not None else ctx.scale_float
        need_x, need_B, need_A, need_values, _, need_scale, need_bias = ctx.needs_input_grad
        grad_out_2d = grad_output.reshape(-1, B.shape[0])

        # Order: input gradient first, then the weight gradient. Either order keeps exactly one dense
        # out x in matrix alive at a time (W, then dW); doing dX first lets the allocator hand W's
        # freed block straight to dW, and the small parameter gradients are created last.
        grad_x = None
        if need_x:
            weight = _dense_weight(B, A, values, indices, scale)
            grad_x = torch.mm(grad_out_2d, weight).view(x.shape)
            del weight

        grad_B = grad_A = grad_values = grad_scale = None
        if need_B or need_A or need_values or need_scale:
            grad_weight = torch.mm(grad_out_2d.t(), x.reshape(-1, A.shape[1]))
            if need_B:
                grad_B = torch.mm(grad_weight, A.t()).mul_(scale)
            if need_A or need_scale:
                bt_grad_weight = torch.mm(B.t(), grad_weight)
                if need_scale:
                    grad_scale = (bt_grad_weight * A).sum()
                if need_A:
                    grad_A = bt_grad_weight.mul_(scale)
            if need_values:
                grad_values = sparse_gather(grad_weight, indices, check_indices=False)
            del grad_weight

        grad_bias = grad_out_2d.sum(0) if need_bias else None
        return grad_x, grad_B, grad_A, grad_values, None, grad_scale, grad_bias


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _FactoredSparsePlusLowRankLinear(torch.autograd.Function):
    """``y = s·(x Aᵀ) Bᵀ + x Sᵀ + bias``: the same function as :class:`_SparsePlusLowRankLinear`, never
    forming an ``out x in`` matrix. ``row_ptr`` is :func:`~lowrank_optim.ops.sparse_row_pointers` of the
    (checked, strictly increasing) support.

    With ``X`` the input (``T x n``, batch dims flattened), ``G`` the output gradient (``T x m``),
    ``H = X Aᵀ`` and ``P = G B`` (both ``T x r``):

    - forward: ``y = s·H Bᵀ + bias`` (two GEMMs, the bias fused into the second), then ``y += X Sᵀ``
      (:func:`~lowrank_optim.ops.spmm_add_`);
    - backward: ``dX = s·P A + G S`` (GEMM, then :func:`~lowrank_optim.ops.spmm_t_add_`), ``dA = s·Pᵀ X``,
      ``dB = s·Gᵀ H``, ``d values[k] = Σ_t G[t, r_k] X[t, c_k]`` (:func:`~lowrank_optim.ops.sddmm`),
      ``ds = <P, H>`` (``= <Bᵀ Gᵀ X, A>``, the dense path's formula), ``d bias = Σ_t G``.

    Saved for backward: ``x`` and the factors (``B``, ``A``, ``values``, the support, ``row_ptr``); ``H`` is
    recomputed (one ``T·n·r`` GEMM) rather than kept. Backward's transients: ``P`` and ``H`` (``T x r``
    each), ``dX`` (``T x n``), the parameter gradients, and the CPU kernels' scratch: per thread a token
    tile (64 tokens x ``max(in, out)`` fp32 values) and, from 256 tokens, a transposed copy of the support
    for ``spmm_t_add_`` (``nnz`` indices and values).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        B: Tensor,
        A: Tensor,
        values: Tensor,
        indices: Tensor,
        row_ptr: Tensor,
        scale: float | Tensor,
        bias: Tensor | None,
    ) -> Tensor:
        out_features, in_features = B.shape[0], A.shape[1]
        inputs = x.reshape(-1, in_features)
        hidden = torch.mm(inputs, A.t())
        # Scale the smaller of H (T x r) and B (out x r); H is this function's own temporary.
        if hidden.shape[0] <= out_features:
            left, right = hidden.mul_(scale), B.t()
        else:
            left, right = hidden, (B * scale).t()
        output = torch.mm(left, right) if bias is None else torch.addmm(bias, left, right)
        spmm_add_(output, inputs, values, indices, row_ptr, check_indices=False)
        scale_tensor = scale if isinstance(scale, Tensor) else None
        ctx.save_for_backward(x, B, A, values, indices, row_ptr, scale_tensor)
        ctx.scale_float = None if isinstance(scale, Tensor) else scale
        return output.view(*x.shape[:-1], out_features)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, B, A, values, indices, row_ptr, scale_tensor = ctx.saved_tensors
        scale = scale_tensor if scale_tensor is not None else ctx.scale_float
        need_x, need_B, need_A, need_values, _, _, need_scale, need_bias = ctx.needs_input_grad
        out_features, in_features = B.shape[0], A.shape[1]
        grad_out_2d = grad_output.reshape(-1, out_features)
        inputs = x.reshape(-1, in_features)

        projected = torch.mm(grad_out_2d, B) if need_x or need_A or need_scale else None  # P = G B
        hidden = torch.mm(inputs, A.t()) if need_B or need_scale else None  # H = X Aᵀ, recomputed
        grad_scale = None
        if need_scale:
            assert projected is not None and hidden is not None and scale_tensor is not None
            accumulate = _accumulate_dtype(projected.dtype)
            grad_scale = torch.sum(projected * hidden, dtype=accumulate).to(scale_tensor.dtype)

        grad_x = grad_A = grad_B = None
        if need_x or need_A:
            assert projected is not None
            projected.mul_(scale)  # s·P, in place: P is no longer needed unscaled
            if need_x:
                grad_x_2d = torch.mm(projected, A)
                spmm_t_add_(grad_x_2d, grad_out_2d, values, indices, row_ptr, check_indices=False)
                grad_x = grad_x_2d.view(x.shape)
            if need_A:
                grad_A = torch.mm(projected.t(), inputs)
        del projected
        if need_B:
            assert hidden is not None
            grad_B = torch.mm(grad_out_2d.t(), hidden.mul_(scale))
        del hidden
        grad_values = sddmm(grad_out_2d, inputs, indices, row_ptr, check_indices=False) if need_values else None
        grad_bias = grad_out_2d.sum(0) if need_bias else None
        return grad_x, grad_B, grad_A, grad_values, None, None, grad_scale, grad_bias


def path_costs(
    tokens: int, in_features: int, out_features: int, rank: int, nnz: int, *, sparse_flop_cost: float
) -> tuple[float, float]:
    """``(dense, factored)``: the GEMM-equivalent multiply-adds of one SLTrainLinear forward+backward on each path.

    With ``T`` tokens, ``m x n`` = ``out x in``, rank ``r`` and ``kappa = sparse_flop_cost`` (the time of a
    sparse kernel's multiply-add in units of a GEMM's, :data:`SPARSE_FLOP_COST`):

    - dense: compose ``W`` (``m·n·r``), ``x Wᵀ`` (``T·m·n``), compose again, ``dX = G W`` and ``dW = Gᵀ X``
      (``2·T·m·n``), ``dB = dW Aᵀ`` and ``dA = Bᵀ dW`` (``2·m·n·r``): ``4·m·n·r + 3·T·m·n``;
    - factored: ``H = X Aᵀ``, ``H Bᵀ``, ``P = G B``, ``P A``, ``Pᵀ X``, ``H`` again and ``Gᵀ H``
      (``T·r·(3m + 4n)``), and ``X Sᵀ``, ``G S`` and the SDDMM (``3·kappa·T·nnz``).

    The factored cost grows with ``T`` from zero, the dense one starts at the two compositions'
    ``4·m·n·r``: the factored path is cheaper below ``T* = 4·m·n·r / (r·(3m + 4n) + 3·kappa·nnz − 3·m·n)``
    tokens, and at every ``T`` when that denominator is not positive (rank and density low enough).
    """
    m, n, r, t = out_features, in_features, rank, tokens
    kappa = sparse_flop_cost
    return 4.0 * m * n * r + 3.0 * t * m * n, t * (r * (3.0 * m + 4.0 * n) + 3.0 * kappa * nnz)


def _check_path(path: object) -> str:
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path={path!r}; allowed: {', '.join(repr(choice) for choice in PATHS)}")
    return path


def _has_compiled_sparse_kernels(device: torch.device) -> bool:
    """Whether the factored path's three ops have a compiled kernel for ``device`` (not only the defaults)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_optim::{op}", key)
        for op in ("spmm_add_", "spmm_t_add_", "sddmm")
    )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs a linear layer in on ``device_type`` now, or None when it is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


class SLTrainLinear(nn.Module):
    """Linear layer with weight ``W = s · B A + S`` (SLTrain, arXiv 2406.02214).

    - ``B`` (``out x rank``) starts at zero; ``A`` (``rank x in``) and the sparse ``values`` start
      uniform in ``±1/sqrt(in)``; ``bias`` (if any) uniform in ``±1/sqrt(out)`` — the reference init,
      so a fresh layer computes ``x Sᵀ``.
    - ``S`` is zero except at ``indices``: ``int(delta · out · in)`` sorted flat row-major positions
      drawn uniformly without replacement (:func:`sample_support`), fixed for life, a persistent buffer
      in ``int32`` below 2³¹ entries (else ``int64``). Draw order from the generator: support, ``A``,
      ``values``, ``bias``.
    - ``s = alpha / rank`` (default ``alpha`` = :data:`DEFAULT_ALPHA`). With ``trainable_scale=True``,
      ``s = tanh(scale_raw)`` for a learnable scalar ``scale_raw`` initialised to 1.0 (as the
      reference's ``trainable_scaling``), and ``alpha`` must be left unset. ``S`` is never scaled.

    Pass ``seed`` or a CPU ``generator`` to make the layer reproducible and identical on every rank;
    with neither, the global CPU generator is used.

    ``path`` (also settable later, ``layer.path = ...``) says how ``y = x Wᵀ + bias`` is computed; both
    paths compute the same function (to the rounding of the dtype) and save only ``x`` and the factors:

    - ``"dense"``: compose the dense ``W`` in forward and again in backward (the reference design), form
      ``dW = Gᵀ X`` once and derive the gradients of ``B``, ``A`` and ``values`` from it; two ``out x in``
      transients (``W``, then ``dW``);
    - ``"factored"``: ``y = s·(x Aᵀ) Bᵀ + x Sᵀ`` with the sparse kernels of :mod:`lowrank_optim.ops.spmm`;
      no ``out x in`` matrix at all (:class:`_FactoredSparsePlusLowRankLinear`);
    - ``"auto"`` (default): per training call, the cheaper by :func:`path_costs` for the call's tokens,
      with ``kappa`` from :data:`SPARSE_FLOP_COST` for the device and dtype; the dense path where there is
      no measured ``kappa`` or no compiled sparse kernel, and when no gradient is needed (evaluation: the
      layer then computes bit for bit what its :func:`merge_sltrain` export computes) (:meth:`path_for`).

    Under ``torch.autocast`` the layer casts its input and parameters (floating, not fp64) to the autocast
    dtype, as autocast casts a linear layer's operands, and runs in that dtype (gradients flow back to the
    parameters in their own dtype).
    """

    indices: Tensor
    #: The layer type :func:`merge_sltrain` gives back when it is not ``nn.Linear`` (set by
    #: :func:`convert_to_sltrain` for a Conv1D; not part of the state dict).
    merges_to: type | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        delta: float = 0.03,
        alpha: float | None = None,
        bias: bool = False,
        trainable_scale: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        path: str = "auto",
    ) -> None:
        super().__init__()
        _check_path(path)
        _check_rank(rank, in_features, out_features)
        _check_delta(delta)
        if trainable_scale and alpha is not None:
            raise ValueError(f"alpha={alpha!r} is unused with trainable_scale=True (s = tanh(scale_raw)); leave it None")
        if alpha is None and not trainable_scale:
            alpha = DEFAULT_ALPHA
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha={alpha!r} is outside the allowed range (0, inf)")
        generator = _make_generator(seed, generator)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}

        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.delta = delta
        self.alpha = alpha
        # On the meta device (shapes only, e.g. for the memory estimator) nothing is sampled: drawing
        # the support costs an out x in permutation on the CPU.
        meta = torch.empty(0, device=device).is_meta
        if meta:
            total = out_features * in_features
            indices = torch.empty(support_size(out_features, in_features, delta), dtype=index_dtype_for(total), device="meta")
        else:
            indices = sample_support(out_features, in_features, delta, generator).to(device)
        self.register_buffer("indices", indices)
        self._support_checked: tuple | None = None  # see _checked_indices
        self._row_ptr: Tensor | None = None  # the support's row pointer, derived once per checked support
        self._path = path
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.values = nn.Parameter(torch.empty(self.indices.numel(), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.scale_raw = nn.Parameter(torch.empty((), **factory)) if trainable_scale else None
        if not meta:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Reference init of ``B``, ``A``, ``values``, ``bias`` and ``scale_raw``; the support is kept.

        Random draws happen on the CPU in fp32 (then are copied), so a seed gives the same numbers on
        every device and dtype.
        """

        def uniform(shape: Sequence[int], bound: float) -> Tensor:
            return torch.empty(shape).uniform_(-bound, bound, generator=generator)

        self.B.zero_()
        self.A.copy_(uniform(self.A.shape, 1.0 / math.sqrt(self.in_features)))
        self.values.copy_(uniform(self.values.shape, 1.0 / math.sqrt(self.in_features)))
        if self.bias is not None:
            self.bias.copy_(uniform(self.bias.shape, 1.0 / math.sqrt(self.out_features)))
        if self.scale_raw is not None:
            self.scale_raw.fill_(TRAINABLE_SCALE_INIT)

    @property
    def scale(self) -> float | Tensor:
        """``s``: ``alpha / rank``, or ``tanh(scale_raw)`` (a differentiable 0-d tensor) when trainable."""
        if self.scale_raw is not None:
            return torch.tanh(self.scale_raw)
        assert self.alpha is not None  # set by __init__ whenever the scale is fixed
        return self.alpha / self.rank

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The support is a buffer, so torch would copy any integer tensor of the right length into it;
        # a bad one would make every forward raise (or, unsorted, silently run slower). Refuse it here,
        # before this layer's tensors are touched: reported as torch reports a shape mismatch (collected,
        # then raised by load_state_dict as one RuntimeError), with this layer left as it was.
        key = prefix + "indices"
        if key in state_dict:
            try:
                check_support(
                    state_dict[key], self.out_features, self.in_features, self.values.numel(), where=f"state_dict[{key!r}]"
                )
            except ValueError as error:
                error_msgs.append(str(error))
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _checked_indices(self) -> Tensor:
        """The support, checked (:func:`check_support`) whenever it is a tensor not seen before or was
        changed in place since (its version counter moved): the sparse kernels then skip their per-call
        check. A support drawn by :func:`sample_support` is valid by construction, and is checked once
        on its device at the first forward anyway."""
        indices = self.indices
        seen = (id(indices), indices._version, indices.data_ptr(), indices.device)
        if seen != self._support_checked:
            check_support(indices, self.out_features, self.in_features, self.values.numel(), where="SLTrainLinear.indices")
            self._support_checked = seen
            self._row_ptr = None  # belongs to the support seen before
        return indices

    def _row_pointers(self, indices: Tensor) -> Tensor:
        """:func:`~lowrank_optim.ops.sparse_row_pointers` of the checked support, cached with the check
        (recomputed whenever :meth:`_checked_indices` checks a support again)."""
        if self._row_ptr is None:
            if indices.is_meta:
                self._row_ptr = torch.empty(self.out_features + 1, dtype=indices.dtype, device=indices.device)
            else:
                self._row_ptr = sparse_row_pointers(indices, self.out_features, self.in_features)
        return self._row_ptr

    @property
    def path(self) -> str:
        """``"auto"``, ``"dense"`` or ``"factored"`` (see the class docstring); validated when set."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path = _check_path(value)

    def path_for(
        self, tokens: int, *, backward: bool, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> str:
        """The path a call with ``tokens`` tokens (``x.numel() // in_features``) runs on ``device`` in
        ``dtype``, ``backward`` saying whether a gradient will be computed: :attr:`path` unless it is
        ``"auto"``; then ``"factored"`` when a backward follows, the device has compiled sparse kernels and
        :func:`path_costs` says it is cheaper with the ``kappa`` of :data:`SPARSE_FLOP_COST`, else
        ``"dense"``."""
        if self._path != "auto":
            return self._path
        device = torch.device(device)
        kappa = SPARSE_FLOP_COST.get((device.type, dtype))
        if not backward or kappa is None or not _has_compiled_sparse_kernels(device):
            return "dense"
        dense, factored = path_costs(
            tokens, self.in_features, self.out_features, self.rank, self.values.numel(), sparse_flop_cost=kappa
        )
        return "factored" if factored < dense else "dense"

    def forward(self, x: Tensor) -> Tensor:
        indices = self._checked_indices()
        B: Tensor = self.B
        A: Tensor = self.A
        values: Tensor = self.values
        bias: Tensor | None = self.bias
        scale = self.scale
        autocast_dtype = _autocast_dtype(x.device.type)
        if autocast_dtype is not None:
            # What autocast does to a linear layer's operands: floating tensors other than fp64 are cast
            # (differentiably: their gradients come back in their own dtype); the layer then runs with
            # autocast off, so that its own matmuls run on exactly these dtypes in forward and backward.
            def cast(tensor: Tensor) -> Tensor:
                eligible = tensor.is_floating_point() and tensor.dtype != torch.float64
                return tensor.to(autocast_dtype) if eligible else tensor

            x, B, A, values = cast(x), cast(B), cast(A), cast(values)
            bias = cast(bias) if bias is not None else None
            with torch.autocast(x.device.type, enabled=False):
                return self._run(x, B, A, values, indices, scale, bias)
        return self._run(x, B, A, values, indices, scale, bias)

    def _run(
        self, x: Tensor, B: Tensor, A: Tensor, values: Tensor, indices: Tensor, scale: float | Tensor, bias: Tensor | None
    ) -> Tensor:
        if x.dtype != B.dtype:
            raise TypeError(
                f"SLTrainLinear: input dtype {x.dtype} differs from the parameters' dtype {B.dtype}; cast the input "
                "(or the layer), or run it under torch.autocast"
            )
        operands = (x, B, A, values, bias, scale if isinstance(scale, Tensor) else None)
        backward = torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in operands)
        tokens = x.numel() // self.in_features if self.in_features else 0
        if self.path_for(tokens, backward=backward, device=x.device, dtype=x.dtype) == "factored":
            return _FactoredSparsePlusLowRankLinear.apply(x, B, A, values, indices, self._row_pointers(indices), scale, bias)
        return _SparsePlusLowRankLinear.apply(x, B, A, values, indices, scale, bias)

    @torch.no_grad()
    def dense_weight(self) -> Tensor:
        """The current ``out x in`` weight ``s · B A + S`` (a new, detached tensor)."""
        scale = self.scale
        return _dense_weight(self.B, self.A, self.values, self._checked_indices(), scale)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding exactly :meth:`dense_weight` (and a copy of the bias)."""
        weight = self.dense_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        delta: float = 0.03,
        alpha: float | None = None,
        trainable_scale: bool = False,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        path: str = "auto",
    ) -> SLTrainLinear:
        """Approximate a trained ``linear`` (same shape, device, dtype and bias).

        ``s · B A`` is the best rank-``rank`` approximation ``L`` of the weight (truncated SVD in fp32,
        split evenly between ``B`` and ``A``), and ``values`` hold the residual ``W − L`` at the
        support, so the result equals ``W`` exactly on the support and ``L`` elsewhere. To pretrain
        from scratch use :func:`convert_to_sltrain`, which applies the reference init instead.
        """
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank=rank,
            delta=delta,
            alpha=alpha,
            bias=linear.bias is not None,
            trainable_scale=trainable_scale,
            seed=seed,
            generator=generator,
            device=weight.device,
            dtype=weight.dtype,
            path=path,
        )
        weight_fp32 = weight.float()
        left, singular, right = torch.linalg.svd(weight_fp32, full_matrices=False)
        root = (singular[:rank] / float(layer.scale)).sqrt()
        B, A = left[:, :rank] * root, root[:, None] * right[:rank]
        layer.B.copy_(B)
        layer.A.copy_(A)
        residual = weight_fp32 - float(layer.scale) * (B @ A)
        layer.values.copy_(sparse_gather(residual, layer.indices))
        if linear.bias is not None:
            assert layer.bias is not None  # built with bias=linear.bias is not None
            layer.bias.copy_(linear.bias)
        return layer

    def extra_repr(self) -> str:
        scale = "tanh(scale_raw)" if self.scale_raw is not None else f"alpha/rank={self.alpha}/{self.rank}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"delta={self.delta}, nnz={self.values.numel()}, scale={scale}, bias={self.bias is not None}, "
            f"path={self._path!r}"
        )


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_to_sltrain` did: converted module names and parameter counts."""

    converted: tuple[str, ...]
    params_before: int
    params_after: int
    index_bytes: int  # bytes of the support buffers (not parameters, but part of the model's memory)


def _count_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def convert_to_sltrain(
    model: nn.Module,
    *,
    rank: int,
    delta: float = 0.03,
    alpha: float | None = None,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
    trainable_scale: bool = False,
    init: str = "reference",
    path: str = "auto",
) -> ConversionReport:
    """Replace, in place, every linear layer that ``target_modules`` selects by an :class:`SLTrainLinear`.

    The layers are chosen by the rule shared with :func:`~lowrank_optim.optim.param_groups`
    (:func:`lowrank_optim.targets.find_targets`; ``None``: the attention and MLP projections of the
    common architectures): ``nn.Linear`` and GPT-2's ``Conv1D`` (whose ``in x out`` weight becomes the
    layer's ``out x in`` weight; :func:`merge_sltrain` gives a ``Conv1D`` back); embeddings, ``lm_head``
    and norms stay dense, and a pattern of the user's that matches nothing, or matches a module with a
    matrix that is not a linear layer, is an error.

    ``init="reference"`` (pretraining from scratch): the reference init, the dense weights dropped.
    ``init="dense"`` (continuing from a dense or exported model): :meth:`SLTrainLinear.from_linear`, i.e.
    ``s · B A`` the best rank-``rank`` approximation of the weight and ``S`` the residual on the support,
    so the layer equals the weight on the support and its rank-``rank`` part elsewhere; with the seed of
    an earlier conversion the support is that conversion's.

    The new layers are on the old weight's device and dtype; the layer named ``name`` is seeded with
    ``derive_seed(seed, name)``, so a conversion is reproducible and identical on every rank; ``path`` is
    every new layer's :attr:`SLTrainLinear.path`. Everything is validated before the first replacement.
    """
    _check_delta(delta)
    _check_path(path)
    if init not in _INITS:
        raise ValueError(f"Invalid init: {init!r}. Must be one of {', '.join(_INITS)}.")
    patterns = (target_modules,) if isinstance(target_modules, str) else target_modules
    for name, module in model.named_modules():
        if isinstance(module, SLTrainLinear) and any(p in name for p in patterns or DEFAULT_TARGET_MODULES):
            raise TypeError(f"module {name!r} matches target_modules but is already an SLTrainLinear")
    targets = find_targets(model, patterns).targets
    for target in targets:
        in_features, out_features = target.features
        _check_rank(rank, in_features, out_features, module_name=target.name)

    params_before = _count_parameters(model)
    index_bytes = 0
    for target in targets:
        parent_name, _, child_name = target.name.rpartition(".")
        in_features, out_features = target.features
        weight, bias = target.weight, target.module._parameters.get("bias")
        if init == "dense":
            dense = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight.t() if target.transposed else weight)
                if bias is not None:
                    dense.bias.copy_(bias)
            layer = SLTrainLinear.from_linear(
                dense, rank=rank, delta=delta, alpha=alpha, trainable_scale=trainable_scale,
                seed=derive_seed(seed, target.name), path=path,
            )
        else:
            layer = SLTrainLinear(
                in_features,
                out_features,
                rank=rank,
                delta=delta,
                alpha=alpha,
                bias=bias is not None,
                trainable_scale=trainable_scale,
                seed=derive_seed(seed, target.name),
                device=weight.device,
                dtype=weight.dtype,
                path=path,
            )
        if target.transposed:
            layer.merges_to = type(target.module)  # merge_sltrain rebuilds a Conv1D
        setattr(model.get_submodule(parent_name), child_name, layer)
        index_bytes += layer.indices.numel() * layer.indices.element_size()
    return ConversionReport(
        converted=tuple(target.name for target in targets),
        params_before=params_before,
        params_after=_count_parameters(model),
        index_bytes=index_bytes,
    )


@torch.no_grad()
def merge_sltrain(model: nn.Module) -> ConversionReport:
    """Replace, in place, every :class:`SLTrainLinear` of ``model`` by the ``nn.Linear`` holding its dense
    weight ``W = s · B A + S`` (and its bias): the export of an SLTrain model. Its ``state_dict`` then has
    the dense model's keys, so e.g. a Hugging Face model converted with :func:`convert_to_sltrain` saves with
    ``save_pretrained`` and loads with ``from_pretrained`` computing what the trained SLTrain model computed
    (bit for bit where the SLTrain layer runs its dense path, which composes ``W`` in the same way: always
    for ``path="dense"``, and for ``"auto"`` when no gradient is needed, as in evaluation; the factored
    path agrees to the rounding of the dtype).

    Each new layer is on its old device and dtype and keeps ``requires_grad`` of ``B``. A model without an
    SLTrainLinear is an error (nothing would be exported). Converse: ``convert_to_sltrain(model, ...,
    init="dense")``; resuming SLTrain training *exactly* needs the SLTrain ``state_dict`` itself (a dense
    ``W`` does not determine ``B``, ``A`` and ``S``).
    """
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, SLTrainLinear)]
    if not targets:
        raise ValueError(f"merge_sltrain: {type(model).__name__} has no SLTrainLinear module to merge")
    if any(name == "" for name, _ in targets):
        raise ValueError("merge_sltrain: the model is itself an SLTrainLinear; use its to_linear()")
    params_before = _count_parameters(model)
    for name, layer in targets:
        parent_name, _, child_name = name.rpartition(".")
        linear = layer.to_linear()
        conv1d = getattr(layer, "merges_to", None)
        if conv1d is not None:  # converted from a Conv1D: y = x W + b with W = weightᵀ
            merged = conv1d(layer.out_features, layer.in_features).to(device=linear.weight.device, dtype=linear.weight.dtype)
            merged.weight.copy_(linear.weight.t())
            if merged.bias is not None:
                if linear.bias is None:
                    merged.bias = None
                else:
                    merged.bias.copy_(linear.bias)
            linear = merged
        linear.requires_grad_(layer.B.requires_grad)
        setattr(model.get_submodule(parent_name), child_name, linear)
    return ConversionReport(
        converted=tuple(name for name, _ in targets),
        params_before=params_before,
        params_after=_count_parameters(model),
        index_bytes=0,
    )


def balanced_factors(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """``U_r √Σ_r`` and ``√Σ_r V_rᵀ`` of the SVD of ``B A`` (arXiv 2505.22922, weight refactorization).

    Computed in fp32 (fp64 for fp64 factors) whatever the parameter dtype, as the reference does.

    Computed without the ``out x in`` product: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (thin QR),
    ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``, so the SVD of the ``r x r`` core gives ``U = Q_B U_c``,
    ``V = Q_A V_c``. Same factors as ``torch.linalg.svd(B @ A)`` up to the sign of each singular pair,
    at ``O((out + in) r²)`` instead of ``O(out · in · min(out, in))``.
    """
    compute_dtype = torch.promote_types(B.dtype, torch.float32)  # fp32, or fp64 for fp64 factors
    left_q, left_r = torch.linalg.qr(B.to(compute_dtype))
    right_q, right_r = torch.linalg.qr(A.to(compute_dtype).t())
    core_u, singular, core_vh = torch.linalg.svd(left_r @ right_r.t())
    root = singular.sqrt()
    return (left_q @ core_u) * root, root[:, None] * (core_vh @ right_q.t())


@torch.no_grad()
def refactorize_(module: nn.Module) -> list[nn.Parameter]:
    """Rebalance every :class:`SLTrainLinear` in ``module``: ``B, A ← U_r √Σ_r, √Σ_r V_rᵀ`` of ``B A``.

    The weight refactorization of arXiv 2505.22922: the unscaled product ``B A`` (hence the model's
    function) is unchanged up to rounding, while ``Bᵀ B = A Aᵀ = Σ_r``. Written in place in the
    parameters' dtype; ``values`` and the support are untouched. Returns the refactorized ``B`` and
    ``A`` parameters (for :func:`reset_momentum_`). Directions with a zero singular value (e.g. every
    direction while ``B`` is still all-zero, before the first update) become zero in both factors and
    then receive no gradient — as in the reference, refactorize only after training has started.
    """
    layers = [layer for layer in module.modules() if isinstance(layer, SLTrainLinear)]
    if not layers:
        raise ValueError(f"refactorize_: {type(module).__name__} contains no SLTrainLinear")
    refactorized: list[nn.Parameter] = []
    for layer in layers:
        new_B, new_A = balanced_factors(layer.B, layer.A)
        layer.B.copy_(new_B)
        layer.A.copy_(new_A)
        refactorized += [layer.B, layer.A]
    return refactorized
