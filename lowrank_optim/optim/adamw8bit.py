"""GaLoreAdamW8bit: galore-torch's 8-bit GaLore under its name and signature (arXiv 2403.03507, §4.3).

galore-torch 1.0's ``GaLoreAdamW8bit`` wraps bitsandbytes' block-wise 8-bit Adam (Dettmers et al., 2022,
arXiv 2110.02861) around GaLore's projection; its 7B pretraining recipe on one GPU is this optimizer with
per-layer updates (:class:`~lowrank_optim.train.PerLayerUpdates`). Here it is :class:`GaLoreAdamW` with
``moment_format=Blockwise8bit(min_size=min_8bit_size)`` (:mod:`lowrank_optim.optim.moments`): the same
step, projectors, refresh policies, non-finite handling and checkpoints as every other optimizer of the
package, and no bitsandbytes (which the reference needs, and whose 8-bit state does not run under FSDP).

Where the arithmetic differs from galore-torch + bitsandbytes (measured differences are small; say so
if you compare runs):

- ``eps`` is added to ``sqrt(V)`` before the bias correction (Hugging Face's AdamW, as galore-torch's
  ``GaLoreAdamW``); bitsandbytes adds it to the bias-corrected ``sqrt(V / (1 - b2^t))``. With the default
  ``eps=1e-8`` the two agree to about ``1e-8 / sqrt(V)`` relative.
- Weight decay is applied after the update, ``W -= lr · wd · W``, for every parameter. galore-torch does
  so for projected parameters; bitsandbytes decays full-rank ones before their update, ``W *= 1 - lr · wd``
  (the same to first order in ``lr``).
- The code maps are the package's own decade maps (:mod:`lowrank_optim.ops.quant`) with blocks of 256
  along each stored row, not bitsandbytes' dynamic map over flat blocks of 256 (2048 in older releases).
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from .galore import GaLoreAdamW
from .moments import Blockwise8bit

__all__ = ["GaLoreAdamW8bit"]


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with block-wise 8-bit moments, under galore-torch's name and signature.

    Args (galore-torch's, which are bitsandbytes' ``AdamW8bit``'s):
        params, lr, betas, eps, weight_decay: as :class:`GaLoreAdamW`, with bitsandbytes' defaults
            (``eps=1e-8``, ``weight_decay=1e-2``; galore-torch's scripts pass ``weight_decay=0``).
        amsgrad: must be ``False`` (bitsandbytes' 8-bit Adam has no AMSGrad either).
        optim_bits: ``32`` (the signature's default) or ``8``: galore-torch passes 8 to bitsandbytes
            whatever this says, so the moments are 8-bit either way, as here. Other values are refused.
        args: must be ``None`` (bitsandbytes' override object).
        min_8bit_size: moments with fewer elements stay fp32 (bitsandbytes' rule, also 4096 by default;
            counted on the low-rank moment of a projected matrix, as galore-torch's projection makes it).
        percentile_clipping: must be ``100`` (no clipping; bitsandbytes' adaptive gradient clipping is not
            implemented: clip gradients before ``step()`` instead).
        block_wise: must be ``True`` (the only quantization implemented).
        is_paged: must be ``False`` (paged optimizer state is not implemented).
        **options: every keyword option of :class:`GaLoreAdamW` (``update_proj_gap``, ``scale``,
            ``proj_type``, ``projector``, ``moment_policy``, ``fused``, ``nonfinite``, ...), except
            ``moment_format``, which this class sets.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        **options: Any,
    ) -> None:
        # (name, value, the one value allowed, why): galore-torch's bitsandbytes options this class has no
        # implementation of are refused rather than ignored.
        fixed = (
            ("amsgrad", amsgrad, False, "False (8-bit Adam has no AMSGrad)"),
            ("args", args, None, "None (bitsandbytes' override object is not used)"),
            (
                "percentile_clipping", percentile_clipping, 100,
                "100 (adaptive clipping is not implemented: clip gradients before step())",
            ),
            ("block_wise", block_wise, True, "True (the only quantization implemented)"),
            ("is_paged", is_paged, False, "False (paged optimizer state is not implemented)"),
        )
        for name, value, allowed, description in fixed:
            if type(value) is not type(allowed) or value != allowed:
                raise ValueError(f"Invalid {name}: {value!r}. Must be {description}.")
        if isinstance(optim_bits, bool) or optim_bits not in (8, 32):
            raise ValueError(
                f"Invalid optim_bits: {optim_bits!r}. Must be 32 or 8 (galore-torch's GaLoreAdamW8bit keeps 8-bit "
                "moments whatever it says, and so does this class; for 32-bit moments use GaLoreAdamW)."
            )
        if "moment_format" in options:
            raise ValueError(
                "Invalid moment_format for GaLoreAdamW8bit: it sets the format itself (Blockwise8bit with "
                "min_size=min_8bit_size); use GaLoreAdamW(moment_format=...) for another one."
            )
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r}. Must be a non-negative integer.")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            moment_format=Blockwise8bit(min_size=min_8bit_size),
            **options,
        )
