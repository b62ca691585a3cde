"""How often Fira's norm-growth limiter is active in a short pretraining run (the tiny LLaMA, the demo's
recipe). When it is not, the limiter is exactly 1 and the ``fira_residual_`` kernels skip their second
pass over the residual, so this fraction says which of ``bench_kernels.py``'s two Fira cases ("lim on",
"lim off") a training step mostly pays for.

A step of a matrix is limited when its stored norm became exactly ``gamma`` times the previous one
(``prev = ||S|| / lim`` with ``lim = ratio / gamma``); a free step stores less.

    python bench/fira_limiter_activity.py [--steps 300] [--config tiny]
"""

from __future__ import annotations

import argparse

import torch

from lowrank_optim.data import TokenStream, stdlib_corpus
from lowrank_optim.models.llama import LlamaConfig
from lowrank_optim.optim import FiraAdamW
from lowrank_optim.optim.fira import RESIDUAL_NORM
from lowrank_optim.projection import FIRA_GAMMA
from lowrank_optim.train.methods import build_model, build_optimizer, cosine_with_warmup, load_presets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    config = LlamaConfig.from_name_or_path(args.config)
    preset = load_presets(args.config)["fira"]
    model = build_model(config, preset=preset)
    optimizer = build_optimizer(model, preset)
    assert isinstance(optimizer, FiraAdamW)
    schedule = cosine_with_warmup(optimizer, args.steps)
    stream = TokenStream(stdlib_corpus(), args.seq_len)
    batches = stream.train_batches(args.batch_size, seed=0)
    limited = free = 0
    per_window: list[float] = []
    window_limited = window_total = 0
    for step in range(args.steps):
        batch = next(batches)
        loss = model(batch, labels=batch).loss
        loss.backward()
        before = {p: s[RESIDUAL_NORM].item() for p, s in optimizer.state.items() if RESIDUAL_NORM in s}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        for param, previous in before.items():
            stored = optimizer.state[param][RESIDUAL_NORM].item()
            if step == 0 or previous == 0.0:
                continue
            is_limited = abs(stored - FIRA_GAMMA * previous) <= 1e-6 * stored
            limited += is_limited
            free += not is_limited
            window_limited += is_limited
            window_total += 1
        if (step + 1) % (args.steps // 5) == 0:
            per_window.append(window_limited / max(window_total, 1))
            window_limited = window_total = 0
    total = limited + free
    print(f"Fira on LLaMA-{args.config}, {args.steps} steps, batch {args.batch_size}x{args.seq_len}, "
          f"lr {preset.lr}, rank {preset.rank}, gamma {FIRA_GAMMA}")
    print(f"matrix-steps limited: {limited} of {total} ({limited / total:.1%}); free (limiter exactly 1): {free}")
    print("limited fraction per fifth of the run: " + ", ".join(f"{value:.1%}" for value in per_window))


if __name__ == "__main__":
    main()
