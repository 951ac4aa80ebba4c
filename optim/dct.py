"""The DCT selection of Modoranu et al. (2025), "SVD-Free Low-Rank Adaptive Gradient
Optimization": the low-rank basis is r columns of the fixed orthonormal DCT-II matrix, the
ones best aligned with the gradient, so only r integer indices per matrix are state and a
refresh costs one product (or an FFT) instead of an SVD.

The reference math on one screen; :class:`memopt.optim.DCTAdamW` (GaLore-Adam with
``projector="dct"``) uses :class:`memopt.projections.DCTProjector`, which computes the same
selection with an FFT for long sides and generates the chosen columns from O(d) tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memopt.projections import dct_matrix


def dct_select(G: Tensor, side: str, r: int, norm: str = "l2") -> tuple[Tensor, Tensor]:
    """The r DCT-II vectors best aligned with G (m x n), and their indices:

        T = DCT-II matrix of size d (row k = vector d_k; d = n right, m left)
        C = G T^T (right) or (T G)^T (left)            (column k: G's coefficients on d_k)
        e_k = ||C_k||_2^2 ("l2", the default) or ||C_k||_1 ("l1", the authors' ell_norm=1)
        idx = the r largest e_k, strongest first;  P = T[idx]^T  (d x r, orthonormal)
    """
    d = G.shape[1] if side == "right" else G.shape[0]
    T = dct_matrix(d, G.device, G.dtype)
    C = (G @ T.mT) if side == "right" else (T @ G).mT
    energy = (C.abs() if norm == "l1" else C.square()).sum(dim=0)
    idx = torch.topk(energy, r, sorted=True).indices
    return T[idx].mT, idx
