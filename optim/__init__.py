"""memopt.optim: memory-efficient torch.optim optimizers.

One file per method holds its math (``galore.py``, ``fira.py``, ``dct.py``, ``muon.py``);
the engine (``engine.py``) drives every step; the executors (``executors*.py``) make the same
math fast. GaLoreAdamW, DCTAdamW and FiraAdamW are one low-rank optimizer configured three
ways (``lowrank.py``); Muon and PolarGrad one orthogonalized one (``muon.py``). Each serves a
whole model: parameters that are not projected or orthogonalized get AdamW in the same
optimizer.
"""

from .engine import MemoptOptimizer, state_bytes
from .groups import param_groups
from .lowrank import (DCTAdamW, DCTAdamW8bit, FiraAdamW, FiraAdamW8bit, GaLoreAdamW,
                      GaLoreAdamW8bit, LowRankAdamW)
from .memory import estimate_memory
from .muon import Muon, Muon8bit, OrthogonalizedOptimizer, PolarGrad, PolarGrad8bit
from .per_layer import PerLayerHandle, step_in_backward
from .registry import OPTIMIZER_NAMES, create_optimizer

__all__ = [
    "OPTIMIZER_NAMES", "create_optimizer", "DCTAdamW", "DCTAdamW8bit", "FiraAdamW", "FiraAdamW8bit", "GaLoreAdamW", "GaLoreAdamW8bit",
    "LowRankAdamW", "MemoptOptimizer", "Muon", "Muon8bit", "OrthogonalizedOptimizer",
    "PerLayerHandle", "PolarGrad", "PolarGrad8bit", "param_groups", "state_bytes",
    "estimate_memory", "step_in_backward",
]
