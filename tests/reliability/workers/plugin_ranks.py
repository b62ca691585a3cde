"""Worker for tests/reliability/test_plugin_section.py: ranks given different ``lowrank_optim`` sections.

``torchrun --standalone --nproc_per_node 2 plugin_ranks.py CASE [CASE ...]``. In every case rank 1 gets a
section that differs from rank 0's in one way (``CASE``; ``same``: it does not), calls
``lowrank_optim.deepspeed.initialize`` (the first case lets it create the process group) and, if that
returns, trains two steps. Every rank prints ``RESULT {"case", "rank", "error", "seconds"}`` per case:
``error`` is what the case raised (type and message) or ``None``; ``seconds`` how long it took.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowrank_optim.deepspeed import initialize

BASE = {"rank": 4, "update_proj_gap": 3, "lr": 1e-3, "target_modules": ["mlp"]}
#: case -> what rank 1's section changes.
RANK_1 = {
    "same": {},
    "rank": {"rank": 2},
    "lr": {"lr": 1e-2},
    "unreadable": {"lr": "0.01"},  # fails to read on rank 1 only
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(20, 36)
        self.mlp_out = nn.Linear(36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(torch.tanh(self.mlp_in(x)))


def run_case(case: str, rank: int) -> dict[str, Any]:
    section = {**BASE, **(RANK_1[case] if rank == 1 else {})}
    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
        "lowrank_optim": section,
    }
    torch.manual_seed(0)
    engine, _, _, _ = initialize(Net(), config)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, y = torch.randn(2, 20, generator=generator), torch.randn(2, 10, generator=generator)
        engine.backward(((engine(x) - y) ** 2).mean())
        engine.step()
    engine.destroy()
    return {}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for case in sys.argv[1:]:
        start = time.perf_counter()
        try:
            outcome = {"error": None, **run_case(case, rank)}
        except Exception as error:  # noqa: BLE001 - the refusal is the case's result
            outcome = {"error": f"{type(error).__name__}: {error}"}
        outcome["seconds"] = round(time.perf_counter() - start, 2)
        # One write per line: the ranks share torchrun's stdout, and print() writes the newline separately,
        # so two ranks' lines could run together.
        sys.stdout.write("RESULT " + json.dumps({"case": case, "rank": rank, **outcome}) + "\n")
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
