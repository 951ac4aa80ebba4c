"""Fira (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"): GaLore's low-rank Adam direction plus the part of the gradient outside the
subspace, scaled by the norm gain Adam gives the low-rank part, with a norm-growth limiter.

Both steps are here: :func:`fira_residual` matrix by matrix (the reference), and
:func:`fira_scales`, phi and the limiter for a batch without forming the residual (the
batched lift, ``executors_lowrank.apply``, folds phi into the update). Any update rule
works: phi compares the norms of the rule's update U and of R per column or row. We follow the paper and subtract P R, the exact in-subspace part of G, so S
lies outside the subspace; Fira's released code subtracts scale * P R, which applies the
in-subspace gradient a second time, raw, beside its Adam update.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .residual import Residual
from .states import StateDecl

FIRA_EPS = 1e-8   # added to ||R_j|| in phi, as in Fira's released code


def fira_residual(G: Tensor, R: Tensor, U: Tensor, P_R: Tensor, side: str,
                  previous_norm: Tensor | None, gamma: float) -> tuple[Tensor, Tensor]:
    """Fira's residual S and its norm, for G (m x n), R = project(G), U = the rule's update
    of R (Adam's, for Fira) and P_R = project_back(R):

        phi_j = ||U_j|| / (||R_j|| + eps)      per column j (left basis) or row (right)
        S = phi * (G - P_R)
        if ||S|| > gamma ||S_prev||:  S <- S * gamma ||S_prev|| / ||S||     (limiter)

    The step adds -lr S to GaLore's. Returns (S, ||S||) (the norm to pass next step).
    """
    dim = 0 if side == "left" else 1       # norms over R's r coordinates of each column/row
    phi = torch.linalg.vector_norm(U, dim=dim) / (torch.linalg.vector_norm(R, dim=dim) + FIRA_EPS)
    S = phi.unsqueeze(dim) * (G.to(R.dtype) - P_R)
    norm = torch.linalg.vector_norm(S)
    if previous_norm is not None and norm > gamma * previous_norm:
        S = S * (gamma * previous_norm / norm)
        norm = gamma * previous_norm
    return S, norm


def fira_scales(R: Tensor, U: Tensor, sq_norms: Tensor, side: str, previous: Tensor,
                gamma: float, sum_over_shards: Callable[[Tensor], Tensor] | None = None,
                grams: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fira's limited scale phi per column (left) or row (right) of a batch, and ||S||
    after the limiter (:func:`fira_residual` for b matrices at once, with
    ||G_j - B R_j||^2 = ||G_j||^2 - ||R_j||^2 instead of a pass over the residual).

    ``grams``: the (b, r, r) matrices M = B^T B of bases that are not orthonormal (INT8 /
    INT4 ones); then ||G_j - B R_j||^2 = ||G_j||^2 - 2 ||R_j||^2 + R_j^T M R_j, as R_j = B^T G_j.
    """
    dim = 1 if side == "left" else 2
    R_norms = torch.linalg.vector_norm(R, dim=dim)
    phi = torch.linalg.vector_norm(U, dim=dim).div_(R_norms + FIRA_EPS)
    if grams is None:
        residual_sq = sq_norms.sub_(R_norms.square_()).clamp_(min=0)
    else:
        MR = grams @ R if side == "left" else R @ grams
        quadratic = (MR * R).sum(dim=dim)
        residual_sq = sq_norms.sub_(R_norms.square_(), alpha=2).add_(quadratic).clamp_(min=0)
    squared = (phi.square() * residual_sq).sum(dim=1)
    if sum_over_shards is not None:
        squared = sum_over_shards(squared)
    norms = squared.sqrt_()
    ratio = torch.clamp(norms / (previous + 1e-30), min=gamma).div_(gamma)
    return phi.div_(ratio.unsqueeze(1)), norms.div_(ratio)


class FiraResidual(Residual):
    """``residual="fira"``: the limited residual; its state is last step's ||S|| (inf
    before the first step: no limit yet)."""

    name = "fira"
    STATE = (StateDecl("residual_norm", "scalar", fill=math.inf),)
