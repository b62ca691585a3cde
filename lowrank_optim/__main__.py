"""Command line: ``python -m lowrank_optim <command> [options]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowrank_optim", description="Memory-efficient pretraining optimizers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="pretrain a tiny LLaMA on CPU with AdamW and GaLore and compare loss, state memory and speed",
        description=(
            "Pretrain the same small LLaMA (same initial weights, same batches) with each optimizer under a "
            "cosine schedule with 10% warmup, then print a table of eval loss, perplexity, optimizer-state "
            "bytes and speed. The default corpus is the Python standard library's source, so nothing is downloaded."
        ),
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(handler=demo.main)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        # Configuration mistakes (bad sizes, unknown config names) read better without a traceback.
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
