"""Loads the compiled kernels (``csrc/``) once, at import, and reports whether that worked.

``setup.py`` builds ``lowrank_optim/_C_cpu*.so`` (and ``_C_cuda*.so`` with a CUDA torch). Loading one
registers its kernels for the ops declared in :mod:`lowrank_optim.ops`; a failure is recorded, never
raised, because every op keeps its pure-PyTorch default. ``LOWRANK_OPTIM_NO_EXTENSIONS=1`` skips
loading (and building, in ``setup.py``), which is how the tests run the package without compiled code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["DISABLE_ENV", "kernel_load_error", "kernels_available"]

DISABLE_ENV = "LOWRANK_OPTIM_NO_EXTENSIONS"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# Extension stem per device type whose kernels it registers.
_EXTENSIONS = {"cpu": "_C_cpu", "cuda": "_C_cuda"}

_loaded: set[str] = set()
_errors: dict[str, str] = {}


def _find_library(stem: str) -> Path | None:
    # The exact suffix depends on the interpreter (e.g. ".cpython-312-x86_64-linux-gnu.so").
    candidates = sorted(_PACKAGE_DIR.glob(f"{stem}.*.so")) + sorted(_PACKAGE_DIR.glob(f"{stem}.so"))
    return candidates[0] if candidates else None


def _load_all() -> None:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        for device_type in _EXTENSIONS:
            _errors[device_type] = f"loading disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
        return
    for device_type, stem in _EXTENSIONS.items():
        if device_type == "cuda" and torch.version.cuda is None:
            _errors[device_type] = f"torch {torch.__version__} is not a CUDA build"
            continue
        path = _find_library(stem)
        if path is None:
            _errors[device_type] = (
                f"no compiled {stem} in {_PACKAGE_DIR}; build it with "
                "`pip install --no-build-isolation -e .` (needs a C++ compiler"
                + (" and the CUDA toolkit)" if device_type == "cuda" else ")")
            )
            continue
        try:
            torch.ops.load_library(str(path))
        except OSError as error:  # what ctypes raises for a missing file, an ABI or a symbol mismatch
            _errors[device_type] = f"{path.name}: {error}"
        else:
            _loaded.add(device_type)


def kernels_available(device_type: str | torch.device) -> bool:
    """Whether compiled kernels were loaded for ``device_type`` (``"cpu"``, ``"cuda"``, or a device)."""
    if isinstance(device_type, torch.device):
        device_type = device_type.type
    return device_type in _loaded


def kernel_load_error(device_type: str | torch.device = "cpu") -> str | None:
    """Why the kernels of ``device_type`` are unavailable (``None`` when they loaded)."""
    if isinstance(device_type, torch.device):
        device_type = device_type.type
    if device_type in _loaded:
        return None
    return _errors.get(device_type, f"no compiled kernels exist for device type {device_type!r}")


_load_all()
