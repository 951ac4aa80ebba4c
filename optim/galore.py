"""GaLore-Adam (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection"): Adam in a rank-r subspace of each matrix gradient.

The reference math on one screen; :class:`memopt.optim.GaLoreAdamW` runs it (the fast
executor, ``executors_lowrank.py``, computes the same on batches). Paper defaults for LLaMA
pretraining: rank 128-512, update_proj_gap 200, scale 0.25, lr 0.01.
"""

from __future__ import annotations

from torch import Tensor


def project(G: Tensor, P: Tensor, side: str) -> Tensor:
    """R = P^T G (left basis P, m x r) or G P (right basis P, n x r)."""
    return P.mT @ G if side == "left" else G @ P


def project_back(N: Tensor, P: Tensor, side: str) -> Tensor:
    """P N (left) or N P^T (right): the adjoint of :func:`project`."""
    return P @ N if side == "left" else N @ P.mT


def adam_direction(R: Tensor, m: Tensor, v: Tensor, t: int, beta1: float, beta2: float,
                   eps: float) -> Tensor:
    """m <- b1 m + (1 - b1) R; v <- b2 v + (1 - b2) R^2 (in place); return
    N = m_hat / (sqrt(v_hat) + eps), with m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)."""
    m.mul_(beta1).add_(R, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(R, R, value=1 - beta2)
    return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)


def galore_adam(G: Tensor, P: Tensor, side: str, m: Tensor, v: Tensor, t: int, *,
                beta1: float, beta2: float, eps: float, scale: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    """One GaLore-Adam direction for a gradient G (m x n) and an orthonormal basis P.

        R = project(G)                 (r x n or m x r: the moments' shape)
        N = Adam(R)                    (moments m, v advanced in place, step t)
        D = scale * project_back(N)    (the full-size direction)

    The step is W <- W (1 - lr wd) - lr D. Returns (R, N, D); Fira reads R and N.
    """
    R = project(G.to(P.dtype), P, side)
    N = adam_direction(R, m, v, t, beta1, beta2, eps)
    return R, N, scale * project_back(N, P, side)


def carry_moments(m: Tensor, v: Tensor, mode: str, P_new: Tensor, P_old: Tensor | None,
                  side: str, R: Tensor | None = None, bias2: float = 1.0) -> tuple[Tensor, Tensor]:
    """The subspace moments after a basis refresh ("keep": as they are, as galore-torch).

        reset:        m, v <- 0 (and Adam's bias correction restarts: t <- 0)
        rotate:       C = P_new^T P_old (r x r);  m <- C m,  v <- (C o C) v   (left; m C^T right)
        rotate_fill:  rotate, then v <- v + (1 - rowsum(C o C)) bias2 R^2,  R = project(G, P_new)

    "rotate" is the DCT authors' ``rotate_subspace`` (Modoranu et al., 2025): a direction new
    to the subspace starts with v = 0, so Adam's first steps along it are about
    (1 - b1) / sqrt(1 - b2) = 3.2 times its usual size. "rotate_fill" (ours) gives the part of
    each new direction outside the old subspace the current gradient's square as its second
    moment instead, scaled by ``bias2`` = 1 - b2^t so that Adam's bias correction sees R^2.
    """
    if mode == "reset":
        return m.zero_(), v.zero_()
    if mode in ("rotate", "rotate_fill"):
        C = P_new.mT @ P_old.to(P_new.dtype)
        mix = (lambda X, K: K @ X) if side == "left" else (lambda X, K: X @ K.mT)
        m, v = mix(m, C), mix(v, C.square())
        if mode == "rotate_fill":
            outside = (1 - C.square().sum(dim=1)).clamp_(min=0)
            outside = outside[:, None] if side == "left" else outside[None, :]
            v = v.addcmul_(R.square(), outside, value=bias2)
    return m, v
