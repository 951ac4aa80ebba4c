"""The projection and the lift of the low-rank composition (``lowrank.py``) over batches
of same-shape matrices: the batched counterparts of ``projections.project_onto`` and
``projections.lift``, whatever the rule in between.

project: R = B^T G or G B for a whole batch as one batched product over stacked copies (rows
zero-padded to an aligned width on the GPU), or matrix by matrix straight from the gradients
for large ones; apply: W <- (1 - lr wd) W + lr scale B U as one batched product added into
the weights, or one product written into each weight. Fira's phi and limiter
(``fira.fira_scales``) are one reduction per batch, folded into U.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .executors import (add_to_matrix_, addmm_into_, aligned_width, as_matrix,
                        lift_factors, norm_dim, padded, product, projected_shape,
                        projection_factors, scale_, slices)
from .fira import fira_scales

#: Plain matrices whose projection takes fewer flops than this are projected and lifted with
#: batched products over stacked copies: such small products cannot fill the GPU, and one
#: call per matrix costs more host time than the product takes. So are GPU matrices with
#: unaligned rows (LLaMA's 5461), through zero-padded copies: aligned products run about
#: twice as fast. Others go one by one, straight from the gradients and into the weights.
BATCHED_PRODUCT_FLOPS = 6e9
_PLAIN = (Tensor, torch.nn.Parameter)


@dataclass
class Batch:
    """Same-shape projected matrices of one step: weights and gradients (matrix views of
    the local tensors), bases (fp32, or bf16 for "medium"), the coordinates R (b, r, n) or
    (b, m, r), and the stacked (zero-padded) bases when the products are batched;
    ``orthonormal``: whether the bases are orthonormal to working precision (INT8 / INT4
    ones are not)."""
    weights: list[Tensor]
    grads: list[Tensor]
    bases: list[Tensor]
    side: str
    R: Tensor
    stacked: Tensor | None = None
    sq_norms: Tensor | None = None       # Fira: ||G_j||^2 per column (left) or row (right)
    orthonormal: bool = True

    def gradient_sq_norms(self) -> Tensor:
        """(b, n) or (b, m) squared column (left) or row (right) norms of the gradients."""
        if self.sq_norms is None:
            self.sq_norms = torch.stack([torch.linalg.vector_norm(
                as_matrix(G), dim=norm_dim(self.side), dtype=self.R.dtype) for G in self.grads]
            ).square_()
        return self.sq_norms


def _batchable(weights: list[Tensor], grads: list[Tensor], dtype: torch.dtype) -> bool:
    """Whether every weight and gradient is a plain contiguous 2-D ``dtype`` tensor (no
    DTensor shard, no conv kernel), so stacked products can read and write them."""
    W = weights[0]
    return (type(W) in _PLAIN and W.ndim == 2 and W.dtype == dtype
            and all(w.is_contiguous() and g.dtype == dtype for w, g in zip(weights, grads)))


def project(weights: list[Tensor], grads: list[Tensor], bases: list[Tensor], side: str,
            medium: bool, fira: bool, orthonormal: bool = True) -> Batch:
    """R = project(G) for a batch (bases generated together; bf16 factors for ``medium``;
    ``orthonormal``: as :attr:`Batch.orthonormal`)."""
    G0 = as_matrix(grads[0])
    r = bases[0].shape[1]
    R = torch.empty((len(grads), *projected_shape(tuple(G0.shape), side, r)),
                    dtype=bases[0].dtype, device=G0.device)
    plain = _batchable(weights, grads, bases[0].dtype)
    stacked = None
    if medium and bases[0].dtype == torch.float32:     # products from bf16 factors
        stacked = torch.stack(bases).to(torch.bfloat16)
        bases = list(stacked.unbind(0))
    batch = Batch(weights, grads, bases, side, R, orthonormal=orthonormal)
    n, width = G0.shape[1], aligned_width(G0.shape[1], bases[0])
    batched = width != n or len(grads) > 1 and 2 * G0.numel() * r < BATCHED_PRODUCT_FLOPS
    if plain and batched:
        _project_stacked(batch, stacked if stacked is not None else torch.stack(bases), width)
    else:
        _project_each(batch, fira)
    return batch


def _project_stacked(batch: Batch, stacked: Tensor, width: int) -> None:
    """R of a batch by batched products over stacked copies of the gradients (in the
    factors' dtype, rows zero-padded to ``width``), slice by slice of ``CHUNK_BYTES``."""
    G0, low, side, R = batch.grads[0], stacked.dtype, batch.side, batch.R
    n = G0.shape[1]
    if side == "right" and width != n:             # zero rows meet G's zero columns
        stacked = torch.nn.functional.pad(stacked, (0, 0, 0, width - n))
    batch.stacked = stacked
    for rows in slices(len(batch.grads), G0.shape[0] * width * G0.element_size()):
        grads = batch.grads[rows]
        if width == n and low == G0.dtype:
            G = torch.stack(grads)
        else:
            G = padded(len(grads), G0.shape[0], n, width, low, G0.device)
            torch._foreach_copy_([Gi[:, :n] for Gi in G.unbind(0)], grads)
        first, second = projection_factors(G, stacked[rows], side)
        if side == "left" and width != n:
            R[rows].copy_(product(first, second)[..., :n])
        else:
            product(first, second, out=R[rows])


def _project_each(batch: Batch, fira: bool) -> None:
    """R matrix by matrix, straight from each gradient (Fira: its norms too, while hot)."""
    norms = [] if fira else None
    for G, B, out in zip(batch.grads, batch.bases, batch.R.unbind(0)):
        G = as_matrix(G)
        Gc = G if G.dtype == B.dtype else G.to(B.dtype)
        product(*projection_factors(Gc, B, batch.side), out=out)
        if norms is not None:
            norms.append(torch.linalg.vector_norm(G, dim=norm_dim(batch.side), dtype=out.dtype))
    if norms is not None:
        batch.sq_norms = torch.stack(norms).square_()


def apply(batch: Batch, U: Tensor, states: list[dict], *, lr: float, scale: float,
          weight_decay: float, fira_gamma: float | None,
          sum_over_shards: Callable[[Tensor], Tensor] | None = None) -> None:
    """W <- (1 - lr wd) W + lr scale B u (u = -N), plus Fira's -lr S with S = phi (G - B R),
    applied as -lr phi G and +lr phi B R folded into u."""
    beta, alpha = 1 - lr * weight_decay, lr * scale
    if fira_gamma is not None:
        dim = norm_dim(batch.side)
        previous = torch.stack([s["residual_norm"] if "residual_norm" in s else
                                torch.full((), math.inf, device=U.device) for s in states])
        grams = None if batch.orthonormal else \
            torch.stack([B.mT @ B for B in batch.bases]).to(batch.R.dtype)
        phi, norms = fira_scales(batch.R, U, batch.gradient_sq_norms(), batch.side, previous,
                                 fira_gamma, sum_over_shards, grams)
        U.addcmul_(batch.R, phi.unsqueeze(dim + 1), value=1 / scale)
        kept = [s.get("residual_norm") for s in states]
        if all(t is not None for t in kept):
            torch._foreach_copy_(kept, list(norms.unbind(0)))
        else:
            for state, norm in zip(states, norms.unbind(0)):
                state["residual_norm"] = norm.clone()
    if batch.bases[0].dtype == torch.bfloat16 and U.dtype != torch.bfloat16:
        U = U.to(torch.bfloat16)                         # "medium": one cast for the batch
    if batch.stacked is not None:
        _lift_stacked(batch, U, alpha, beta)
    else:
        for W, Ui, B in zip(batch.weights, U.unbind(0), batch.bases):
            lift_into_(W, Ui, B, batch.side, alpha, beta)
    if fira_gamma is not None:                          # W <- W - lr phi G
        for W, G, f in zip(batch.weights, batch.grads, phi.unsqueeze(dim + 1).unbind(0)):
            add_to_matrix_(W, as_matrix(G), -lr, f)


def lift_into_(W: Tensor, L: Tensor, B: Tensor, side: str, alpha: float, beta: float) -> None:
    """W <- beta W + alpha lift(L): one product written into W where it can
    (:func:`addmm_into_`); else the lift formed apart (in fp32 from bf16 factors) and added."""
    first, second = lift_factors(L, B, side)
    if not addmm_into_(W, first, second, alpha, beta):
        if beta != 1:
            W.mul_(beta)
        add_to_matrix_(W, product(first.to(B.dtype), second.to(B.dtype)), alpha)


def _lift_stacked(batch: Batch, U: Tensor, alpha: float, beta: float) -> None:
    """W <- beta W + alpha lift(u) for a stacked batch: one batched product per slice (on
    rows padded to the aligned width), one multi-tensor add (one add per padded weight)."""
    weights, W0 = batch.weights, batch.weights[0]
    n = W0.shape[1]
    width = aligned_width(n, batch.stacked)
    if beta != 1:
        scale_(weights, beta)
    for rows in slices(len(weights), W0.shape[0] * width * W0.element_size()):
        Ur = U[rows] if batch.side == "right" or width == n else \
            torch.nn.functional.pad(U[rows], (0, width - n))
        T = product(*lift_factors(Ur, batch.stacked[rows], batch.side))
        if width == n:
            torch._foreach_add_(weights[rows], list(T.unbind(0)), alpha=alpha)
        else:
            for W, Ti in zip(weights[rows], T.unbind(0)):
                W.add_(Ti[:, :n], alpha=alpha)
