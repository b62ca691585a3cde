"""WeLore on the demo's model: pretrain ``tiny`` (the demo's recipe: 200 updates of 16 x 128 tokens of
the stdlib corpus, tiny presets) with GaLore and with AdamW while tracking the weight spectra, then

1. compress the target matrices (attention and MLP) by 30 % and 50 % of their parameters with WeLore's
   non-uniform ranks and with one uniform rank ratio: held-out loss and perplexity of each;
2. fine-tune the 50 % WeLore model's low-rank components only (LRC), the 50 % uniform one's, and the
   dense model in full, for the same updates at the same learning rate: loss, perplexity, trainable
   parameters, optimizer-state bytes and the measured peak of a step (allocator, CPU profiler).

Everything runs in this process on the same held-out batches (``--eval-batches``).

Usage: python bench/bench_welore.py [--methods galore adamw] [--finetune-steps 100] [--lr 1e-3] [--out FILE]
       [--spectra-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import sys
from pathlib import Path

import torch

from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.models import LlamaConfig
from lowrank_optim.train.methods import TARGET_MODULES, build_model, load_presets
from lowrank_optim.train.pretrain import TrainSettings, evaluate, pretrain
from lowrank_optim.welore import (
    SpectrumTracker,
    compress,
    freeze_for_lrc_finetune,
    uniform_plan,
    weight_spectra,
    welore_plan,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["galore", "adamw"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak lr, LRC and full alike")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--spectra-dir", default="bench/out/welore")
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    say(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, commit {commit}; command: {' '.join(sys.argv)}")
    config = LlamaConfig.from_name_or_path("tiny")
    presets = load_presets("tiny")
    stream = TokenStream(stdlib_corpus(), 128)
    quiet = {"log": lambda line: None}
    settings = TrainSettings(steps=args.steps, batch_size=16, seq_len=128, eval_batches=args.eval_batches,
                             seed=0, measure_memory=False)
    spectra_dir = Path(args.spectra_dir)
    spectra_dir.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        preset = presets[method]
        model = build_model(config, preset=preset, seed=0)
        tracker = SpectrumTracker(20, target_modules=TARGET_MODULES)
        tracker.record(0, model)  # the random init: where the spectra start
        pretrain(model, preset, stream, settings, callbacks=[tracker], **quiet)
        tracker.write(spectra_dir / f"{method}.json", spectra_dir / f"{method}.png")
        dense = evaluate(model, stream, 16, args.eval_batches)
        first, last = tracker.records[0]["matrices"], tracker.records[-1]["matrices"]
        stable = [(first[name]["stable_rank"], last[name]["stable_rank"]) for name in last]
        say()
        say(f"## {method} (lr {preset.lr:.3g}), {args.steps} updates: dense eval loss {dense:.4f}, ppl {math.exp(dense):.2f}")
        say(f"stable rank of the {len(stable)} target matrices, init -> update {args.steps}: mean "
            f"{sum(a for a, _ in stable) / len(stable):.2f} -> {sum(b for _, b in stable) / len(stable):.2f}, "
            f"min {min(b for _, b in stable):.2f}, max {max(b for _, b in stable):.2f} (their full ranks: "
            f"{sorted({m['max_rank'] for m in last.values()})})")
        spectra = weight_spectra(model, TARGET_MODULES)
        say(f"{'compression':>24} {'params removed':>14} {'ranks removed':>13} {'LRCs':>5} {'eval loss':>9} {'ppl':>8}")
        compressed = {}
        for target in (0.3, 0.5):
            for rule, planner in (("welore", welore_plan), ("uniform", uniform_plan)):
                plan = planner(spectra, target, by="parameters")
                copy_ = copy.deepcopy(model)
                compress(copy_, plan, TARGET_MODULES)
                loss = evaluate(copy_, stream, 16, args.eval_batches)
                lrcs = sum(m.lrc for m in plan.matrices)
                say(f"{rule + f' {target:.0%} of params':>24} {plan.parameter_reduction:14.1%} {plan.rank_reduction:13.1%} "
                    f"{lrcs:5d} {loss:9.4f} {math.exp(loss):8.2f}")
                compressed[(rule, target)] = copy_
        say(f"fine-tuning {args.finetune_steps} updates at lr {args.lr:g} (cosine, 10 % warmup; data seed 1):")
        say(f"{'model':>24} {'trainable':>10} {'state MiB':>9} {'peak MiB':>9} {'eval loss':>9} {'ppl':>8} {'tokens/s':>9}")
        tune = TrainSettings(steps=args.finetune_steps, batch_size=16, seq_len=128, eval_batches=args.eval_batches,
                             seed=1, measure_memory=True)
        runs = [("LRC of welore 50%", compressed[("welore", 0.5)]), ("LRC of uniform 50%", compressed[("uniform", 0.5)]),
                ("full, dense", copy.deepcopy(model))]
        for label, tuned in runs:
            params = freeze_for_lrc_finetune(tuned) if label.startswith("LRC") else list(tuned.parameters())
            optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
            result = pretrain(tuned, optimizer, stream, tune, name=label.replace(" ", "_"), **quiet)
            say(f"{label:>24} {sum(p.numel() for p in params):10,d} {result['optimizer_state_bytes'] / 2**20:9.2f} "
                f"{result['peak_bytes'] / 2**20:9.2f} {result['final_eval_loss']:9.4f} {result['final_perplexity']:8.2f} "
                f"{result['tokens_per_s']:9,.0f}")
    say()
    say(f"spectra (JSON, stable-rank plots per layer): {spectra_dir}/<method>.json, .png")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
