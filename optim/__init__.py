"""memopt.optim: memory-efficient torch.optim optimizers.

GaLoreAdamW, DCTAdamW and FiraAdamW run on one low-rank engine (:mod:`.lowrank`); Muon and
PolarGrad on one orthogonalized-momentum engine (:mod:`.polar`). Each serves a whole model:
parameters that are not projected or orthogonalized get AdamW inside the same optimizer.
"""

from .base import MemoptOptimizer, state_bytes
from .dct import DCTAdamW, DCTAdamW8bit
from .fira import FiraAdamW, FiraAdamW8bit
from .galore import GaLoreAdamW, GaLoreAdamW8bit
from .groups import param_groups
from .lowrank import LowRankAdamW
from .memory import estimate_memory
from .per_layer import PerLayerHandle, step_in_backward
from .polar import Muon, Muon8bit, OrthogonalizedOptimizer, PolarGrad, PolarGrad8bit
from .registry import OPTIMIZER_NAMES, create_optimizer

__all__ = [
    "OPTIMIZER_NAMES", "create_optimizer", "DCTAdamW", "DCTAdamW8bit", "FiraAdamW", "FiraAdamW8bit", "GaLoreAdamW", "GaLoreAdamW8bit",
    "LowRankAdamW", "MemoptOptimizer", "Muon", "Muon8bit", "OrthogonalizedOptimizer",
    "PerLayerHandle", "PolarGrad", "PolarGrad8bit", "param_groups", "state_bytes",
    "estimate_memory", "step_in_backward",
]
