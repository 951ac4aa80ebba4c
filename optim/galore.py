"""GaLore: Adam in the top-r singular subspace of each gradient (Zhao et al., 2024,
"GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection").

Paper defaults for LLaMA pretraining: rank 128-512, update_proj_gap 200, scale 0.25, lr 0.01.
"""

from __future__ import annotations

from typing import Any

from .lowrank import LowRankAdamW


class GaLoreAdamW(LowRankAdamW):
    """GaLore-Adam: :class:`LowRankAdamW` with the SVD projector (``projector="svd"``).

    ``GaLoreAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128,
    update_proj_gap=200, scale=0.25, projector="svd", state_bits=32)``; every argument of
    :class:`LowRankAdamW` is accepted. ``projector`` may also be "dct", "polar" or a callable.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, rank: int | None = 128,
                 update_proj_gap: int = 200, scale: float = 0.25, projector: Any = "svd",
                 state_bits: int = 32, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                         projector=projector, state_bits=state_bits, **kwargs)


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with 8-bit blockwise moments (``state_bits=8``)."""

    def __init__(self, params: Any, *args: Any, state_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
