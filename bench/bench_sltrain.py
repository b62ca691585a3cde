"""SLTrain (arXiv 2406.02214) memory and speed against dense layers, in one process on the CPU.

1. LLaMA-60M/130M (reference ranks and alphas, delta = 0.03): parameter count and the bytes of
   weights + AdamW moments (+ support indices, int32 vs int64), in bf16 (the papers' pure-bf16
   convention) and fp32, beside the dense model.
2. One SLTrainLinear vs nn.Linear at LLaMA-1B MLP shape (in 2048, out 5461, r = 512, delta = 0.03),
   fp32, 256 tokens: forward+backward time (median of repeats) and memory.

Memory method (CPU has no allocator statistics): a TorchDispatchMode sees every ATen op of the forward
and backward passes (autograd propagates it to the backward thread) and registers each new output
storage; a weakref finalizer on the storage subtracts its bytes when it is freed. "transient peak" is
the maximum of the live bytes allocated during the pass (activations, temporaries, gradients),
measured above the parameters, input and output gradient that exist before it; "resident" adds the
parameter and index bytes. Run: ``python bench/bench_sltrain.py``.
"""

from __future__ import annotations

import statistics
import time
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowrank_optim.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank_optim.nn import SLTrainLinear, convert_to_sltrain

MIB = 2**20
# Reference SLTrain recipes (DESIGN.md §1): rank and alpha per model size.
RECIPES = {"60m": (128, 32.0), "130m": (256, 16.0)}
DELTA = 0.03
LAYER_SHAPE = (2048, 5461)  # (in_features, out_features) of a LLaMA-1B MLP up/gate projection
LAYER_RANK = 512
TOKENS = 256
REPEATS = 10


class LiveStorageBytes(TorchDispatchMode):
    """Tracks the live and peak bytes of storages that ATen ops create while the mode is active."""

    def __init__(self, preexisting: list[Tensor]) -> None:
        super().__init__()
        self._tracked: set[int] = {t.untyped_storage().data_ptr() for t in preexisting}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            if isinstance(leaf, Tensor):
                self._track(leaf.untyped_storage())
        return output

    def _track(self, storage: torch.UntypedStorage) -> None:
        pointer, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or pointer in self._tracked:  # an alias (view, in-place result) of a known storage
            return
        self._tracked.add(pointer)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, pointer, size)

    def _release(self, pointer: int, size: int) -> None:
        self._tracked.discard(pointer)
        self.live -= size


def model_memory_table() -> None:
    print("== LLaMA models: weights + AdamW moments (2 per trainable weight) [+ SLTrain support indices] ==")
    header = f"{'model':<6} {'variant':<22} {'params':>12} {'bf16 MiB':>10} {'fp32 MiB':>10} {'vs dense (bf16)':>16}"
    print(header)
    for name, (rank, alpha) in RECIPES.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig.from_name_or_path(name))
        report = convert_to_sltrain(model, rank=rank, delta=DELTA, alpha=alpha)
        nnz = report.index_bytes // 4  # every LLaMA matrix has < 2**31 entries, so the buffers are int32

        def total_bytes(params: int, weight_bytes: int, index_bytes: int) -> int:
            return 3 * params * weight_bytes + index_bytes  # weight + exp_avg + exp_avg_sq

        dense_bf16 = total_bytes(report.params_before, 2, 0)
        rows = [
            ("dense AdamW", report.params_before, 0),
            (f"SLTrain r={rank} int32 idx", report.params_after, 4 * nnz),
            (f"SLTrain r={rank} int64 idx", report.params_after, 8 * nnz),
        ]
        for variant, params, index_bytes in rows:
            bf16, fp32 = total_bytes(params, 2, index_bytes), total_bytes(params, 4, index_bytes)
            print(
                f"{name:<6} {variant:<22} {params:>12,} {bf16 / MIB:>10.1f} {fp32 / MIB:>10.1f} "
                f"{bf16 / dense_bf16:>16.3f}"
            )
        print(f"{name:<6} {'(support entries)':<22} {nnz:>12,}")


def forward_backward(layer: nn.Module, x: Tensor, grad_output: Tensor) -> float:
    """Seconds of one forward+backward pass, starting from empty parameter gradients."""
    for param in layer.parameters():
        param.grad = None
    start = time.perf_counter()
    layer(x).backward(grad_output)
    return time.perf_counter() - start


def median_seconds(layers: dict[str, nn.Module], x: Tensor, grad_output: Tensor) -> dict[str, float]:
    """Median time per layer; the layers alternate within each repeat so that load drift on a shared
    machine affects both alike."""
    for layer in layers.values():
        forward_backward(layer, x, grad_output)  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(REPEATS):
        for name, layer in layers.items():
            times[name].append(forward_backward(layer, x, grad_output))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def transient_peak_bytes(layer: nn.Module, x: Tensor, grad_output: Tensor) -> int:
    for param in layer.parameters():
        param.grad = None
    with LiveStorageBytes([x, grad_output, *layer.parameters(), *layer.buffers()]) as tracker:
        layer(x).backward(grad_output)
    return tracker.peak


def resident_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])


def layer_benchmark() -> None:
    in_features, out_features = LAYER_SHAPE
    print(
        f"\n== one layer, fp32 CPU ({torch.get_num_threads()} threads): in={in_features}, out={out_features}, "
        f"r={LAYER_RANK}, delta={DELTA}, {TOKENS} tokens, forward+backward, median of {REPEATS} =="
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, in_features, generator=generator, requires_grad=True)
    grad_output = torch.randn(TOKENS, out_features, generator=generator)
    dense = nn.Linear(in_features, out_features, bias=False)
    sltrain = SLTrainLinear(in_features, out_features, rank=LAYER_RANK, delta=DELTA, alpha=8.0, seed=0)
    with torch.no_grad():
        sltrain.B.normal_(generator=generator)  # non-zero B, as during training (same cost either way)

    layers = {"nn.Linear": dense, "SLTrainLinear": sltrain}
    seconds = median_seconds(layers, x, grad_output)
    results = {
        name: (seconds[name], transient_peak_bytes(layer, x, grad_output), resident_bytes(layer))
        for name, layer in layers.items()
    }
    base_seconds, base_peak, base_resident = results["nn.Linear"]
    print(f"{'layer':<14} {'time ms':>9} {'x':>6} {'transient peak MiB':>19} {'x':>6} {'params+idx MiB':>15} {'x':>6} {'resident peak MiB':>18} {'x':>6}")
    for name, (layer_seconds, peak, resident) in results.items():
        print(
            f"{name:<14} {layer_seconds * 1e3:>9.1f} {layer_seconds / base_seconds:>6.2f} {peak / MIB:>19.1f} "
            f"{peak / base_peak:>6.2f} {resident / MIB:>15.1f} {resident / base_resident:>6.2f} "
            f"{(peak + resident) / MIB:>18.1f} {(peak + resident) / (base_peak + base_resident):>6.2f}"
        )
    print(f"(one dense {out_features}x{in_features} fp32 matrix = {out_features * in_features * 4 / MIB:.1f} MiB)")


if __name__ == "__main__":
    model_memory_table()
    layer_benchmark()
