"""The SVD-free DCT projector (Modoranu et al., 2025, "SVD-Free Low-Rank Adaptive Gradient
Optimization").

The orthonormal DCT-II basis of size d is fixed, so a rank-r basis is just r of its vectors:
the r with the largest alignment ||G d_k|| (energy of G's DCT coefficients). Only the r
indices are state; the d x d matrix of each size is built once per device and shared by every
projector. Computing all d coefficients costs one dense product (m d^2) or an FFT (m d log d).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch
from torch import Tensor

from .base import Projector, full_fp32_matmul

METHODS = ("auto", "matmul", "fft")

#: "auto" uses the FFT from this length up, per device type. Set from
#: ``python -m memopt.recipes.bench_projectors`` (README, "Projector refresh").
FFT_MIN_DIM = {"cpu": 1024, "cuda": 1024}

_cache: dict[tuple[int, str, torch.dtype], Tensor] = {}
_cache_lock = threading.Lock()


def dct_matrix(d: int, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal DCT-II matrix T (d x d) whose row k is basis vector k.

    T[k, i] = sqrt(2/d) c_k cos(pi (i + 1/2) k / d), c_0 = 1/sqrt(2), c_k = 1 otherwise
    (scipy.fft.dct(eye(d), norm="ortho", axis=0)). One shared copy per (d, device, dtype).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (int(d), str(device), dtype)
    with _cache_lock:
        T = _cache.get(key)
        if T is None:
            i = torch.arange(d, dtype=torch.float64, device=device)
            k = i.unsqueeze(1)
            T = torch.cos(math.pi * (i + 0.5) * k / d) * math.sqrt(2.0 / d)
            T[0] /= math.sqrt(2.0)
            T = T.to(dtype)
            _cache[key] = T
    return T


def clear_dct_cache() -> None:
    """Free the shared DCT matrices."""
    with _cache_lock:
        _cache.clear()


def dct_cache_bytes() -> int:
    """Bytes held by the shared DCT matrices (all sizes and devices)."""
    with _cache_lock:
        return sum(T.numel() * T.element_size() for T in _cache.values())


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


def dct_energy(G: Tensor, side: str, method: str = "auto") -> Tensor:
    """Alignment of every DCT vector with G: e_k = ||G d_k||^2 (right) or ||d_k^T G||^2 (left)."""
    d = G.shape[1] if side == "right" else G.shape[0]
    if method == "auto":
        method = "fft" if d >= FFT_MIN_DIM.get(G.device.type, 1024) else "matmul"
    rows = G if side == "right" else G.mT                 # transform along the last dim
    if method == "fft":
        return dct2(rows).square().sum(dim=0)
    with full_fp32_matmul():
        coefficients = rows @ dct_matrix(d, G.device, G.dtype).mT
    return coefficients.square().sum(dim=0)


def select_dct_indices(G: Tensor, side: str, r: int, method: str = "auto") -> Tensor:
    """Indices (ascending, int64) of the r DCT vectors best aligned with G."""
    energy = dct_energy(G, side, method)
    return torch.topk(energy, r, sorted=False).indices.sort().values


class DCTProjector(Projector):
    """r columns of the orthonormal DCT-II basis, chosen by alignment with G; indices only.

    Args:
        rank: r (>= 1).
        side: "auto", "left" or "right".
        method: how all d alignments are computed: "matmul" (dense product with the shared
            DCT matrix), "fft" (one real FFT per row), or "auto" (FFT from
            ``FFT_MIN_DIM[device]`` up).
    """

    name = "dct"

    def __init__(self, rank: int, side: str = "auto", method: str = "auto") -> None:
        super().__init__(rank, side)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.indices: Tensor | None = None
        self.dtype = torch.float32

    def _fit(self, G: Tensor, side: str, dim: int, r: int) -> None:
        self.indices = select_dct_indices(G, side, r, self.method)
        self.dtype = G.dtype

    def basis(self) -> Tensor:
        """The chosen DCT vectors as columns (d x r), gathered from the shared matrix."""
        self._check_fitted()
        T = dct_matrix(self.dim, self.indices.device, self.dtype)
        return T.index_select(0, self.indices).mT

    def _basis_state(self) -> dict[str, Any]:
        return {"indices": self.indices, "float64": int(self.dtype == torch.float64)}

    def _load_basis_state(self, state: dict[str, Any]) -> None:
        self.indices = state["indices"].to(torch.int64)
        self.dtype = torch.float64 if int(state["float64"]) else torch.float32
