"""The SVD-free DCT projector (Modoranu et al., 2025, "SVD-Free Low-Rank Adaptive Gradient
Optimization").

The orthonormal DCT-II basis of size d is fixed, so a rank-r basis is just r of its vectors:
the r with the largest alignment with G, measured by the L2 norm ||G d_k|| (the energy of
G's DCT coefficients, the default) or the L1 norm ||G d_k||_1 (the authors' ``ell_norm=1``).
Only the r indices are state. The chosen columns are generated when needed from two O(d) tables per
size (no d x d matrix is kept); all d alignments cost one real FFT per row (m d log d), or a
dense product with a generated DCT matrix for small d.

``refine`` (off by default) trades the index-only state for kept energy: a few steps of
subspace iteration warm-started from the chosen columns (:func:`refine_basis`) move the
basis toward G's top singular subspace, and the projector then keeps the dense basis.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Projector, canonical_signs, check_count, check_one_of, full_fp32_matmul

METHODS = ("auto", "matmul", "fft")
#: How a DCT vector's alignment with G is measured: the L2 or the L1 norm of G's coefficients.
NORMS = ("l2", "l1")

#: "auto" uses the FFT from this length up, per device type. Set from
#: ``python -m memopt.recipes.bench_projectors`` (README, "Projector refresh").
FFT_MIN_DIM = {"cpu": 1024, "cuda": 1024}

_tables: dict[tuple[int, str, torch.dtype], tuple[Tensor, Tensor, Tensor]] = {}
_tables_lock = threading.Lock()


def _dct_tables(d: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(cos(pi t / 2d) for t < 4d, 2i + 1 for i < d, the scale sqrt((2 - [k = 0]) / d) for k < d)."""
    key = (int(d), str(device), dtype)
    with _tables_lock:
        tables = _tables.get(key)
        if tables is None:
            t = torch.arange(4 * d, dtype=torch.float64, device=device)
            cosines = torch.cos(math.pi * t / (2 * d)).to(dtype)
            odd = 2 * torch.arange(d, dtype=torch.int64, device=device) + 1
            scale = torch.full((d,), math.sqrt(2.0 / d), dtype=dtype, device=device)
            scale[0] = math.sqrt(1.0 / d)
            tables = _tables[key] = (cosines, odd, scale)
    return tables


def dct_rows(d: int, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """DCT-II basis vectors ``indices`` of size d as the rows of a contiguous (r x d) matrix.

    Entry (j, i) is sqrt(2/d) c_k cos(pi (2i + 1) k / 2d) for k = indices[j]
    (c_0 = 1/sqrt(2), c_k = 1 otherwise); the phase (2i + 1) k is reduced modulo 4d in
    integers, so the cosine is exact to the dtype's rounding for any d.
    """
    cosines, odd, scale = _dct_tables(d, indices.device, dtype)
    phase = torch.outer(indices, odd).remainder_(4 * d)
    return cosines[phase].mul_(scale[indices].unsqueeze(1))


def dct_columns(d: int, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The same vectors as the columns of a (d x r) matrix (a transposed view of
    :func:`dct_rows`)."""
    return dct_rows(d, indices, dtype).mT


def dct_matrix(d: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix T (d x d) whose row k is basis vector k
    (``scipy.fft.dct(eye(d), norm="ortho", axis=0)``). Built on each call, not kept."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return dct_rows(d, torch.arange(d, device=device), dtype)


def dct_bases(d: int, indices: list[Tensor], dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """The (d x r_i) bases of several index sets of one size, from one generated matrix:
    the rows of all of them, or the whole d x d matrix when that is smaller, then one
    gather. Columns of each basis are rows of one contiguous block."""
    total = sum(int(i.numel()) for i in indices)
    flat = torch.cat(indices)
    if total <= d:
        rows = dct_rows(d, flat, dtype)
    else:
        rows = dct_rows(d, torch.arange(d, device=flat.device), dtype).index_select(0, flat)
    return [block.mT for block in rows.split([int(i.numel()) for i in indices])]


def dct_table_bytes(d: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the O(d) tables that size-d columns are generated from (shared by all)."""
    return sum(t.numel() * t.element_size() for t in _dct_tables(d, device, dtype))


#: Elements of G transformed at once by ``dct_energy``: the energy is a sum over rows, taken
#: in chunks of rows so that the FFT's temporaries (about 8 copies of what it transforms)
#: stay near 128 MiB for any matrix; a matrix up to this size is transformed whole.
ENERGY_CHUNK = 1 << 22


def dct2(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dimension by one real FFT (Makhoul, 1980).

    With v = (x_0, x_2, x_4, ..., x_5, x_3, x_1) and V = FFT(v):
    X_k = 2 Re(exp(-i pi k / 2d) V_k) scaled by sqrt(1/4d) (k = 0) or sqrt(1/2d).
    """
    d = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    half = torch.fft.rfft(v, dim=-1)                      # V_0 .. V_{d//2}
    V = torch.cat([half, half[..., 1:d - d // 2].flip(-1).conj()], dim=-1)
    k = torch.arange(d, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * d))
    X = (V * twiddle).real * math.sqrt(2.0 / d)
    X[..., 0] /= math.sqrt(2.0)
    return X


def dct_energy(G: Tensor, side: str, method: str = "auto", norm: str = "l2") -> Tensor:
    """Alignment of every DCT vector with G: e_k = ||G d_k||^2 (right) or ||d_k^T G||^2
    (left) for "l2"; the L1 norms ||G d_k||_1, ||d_k^T G||_1 for "l1". Both are sums over
    G's rows (right) or columns (left), so shards of those add up."""
    d = G.shape[1] if side == "right" else G.shape[0]
    if method == "auto":
        method = "fft" if d >= FFT_MIN_DIM.get(G.device.type, 1024) else "matmul"
    rows = G if side == "right" else G.mT                 # transform along the last dim
    table = None if method == "fft" else dct_columns(d, torch.arange(d, device=G.device),
                                                      G.dtype)
    step = max(1, ENERGY_CHUNK // d)
    energy = None
    for start in range(0, rows.shape[0], step):         # bounded temporaries (the FFT's: ~8x)
        part = rows[start:start + step]
        if table is None:
            coefficients = dct2(part)
        else:
            with full_fp32_matmul():
                coefficients = part @ table
        e = (coefficients.abs() if norm == "l1" else coefficients.square()).sum(dim=0)
        energy = e if energy is None else energy.add_(e)
    return energy


def select_dct_indices(G: Tensor, side: str, r: int, method: str = "auto",
                       row_reduce: Callable[[Tensor], Tensor] | None = None,
                       norm: str = "l2") -> Tensor:
    """Indices (int64) of the r DCT vectors best aligned with G, strongest first (with the
    right-side energy summed over row shards by ``row_reduce``).

    Strongest first, as singular vectors come: an optimizer that keeps its subspace moments
    across a refresh then keeps them for the direction of the same rank. Sorted by index
    instead, a moment row would follow whatever index landed in its slot (measured: a loss
    jump after the refresh, README "Moments at a refresh")."""
    energy = dct_energy(G, side, method, norm)
    if row_reduce is not None:
        energy = row_reduce(energy)
    return torch.topk(energy, r, sorted=True).indices


def refine_basis(G: Tensor, side: str, Q: Tensor, steps: int,
                 row_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``steps`` steps of subspace (block power) iteration on G's Gram matrix from the
    orthonormal start Q (d x r), in full fp32 (fp64 for fp64 input):

        right (d = n): Q <- orth(G^T (G Q))        left (d = m): Q <- orth(G (G^T Q))

    orth = Householder QR, then each column's sign fixed by ``canonical_signs``, so the
    result is orthonormal whatever G's rank and the same on every rank and device type.
    Each step costs two products of G with a thin matrix (4 m n r flops) and one thin QR
    (O(d r^2)); an exact SVD costs O(m n min(m, n)). ``row_reduce`` (right side only):
    G holds some rows of the matrix and the (n x r) product G^T (G Q), a sum over rows,
    is summed over the shards before the QR.
    """
    if row_reduce is not None and side != "right":
        raise ValueError("refine_basis sums over row shards only for a right basis")
    with full_fp32_matmul():
        for _ in range(steps):
            Y = G.mT @ (G @ Q) if side == "right" else G @ (G.mT @ Q)
            if row_reduce is not None:
                Y = row_reduce(Y)
            Q = canonical_signs(torch.linalg.qr(Y).Q)
    return Q.contiguous()


class DCTProjector(Projector):
    """r columns of the orthonormal DCT-II basis, chosen by alignment with G; indices only
    (or, with ``refine``, a dense basis grown from them).

    Args:
        rank, side: as for :class:`~memopt.projections.base.Projector`.
        method: how all d alignments are computed: "matmul" (dense product with the shared
            DCT matrix), "fft" (one real FFT per row), or "auto" (FFT from
            ``FFT_MIN_DIM[device]`` up).
        norm: "l2" (rank vectors by the energy of G's coefficients, the default) or "l1"
            (by their L1 norm, as the authors' ``DCTAdamW`` with ``ell_norm=1``).
        refine: steps of subspace iteration run after the selection, warm-started from
            the chosen columns (default 0: none). With ``refine`` > 0 the basis is
            Q <- orth(G^T G Q) (right) or orth(G G^T Q) (left) repeated ``refine`` times
            (:func:`refine_basis`): it kept no less of G's energy than the columns it
            starts from in every test (``tests/test_dct_refine.py``), and comes close to
            the top-r singular subspace in a few steps where G's spectrum has a gap. Its cost per refresh, on top of
            the selection: ``refine`` x (two products of G with a d x r matrix, 4 m n r
            flops, and a thin QR, O(d r^2)), against an SVD's O(m n min(m, n)); with row
            shards, one all-reduce of d x r floats per step. Its memory: the basis is no
            longer a set of DCT columns, so the state is the dense (d, r) basis in fp32
            (fp64 for fp64 input), r d floats instead of r integers, as for the SVD
            projector. The basis depends only on G (no warm start from the previous one).

    No ``bits`` option: without ``refine`` the state is r integer indices, with nothing to
    quantize, and the refined dense basis is kept in fp32 (INT8 / INT4 bases are the SVD
    projector's ``bits``); ``projector_options={"bits": ...}`` with "dct" is a ValueError.
    """

    name = "dct"
    supports_row_sharding = True       # the energy of a right basis is a sum over rows

    def __init__(self, rank: int, side: str = "auto", method: str = "auto",
                 norm: str = "l2", refine: int = 0) -> None:
        super().__init__(rank, side)
        self.method = check_one_of("method", method, METHODS)
        self.norm = check_one_of("norm", norm, NORMS)
        self.refine = check_count("refine", refine)
        self.indices: Tensor | None = None        # the state without refine
        self._basis: Tensor | None = None         # the state with refine
        self.dtype = torch.float32

    def _fit(self, G: Tensor, side: str, dim: int, r: int,
             row_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        indices = select_dct_indices(G, side, r, self.method, row_reduce, self.norm)
        if self.refine:
            # r = d: the columns already span everything, and iterating only rotates them
            Q = dct_columns(dim, indices, G.dtype).contiguous()
            steps = self.refine if r < dim else 0
            self._basis = refine_basis(G, side, Q, steps, row_reduce)
        else:
            self.indices = indices
        self.dtype = G.dtype

    def basis(self) -> Tensor:
        """The basis as columns (d x r): the chosen DCT vectors generated from the indices,
        or the stored refined basis."""
        self._check_fitted()
        if self.refine:
            return self._basis
        return dct_columns(self.dim, self.indices, self.dtype)

    @classmethod
    def basis_many(cls, projectors: Sequence[Projector]) -> list[Tensor]:
        """Bases of several DCT projectors: one generated matrix per size, dtype and device."""
        out: list[Tensor | None] = [None] * len(projectors)
        groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
        for i, proj in enumerate(projectors):
            proj._check_fitted()
            if proj.refine:
                out[i] = proj._basis
            else:
                groups.setdefault((proj.dim, proj.dtype, proj.indices.device), []).append(i)
        for (d, dtype, _), members in groups.items():
            blocks = dct_bases(d, [projectors[i].indices for i in members], dtype)
            for i, B in zip(members, blocks):
                out[i] = B
        return out

    def state_shapes(self, dim: int, r: int, dtype: torch.dtype
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.refine:
            return {"basis": ((dim, r), dtype)}
        return {"indices": ((r,), torch.int64)}

    def shared_table(self, dim: int | None = None, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> tuple[Any, int]:
        """The O(d) tables of a size, dtype and device, which every DCT projector of them
        generates its columns from (with ``refine`` too: the refresh's starting columns
        come from them, and they stay cached)."""
        if dim is None:
            state = self._basis if self.refine else self.indices
            dim, device, dtype = self.dim, state.device, self.dtype
        return (dim, str(device), dtype), dct_table_bytes(dim, device, dtype)

    def _basis_state(self) -> dict[str, Any]:
        kept = {"basis": self._basis} if self.refine else {"indices": self.indices}
        return {**kept, "float64": int(self.dtype == torch.float64)}

    def _load_basis_state(self, state: dict[str, Any]) -> None:
        key = "basis" if self.refine else "indices"
        if key not in state:
            raise ValueError(f"a DCTProjector with refine={self.refine} keeps its {key}; this "
                             "state has none (it was saved with refine "
                             f"{'0' if self.refine else '> 0'})")
        dtype = torch.float64 if int(state["float64"]) else torch.float32
        if self.refine:
            self._basis = state["basis"].to(dtype)
        else:
            self.indices = state["indices"].to(torch.int64)
        self.dtype = dtype
