"""Muon and PolarGrad (``muon.py``) made fast over batches of same-shape matrices.

fill: each matrix's orthogonalizer input (the Nesterov direction in one lerp read before the
momentum advances, or G) written once into a zero-padded (b, m, cols) buffer in the
iteration dtype (bf16 on CUDA), its Frobenius norm taken there (the finiteness check reads
the norms); orthogonalize: one batched iteration, in Gram form for rectangular batches; write:
for Muon the last product goes straight into the fp32 weights (W <- beta W - alpha M X, no
polar factor written and read back), else the factor is added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..projections.polar import (GRAM_RESTART, _exact_polar, apply_factor, factor_dtype,
                                     frobenius_norms, gram_factor, gram_polynomial_iteration,
                                     polar_scales, polynomial_iteration, scale_into, schedule,
                                     uses_gram_form)

from .executors import add_to_matrix_, addmm_into_, aligned_width, as_matrix, padded, scale_


@dataclass
class Filled:
    """A batch's orthogonalizer inputs (unscaled; zero-padded columns) and their norms; once
    orthogonalized: the scaled input, the polar factors X (or X before the last product,
    whose small factor is M: polar = M X wide, X M tall) and the scales."""
    buffer: Tensor | None
    norms: Tensor
    scaled: Tensor | None = None
    X: Tensor | None = None
    M: Tensor | None = None
    scales: Tensor | None = None


def fill(grads: list[Tensor], momenta: list[Tensor | None], *, momentum: float, nesterov: bool,
         polar_first: bool, dtype: torch.dtype, pad: bool) -> Filled:
    """The inputs of a batch, changing nothing: G (polar-first), or the momentum direction.
    The Nesterov direction (1 - mu) G + mu buf_new, with buf_new = mu buf + (1 - mu) G, is
    lerp(buf, G, 1 - mu^2), read before buf is advanced; a missing buffer is zero."""
    G0 = as_matrix(grads[0])
    m, n = G0.shape
    cols = -(-n // 64) * 64 if pad and G0.is_cuda else n     # aligned rows for the products
    buffer = padded(len(grads), m, n, cols, dtype, G0.device)
    weight = 1 - momentum * momentum if nesterov else 1 - momentum
    for slot, G, buf in zip(buffer[..., :n].unbind(0), grads, momenta):
        G = as_matrix(G)
        if polar_first:
            slot.copy_(G)
        elif buf is not None:
            torch.lerp(buf, G if G.dtype == buf.dtype else G.to(buf.dtype), weight, out=slot)
        else:
            torch.mul(G, weight, out=slot)
    return Filled(buffer, frobenius_norms(buffer))


def last_product_into_weights(W: Tensor, buffer_shape: tuple[int, ...], dtype: torch.dtype,
                              method: str, steps: int) -> bool:
    """Whether the last product of the iteration can add itself to each weight: W's rows
    are aligned and W has the factors' dtype, or is an fp32 CUDA target the product can
    write into (the caller knows the step is not rescaled by a norm of the result)."""
    n = as_matrix(W).shape[1]
    if method == "svd" or not W.is_contiguous() or aligned_width(n, W) != n:
        return False          # products into unaligned rows are slow: add the factor instead
    factors = factor_dtype(dtype, uses_gram_form(buffer_shape, method, steps))
    return W.dtype == factors or (W.dtype == torch.float32 and W.is_cuda and factors in
                                  (torch.bfloat16, torch.float16))


def orthogonalize(filled: Filled, method: str, steps: int, last_factor: bool) -> Filled:
    """Polar factors of the batch (once): scaled (:func:`polar_scales`; in place, or into
    an fp16 copy for the Gram form), then iterated; with ``last_factor`` the last product is
    left to :func:`write`. "svd" is exact (no scaling)."""
    if filled.X is not None:
        return filled
    buffer, filled.buffer = filled.buffer, None
    if method == "svd":
        filled.scaled, filled.scales = buffer, torch.ones_like(filled.norms)
        filled.X = _exact_polar(buffer).to(buffer.dtype)
        return filled
    filled.scales = polar_scales(filled.norms, method)
    coefficients = schedule(method, steps)
    gram = uses_gram_form(tuple(buffer.shape), method, steps)
    X = filled.scaled = scale_into(buffer, filled.scales, factor_dtype(buffer.dtype, gram))
    if not last_factor:
        iterate = gram_polynomial_iteration if gram else polynomial_iteration
        filled.X = iterate(X, coefficients)
        return filled
    last = coefficients[GRAM_RESTART:] if gram and len(coefficients) > GRAM_RESTART \
        else coefficients[-1:]
    before = coefficients[:len(coefficients) - len(last)]
    if before:
        X = (gram_polynomial_iteration if gram else polynomial_iteration)(X, before)
    filled.X, filled.M = X, gram_factor(X, last)
    return filled


def nuclear_norms(filled: Filled) -> Tensor:
    """||M||_* = <M, polar(M)> of each input (the buffer holds M scaled)."""
    return (filled.scaled * filled.X).sum(dim=(1, 2), dtype=filled.scales.dtype) / filled.scales


def write(weights: list[Tensor], filled: Filled, n: int, *, step_size: float,
          decay: float) -> None:
    """W <- decay W - step_size polar_i for Muon: the last product written into W where the
    batch kept its last factor, else the factor added."""
    if filled.M is not None:
        tall = filled.X.shape[-2] > filled.X.shape[-1]
        for W, Xi, Mi in zip(weights, filled.X, filled.M):
            first, second = (Xi[:, :n], Mi[:n, :n]) if tall else (Mi, Xi[:, :n])
            if not addmm_into_(W, first, second, -step_size, decay):
                W.mul_(decay)
                add_to_matrix_(W, apply_factor(Mi[None], Xi[None])[0][:, :n], -step_size)
        return
    if decay != 1:
        scale_(weights, decay)
    for W, U in zip(weights, filled.X[..., :n]):
        add_to_matrix_(W, U, -step_size)


def advance_momenta(momenta: list[Tensor], grads: list[Tensor], momentum: float) -> None:
    """buf <- mu buf + (1 - mu) G for each matrix (one kernel for all)."""
    if momenta:
        torch._foreach_lerp_(momenta, [G if G.dtype == b.dtype else G.to(b.dtype)
                                       for b, G in zip(momenta, grads)], 1 - momentum)
