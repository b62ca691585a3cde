"""Custom ``torch.library`` ops of the ``lowrank_optim`` namespace, with pure-PyTorch default kernels.

Importing this package defines the ops; compiled extensions only add CPU/CUDA kernels to them
(see :mod:`lowrank_optim.ops.sparse` for how that override works).
"""

from ._extension import kernel_load_error, kernels_available
from .adam import lowrank_adam_
from .dct import dct_topk
from .fira import fira_folded_, fira_residual_
from .quant import blockwise_adam_, dequantize_blockwise, quantize_blockwise_, signed_code_map, unsigned_code_map
from .sparse import sparse_gather, sparse_scatter_add_
from .spmm import sddmm, sparse_row_pointers, spmm_add_, spmm_t_add_

__all__ = [
    "blockwise_adam_",
    "dct_topk",
    "dequantize_blockwise",
    "fira_folded_",
    "fira_residual_",
    "kernel_load_error",
    "kernels_available",
    "lowrank_adam_",
    "quantize_blockwise_",
    "sddmm",
    "signed_code_map",
    "sparse_gather",
    "sparse_row_pointers",
    "sparse_scatter_add_",
    "spmm_add_",
    "spmm_t_add_",
    "unsigned_code_map",
]
