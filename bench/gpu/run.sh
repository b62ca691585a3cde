#!/usr/bin/env bash
# `make test-gpu`: on a machine with an NVIDIA GPU, a CUDA build of torch and nvcc (no DeepSpeed needed).
# Builds both extensions in place, runs the GPU-marked tests, then the kernel
# benchmark and the optimizer-step benchmark on CUDA, and writes everything to
# bench/results/gpu-<date>-<commit>/. About 3-5 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-python3}"
# The scripts import the package from this checkout (bench/ scripts are not run from the root).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
out="bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)-${commit}"
mkdir -p "$out"

"$PY" - <<'PYEOF' > "$out/environment.txt"
import subprocess, torch
assert torch.cuda.is_available(), "make test-gpu needs a CUDA device and a CUDA build of torch"
print("device:", torch.cuda.get_device_name(0))
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
print("nvcc:", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
PYEOF
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)" >> "$out/environment.txt"
cat "$out/environment.txt"

# Only the visible GPU's architecture: keeps the build to about a minute.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export MAX_JOBS="${MAX_JOBS:-8}"
( time "$PY" setup.py -q build_ext --inplace ) 2>&1 | tee "$out/build.log"
"$PY" -c 'import lowrank_optim.ops as o; assert o.kernels_available("cuda"), o.kernel_load_error("cuda"); print("CUDA kernels loaded")'

status=0
# Every CUDA case is marked `gpu`: the kernels against their references (tests/test_kernels.py), fused vs
# reference optimizer trajectories (tests/test_fused.py), CPU/CUDA state round trips (tests/test_gpu.py).
# The CPU cases run in CI; device time is short.
"$PY" -m pytest -q -rs -m gpu tests 2>&1 | tee "$out/pytest-gpu.txt" || status=1
"$PY" bench/bench_kernels.py --device cuda --repeats 30 --json "$out/bench_kernels_cuda.json" 2>&1 \
  | tee "$out/bench_kernels_cuda.txt" || status=1
# A whole optimizer step (56 LLaMA-60M matrices): GaLore and Fira with the kernels vs fused=False.
"$PY" bench/bench_galore_step.py --device cuda --repeats 20 2>&1 | tee "$out/bench_galore_step_cuda.txt" || status=1
echo "results in $out"
exit $status
