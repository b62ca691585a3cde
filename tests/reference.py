"""Independent fp64 references written from the formulas of DESIGN.md §1, as plain loops.

They share no code with the package: no projection helpers, no optimizer classes. The one concession
to the implementation is the SVD: the method *defines* the basis as the fp32 SVD of the gradient
(``torch.linalg.svd(G.float())``), and singular vectors are only defined up to sign, so the reference
takes that same fp32 SVD and does everything else in fp64 (with ``sign="canonical"``, the default, each
basis vector is then flipped so that its largest-magnitude entry is positive). The DCT basis is built here from its closed
form, ``Q[k, j] = sqrt(2/d) cos(π k (2j+1) / 2d)`` with row 0 times ``sqrt(1/2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def dct2_matrix(size: int) -> Tensor:
    """The orthonormal DCT-II matrix in fp64, one entry at a time (rows are frequencies)."""
    q = torch.empty(size, size, dtype=torch.float64)
    for k in range(size):
        for j in range(size):
            q[k, j] = math.sqrt(2.0 / size) * math.cos(math.pi * k * (2 * j + 1) / (2 * size))
    q[0] *= math.sqrt(0.5)
    return q


def dct_top_indices(grad: Tensor, rank: int, side: str) -> list[int]:
    """The ``rank`` frequencies with the largest L1 coefficient norms, ascending (fp64)."""
    g = grad.double()
    if side == "right":
        scores = (g @ dct2_matrix(g.shape[1]).T).abs().sum(dim=0)
    else:
        scores = (dct2_matrix(g.shape[0]) @ g).abs().sum(dim=1)
    order = sorted(range(len(scores)), key=lambda k: -float(scores[k]))
    return sorted(order[:rank])


def _moved(moment: Tensor, old: list[int], new: list[int], dim: int) -> Tensor:
    """Slices of ``moment`` along ``dim`` follow their frequency from ``old`` to ``new``; new ones are 0."""
    out = torch.zeros_like(moment)
    for j, frequency in enumerate(new):
        if frequency in old:
            i = old.index(frequency)
            if dim == 0:
                out[j] = moment[i]
            else:
                out[:, j] = moment[:, i]
    return out


@dataclass
class GaLoreReference:
    """GaLore-AdamW for one matrix (or a plain HF-style AdamW when ``rank`` is None), in fp64.

    ``projector="dct"`` replaces the SVD basis by the top-``rank`` DCT-II frequencies; at a refresh the
    moments of frequencies that stay selected move with them and the others restart from zero
    (``moment_policy="keep"``). ``moment_policy="rotate"``: with ``C = P_oldᵀ P_new`` (left) or
    ``P_old P_newᵀ`` (right), entry by entry, ``M[:, j] = Σ_k C[k, j] M_old[:, k]`` and
    ``V[:, j] = Σ_k C[k, j]² V_old[:, k]`` (and likewise over rows on the left).
    """

    weight: Tensor
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 1.0
    proj_type: str = "std"
    projector: str = "svd"
    sign: str = "canonical"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    moment_policy: str = "keep"
    step: int = 0
    left: Tensor | None = None
    right: Tensor | None = None
    left_indices: list[int] | None = None
    right_indices: list[int] | None = None
    m: Tensor | None = field(default=None, repr=False)
    v: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().double().clone()

    def side(self) -> str:
        rows, cols = self.weight.shape
        if self.proj_type == "std":
            return "right" if rows >= cols else "left"
        if self.proj_type == "reverse_std":
            return "left" if rows >= cols else "right"
        return self.proj_type

    def refresh(self, grad: Tensor, side: str) -> None:
        r = min(self.rank, *grad.shape)
        old_left, old_right = self.left, self.right
        if self.projector == "svd":
            u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
            self.left = u[:, :r].double() if side in ("left", "full") else None
            self.right = vh[:r].double().T if side in ("right", "full") else None
            for basis in (self.left, self.right):  # columns are the basis vectors here
                if basis is not None and self.sign == "canonical":
                    for k in range(basis.shape[1]):
                        column = basis[:, k]
                        top = max(range(len(column)), key=lambda i: (abs(float(column[i])), -i))
                        if column[top] < 0:
                            basis[:, k] = -column
            if self.right is not None:
                self.right = self.right.T.contiguous()
            if self.m is not None and self.moment_policy == "reset":
                self.m = torch.zeros_like(self.m)
                self.v = torch.zeros_like(self.v)
            if self.m is not None and self.moment_policy == "rotate":
                self._rotate(old_left, old_right)
            return
        if self.m is not None and self.moment_policy == "rotate":
            for one_side, dim in (("left", 0), ("right", 1)):
                if side in (one_side, "full"):
                    new = dct_top_indices(grad, r, one_side)
                    setattr(self, f"{one_side}_indices", new)
                    q = dct2_matrix(grad.shape[dim])[new]
                    setattr(self, one_side, q.T if one_side == "left" else q)
            self._rotate(old_left, old_right)
            return
        for one_side, dim in (("left", 0), ("right", 1)):
            if side not in (one_side, "full"):
                continue
            new = dct_top_indices(grad, r, one_side)
            old = getattr(self, f"{one_side}_indices")
            if self.m is not None:
                if self.moment_policy == "reset":
                    self.m, self.v = torch.zeros_like(self.m), torch.zeros_like(self.v)
                else:
                    self.m, self.v = _moved(self.m, old, new, dim), _moved(self.v, old, new, dim)
            setattr(self, f"{one_side}_indices", new)
            q = dct2_matrix(grad.shape[dim])[new]
            setattr(self, one_side, q.T if one_side == "left" else q)

    def _rotate(self, old_left: Tensor | None, old_right: Tensor | None) -> None:
        """``moment_policy="rotate"``, as loops over the entries of the change of basis."""
        m, v = self.m, self.v
        if old_right is not None:
            c = old_right @ self.right.T  # r x r
            new_m, new_v = torch.zeros_like(m), torch.zeros_like(v)
            for j in range(c.shape[1]):
                for k in range(c.shape[0]):
                    new_m[:, j] += c[k, j] * m[:, k]
                    new_v[:, j] += c[k, j] ** 2 * v[:, k]
            m, v = new_m, new_v
        if old_left is not None:
            c = old_left.T @ self.left
            new_m, new_v = torch.zeros_like(m), torch.zeros_like(v)
            for j in range(c.shape[1]):
                for k in range(c.shape[0]):
                    new_m[j] += c[k, j] * m[k]
                    new_v[j] += c[k, j] ** 2 * v[k]
            m, v = new_m, new_v
        self.m, self.v = m, v

    def project(self, g: Tensor, side: str | None) -> Tensor:
        if side == "right":
            return g @ self.right.T
        if side == "left":
            return self.left.T @ g
        if side == "full":
            return self.left.T @ g @ self.right.T
        return g

    def back(self, n: Tensor, side: str | None) -> Tensor:
        if side == "right":
            return n @ self.right
        if side == "left":
            return self.left @ n
        if side == "full":
            return self.left @ n @ self.right
        return n

    def adam(self, grad: Tensor) -> tuple[str | None, Tensor, Tensor, float]:
        """Refresh when due, project, update the moments; return ``(side, R, N, step_size)``."""
        g = grad.double()
        side = self.side() if self.rank is not None else None
        if side is not None and self.step % self.update_proj_gap == 0:
            self.refresh(grad, side)
        r_grad = self.project(g, side)
        if self.m is None:
            self.m = torch.zeros_like(r_grad)
            self.v = torch.zeros_like(r_grad)
        self.step += 1
        b1, b2 = self.betas
        self.m = b1 * self.m + (1 - b1) * r_grad
        self.v = b2 * self.v + (1 - b2) * r_grad * r_grad
        n = self.m / (self.v.sqrt() + self.eps)
        step_size = self.lr * math.sqrt(1 - b2**self.step) / (1 - b1**self.step)
        return side, r_grad, n, step_size

    def apply(self, update: Tensor, step_size: float) -> None:
        self.weight = self.weight - step_size * update
        if self.weight_decay > 0:
            self.weight = self.weight - self.lr * self.weight_decay * self.weight

    def update(self, grad: Tensor) -> None:
        side, _, n, step_size = self.adam(grad)
        scale = self.scale if side is not None else 1.0
        self.apply(scale * self.back(n, side), step_size)


@dataclass
class FiraReference(GaLoreReference):
    """Fira-AdamW for one matrix in fp64, ``scale`` playing ``alpha``.

    ``residual="code"`` (package ``fira`` 1.0.2): ``S = (G - alpha P Pᵀ G) · phi``, update
    ``alpha back(N) + S``; ``"paper"``: ``S = (G - P Pᵀ G) · phi``, update ``alpha (back(N) + S)``.
    ``phi`` per row (right) or column (left): ``||N||/(||R|| + 1e-8)``. Limiter on ``||S||_F``:
    ``norms`` records the stored (post-limit) norm of every step.
    """

    residual: str = "code"
    gamma: float = 1.01
    norms: list[float] = field(default_factory=list)

    def update(self, grad: Tensor) -> None:
        side, r_grad, n, step_size = self.adam(grad)
        if side is None:
            self.apply(n, step_size)
            return
        g = grad.double()
        rows, cols = g.shape
        phi = torch.empty_like(g)
        if side == "right":
            for i in range(rows):
                phi[i, :] = n[i].norm() / (r_grad[i].norm() + 1e-8)
        else:
            for j in range(cols):
                phi[:, j] = n[:, j].norm() / (r_grad[:, j].norm() + 1e-8)
        alpha = self.scale
        subtract, weight = (alpha, 1.0) if self.residual == "code" else (1.0, alpha)
        s = (g - subtract * self.back(r_grad, side)) * phi
        norm = float(s.norm())
        if self.norms:
            limiter = max(norm / (self.norms[-1] + 1e-8), self.gamma) / self.gamma
            s = s / limiter
            norm = norm / limiter
        self.norms.append(norm)
        self.apply(alpha * self.back(n, side) + weight * s, step_size)
