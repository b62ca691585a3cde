"""The command-line options of benchmarks that train the demo's model at the demo's size (one place, so
that every such benchmark defaults to the same run)."""

from __future__ import annotations

import argparse

import torch


def add_demo_run_arguments(parser: argparse.ArgumentParser, seeds: list[int], repeats: int) -> None:
    """``--threads``, ``--steps``, ``--batch-size``, ``--seq-len`` (the demo's 200 x 16 x 128), ``--seeds``,
    and the step-time part's ``--repeats`` and ``--part`` (``all``, ``quality`` or ``time``)."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--part", choices=("all", "quality", "time"), default="all")


def start(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, with torch's thread count set from them and printed with torch's version."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return args
