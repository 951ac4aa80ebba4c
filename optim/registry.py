"""One registry of optimizer names, for the command line, recipes and the Trainer helper.

``create_optimizer(name, model_or_params, **kwargs)``: "adamw", "galore", "dct", "fira",
"muon", "polargrad", each also with an "8bit" suffix. Given an ``nn.Module``, the memopt
optimizers get :func:`param_groups` (hidden matrices projected or orthogonalized, the rest
AdamW); "adamw" is ``torch.optim.AdamW`` (fused on CUDA) and "adamw8bit" bitsandbytes'
AdamW8bit, the baselines memopt is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .groups import param_groups
from .lowrank import (DCTAdamW, DCTAdamW8bit, FiraAdamW, FiraAdamW8bit, GaLoreAdamW,
                      GaLoreAdamW8bit)
from .muon import Muon, Muon8bit, PolarGrad, PolarGrad8bit
from .states import import_bitsandbytes


def _torch_adamw(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    tensors = [p[1] if isinstance(p, tuple) else p for p in tensors]
    fused = bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(params, **({"fused": True} if fused else {}), **kwargs)


def _bnb_adamw8bit(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    bnb = import_bitsandbytes("adamw8bit")
    return bnb.optim.AdamW8bit(params, **kwargs)


_MEMOPT: dict[str, type] = {
    "galore": GaLoreAdamW, "dct": DCTAdamW, "fira": FiraAdamW, "muon": Muon,
    "polargrad": PolarGrad, "galore8bit": GaLoreAdamW8bit, "dct8bit": DCTAdamW8bit,
    "fira8bit": FiraAdamW8bit, "muon8bit": Muon8bit, "polargrad8bit": PolarGrad8bit}
_BASELINES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _torch_adamw, "adamw8bit": _bnb_adamw8bit}

#: Every name ``create_optimizer`` accepts.
OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "adamw8bit") + tuple(
    n + suffix for n in ("galore", "dct", "fira", "muon", "polargrad") for suffix in ("", "8bit"))


def create_optimizer(name: str, model_or_params: nn.Module | Iterable[Any],
                     **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for a model (with :func:`param_groups`) or parameters.

    ``kwargs`` go to the optimizer's constructor (``lr``, ``rank``, ``weight_decay``, ...).
    Raises ValueError for an unknown name, listing the known ones.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    if key in _BASELINES:
        params = (model_or_params.parameters() if isinstance(model_or_params, nn.Module)
                  else model_or_params)
        return _BASELINES[key](params, **kwargs)
    cls = _MEMOPT[key]
    params = (param_groups(model_or_params) if isinstance(model_or_params, nn.Module)
              else model_or_params)
    return cls(params, **kwargs)
