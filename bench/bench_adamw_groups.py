"""Does AdamW close its gap on ``tiny`` with a separate learning rate for the parameters the low-rank
methods do not project (embeddings, ``lm_head``, norms)?

The projecting methods train those parameters with full Adam at their own learning rate (GaLore's tuned
tiny preset: 5.6e-2), while AdamW's tuned preset uses one rate (1.5e-3) for everything. This runs AdamW
with the matrices at the tuned 1.54e-3 and the other parameters at each of ``--other-lrs``, at the demo's
budget and seeds, in one process, and prints the mean ± std of the final eval loss per rate.

Usage: python bench/bench_adamw_groups.py [--other-lrs 0.00154 0.0056 0.0154 0.0562] [--seeds 0 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.models import LlamaConfig
from lowrank_optim.targets import find_targets
from lowrank_optim.train.methods import TARGET_MODULES, build_model, load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-lrs", type=float, nargs="+", default=[0.00154, 0.0056, 0.0154, 0.0562])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    say(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, commit {commit}; command: {' '.join(sys.argv)}")
    config = LlamaConfig.from_name_or_path("tiny")
    matrix_lr = load_presets("tiny")["adamw"].lr
    stream = TokenStream(stdlib_corpus(), 128)
    say(f"AdamW on tiny, 200 updates x 16 x 128 tokens, target matrices ({', '.join(TARGET_MODULES)}) at lr {matrix_lr:g}")
    say(f"{'other lr':>9} {'seeds':>6} {'final eval loss (mean ± std)':>29}")
    for other_lr in args.other_lrs:
        losses = []
        for seed in args.seeds:
            settings = TrainSettings(steps=200, batch_size=16, seq_len=128, eval_batches=8, seed=seed, measure_memory=False)
            model = build_model(config, seed=seed)
            matrices = [target.weight for target in find_targets(model, TARGET_MODULES).targets]
            ids = {id(p) for p in matrices}
            others = [p for p in model.parameters() if id(p) not in ids]
            optimizer = torch.optim.AdamW(
                [{"params": matrices, "lr": matrix_lr}, {"params": others, "lr": other_lr}], lr=matrix_lr, weight_decay=0.0
            )
            result = pretrain(model, optimizer, stream, settings, name="adamw_groups", log=lambda line: None)
            losses.append(result["final_eval_loss"])
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        say(f"{other_lr:9.3g} {len(losses):6d} {statistics.fmean(losses):21.4f} ± {spread:.4f}   seeds {losses}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
