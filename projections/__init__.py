"""memopt.projections: orthonormal bases (SVD, DCT, polar) and polar factors.

Knows nothing about optimizers. ``make_projector("svd" | "dct" | "polar", rank, **kw)``
builds a :class:`Projector`; ``orthogonalize(G, method)`` returns the polar factor U V^T.
"""

from __future__ import annotations

import inspect
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


def projector_options(name: str) -> tuple[str, ...]:
    """The keyword options of the projector ``name`` (everything its class takes but rank)."""
    parameters = inspect.signature(PROJECTORS[name].__init__).parameters
    return tuple(k for k in parameters if k not in ("self", "rank"))


def make_projector(name: str, rank: int, **kwargs: Any) -> Projector:
    """Build a projector by name: "svd", "dct" or "polar"; ``kwargs`` go to its class.
    An option the class does not take is a ValueError naming it and the projectors that
    take it (``bits`` on the DCT projector is refused, never ignored)."""
    try:
        cls = PROJECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown projector {name!r}; choose one of {sorted(PROJECTORS)}") from None
    own = projector_options(name)
    for key in kwargs:
        if key not in own:
            takers = [other for other in PROJECTORS if key in projector_options(other)]
            where = (f"; {key!r} is an option of projector {' and '.join(map(repr, takers))}"
                     if takers else "")
            raise ValueError(f"projector {name!r} has no option {key!r} (its options: "
                             f"{', '.join(own)}){where}")
    return cls(rank, **kwargs)


__all__ = [
    "DCTProjector", "PROJECTORS", "PolarProjector", "Projector", "SVDProjector", "dct_matrix",
    "lift", "make_projector", "orthogonalize", "orthogonalize_many", "orthonormality_error",
    "project_onto",
]
