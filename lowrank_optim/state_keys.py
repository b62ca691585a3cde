"""The keys of the low-rank optimizers' per-matrix state, defined once for every layout and checkpoint.

Bases (SVD) or frequency indices (DCT) exist only for the side(s) a projection uses; ``residual_norm``
only for Fira. A layout keeps each tensor whole or as its local piece (see ``optim.layout.SHARDINGS``).
"""

STEP = "step"  # 0-dim fp32 on the CPU, like torch's Adam
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
BASIS_LEFT = "basis_left"  # m x r
BASIS_RIGHT = "basis_right"  # r x n
DCT_INDICES_LEFT = "dct_indices_left"  # r sorted int64 frequencies of the m-point DCT
DCT_INDICES_RIGHT = "dct_indices_right"  # r sorted int64 frequencies of the n-point DCT
RESIDUAL_NORM = "residual_norm"  # Fira's limiter: 0-dim fp32, the previous residual norm
PROJECTION_SEED = "projection_seed"  # the random projector's seed of the current matrix: 0-dim int64
UPDATE_NORM = "update_norm"  # APOLLO's limiter: 0-dim fp32, the previous update norm
EXP_AVG_ABSMAX = "exp_avg_absmax"  # 8-bit moments (optim.moments.Blockwise8bit): fp32 scale per block of exp_avg
EXP_AVG_SQ_ABSMAX = "exp_avg_sq_absmax"  # the same for exp_avg_sq
MATRIX_RANK = "matrix_rank"  # rank="auto": the matrix's current rank, a plain int (0 until its first refresh)
