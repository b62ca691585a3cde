"""APOLLOAdamW vs the reference package ``apollo-torch`` 1.0.3, in one process: step time and state bytes.

On LLaMA-60M's projected matrices (q/k/v/o 512x512, gate/up 1376x512, down 512x1376, 8 layers; fp32,
``--threads`` threads), for APOLLO (rank 128, channel-wise) and APOLLO-Mini (rank 1, tensor-wise, scale
128): the median time of a step between refreshes (``--repeats`` rounds, the two optimizers alternating
round by round so that a change in the machine's load hits both) and the optimizer's state bytes. For
apollo-torch the state includes its projector objects' random matrices (they live in its state dict);
ours keeps a seed per matrix and draws the matrix again (cached between refreshes, so the memory in use
is the same, but a checkpoint holds the seed only). Ours is timed with its default NaN/Inf protection
(``nonfinite="skip"``) and without it (``propagate``, apollo-torch's behaviour). GaLoreAdamW at the same
rank (SVD basis) is timed for context.

apollo-torch is loaded without its package ``__init__`` (which imports bitsandbytes) and with a stub for
the ``transformers`` version check, as tests/test_apollo_reference.py does.

Usage: python bench/bench_apollo.py [--repeats 15] [--threads 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
import types

import torch
from torch import nn

from lowrank_optim import APOLLOAdamW, GaLoreAdamW

LAYERS = 8
SHAPES = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
CONFIGS = {
    "APOLLO r=128 channel": {"rank": 128, "scale_type": "channel", "scale": 1.0},
    "APOLLO-Mini r=1 tensor": {"rank": 1, "scale_type": "tensor", "scale": 128.0},
}


def load_reference() -> type:
    spec = importlib.util.find_spec("apollo_torch")
    if spec is None:
        raise SystemExit("apollo-torch 1.0.3 is not installed (pip install --no-deps apollo-torch==1.0.3)")
    for name in ("transformers", "transformers.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    versions = types.ModuleType("transformers.utils.versions")
    versions.require_version = lambda *args, **kwargs: None
    sys.modules["transformers.utils.versions"] = versions
    shell = types.ModuleType("apollo_torch")
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules["apollo_torch"] = shell
    return importlib.import_module("apollo_torch.apollo").AdamW


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            matrix = getattr(value, "ortho_matrix", None)  # apollo-torch's projector object
            if isinstance(matrix, torch.Tensor):
                total += matrix.numel() * matrix.element_size()
    return total


def build(cls: type, group: dict) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in SHAPES * LAYERS:
        param = nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02))
        param.grad = torch.randn(shape, generator=generator)
        params.append(param)
    optimizer = cls([{"params": params, "proj": "random", "update_proj_gap": 200, "proj_type": "std", **group}], lr=1e-3)
    optimizer.step()  # the first draw and the state; later steps (before step 201) do not refresh
    return optimizer, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reference = load_reference()
    lines = [f"# torch {torch.__version__}, {torch.get_num_threads()} threads; command: {' '.join(sys.argv)}"]
    lines.append(f"{'configuration':<24} {'optimizer':<15} {'step ms':>8} {'x ref':>6} {'state MiB':>10} {'x ref':>6}")
    for label, group in CONFIGS.items():
        contenders = {
            "apollo-torch": build(reference, group)[0],
            "ours": build(APOLLOAdamW, group)[0],
            # apollo-torch has no NaN/Inf protection; ours by default checks every update on the device.
            "ours propagate": build(lambda groups, **kw: APOLLOAdamW(groups, nonfinite="propagate", **kw), group)[0],
            "GaLoreAdamW": build(lambda groups, **kw: GaLoreAdamW(
                [{k: v for k, v in g.items() if k not in ("proj", "scale_type")} for g in groups], **kw
            ), {**group, "scale": 0.25})[0],
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, optimizer in contenders.items():
                start = time.perf_counter()
                optimizer.step()
                times[name].append(time.perf_counter() - start)
        base_time = statistics.median(times["apollo-torch"])
        base_bytes = state_bytes(contenders["apollo-torch"])
        for name, optimizer in contenders.items():
            median = statistics.median(times[name])
            size = state_bytes(optimizer)
            lines.append(
                f"{label:<24} {name:<15} {median * 1e3:>8.1f} {median / base_time:>6.2f} {size / 2**20:>10.2f} "
                f"{size / base_bytes:>6.3f}"
            )
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
