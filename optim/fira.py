"""Fira (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"): GaLore's low-rank Adam direction plus the part of the gradient outside the
subspace, scaled by the norm gain Adam gives the low-rank part, with a norm-growth limiter.

The reference math on one screen; :class:`memopt.optim.FiraAdamW` runs it
(``executors_lowrank.fira_scales`` computes phi and the limiter for batches, without forming
the residual). We follow the paper and subtract P R, the exact in-subspace part of G, so S
lies outside the subspace; Fira's released code subtracts scale * P R, which applies the
in-subspace gradient a second time, raw, beside its Adam update.
"""

from __future__ import annotations

import torch
from torch import Tensor

FIRA_EPS = 1e-8   # added to ||R_j|| in phi, as in Fira's released code


def fira_residual(G: Tensor, R: Tensor, N: Tensor, P_R: Tensor, side: str,
                  previous_norm: Tensor | None, gamma: float) -> tuple[Tensor, Tensor]:
    """Fira's residual S and its norm, for G (m x n), R = project(G), N = Adam(R) and
    P_R = project_back(R):

        phi_j = ||N_j|| / (||R_j|| + eps)      per column j (left basis) or row (right)
        S = phi * (G - P_R)
        if ||S|| > gamma ||S_prev||:  S <- S * gamma ||S_prev|| / ||S||     (limiter)

    The step adds -lr S to GaLore's. Returns (S, ||S||) (the norm to pass next step).
    """
    dim = 0 if side == "left" else 1       # norms over R's r coordinates of each column/row
    phi = torch.linalg.vector_norm(N, dim=dim) / (torch.linalg.vector_norm(R, dim=dim) + FIRA_EPS)
    S = phi.unsqueeze(dim) * (G.to(R.dtype) - P_R)
    norm = torch.linalg.vector_norm(S)
    if previous_norm is not None and norm > gamma * previous_norm:
        S = S * (gamma * previous_norm / norm)
        norm = gamma * previous_norm
    return S, norm
