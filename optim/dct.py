"""DCTAdamW: the SVD-free low-rank optimizer of Modoranu et al. (2025), "SVD-Free Low-Rank
Adaptive Gradient Optimization".

The basis is r columns of the fixed orthonormal DCT-II matrix, those best aligned with the
gradient; only r integer indices per matrix are state, so a refresh costs one product (or an
FFT) instead of an SVD and the optimizer stores no basis at all.
"""

from __future__ import annotations

from typing import Any

from .galore import GaLoreAdamW


class DCTAdamW(GaLoreAdamW):
    """:class:`GaLoreAdamW` with ``projector="dct"``: same signature, same engine."""

    def __init__(self, params: Any, *args: Any, projector: Any = "dct", **kwargs: Any) -> None:
        super().__init__(params, *args, projector=projector, **kwargs)


class DCTAdamW8bit(DCTAdamW):
    """:class:`DCTAdamW` with 8-bit blockwise moments (``state_bits=8``)."""

    def __init__(self, params: Any, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
