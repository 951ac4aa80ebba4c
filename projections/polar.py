"""Polar factors U V^T and the SVD-free polar projector.

For G = U S V^T, polar(G) = U V^T is the orthogonal matrix nearest to G. Muon (Jordan et al.,
2024) approximates it with a fixed quintic Newton-Schulz map; Polar Express (Amsel, Persson,
Musco, Gower, 2025) changes the polynomial at every step to the minimax-optimal one. Both are
matrix products only, so they run in bf16 on a GPU and batch over same-shape matrices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import (StoredBasisProjector, accurate_svd, check_count, full_fp32_matmul,
                   seeded_gaussian)

Coefficients = tuple[float, float, float]

#: Muon's quintic p(x) = a x + b x^3 + c x^5 (Jordan et al., 2024): steepest slope at zero,
#: so five steps push every singular value into roughly [0.7, 1.2] instead of exactly 1.
NEWTON_SCHULZ_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)

#: Polar Express degree-5 schedule for l = 1e-3 (Amsel et al., 2025, Algorithm 1), as columns
#: a, b, c of the steps' polynomials a x + b x^3 + c x^5. Each step
#: is the minimax-optimal odd quintic for the interval the previous step left behind; the
#: last one repeats. All but the last are divided by a safety factor 1.01 (a / s, b / s^3,
#: c / s^5) so that bf16 rounding cannot push a singular value past the point of divergence.
_A = (8.28721201814563, 4.107059111542203, 3.9486908534822946, 3.3184196573706015,
      2.300652019954817, 1.891301407787398, 1.8750014808534479, 1.875)
_B = (-23.595886519098837, -2.9478499167379106, -2.908902115962949,
      -2.488488024314874, -1.6689039845747493, -1.2679958271945868, -1.2500016453999487, -1.25)
_C = (17.300387312530933, 0.5448431082926601, 0.5518191394370137, 0.51004894012372,
      0.4188073119525673, 0.37680408948524835, 0.3750001645474248, 0.375)
_POLAR_EXPRESS_RAW: tuple[Coefficients, ...] = tuple(zip(_A, _B, _C))
POLAR_EXPRESS_SAFETY = 1.01
POLAR_EXPRESS_COEFFICIENTS: tuple[Coefficients, ...] = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]
) + (_POLAR_EXPRESS_RAW[-1],)

#: Classic cubic Newton-Schulz, p(x) = 1.5 x - 0.5 x^3: converges quadratically to exactly 1
#: once singular values are near it. Used to polish a basis to working precision.
CUBIC_NEWTON_SCHULZ: Coefficients = (1.5, -0.5, 0.0)

DEFAULT_STEPS = {"newton_schulz": 5, "polar_express": 5}
METHODS = ("newton_schulz", "polar_express", "svd")


def gram_factor(X: Tensor, coefficients: Sequence[Coefficients]) -> Tensor:
    """The small factor Q of ``len(coefficients)`` polynomial steps on X (batch, m, n):
    the steps turn X into Q X (wide) or X Q (tall), Q being short x short.

    One step maps every singular value s to a s + b s^3 + c s^5: with the short side's Gram
    matrix R = X X^T (wide; X^T X tall) its factor is M = a I + b R + c R^2 (b R + c R^2 in
    one product, a added to the diagonal: no copy of X). Further steps iterate R <- M R M
    and multiply their factors (polynomials in R, so they commute) into Q: only short x short
    matrices are iterated after the first Gram product.
    """
    tall = X.shape[-2] > X.shape[-1]
    R = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
    Q = None
    for k, (a, b, c) in enumerate(coefficients):
        M = torch.baddbmm(R, R, R, beta=b, alpha=c) if c != 0.0 else R.mul(b)
        M.diagonal(dim1=-2, dim2=-1).add_(a)
        Q = M if Q is None else torch.bmm(Q, M)
        if k < len(coefficients) - 1:
            R = torch.bmm(M, torch.bmm(R, M))
    return Q


def apply_factor(Q: Tensor, X: Tensor) -> Tensor:
    """Q X for a wide X, X Q for a tall one (the product :func:`gram_factor` leaves)."""
    return torch.bmm(X, Q) if X.shape[-2] > X.shape[-1] else torch.bmm(Q, X)


def polynomial_iteration(X: Tensor, coefficients: Sequence[Coefficients]) -> Tensor:
    """Map every singular value s of each matrix in X (batch, m, n) to a s + b s^3 + c s^5,
    one step per (a, b, c): X <- (a I + b A + c A^2) X with A = X X^T (wide; X (...) with
    A = X^T X tall, so a tall matrix needs no transposed copy); three products a step."""
    for coefficient in coefficients:
        X = apply_factor(gram_factor(X, [coefficient]), X)
    return X


#: A rectangular batch at least this many times longer than wide (and 3 steps or more) is
#: iterated in Gram form: fewer products for the same map. Per step the plain form costs
#: (2 aspect + 1) short^3-products, the Gram form (restarted once) 4 aspect + 14 over 5 steps:
#: even at 1.5, 22% fewer for LLaMA's 5461 x 2048.
GRAM_MIN_ASPECT = 1.5
#: Gram steps before the one restart (Dao lab, "Gram Newton-Schulz", 2026: restarting after
#: the second step keeps a half-precision Gram iteration on track).
GRAM_RESTART = 2


def gram_polynomial_iteration(X: Tensor, coefficients: Sequence[Coefficients],
                              restart: int = GRAM_RESTART) -> Tensor:
    """The map of :func:`polynomial_iteration` computed on the short side's Gram matrix
    (:func:`gram_factor`): X is read by the first Gram product and by the final Q X.
    Rounding makes the iterated R drift from the Gram matrix of the X it stands for, so
    after ``restart`` steps X is formed once and R taken afresh (Dao lab, "Gram
    Newton-Schulz", 2026)."""
    for phase in gram_phases(coefficients, restart):
        X = apply_factor(gram_factor(X, phase), X)
    return X


def gram_phases(coefficients: Sequence[Coefficients], restart: int = GRAM_RESTART
                ) -> list[list[Coefficients]]:
    """The steps before and after the restart (the second part empty when there is none)."""
    return [phase for phase in (list(coefficients[:restart]), list(coefficients[restart:]))
            if phase]


def uses_gram_form(shape: tuple[int, int], method: str, steps: int | None) -> bool:
    """Whether (m x n) matrices are iterated in Gram form (:func:`gram_polynomial_iteration`)."""
    if method == "svd":
        return False
    m, n = shape[-2:]
    return len(schedule(method, steps)) >= 3 and max(m, n) >= GRAM_MIN_ASPECT * min(m, n)


def factor_dtype(dtype: torch.dtype, gram: bool) -> torch.dtype:
    """The dtype the polar factors of a ``dtype`` buffer come out in: bf16 inputs are
    iterated in fp16 in Gram form (8 times finer rounding at the same speed, and values
    stay far inside fp16's range once scaled), otherwise in their own dtype."""
    return torch.float16 if gram and dtype == torch.bfloat16 else dtype


def schedule(method: str, steps: int | None = None) -> list[Coefficients]:
    """The (a, b, c) of each of ``steps`` steps (default 5) of "newton_schulz" or
    "polar_express" (whose last pair repeats beyond its table)."""
    steps = steps or DEFAULT_STEPS[method]
    if method == "newton_schulz":
        return [NEWTON_SCHULZ_COEFFICIENTS] * steps
    table = POLAR_EXPRESS_COEFFICIENTS
    return list(table[:steps]) + [table[-1]] * max(0, steps - len(table))


def iteration_dtype(G: Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """``dtype`` if given, else bf16 on CUDA (the matrix units' fast path), fp32 elsewhere,
    fp64 kept as fp64: the dtype iterative polar factors are computed and returned in."""
    if dtype is not None:
        return dtype
    if G.dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if G.is_cuda else torch.float32


def _check_method_and_steps(method: str, steps: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def work_dtype(method: str, G: Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype ``method`` computes polar factors of G in: :func:`iteration_dtype` for the
    iterative methods, fp32 (fp64 for fp64) for the exact SVD."""
    if method == "svd":
        return torch.float64 if G.dtype == torch.float64 else torch.float32
    return iteration_dtype(G, dtype)


def frobenius_norms(buffer: Tensor) -> Tensor:
    """||buffer[i]||_F of each matrix of a (count, m, n) buffer, accumulated in fp32 (fp64)."""
    acc = torch.float64 if buffer.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(buffer, dim=(1, 2), dtype=acc)


def polar_scales(norms: Tensor, method: str) -> Tensor:
    """What each matrix is multiplied by so that its singular values are at most 1, from its
    Frobenius norm: Newton-Schulz 1 / max(||M||_F, 1e-7), as torch.optim.Muon; Polar Express
    1 / (1.01 ||M||_F + 1e-7) (Amsel et al., Algorithm 1)."""
    if method == "newton_schulz":
        return norms.clamp(min=1e-7).reciprocal()
    return (norms * POLAR_EXPRESS_SAFETY + 1e-7).reciprocal()


def _polar_batch(mats: Sequence[Tensor], method: str, steps: int | None,
                 dtype: torch.dtype | None, pad_to: int | None) -> Tensor:
    """Polar factors of same-shape matrices, as a (b, m, n) view in the work dtype."""
    first = mats[0]
    (m, n), work = first.shape, work_dtype(method, first, dtype)
    if method == "svd":
        return _exact_polar(torch.stack(list(mats))).to(work)
    multiple = pad_to if pad_to is not None else (64 if first.is_cuda else 1)
    cols = -(-n // multiple) * multiple                   # zero columns: polar([X 0]) = [U 0]
    buffer = torch.zeros((len(mats), m, cols), dtype=work, device=first.device)
    torch._foreach_copy_([slot[:, :n] for slot in buffer.unbind(0)], list(mats))
    scales = polar_scales(frobenius_norms(buffer), method)
    gram = uses_gram_form(tuple(buffer.shape), method, steps)
    X = scale_into(buffer, scales, factor_dtype(work, gram))
    iterate = gram_polynomial_iteration if gram else polynomial_iteration
    return iterate(X, schedule(method, steps))[..., :n]


def scale_into(buffer: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Each matrix of ``buffer`` times its scale: in place when ``dtype`` is the buffer's,
    else into a new ``dtype`` buffer (the product taken in fp32, rounded once)."""
    if dtype == buffer.dtype:
        return buffer.mul_(scales.to(dtype).view(-1, 1, 1))
    return torch.mul(buffer, scales.float().view(-1, 1, 1),
                     out=torch.empty_like(buffer, dtype=dtype))


def orthogonalize(G: Tensor, method: str = "newton_schulz", steps: int | None = None,
                  dtype: torch.dtype | None = None, check_finite: bool = True,
                  pad_to: int | None = None) -> Tensor:
    """Polar factor U V^T of G (..., m, n), exactly ("svd") or approximately.

    ``newton_schulz``: Muon's quintic, 5 steps; singular values land in about [0.7, 1.2].
    ``polar_express``: per-step optimal quintics (Amsel et al., 2025), 5 steps by default;
    singular values land closer to 1 for the same cost. ``svd``: exact, with singular values
    that are zero (to rounding) mapped to zero rather than an arbitrary completion.

    A leading batch of same-shape matrices is done in one call. The iterative methods run in
    ``dtype`` (default bf16 on CUDA, fp32 on the CPU, fp64 for fp64 input); the result has
    G's dtype. ``check_finite=False`` skips the finiteness check (one device sync) for
    callers that have checked already. ``pad_to`` (default 64 on CUDA, 1 elsewhere) pads the
    last dimension with zeros to a multiple: the iteration maps zero singular values to zero,
    so polar([X 0]) = [polar(X) 0], and GPU products whose rows are an odd number of
    elements long (LLaMA's 5461) run two to six times slower than aligned ones.
    """
    _check_method_and_steps(method, steps)
    if not isinstance(G, Tensor) or G.ndim < 2:
        shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
        raise ValueError(f"G must be a matrix or a batch of matrices (..., m, n), got {shape}")
    if G.is_complex() or not G.is_floating_point():
        raise ValueError(f"G must be real floating point, got {G.dtype}")
    if check_finite and not bool(torch.isfinite(G).all()):
        raise FloatingPointError("G has non-finite entries (inf or nan)")
    if G.numel() == 0:
        return G.clone()
    batch, (m, n) = G.shape[:-2], G.shape[-2:]
    X = _polar_batch(G.reshape(-1, m, n).unbind(0), method, steps, dtype, pad_to)
    return X.reshape(*batch, m, n).to(G.dtype)


#: Largest input buffer of one batched iteration; its working set is about four times this.
MAX_BATCH_BYTES = 512 * 2**20


def orthogonalize_many(matrices: Sequence[Tensor], method: str = "newton_schulz",
                       steps: int | None = None, dtype: torch.dtype | None = None,
                       pad_to: int | None = None,
                       max_batch_bytes: int = MAX_BATCH_BYTES) -> list[Tensor]:
    """polar(M) for every matrix of a list, with same-shape matrices in batched calls.

    Each matrix is copied once, scaled, straight into its batch's buffer; a batch holds at
    most ``max_batch_bytes`` of matrices (at least one), which bounds the step's transient
    memory for any model. The results of the iterative methods stay in the iteration dtype
    (bf16 on CUDA): views to add to the weights directly. Inputs are not checked for
    finiteness (optimizers check gradients).
    """
    _check_method_and_steps(method, steps)
    out: list[Tensor | None] = [None] * len(matrices)
    batches: dict[tuple[Any, ...], list[int]] = {}
    for i, M in enumerate(matrices):
        batches.setdefault((tuple(M.shape), M.dtype, M.device), []).append(i)
    split: list[list[int]] = []
    for indices in batches.values():
        first = matrices[indices[0]]
        size = first.numel() * torch.empty((), dtype=work_dtype(method, first, dtype)).element_size()
        per_batch = max(1, max_batch_bytes // max(1, size))
        split += [indices[k:k + per_batch] for k in range(0, len(indices), per_batch)]
    for indices in split:
        polars = _polar_batch([matrices[i] for i in indices], method, steps, dtype, pad_to)
        for slot, i in enumerate(indices):
            out[i] = polars[slot]
    return out


def _exact_polar(G: Tensor) -> Tensor:
    """U V^T from the thin SVD in fp32 (fp64 for fp64), null directions mapped to zero; nan
    for a matrix with a non-finite entry (as the iterations give), whose SVD may fail."""
    work = G.to(torch.float64 if G.dtype == torch.float64 else torch.float32)
    bad = ~torch.isfinite(work).flatten(-2).all(-1)[..., None, None]
    try:
        U, S, Vh = accurate_svd(work)
    except torch.linalg.LinAlgError:
        if not bool(bad.any()):
            raise
        return _exact_polar(work.masked_fill(bad, 0.0)).masked_fill(bad, math.nan)
    tol = S.amax(dim=-1, keepdim=True) * max(work.shape[-2:]) * torch.finfo(work.dtype).eps
    keep = (S > tol).to(work.dtype)
    return ((U * keep.unsqueeze(-2)) @ Vh).masked_fill_(bad, math.nan)


def approximate_polar(Y: Tensor) -> Tensor:
    """Columns of a tall Y (d x r) made approximately orthonormal by Polar Express (8 steps).

    Good enough to condition an intermediate sketch; :func:`orthonormal_columns` polishes
    the result to working precision.
    """
    with full_fp32_matmul():
        X = Y.mT.unsqueeze(0)
        X = X / (torch.linalg.vector_norm(X) * POLAR_EXPRESS_SAFETY + torch.finfo(Y.dtype).tiny)
        X = polynomial_iteration(X, schedule("polar_express", len(POLAR_EXPRESS_COEFFICIENTS)))
        return X[0].mT


def orthonormal_columns(Y: Tensor, polish_steps: int = 8) -> Tensor:
    """Orthonormal basis of range(Y) for a tall Y (d x r, d >= r): the polar factor of Y.

    Polar Express, then cubic Newton-Schulz polishing until max|Q^T Q - I| is at working
    precision (32 sqrt(r) eps). Only when Y is rank-deficient or so ill-conditioned that the
    iteration cannot finish (a direction with no energy has no polar factor) does it fall
    back to the exact SVD, whose U completes the null space.
    """
    r = Y.shape[1]
    tol = 32.0 * math.sqrt(r) * torch.finfo(Y.dtype).eps
    eye = torch.eye(r, dtype=Y.dtype, device=Y.device)
    X = approximate_polar(Y).mT.unsqueeze(0)
    with full_fp32_matmul():
        for _ in range(polish_steps):
            X = polynomial_iteration(X, [CUBIC_NEWTON_SCHULZ])
            err = float((torch.bmm(X, X.mT)[0] - eye).abs().max())
            if err <= tol:
                return X[0].mT.contiguous()
        U, _, _ = accurate_svd(Y)
        return U


class PolarProjector(StoredBasisProjector):
    """SVD-free, QR-free basis: a range-finder sketch orthonormalized by a polar step.

    Right basis (row space of G): Q = polar(G^T Z) with Z = G Q_prev (warm start: one power
    step from the previous basis) or a seeded Gaussian (first update); the left basis is the
    same on G^T. ``power_iters`` extra half-steps sharpen the subspace; each is conditioned
    by an approximate polar step instead of QR. Halko, Martinsson, Tropp (2011) for the
    range finder; the polar step is Polar Express plus Newton-Schulz polishing.

    Args:
        rank, side: as for :class:`~memopt.projections.base.Projector`.
        power_iters: extra power iterations per update (default 1).
        warm_start: start from the previous basis when it has the right shape (default True).
        seed: seed of the Gaussian test matrix; saved in ``state_dict``.
    """

    name = "polar"

    def __init__(self, rank: int, side: str = "auto", power_iters: int = 1,
                 warm_start: bool = True, seed: int = 0) -> None:
        super().__init__(rank, side, seed)
        self.power_iters = check_count("power_iters", power_iters)
        self.warm_start = bool(warm_start)

    def _fit(self, G: Tensor, side: str, dim: int, r: int) -> None:
        A = G if side == "left" else G.mT          # the basis spans A's column space
        prev = self._basis
        with full_fp32_matmul():
            if self.warm_start and prev is not None and prev.shape == (dim, r):
                Z = approximate_polar(A.mT @ prev.to(device=A.device, dtype=A.dtype))
                draws = self.draws
            else:
                Z = seeded_gaussian((A.shape[1], r), self.seed, self.draws, A.device, A.dtype)
                draws = self.draws + 1
            Y = A @ Z
            for _ in range(self.power_iters):
                Y = A @ approximate_polar(A.mT @ approximate_polar(Y))
        self._basis = orthonormal_columns(Y)
        self.draws = draws


__all__ = [
    "CUBIC_NEWTON_SCHULZ", "NEWTON_SCHULZ_COEFFICIENTS", "POLAR_EXPRESS_COEFFICIENTS",
    "POLAR_EXPRESS_SAFETY", "PolarProjector", "approximate_polar",
    "orthogonalize", "orthogonalize_many", "orthonormal_columns", "polynomial_iteration",
]
