"""Build script: the package, plus the csrc/ kernels as torch C++ (and CUDA) extensions.

Install for development with ``pip install --no-build-isolation -e .[test]`` after installing torch, so
that the extensions compile against the torch already in the environment instead of pulling another one
into an isolated build environment.

- ``lowrank_optim._C_cpu``: ``csrc/cpu/*.cpp``, built whenever a C++ compiler is found.
- ``lowrank_optim._C_cuda``: ``csrc/cuda/*.{cu,cpp}``, built when torch is a CUDA build and a CUDA
  toolkit (``CUDA_HOME``) is found; architectures follow ``TORCH_CUDA_ARCH_LIST`` (torch's default:
  the visible GPU's, else a list of common ones).
- ``LOWRANK_OPTIM_NO_EXTENSIONS=1`` builds neither; the package then runs on its pure-PyTorch ops.

Either ``.so`` is loaded at import by ``lowrank_optim/ops/_extension.py``, never imported as a module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"

# -ffp-contract=off: the compiler must not fuse multiply-adds that the reference rounds separately
# (csrc/cpu/adam.cpp fuses exactly where ATen does). -fno-math-errno lets sqrt vectorize. OpenMP
# because at::parallel_for is inlined from headers that parallelize with it, as in torch itself.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "-fmad=false", "--expt-relaxed-constexpr"]


def _relative(paths: list[Path]) -> list[str]:
    return sorted(str(path.relative_to(ROOT)) for path in paths)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root: ``CUDA_HOME``/``CUDA_PATH`` if set, else the one whose ``include/`` has
    ``cuda_runtime.h`` among nvcc's grandparent (links resolved) and ``/usr/local/cuda``.

    torch's own guess is nvcc's grandparent unresolved, which is wrong when ``nvcc`` on PATH is a
    wrapper script (``/usr/local/bin/nvcc`` gives ``/usr/local``, without the CUDA headers).
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for candidate in candidates:
        if (candidate / "include" / "cuda_runtime.h").is_file():
            return str(candidate)
    return None


def _extensions() -> tuple[list, dict]:
    if os.environ.get("LOWRANK_OPTIM_NO_EXTENSIONS", "0") not in ("", "0"):
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("lowrank_optim: no C++ compiler found; installing without compiled kernels")
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    import torch

    extensions = [
        CppExtension(
            "lowrank_optim._C_cpu",
            _relative(list((CSRC / "cpu").glob("*.cpp"))),
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    if torch.version.cuda is not None and CUDA_HOME is not None:
        extensions.append(
            CUDAExtension(
                "lowrank_optim._C_cuda",
                _relative(list((CSRC / "cuda").glob("*.cu")) + list((CSRC / "cuda").glob("*.cpp"))),
                # -fmad=false: the same rounding as the reference's separate ops (see csrc/README.md).
                extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS},
            )
        )
    return extensions, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="lowrank_optim",
    version="0.1.0",
    description="Memory-efficient pretraining optimizers (GaLore, Fira, DCT, SLTrain) as drop-ins for AdamW",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["lowrank_optim", "lowrank_optim.*"]),
    package_data={"lowrank_optim": ["configs/**/*.json"]},
    # A range that the torch==2.13.0 CPU wheel satisfies, so pip never swaps in another build.
    install_requires=["torch>=2.4,<2.15", "numpy", "matplotlib"],
    extras_require={
        "test": ["pytest>=8", "scipy", "deepspeed==0.19.8", "tokenizers", "transformers==5.24.0", "accelerate==1.16.0",
                 "ruff==0.17.6", "mypy==2.4.1"],
        "transformers": ["transformers>=5", "accelerate"],
    },
    entry_points={"console_scripts": ["lowrank-optim=lowrank_optim.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
