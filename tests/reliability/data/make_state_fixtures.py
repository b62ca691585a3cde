# Writes tests/reliability/data/<name>-8ebfe8e.pt. Run with the package of commit 8ebfe8e (before the
# nonfinite option), e.g. from a worktree of it: cd /tmp && PYTHONPATH=<worktree> python make_state_fixtures.py <this dir>.
# State dicts of the three optimizers after 3 steps, and the weights after 2 more steps from them (gradients
# from a fixed seed), for tests/reliability/test_state_compat.py.
import copy
import sys

import torch
from torch import nn

from lowrank_optim import DCTAdamW, FiraAdamW, GaLoreAdamW

for name, cls in (("galore", GaLoreAdamW), ("fira", FiraAdamW), ("dct", DCTAdamW)):
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(12, 8, generator=g))
    b = nn.Parameter(torch.randn(12, generator=g))
    opt = cls([{"params": [b]}, {"params": [w], "rank": 3, "update_proj_gap": 2}], lr=0.01, weight_decay=0.1)
    for _ in range(3):
        w.grad, b.grad = torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
        opt.step()
    # state_dict() holds references to the live state: copy it before stepping on.
    saved = {"optimizer": copy.deepcopy(opt.state_dict()), "w": w.detach().clone(), "b": b.detach().clone()}
    later = torch.Generator().manual_seed(1)
    for _ in range(2):
        w.grad, b.grad = torch.randn(12, 8, generator=later), torch.randn(12, generator=later)
        opt.step()
    saved.update(w_after=w.detach().clone(), b_after=b.detach().clone())
    torch.save(saved, f"{sys.argv[1]}/{name}-8ebfe8e.pt")
