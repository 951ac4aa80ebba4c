"""Top-r singular subspace of a gradient: GaLore's projector (Zhao et al., 2024).

By Eckart-Young, the top-r singular vectors on a side capture the most energy ||B^T G||_F^2
of any rank-r basis there. ``exact`` is one torch.linalg.svd; ``randomized`` is a range
finder with power iterations (Halko, Martinsson, Tropp, 2011), warm-started from the
previous basis, which is what a slowly drifting gradient subspace wants.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import (SIDES, StoredBasisProjector, accurate_svd, canonical_signs, check_count,
                   check_one_of, full_fp32_matmul, orthonormality_error, seeded_gaussian)
from .quantized_basis import (CODE_DTYPES, check_bits, code_shapes, dequantize_columns,
                              quantize_columns)

METHODS = ("exact", "randomized")


def top_singular_basis(G: Tensor, side: str, r: int) -> Tensor:
    """Exact top-r singular vectors of G on ``side`` (d x r).

    On CUDA the vectors of the shorter side come from cuSOLVER's gesvda in fp64 (the
    eigenvectors of the small Gram matrix, accurate for every vector we keep once in fp64,
    and 8-10x faster than gesvd on an H100); everything else uses accurate_svd.
    """
    m, n = G.shape
    short_side = "right" if m >= n else "left"
    if G.is_cuda and side == short_side and r <= min(m, n):
        tall = (G if m >= n else G.mT).to(torch.float64)
        try:       # gesvda refuses rank-deficient input (cuSOLVER error 63): use gesvd then
            _, _, Vh = torch.linalg.svd(tall, full_matrices=False, driver="gesvda")
            B = Vh[:r].mT
            if orthonormality_error(B) <= 1e-10:
                return canonical_signs(B).to(G.dtype).contiguous()
        except torch.linalg.LinAlgError:
            pass
    full = r > min(m, n)             # a side longer than min(m, n) needs the full SVD
    with full_fp32_matmul():
        U, _, Vh = accurate_svd(G, full_matrices=full)
    return canonical_signs(Vh[:r].mT if side == "right" else U[:, :r]).contiguous()


def randomized_basis(G: Tensor, side: str, r: int, start: Tensor, power_iters: int) -> Tensor:
    """Top-r singular subspace by subspace iteration from ``start`` (d x k, k >= r).

    Q <- qr(A A^T Q) ``power_iters`` times (A = G for a left basis, G^T for a right one),
    then Rayleigh-Ritz: the top-r eigenvectors of Q^T A A^T Q rotate Q to the best r of its
    columns.
    """
    A = G if side == "left" else G.mT
    with full_fp32_matmul():
        Q = torch.linalg.qr(start).Q
        for _ in range(power_iters):
            Q = torch.linalg.qr(A @ (A.mT @ Q)).Q
        C = A.mT @ Q
        evals, evecs = torch.linalg.eigh(C.mT @ C)
        top = evecs[:, torch.argsort(evals, descending=True)[:r]]
        return canonical_signs(Q @ top).contiguous()


class SVDProjector(StoredBasisProjector):
    """Top-r singular vectors of G on one side, computed in fp32 (fp64 for fp64 input).

    Args:
        rank, side: as for :class:`~memopt.projections.base.Projector`.
        method: "exact" (torch.linalg.svd) or "randomized" (subspace iteration from the
            previous basis, or a seeded Gaussian sketch with ``oversample`` extra columns).
        power_iters: subspace iterations per randomized update (default 2; 1 when warm).
        oversample: extra sketch columns for a cold randomized start (default 8).
        seed: seed of the Gaussian sketch; saved in ``state_dict``.
        bits: how the basis is kept between refreshes: 32 (default: the fp32 basis itself,
            fp64 for fp64 input), or 8 / 4 for INT8 / INT4 codes, as Q-GaLore keeps its
            projection matrices in INT4 (Zhang et al., 2024, arXiv 2407.08296). The basis
            B (d x r) is computed as for 32 bits, then stored as symmetric absmax codes
            with one fp32 scale per ``GROUP_SIZE`` = 256 rows of each column
            (``quantized_basis.py``): s = max|B_group| / L, q = round(B / s) in [-L, L],
            L = 127 (INT8) or 7 (INT4, two codes per byte), so each entry of the
            dequantized basis B^ = q s is within s / 2 of B's. Round to nearest: the basis
            is refit from G at every refresh, never accumulated, so no stochastic rounding
            is needed. ``basis()``, ``project`` and ``project_back`` use B^, which is only
            approximately orthonormal (``orthonormal`` is False). Measured max |B^T B^ - I|
            and ||B^T B^ - I||_2: INT8 <= 4.2e-3 and 0.018, INT4 <= 0.082 and 0.33 for
            random, power-law and low-rank matrices of 64-1024 rows / columns at ranks 4
            and 64, both sides; INT8 7.0e-3 and 0.026, INT4 0.20 and 0.44 when G has only
            12 nonzero rows (vectors on a few entries); for a random 2048 x 4096 G at rank
            1024, INT8 1.1e-3 and 0.014, INT4 0.038 and 0.28, with B^ off by 0.7% (INT8) and
            12.6% (INT4) of ||B||_F (``tests/test_quantized_basis.py``). Memory per basis:
            d r bytes (INT8) or ceil(d / 2) r bytes (INT4), plus 4 r ceil(d / 256) bytes of
            scales, against 4 d r in fp32. A randomized refresh warm-starts from B^.
    """

    name = "svd"

    def __init__(self, rank: int, side: str = "auto", method: str = "exact",
                 power_iters: int = 2, oversample: int = 8, seed: int = 0,
                 bits: int = 32) -> None:
        super().__init__(rank, side, seed)
        self.method = check_one_of("method", method, METHODS)
        self.power_iters = check_count("power_iters", power_iters)
        self.oversample = check_count("oversample", oversample)
        self.bits = check_bits(bits)
        self._codes: Tensor | None = None          # bits 8 / 4: the state instead of _basis
        self._scales: Tensor | None = None
        self.dtype = torch.float32

    @property
    def orthonormal(self) -> bool:
        return self.bits == 32

    def _fit(self, G: Tensor, side: str, dim: int, r: int) -> None:
        if self.method == "exact" or r == dim:
            self._keep(top_singular_basis(G, side, r))
            return
        prev, draws = self._stored_basis(), self.draws
        if prev is not None and prev.shape == (dim, r):
            start, iters = prev.to(device=G.device, dtype=G.dtype), max(1, self.power_iters - 1)
        else:
            k = min(dim, r + self.oversample)
            start = seeded_gaussian((dim, k), self.seed, draws, G.device, G.dtype)
            iters, draws = max(1, self.power_iters), draws + 1
        self._keep(randomized_basis(G, side, r, start, iters))
        self.draws = draws

    def _keep(self, B: Tensor) -> None:
        """Store the new basis: itself (32 bits) or its codes and scales."""
        if self.bits == 32:
            self._basis = B
        else:
            self._codes, self._scales = quantize_columns(B, self.bits)
            self.dtype = B.dtype

    def _stored_basis(self) -> Tensor | None:
        """The basis kept now (dequantized for 8 / 4 bits), or None before the first fit."""
        if self.bits == 32:
            return self._basis
        return None if self._codes is None else self.basis()

    def basis(self) -> Tensor:
        """The (d x r) basis: the stored one (32 bits) or B^ = q s dequantized from the
        codes on each call (8 / 4 bits; only approximately orthonormal, see the class)."""
        if self.bits == 32:
            return super().basis()
        self._check_fitted()
        return dequantize_columns(self._codes, self._scales, self.bits, self.dim, self.dtype)

    def state_shapes(self, dim: int, r: int, dtype: torch.dtype
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.bits == 32:
            return super().state_shapes(dim, r, dtype)
        return {"basis_" + k: v for k, v in code_shapes(dim, r, self.bits).items()}

    def _basis_state(self) -> dict[str, Any]:
        if self.bits == 32:
            return super()._basis_state()
        return {"basis_codes": self._codes, "basis_scales": self._scales,
                "float64": int(self.dtype == torch.float64), "seed": self.seed,
                "draws": self.draws}

    def _load_basis_state(self, state: dict[str, Any]) -> None:
        saved = self._saved_bits(state)
        if saved != self.bits:
            raise ValueError(f"state was saved with bits={saved} but this SVDProjector has "
                             f"bits={self.bits}")
        if self.bits == 32:
            super()._load_basis_state(state)
            return
        side = SIDES[int(state["side"])]
        dim = int(state["cols"] if side == "right" else state["rows"])
        shapes = code_shapes(dim, min(self.rank, dim), self.bits)
        for key, (shape, dtype) in shapes.items():
            value = state["basis_" + key]
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(f"state's basis_{key} is {tuple(value.shape)} {value.dtype}, "
                                 f"expected {shape} {dtype} for a rank-{self.rank} basis of "
                                 f"length {dim} at bits={self.bits}")
        self._codes, self._scales = state["basis_codes"], state["basis_scales"]
        self.dtype = torch.float64 if int(state["float64"]) else torch.float32
        self.seed, self.draws = int(state["seed"]), int(state["draws"])

    @staticmethod
    def _saved_bits(state: dict[str, Any]) -> int:
        """The width a state was saved at: 32 for a dense basis, else from its codes' dtype."""
        if "basis" in state:
            return 32
        codes = state.get("basis_codes")
        widths = {dtype: bits for bits, dtype in CODE_DTYPES.items()}
        if not isinstance(codes, Tensor) or codes.dtype not in widths:
            raise ValueError("state holds neither a basis nor INT8 / INT4 basis_codes: not "
                             "an SVDProjector's state")
        return widths[codes.dtype]
