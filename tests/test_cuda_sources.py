"""The CUDA sources compile without a GPU: ``nvcc -c`` on each ``csrc/cuda/*.cu`` for sm_80 and sm_90.

The ``.cu`` files include CUDA headers only (csrc/README.md), so this works on a CPU-only machine whose
torch has no CUDA headers; the torch bindings (``bindings.cpp``) are compiled by ``make test-gpu``.
Uses the flags of the real build: ``setup.py``'s plus the ones torch's ``CUDAExtension`` adds (which
remove the implicit half/bfloat16 conversions, so a cast that compiles alone can fail there).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
ARCHITECTURES = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
NVCC_FLAGS = [*COMMON_NVCC_FLAGS, "-O3", "-fmad=false", "--expt-relaxed-constexpr", "-std=c++17"]


def test_cuda_sources_exist() -> None:
    assert SOURCES, f"no .cu files in {CUDA_DIR}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (install the CUDA toolkit to compile the kernels)")
@pytest.mark.parametrize("source", SOURCES, ids=[source.name for source in SOURCES])
def test_cuda_source_compiles(source: Path, tmp_path: Path) -> None:
    command = [NVCC, "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o"), *NVCC_FLAGS, *ARCHITECTURES]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
