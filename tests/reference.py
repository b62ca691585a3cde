"""Independent fp64 references written from the formulas of DESIGN.md §1, as plain loops.

They share no code with the package: no projection helpers, no optimizer classes. The one concession
to the implementation is the SVD: the method *defines* the basis as the fp32 SVD of the gradient
(``torch.linalg.svd(G.float())``), and singular vectors are only defined up to sign, so the reference
takes that same fp32 SVD and does everything else in fp64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class GaLoreReference:
    """GaLore-AdamW for one matrix (or a plain HF-style AdamW when ``rank`` is None), in fp64."""

    weight: Tensor
    rank: int | None = None
    update_proj_gap: int = 200
    scale: float = 1.0
    proj_type: str = "std"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    moment_policy: str = "keep"
    step: int = 0
    left: Tensor | None = None
    right: Tensor | None = None
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

    def update(self, grad: Tensor) -> None:
        g = grad.double()
        side = self.side() if self.rank is not None else None
        if side is not None and self.step % self.update_proj_gap == 0:
            u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
            r = min(self.rank, *grad.shape)
            self.left = u[:, :r].double() if side in ("left", "full") else None
            self.right = vh[:r].double() if side in ("right", "full") else None
            if self.moment_policy == "reset" and self.m is not None:
                self.m = torch.zeros_like(self.m)
                self.v = torch.zeros_like(self.v)
        if side == "right":
            r_grad = g @ self.right.T
        elif side == "left":
            r_grad = self.left.T @ g
        elif side == "full":
            r_grad = self.left.T @ g @ self.right.T
        else:
            r_grad = g
        if self.m is None:
            self.m = torch.zeros_like(r_grad)
            self.v = torch.zeros_like(r_grad)
        self.step += 1
        b1, b2 = self.betas
        self.m = b1 * self.m + (1 - b1) * r_grad
        self.v = b2 * self.v + (1 - b2) * r_grad * r_grad
        n = self.m / (self.v.sqrt() + self.eps)
        step_size = self.lr * math.sqrt(1 - b2**self.step) / (1 - b1**self.step)
        if side == "right":
            back = self.scale * (n @ self.right)
        elif side == "left":
            back = self.scale * (self.left @ n)
        elif side == "full":
            back = self.scale * (self.left @ n @ self.right)
        else:
            back = n
        self.weight = self.weight - step_size * back
        if self.weight_decay > 0:
            self.weight = self.weight - self.lr * self.weight_decay * self.weight
