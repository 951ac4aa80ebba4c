"""memopt.projections: orthonormal bases (SVD, DCT, polar) and polar factors.

Knows nothing about optimizers. ``make_projector("svd" | "dct" | "polar", rank, **kw)``
builds a :class:`Projector`; ``orthogonalize(G, method)`` returns the polar factor U V^T.
"""

from __future__ import annotations

from typing import Any

from .base import Projector, lift, orthonormality_error, project_onto
from .dct import DCTProjector, dct_matrix
from .polar import PolarProjector, orthogonalize, orthogonalize_many
from .svd import SVDProjector

PROJECTORS: dict[str, type[Projector]] = {
    "svd": SVDProjector,
    "dct": DCTProjector,
    "polar": PolarProjector,
}


def make_projector(name: str, rank: int, **kwargs: Any) -> Projector:
    """Build a projector by name: "svd", "dct" or "polar"; ``kwargs`` go to its class."""
    try:
        cls = PROJECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown projector {name!r}; choose one of {sorted(PROJECTORS)}") from None
    return cls(rank, **kwargs)


__all__ = [
    "DCTProjector", "PROJECTORS", "PolarProjector", "Projector", "SVDProjector", "dct_matrix",
    "lift", "make_projector", "orthogonalize", "orthogonalize_many", "orthonormality_error",
    "project_onto",
]
