"""SLTrainLinear's two paths against nn.Linear of the same shape: forward+backward time, in one process.

For each shape (in -> out, rank r, delta 0.03, fp32, bias-free, B non-zero as during training) and token
count: the median time of ``layer(x).backward(G)`` for nn.Linear, the dense path (compose W twice) and the
factored path (sparse kernels, no out x in matrix), alternating within each repeat so that load drift on a
shared machine hits all alike; the ratio to nn.Linear; and the transient peak of forward+backward
(bench_sltrain's storage tracker: ATen outputs above the parameters, input and output gradient; the CPU
kernels' scratch, allocated inside the ops, is not seen by it and is listed apart, computed).

Then ``kappa``, the cost rule's price of a sparse multiply-add in GEMM multiply-adds (SPARSE_FLOP_COST in
lowrank_optim/nn/sltrain.py): the three sparse ops at each shape against one GEMM of T x in x out; and the
crossover of the rule, T* (tokens below which the factored path is cheaper; "always" when it is cheaper
at every T), with a sweep over T of the measured times around it for a shape whose T* is finite.

Last, a whole training step (forward, backward, AdamW step) of a LLaMA model (``--model``, default 60m;
``--model none`` skips it) on ``--batch`` x ``--seq`` tokens: tokens/s of the dense model with AdamW and of
its SLTrain conversion (the preset's rank, alpha and delta) on each path.

Run: ``python bench/bench_sltrain_layer.py [--threads 2] [--repeats 7] [--model 60m]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from bench_sltrain import transient_peak_bytes
from torch import Tensor, nn

from lowrank_optim.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank_optim.nn import SLTrainLinear, convert_to_sltrain
from lowrank_optim.nn.sltrain import SPARSE_FLOP_COST, path_costs
from lowrank_optim.ops import sddmm, sparse_row_pointers, spmm_add_, spmm_t_add_

MIB = 2**20
DELTA = 0.03
# (in, out, rank, alpha, tokens): LLaMA-1B MLP up/gate (r 512, alpha 8) and LLaMA-60M MLP (r 128, alpha 32).
CASES = [(2048, 5461, 512, 8.0, 2048), (2048, 5461, 512, 8.0, 256), (512, 1376, 128, 32.0, 2048)]
# A shape whose crossover is finite (rank half of in): the sweep shows the measured times on both sides.
SWEEP = (1024, 1024, 512, 8.0)
SWEEP_TOKENS = [64, 256, 1024, 4096]


def _layers(in_features: int, out_features: int, rank: int, alpha: float) -> dict[str, nn.Module]:
    generator = torch.Generator().manual_seed(0)
    dense = nn.Linear(in_features, out_features, bias=False)
    layers: dict[str, nn.Module] = {"nn.Linear": dense}
    for path in ("dense", "factored"):
        layer = SLTrainLinear(in_features, out_features, rank=rank, delta=DELTA, alpha=alpha, seed=0, path=path)
        with torch.no_grad():
            layer.B.normal_(generator=generator)  # non-zero B, as during training (the cost is the same)
        layers[f"SLTrain {path}"] = layer
    return layers


def _forward_backward(layer: nn.Module, x: Tensor, grad_output: Tensor, autocast: bool) -> float:
    for param in layer.parameters():
        param.grad = None
    x.grad = None
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = layer(x)
    output.backward(grad_output.to(output.dtype))
    return time.perf_counter() - start


def _median_seconds(
    layers: dict[str, nn.Module], x: Tensor, grad_output: Tensor, repeats: int, autocast: bool = False
) -> dict[str, float]:
    for layer in layers.values():
        _forward_backward(layer, x, grad_output, autocast)  # warm-up: first-call allocations, the support check
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(_forward_backward(layer, x, grad_output, autocast))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def _median(run: Callable[[], object], repeats: int) -> float:
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def kappa(in_features: int, out_features: int, tokens: int, dtype: torch.dtype, repeats: int) -> float:
    """Seconds per multiply-add of spmm_add_ + spmm_t_add_ + sddmm over seconds per multiply-add of x Wᵀ."""
    generator = torch.Generator().manual_seed(1)
    layer = SLTrainLinear(in_features, out_features, rank=1, delta=DELTA, seed=0)
    indices = layer.indices
    row_ptr = sparse_row_pointers(indices, out_features, in_features)
    nnz = indices.numel()
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    g = torch.randn(tokens, out_features, generator=generator).to(dtype)
    values = torch.randn(nnz, generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    y, dx = torch.zeros(tokens, out_features, dtype=dtype), torch.zeros(tokens, in_features, dtype=dtype)

    def sparse() -> None:
        spmm_add_(y, x, values, indices, row_ptr, check_indices=False)
        spmm_t_add_(dx, g, values, indices, row_ptr, check_indices=False)
        sddmm(g, x, indices, row_ptr, check_indices=False)

    sparse_seconds = _median(sparse, repeats)
    gemm_seconds = _median(lambda: torch.mm(x, weight.t()), repeats)
    return (sparse_seconds / (3 * tokens * nnz)) / (gemm_seconds / (tokens * in_features * out_features))


def crossover(in_features: int, out_features: int, rank: int, nnz: int, kappa_value: float) -> str:
    """T* of path_costs (fwd+bwd): the token count where both paths cost the same."""
    m, n, r = out_features, in_features, rank
    denominator = r * (3 * m + 4 * n) + 3 * kappa_value * nnz - 3 * m * n
    return "always factored" if denominator <= 0 else f"factored below T* = {4 * m * n * r / denominator:.0f} tokens"


# The SLTrain presets (lowrank_optim/configs/presets): rank, alpha.
MODEL_RECIPES = {"tiny": (32, 8.0), "60m": (128, 32.0)}


def training_step_table(model_name: str, batch: int, seq: int, repeats: int) -> None:
    rank, alpha = MODEL_RECIPES[model_name]
    config = LlamaConfig.from_name_or_path(model_name)
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    print(f"\n== one training step of LLaMA-{model_name} (forward, backward, AdamW step), {batch} x {seq} tokens, "
          f"median of {repeats} ==")
    print(f"{'model':<28} {'s/step':>8} {'tokens/s':>9} {'x dense AdamW':>14}")
    base = None
    for variant in ("dense AdamW", "SLTrain dense path", "SLTrain factored path", "SLTrain auto path"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if variant != "dense AdamW":
            convert_to_sltrain(model, rank=rank, delta=DELTA, alpha=alpha, seed=0)
            for module in model.modules():
                if isinstance(module, SLTrainLinear):
                    module.path = variant.split()[1]
                    with torch.no_grad():
                        module.B.normal_(std=0.02, generator=generator)  # as during training
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            model(input_ids, labels=input_ids).loss.backward()
            optimizer.step()

        seconds = _median(step, repeats)
        base = base or seconds
        print(f"{variant:<28} {seconds:>8.3f} {batch * seq / seconds:>9.0f} {base / seconds:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="60m", choices=[*MODEL_RECIPES, "none"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, fp32, median of {args.repeats}")
    print(f"cost rule kappa in use (SPARSE_FLOP_COST): {SPARSE_FLOP_COST or 'none (auto = dense)'}")

    print("\n== forward+backward vs nn.Linear of the same shape (delta 0.03, no bias; fp32 parameters, fp32 or "
          "under torch.autocast bf16) ==")
    header = (f"{'shape':<18} {'tokens':>6} {'dtype':<9} {'layer':<17} {'ms':>8} {'x nn.Linear':>12} "
              f"{'transient peak MiB':>18} {'kernel scratch MiB':>19}")
    print(header)
    for in_features, out_features, rank, alpha, tokens in CASES:
        layers = _layers(in_features, out_features, rank, alpha)
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(tokens, in_features, generator=generator, requires_grad=True)
        grad_output = torch.randn(tokens, out_features, generator=generator)
        shape = f"{in_features}->{out_features} r={rank}"
        for autocast in (False, True):
            seconds = _median_seconds(layers, x, grad_output, args.repeats, autocast)
            for name, layer in layers.items():
                peak = "" if autocast else f"{transient_peak_bytes(layer, x, grad_output) / MIB:.1f}"
                # The factored path's CPU kernels allocate a 64-token tile of max(in, out) fp32 features per
                # thread and, from 256 tokens, spmm_t_add_ a transposed support (int32 indices, fp32 values).
                nnz = int(DELTA * in_features * out_features)
                scratch = 64 * max(in_features, out_features) * 4 * args.threads
                scratch += (8 * nnz + 4 * (in_features + 1)) if tokens >= 256 else 0
                tiles = scratch if name.endswith("factored") else 0
                print(f"{shape:<18} {tokens:>6} {'bf16 amp' if autocast else 'fp32':<9} {name:<17} "
                      f"{seconds[name] * 1e3:>8.1f} {seconds[name] / seconds['nn.Linear']:>12.2f} {peak:>18} "
                      f"{tiles / MIB:>19.1f}")
        print(f"{'':<18} {'':>6} (one dense {out_features}x{in_features} fp32 matrix: "
              f"{out_features * in_features * 4 / MIB:.1f} MiB; x: {tokens * in_features * 4 / MIB:.1f} MiB)")

    print("\n== kappa: a sparse multiply-add (spmm_add_ + spmm_t_add_ + sddmm) in units of a GEMM multiply-add, "
          "and the cost rule's crossover (forward+backward) with it ==")
    for in_features, out_features, rank, _, tokens in CASES:
        nnz = int(DELTA * in_features * out_features)
        for dtype in (torch.float32, torch.bfloat16):
            value = kappa(in_features, out_features, tokens, dtype, args.repeats)
            print(f"{in_features}->{out_features} r={rank} tokens={tokens} {str(dtype):<15} kappa = {value:6.2f}: "
                  f"{crossover(in_features, out_features, rank, nnz, value)}")

    in_features, out_features, rank, alpha = SWEEP
    nnz = int(DELTA * in_features * out_features)
    value = kappa(in_features, out_features, 1024, torch.float32, args.repeats)
    print(f"\n== sweep {in_features}->{out_features} r={rank} (kappa {value:.2f}: "
          f"{crossover(in_features, out_features, rank, nnz, value)}) ==")
    print(f"{'tokens':>6} {'dense ms':>9} {'factored ms':>12} {'measured faster':>16} {'rule picks':>11} "
          f"{'auto picks':>11}")
    layers = _layers(in_features, out_features, rank, alpha)
    del layers["nn.Linear"]
    probe = SLTrainLinear(in_features, out_features, rank=rank, delta=DELTA, alpha=alpha, seed=0)  # path "auto"
    for tokens in SWEEP_TOKENS:
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(tokens, in_features, generator=generator, requires_grad=True)
        grad_output = torch.randn(tokens, out_features, generator=generator)
        seconds = _median_seconds(layers, x, grad_output, args.repeats)
        dense_cost, factored_cost = path_costs(
            tokens, in_features, out_features, rank, nnz, sparse_flop_cost=value
        )
        faster = "factored" if seconds["SLTrain factored"] < seconds["SLTrain dense"] else "dense"
        picked = "factored" if factored_cost < dense_cost else "dense"
        auto = probe.path_for(tokens, backward=True)  # with SPARSE_FLOP_COST's kappa
        print(f"{tokens:>6} {seconds['SLTrain dense'] * 1e3:>9.1f} {seconds['SLTrain factored'] * 1e3:>12.1f} "
              f"{faster:>16} {picked:>11} {auto:>11}")

    if args.model != "none":
        training_step_table(args.model, args.batch, args.seq, max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
