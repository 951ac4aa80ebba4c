"""FiraAdamW (Chen et al., 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under
Low-rank Constraint?").

GaLore's low-rank Adam update plus the part of the gradient outside the subspace,
S = phi (G - P R), with phi = ||psi(R)|| / ||R|| per column (left basis) or row (right
basis), and a limiter that lets ||S|| grow by at most gamma = 1.01 per step
(:func:`memopt.optim.lowrank.fira_scales`). S is never formed: the step adds
-lr phi G and folds +lr phi P R into the low-rank product.
"""

from __future__ import annotations

from typing import Any

from .galore import GaLoreAdamW


class FiraAdamW(GaLoreAdamW):
    """:class:`GaLoreAdamW` with ``residual="fira"`` and ``limiter_gamma=1.01``.

    W <- W (1 - lr wd) - lr (scale P psi(R) + S), R = P^T G, S = phi (G - P R).
    We follow the paper and subtract P R, the exact in-subspace part of G, so S lies
    outside the subspace. Fira's released code subtracts scale * P R, which leaves
    (1 - scale) P R inside S: the in-subspace gradient is then applied a second time, raw,
    beside its Adam update.
    """

    def __init__(self, params: Any, *args: Any, limiter_gamma: float = 1.01,
                 residual: str = "fira", **kwargs: Any) -> None:
        super().__init__(params, *args, limiter_gamma=limiter_gamma, residual=residual, **kwargs)


class FiraAdamW8bit(FiraAdamW):
    """:class:`FiraAdamW` with 8-bit blockwise moments (``state_bits=8``)."""

    def __init__(self, params: Any, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
