#!/usr/bin/env bash
# `make cuda-build-check`: compiles and links the CUDA extension against a real CUDA build of torch on a
# machine without a GPU, then loads it and checks that every op got a CUDA kernel. CI cannot afford this
# (the CUDA torch is about 5.5 GB); `tests/test_cuda_sources.py` covers the .cu files with torch's nvcc
# flags, this covers bindings.cpp, the link and the registration. Needs nvcc matching torch's CUDA major.
# Builds in a scratch copy of the tracked tree, so the checkout's CPU build is left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
VENV="${CUDA_VENV:-/tmp/lowrank_optim-cuda-venv}"
# On the build machines this CUDA wheel lies on disk (torch 2.13.0 there is the CPU build only).
TORCH_CUDA_SPEC="${TORCH_CUDA_SPEC:-torch==2.14.1}"
# setup.py finds the toolkit (CUDA_HOME, else nvcc's real location, else /usr/local/cuda).
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "$TORCH_CUDA_SPEC" numpy setuptools
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
git ls-files -z | xargs -0 tar cf - | tar xf - -C "$scratch"
cd "$scratch"
"$VENV/bin/python" -c 'import torch; assert torch.version.cuda, torch.__version__; print("torch", torch.__version__, "CUDA", torch.version.cuda)'
"$VENV/bin/python" setup.py -q build_ext --inplace
"$VENV/bin/python" - <<'PYEOF'
import torch
import lowrank_optim.ops as ops
assert ops.kernels_available("cuda"), ops.kernel_load_error("cuda")
# fira_folded_ has no CUDA kernel yet: on CUDA the dispatcher runs its pure-PyTorch default (csrc/README.md).
names = ["sparse_scatter_add_", "sparse_gather", "lowrank_adam_", "fira_residual_", "dct_topk"]
missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lowrank_optim::{n}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"CUDA extension built, loaded, kernels registered for {len(names)} ops (no GPU needed to check this)")
PYEOF
