"""The devices tests run on: CUDA cases are marked ``gpu`` and skipped, with the reason, without a device."""

from __future__ import annotations

import pytest
import torch

#: Marks for a test (or ``pytestmark``) that needs a CUDA device.
CUDA_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is available here"),
]

#: ``@pytest.mark.parametrize("device", DEVICES)``: the CPU, and CUDA with CUDA_MARKS.
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]
