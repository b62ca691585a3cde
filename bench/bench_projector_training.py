"""The demo recipe (``tiny`` model, its GaLore/Fira presets, 200 updates of 16 x 128 tokens) trained with the
SVD projector and with the warm-started randomized SVD (``projector="rsvd"``), over several seeds, in
this process: final eval loss per run, the mean and spread per projector, and the time spent in
projector refreshes (``Projector.refresh``, summed over the run) next to the whole run's time.

Usage: python bench/bench_projector_training.py [--methods galore fira] [--seeds 0 1] [--steps 200]
       [--projectors svd rsvd] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace

import torch

from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.models import LlamaConfig
from lowrank_optim.projection import resolve_projector
from lowrank_optim.train.methods import load_presets
from lowrank_optim.train.pretrain import TrainSettings, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["galore", "fira"])
    parser.add_argument("--projectors", nargs="+", default=["svd", "rsvd"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    config = LlamaConfig.from_name_or_path("tiny")
    presets = load_presets("tiny")
    stream = TokenStream(stdlib_corpus(), 128)
    say(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; command: {' '.join(sys.argv)}")
    say(f"{'method':>7} {'projector':>9} {'seed':>4} {'eval loss':>9} {'run s':>7} {'refresh s':>9}")
    # Time every projector's refresh (the classes are looked up through the registry).
    spent = {"refresh": 0.0}
    for cls in {type(resolve_projector(name)) for name in args.projectors}:
        original = cls.refresh

        def timed(self, *a, _original=original, **k):
            start = time.perf_counter()
            try:
                return _original(self, *a, **k)
            finally:
                spent["refresh"] += time.perf_counter() - start

        cls.refresh = timed
    summary: dict[tuple[str, str], list[float]] = {}
    for method in args.methods:
        for projector in args.projectors:
            preset = replace(presets[method], projector=projector)
            for seed in args.seeds:
                settings = TrainSettings(steps=args.steps, batch_size=16, seq_len=128, eval_batches=8, seed=seed, eval_every=args.steps)
                spent["refresh"] = 0.0
                start = time.perf_counter()
                result = pretrain(config, preset, stream, settings, log=lambda _: None)
                elapsed = time.perf_counter() - start
                loss = result["final_eval_loss"]
                summary.setdefault((method, projector), []).append(loss)
                say(f"{method:>7} {projector:>9} {seed:>4} {loss:>9.4f} {elapsed:>7.1f} {spent['refresh']:>9.2f}")
    say("")
    say(f"{'method':>7} {'projector':>9} {'mean':>8} {'spread (max-min)':>17}")
    for (method, projector), losses in summary.items():
        say(f"{method:>7} {projector:>9} {statistics.mean(losses):>8.4f} {max(losses) - min(losses):>17.4f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
