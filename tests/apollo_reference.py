"""An fp64 reference of ``apollo-torch==1.0.3``'s ``APOLLOAdamW`` (APOLLO / APOLLO-Mini, arXiv 2412.05270).

Written from the specification in ``notes/apollo.md``, not from the package's code: plain loops over
steps, parameters and channels, everything in float64. It reproduces what the package computes for a
parameter group with ``rank`` and ``proj="random"`` on 2-D parameters, quirks included (see the notes):

* the random matrices are drawn on the CPU in float32 from ``torch.Generator().manual_seed(seed)``
  (so :func:`apollo_random_matrix` gives them bit for bit, as the package holds them for fp32 weights);
  the first draw of the i-th parameter (1-based, counted over every parameter handed to the optimizer, in
  group order) uses seed ``i``, every later draw the seed :func:`apollo_next_seed` makes from the previous;
* draws happen at steps 1, 1 + gap, 1 + 2 gap, ... and the Adam moments, the norm-growth limiter's state
  and the step count are carried over a re-draw untouched;
* the channel of the scaling factor follows the weight's shape (rows for ``m >= n``, columns for
  ``m < n``), not the side that was projected: for ``proj_type`` other than ``"std"`` it can disagree,
  and then the package fails unless the factor broadcasts (``rank == 1``, or ``rank`` equal to the
  dimension it is multiplied against); :class:`ApolloCrash` stands for that failure here.

:func:`apollo_reference` takes the random matrices either from the seeds (default: what the package
draws on the CPU) or explicitly, e.g. to test an implementation that draws its own.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ApolloCrash",
    "apollo_next_seed",
    "apollo_projection_side",
    "apollo_random_matrix",
    "apollo_reference",
    "apollo_seed_chain",
    "refresh_steps",
]

_INT64_MAX = 2**63 - 1
_SEED_ADVANCE = 15  # the package takes the 15th integer of the stream as the next seed
_RATIO_EPS = 1e-8  # fixed, not the group's eps: denominators of the scaling factor and of the limiter
_GROWTH = 1.01  # the norm-growth limiter lets the update's norm grow by at most 1 % a step


class ApolloCrash(RuntimeError):
    """A configuration on which apollo-torch 1.0.3 itself raises (a broadcast failure)."""


def apollo_next_seed(seed: int) -> int:
    """The seed apollo-torch uses for a parameter's next draw: integer 15 of a CPU stream seeded with ``seed``."""
    stream = torch.Generator(device="cpu")
    stream.manual_seed(seed)
    values = torch.randint(0, _INT64_MAX, (_SEED_ADVANCE,), generator=stream)
    return int(values[_SEED_ADVANCE - 1])


def apollo_seed_chain(first_seed: int, draws: int) -> list[int]:
    """The seeds of a parameter's first ``draws`` random matrices."""
    seeds = [first_seed]
    while len(seeds) < draws:
        seeds.append(apollo_next_seed(seeds[-1]))
    return seeds[:draws]


def apollo_projection_side(shape: Sequence[int], proj_type: str) -> str:
    """``"left"`` (matrix ``m x r``, ``R = Pᵀ G``) or ``"right"`` (matrix ``r x n``, ``R = G Pᵀ``)."""
    m, n = shape
    tall = m >= n
    if proj_type == "std":
        return "right" if tall else "left"
    if proj_type == "reverse_std":
        return "left" if tall else "right"
    if proj_type in ("left", "right"):
        return proj_type
    if proj_type == "full":
        raise NotImplementedError("apollo-torch's random projector has no 'full' projection")
    raise ValueError(f"unknown proj_type {proj_type!r} (apollo-torch fails with UnboundLocalError)")


def apollo_random_matrix(seed: int, shape: Sequence[int], rank: int, side: str) -> Tensor:
    """The float32 matrix apollo-torch draws on the CPU: standard normal over ``sqrt(rank)``.

    ``m x rank`` for the left side, ``rank x n`` for the right. Bit-identical to the package's
    ``ortho_matrix`` for a float32 weight on the CPU (fp64/bf16 weights get this matrix cast; CUDA
    weights get a different stream, drawn by a CUDA generator).
    """
    m, n = shape
    size = (m, rank) if side == "left" else (rank, n)
    stream = torch.Generator(device="cpu")
    stream.manual_seed(seed)
    gaussian = torch.randn(size, generator=stream, dtype=torch.float32)
    return gaussian / math.sqrt(rank)


def refresh_steps(steps: int, update_proj_gap: int) -> list[int]:
    """1-based steps at which a new random matrix is drawn (the count before the step is a multiple of gap)."""
    return [t for t in range(1, steps + 1) if t == 1 or (t - 1) % update_proj_gap == 0]


def _frobenius(x: Tensor) -> float:
    total = 0.0
    for value in x.reshape(-1).tolist():
        total += value * value
    return math.sqrt(total)


def _scaling_factors(normalized: Tensor, low_rank: Tensor, weight_shape: Sequence[int], scale_type: str) -> Tensor:
    """The factor multiplying the full-rank gradient, shaped to broadcast against it (fp64)."""
    m, n = weight_shape
    if scale_type == "tensor":
        value = _frobenius(normalized) / (_frobenius(low_rank) + _RATIO_EPS)
        return torch.tensor(value, dtype=torch.float64)
    if scale_type != "channel":
        raise ValueError(f"unknown scale_type {scale_type!r} (apollo-torch fails with UnboundLocalError)")
    if m >= n:  # one factor per row of the low-rank matrices, applied to rows of the gradient
        rows = low_rank.shape[0]
        factors = [_frobenius(normalized[i]) / (_frobenius(low_rank[i]) + _RATIO_EPS) for i in range(rows)]
        if rows not in (1, m):
            raise ApolloCrash(f"{rows} row factors cannot scale a {m} x {n} gradient")
        return torch.tensor(factors, dtype=torch.float64).reshape(rows, 1)
    columns = low_rank.shape[1]  # m < n: one factor per column, applied to columns of the gradient
    factors = [_frobenius(normalized[:, j]) / (_frobenius(low_rank[:, j]) + _RATIO_EPS) for j in range(columns)]
    if columns not in (1, n):
        raise ApolloCrash(f"{columns} column factors cannot scale a {m} x {n} gradient")
    return torch.tensor(factors, dtype=torch.float64).reshape(1, columns)


def apollo_reference(
    params: Sequence[Tensor],
    grads: Sequence[Sequence[Tensor]],
    *,
    rank: int,
    scale_type: str = "channel",
    scale: float = 1.0,
    update_proj_gap: int = 200,
    proj_type: str = "std",
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    scale_front: bool = False,
    disable_nl: bool = False,
    seeds: Sequence[int] | None = None,
    projections: Sequence[Sequence[Tensor]] | Callable[[int, int, int], Tensor] | None = None,
) -> list[list[Tensor]]:
    """The weights after each of ``len(grads)`` APOLLOAdamW steps, in float64.

    ``params``: the initial 2-D weights; ``grads[t][i]``: the gradient of weight ``i`` at step ``t + 1``.
    The keyword arguments are the group's keys and the constructor's (``scale_front``, ``disable_nl``),
    with the constructor's defaults; apollo-torch itself has no defaults for the group keys.

    Random matrices: by default drawn as apollo-torch draws them on the CPU, weight ``i`` (0-based)
    starting from ``seeds[i]`` (default ``i + 1``: right when these are all the optimizer's parameters,
    in order). Or given: ``projections[i][k]`` (or ``projections(i, k, seed)``) is weight ``i``'s
    ``k``-th matrix, ``m x r`` (left) or ``r x n`` (right), already divided by ``sqrt(r)``.
    """
    if update_proj_gap <= 0:
        raise ZeroDivisionError("apollo-torch takes the step count modulo update_proj_gap")
    beta1, beta2 = betas
    weights = [p.detach().to(torch.float64).clone() for p in params]
    for w in weights:
        if w.dim() != 2:
            raise ValueError("apollo-torch's APOLLO path handles 2-D weights only")
    count = len(weights)
    next_seeds = list(seeds) if seeds is not None else [i + 1 for i in range(count)]
    draws = [0] * count
    matrices: list[Tensor | None] = [None] * count
    sides = [apollo_projection_side(w.shape, proj_type) for w in weights]
    first = [torch.zeros(0)] * count
    second = [torch.zeros(0)] * count
    limiter_norm: list[float | None] = [None] * count
    trajectory: list[list[Tensor]] = []

    for t, step_grads in enumerate(grads, start=1):
        for i, w in enumerate(weights):
            g = step_grads[i].detach().to(torch.float64)
            side = sides[i]
            if matrices[i] is None or (t - 1) % update_proj_gap == 0:
                seed = next_seeds[i]
                if projections is None:
                    drawn = apollo_random_matrix(seed, w.shape, rank, side)
                elif callable(projections):
                    drawn = projections(i, draws[i], seed)
                else:
                    drawn = projections[i][draws[i]]
                matrices[i] = drawn.detach().to(torch.float64)
                next_seeds[i] = apollo_next_seed(seed)
                draws[i] += 1
            p = matrices[i]
            low = p.t() @ g if side == "left" else g @ p.t()
            if t == 1:
                first[i] = torch.zeros_like(low)
                second[i] = torch.zeros_like(low)

            # Adam in the low-rank space; no bias correction inside the ratio, eps outside the root.
            m_state, v_state = first[i], second[i]
            normalized = torch.empty_like(low)
            for a in range(low.shape[0]):
                for b in range(low.shape[1]):
                    x = float(low[a, b])
                    m_state[a, b] = beta1 * float(m_state[a, b]) + (1.0 - beta1) * x
                    v_state[a, b] = beta2 * float(v_state[a, b]) + (1.0 - beta2) * x * x
                    normalized[a, b] = float(m_state[a, b]) / (math.sqrt(float(v_state[a, b])) + eps)
            step_size = lr
            if correct_bias:
                step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)

            update = g * _scaling_factors(normalized, low, w.shape, scale_type)
            if scale_front:
                update = update * math.sqrt(scale)
            if not disable_nl:
                norm = _frobenius(update)
                if limiter_norm[i] is None:
                    limiter_norm[i] = norm
                else:
                    shrink = max(norm / (limiter_norm[i] + _RATIO_EPS), _GROWTH) / _GROWTH
                    update = update / shrink
                    limiter_norm[i] = norm / shrink
            if not scale_front:
                update = update * math.sqrt(scale)

            w -= step_size * update
            if weight_decay > 0.0:  # decoupled, after the update, with the plain lr
                w -= lr * weight_decay * w
        trajectory.append([w.clone() for w in weights])
    return trajectory
