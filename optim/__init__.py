"""memopt.optim: memory-efficient torch.optim optimizers.

The low-rank family is one composition, projector x update rule x residual x state precision
(``lowrank.py``): GaLoreAdamW, DCTAdamW, FiraAdamW, Trion and GaLoreMuon are presets of
:class:`LowRankOptimizer`. Each update rule is one file in ``rules/`` holding its reference
and batched steps; residuals are ``fira.py`` and ``error_feedback.py``; every piece and its
state are registered in ``registry.py``. Muon and PolarGrad (``muon.py``) run the
orthogonalized rule on whole matrices. The engine (``engine.py``) drives every step; the
executors (``executors*.py``) batch the projections, lifts and polar factors. Each optimizer
serves a whole model: parameters that are not projected or orthogonalized get AdamW in the
same optimizer.
"""

from .engine import MemoptOptimizer, state_bytes
from .groups import param_groups
from .lowrank import LowRankOptimizer
from .lowrank_options import LowRankOptions
from .methods import (DCTAdamW, DCTAdamW8bit, FiraAdamW, FiraAdamW8bit, GaLoreAdamW,
                      GaLoreAdamW8bit, GaLoreMuon, GaLoreMuon8bit, LowRankAdamW, Trion, Trion8bit)
from .memory import estimate_memory
from .muon import Muon, Muon8bit, OrthogonalizedOptimizer, PolarGrad, PolarGrad8bit
from .per_layer import PerLayerHandle, step_in_backward
from .registry import (RESIDUALS, RULES, create_optimizer, optimizer_names, register_optimizer,
                       register_residual, register_rule)

#: Every registered optimizer name ``create_optimizer`` accepts, besides the compositions
#: "PROJECTOR+RULE[+RESIDUAL][+8bit]".
OPTIMIZER_NAMES: tuple[str, ...] = optimizer_names()

__all__ = [
    "OPTIMIZER_NAMES", "RESIDUALS", "RULES", "create_optimizer", "DCTAdamW", "DCTAdamW8bit",
    "FiraAdamW", "FiraAdamW8bit", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreMuon",
    "GaLoreMuon8bit", "LowRankAdamW", "LowRankOptimizer", "LowRankOptions", "MemoptOptimizer",
    "Muon", "Muon8bit", "OrthogonalizedOptimizer", "Trion", "Trion8bit", "optimizer_names",
    "register_optimizer", "register_residual", "register_rule",
    "PerLayerHandle", "PolarGrad", "PolarGrad8bit", "param_groups", "state_bytes",
    "estimate_memory", "step_in_backward",
]
