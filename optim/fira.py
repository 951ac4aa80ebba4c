"""FiraAdamW (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under
Low-rank Constraint?").

GaLore's low-rank Adam update plus the part of the gradient outside the subspace,
S = phi (G - P R), with phi = ||psi(R)|| / ||R|| per column (left basis) or row (right
basis), and a limiter that lets ||S|| grow by at most gamma = 1.01 per step. See
:func:`memopt.optim.lowrank.fira_residual` for the one place we differ from the released code.
"""

from __future__ import annotations

from typing import Any

from .galore import GaLoreAdamW


class FiraAdamW(GaLoreAdamW):
    """:class:`GaLoreAdamW` with ``residual="fira"`` and ``limiter_gamma=1.01``."""

    def __init__(self, params: Any, *args: Any, limiter_gamma: float = 1.01,
                 residual: str = "fira", **kwargs: Any) -> None:
        super().__init__(params, *args, limiter_gamma=limiter_gamma, residual=residual, **kwargs)


class FiraAdamW8bit(FiraAdamW):
    """:class:`FiraAdamW` with 8-bit blockwise moments (``state_bits=8``)."""

    def __init__(self, params: Any, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
