"""The end of every torchrun worker in tests/distributed: tear the process group down, then leave without
the interpreter's teardown. Left to exit normally, a rank was seen aborting after every case had passed
("terminate called without an active exception": a library's joinable std::thread destroyed at exit,
with gloo and DeepSpeed, under load), which fails the whole launch. Everything is printed first."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def end_worker() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
