"""The one registry: update rules, residuals and optimizer names.

Each update rule (``rules/``) and residual declares its state (``states.StateDecl``: key,
shape, quantizable, sign, what a basis change does to it); registering it records that
declaration (``states.declare``), from which follow state creation, ``state_bytes``,
``estimate_memory``, 8-bit storage, checkpoint checks and FSDP2's row-sharded keys. A piece
that declares no state is refused. Projectors are registered in ``memopt.projections``
(``PROJECTORS``); they declare their state through ``Projector.state_shapes``.

Optimizer names, for ``create_optimizer``, the command line, recipes and the Trainer helper:
the registered presets ("galore", "dct", "fira", "trion", "galoremuon", "muon",
"polargrad"), each also with an "8bit" suffix; any composition written
"PROJECTOR+RULE[+RESIDUAL][+8bit]" (e.g. "dct+orthogonalized", "svd+adam+fira"); and the
baselines memopt is measured against, "adamw" (``torch.optim.AdamW``, fused on CUDA) and
"adamw8bit" (bitsandbytes' AdamW8bit). Given an ``nn.Module``, memopt optimizers get
:func:`param_groups` (hidden matrices projected or orthogonalized, the rest AdamW).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import nn

from .groups import param_groups
from .error_feedback import ErrorFeedback
from .fira import FiraResidual
from .residual import Residual
from .rules.adam import AdamRule
from .rules.base import Rule
from .rules.orthogonalized import OrthogonalizedRule
from .states import declare, import_bitsandbytes

#: Update rules in the subspace, by name.
RULES: dict[str, Rule] = {}
#: Residuals (what the subspace leaves out, added back or carried), by name; "none" is none.
RESIDUALS: dict[str, Residual] = {}
#: Optimizer classes by their name (each also reachable with an "8bit" suffix).
OPTIMIZERS: dict[str, type] = {}
#: The class compositions are built with (``lowrank.LowRankOptimizer``, which registers itself).
COMPOSITION: list[type] = []


def register_rule(rule: type[Rule]) -> type[Rule]:
    """Register an update rule class (usable as a decorator): its name, its declared state
    (at least one tensor), its options dataclass and its two steps are checked."""
    name = getattr(rule, "name", "")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"rule {rule!r}: name must be an identifier, got {name!r}")
    if name in RULES and type(RULES[name]) is not rule:
        raise ValueError(f"a rule named {name!r} is already registered ({type(RULES[name])})")
    if not is_dataclass(rule.Options) or any(
            f.default is f.default_factory for f in fields(rule.Options)):  # type: ignore
        raise ValueError(f"rule {name!r}: Options must be a dataclass whose fields have defaults")
    for method in ("reference", "batched", "adamw_settings"):
        if getattr(rule, method) is getattr(Rule, method):
            raise ValueError(f"rule {name!r} does not implement {method}")
    declare(rule.STATE, f"rule {name!r}")
    RULES[name] = rule()
    return rule


def register_residual(residual: type[Residual]) -> type[Residual]:
    """Register a residual class (its state declared as a rule's is)."""
    declare(residual.STATE, f"residual {residual.name!r}")
    RESIDUALS[residual.name] = residual()
    return residual


def register_optimizer(name: str, cls: type) -> type:
    """Register an optimizer class under ``name`` (and its 8-bit variant, if it has one,
    under name + "8bit")."""
    OPTIMIZERS[name] = cls
    eight = getattr(cls, "EIGHT_BIT", None)
    if eight is not None:
        OPTIMIZERS[name + "8bit"] = eight
    return cls


register_rule(AdamRule)
register_rule(OrthogonalizedRule)
register_residual(FiraResidual)
register_residual(ErrorFeedback)


def _torch_adamw(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    tensors = [p[1] if isinstance(p, tuple) else p for p in tensors]
    fused = bool(tensors) and all(p.is_cuda for p in tensors)
    return torch.optim.AdamW(params, **({"fused": True} if fused else {}), **kwargs)


def _bnb_adamw8bit(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    bnb = import_bitsandbytes("adamw8bit")
    return bnb.optim.AdamW8bit(params, **kwargs)


_BASELINES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _torch_adamw, "adamw8bit": _bnb_adamw8bit}


def optimizer_names() -> tuple[str, ...]:
    """Every registered name ``create_optimizer`` accepts (compositions aside)."""
    return tuple(_BASELINES) + tuple(OPTIMIZERS)


def composition(name: str) -> dict[str, Any] | None:
    """The options of a composed name "PROJECTOR+RULE[+RESIDUAL][+8bit]", or None for a
    name without "+". ValueError naming the part that is not registered."""
    if "+" not in name:
        return None
    from ..projections import PROJECTORS
    parts = [p.strip().lower() for p in name.split("+")]
    if len(parts) < 2:
        raise ValueError(f"composed optimizer name {name!r}: write PROJECTOR+RULE[+RESIDUAL][+8bit]")
    projector, rule, *rest = parts
    options: dict[str, Any] = {}
    if projector not in PROJECTORS:
        raise ValueError(f"composed optimizer name {name!r}: unknown projector {projector!r}; "
                         f"choose one of {', '.join(PROJECTORS)}")
    if rule not in RULES:
        raise ValueError(f"composed optimizer name {name!r}: unknown rule {rule!r}; choose "
                         f"one of {', '.join(RULES)}")
    options.update(projector=projector, rule=rule)
    for part in rest:
        if part == "8bit":
            options["state_bits"] = 8
        elif part == "errorfeedback" or part == "error_feedback":
            options["error_feedback"] = "fp32"
        elif part in RESIDUALS:
            options["residual"] = part
        else:
            raise ValueError(f"composed optimizer name {name!r}: {part!r} is neither a "
                             f"residual ({', '.join(RESIDUALS)}, errorfeedback) nor 8bit")
    return options


def lr_family(name: str) -> str:
    """Which learning rate of a recipe preset suits optimizer ``name``: "adamw", the rule's
    family for low-rank ones ("lowrank" for Adam, "muon" for orthogonalized), "muon" or
    "polargrad". ValueError for an unknown name."""
    key = _key(name)
    composed = composition(key)
    if composed is not None:
        return RULES[composed["rule"]].lr_family
    base = key.removesuffix("8bit")
    if base == "adamw":
        return "adamw"
    if key not in OPTIMIZERS:
        raise ValueError(_unknown(name))
    return OPTIMIZERS[key].lr_family()


def preset_options(name: str) -> dict[str, Any] | None:
    """The options a low-rank name fixes (its class's ``PRESET`` or the composition's),
    or None for an optimizer that is not a low-rank composition. ValueError if unknown."""
    key = _key(name)
    composed = composition(key)
    if composed is not None:
        return composed
    if key.removesuffix("8bit") == "adamw":
        return None
    if key not in OPTIMIZERS:
        raise ValueError(_unknown(name))
    return dict(OPTIMIZERS[key].PRESET) if hasattr(OPTIMIZERS[key], "PRESET") else None


def is_low_rank(name: str) -> bool:
    """Whether optimizer ``name`` is a low-rank composition (it takes a ``rank``)."""
    try:
        return preset_options(name) is not None
    except ValueError:
        return False


def low_rank_names() -> tuple[str, ...]:
    """The registered names of low-rank optimizers (without their 8-bit variants)."""
    return tuple(n for n in OPTIMIZERS if not n.endswith("8bit") and is_low_rank(n))


def is_known(name: str) -> bool:
    """Whether ``create_optimizer`` takes ``name``."""
    try:
        lr_family(name)
    except ValueError:
        return False
    return True


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _unknown(name: str) -> str:
    return (f"unknown optimizer {name!r}; choose one of {', '.join(optimizer_names())}, "
            "or a composition PROJECTOR+RULE[+RESIDUAL][+8bit] (e.g. dct+orthogonalized)")


def create_optimizer(name: str, model_or_params: nn.Module | Iterable[Any],
                     **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for a model (with :func:`param_groups`) or parameters.

    ``kwargs`` go to the optimizer's constructor (``lr``, ``rank``, ``weight_decay``, ...).
    Raises ValueError for an unknown name, listing the known ones.
    """
    key = _key(name)
    composed = composition(key)
    if composed is None and key not in OPTIMIZERS and key not in _BASELINES:
        raise ValueError(_unknown(name))
    if key in _BASELINES:
        params = (model_or_params.parameters() if isinstance(model_or_params, nn.Module)
                  else model_or_params)
        return _BASELINES[key](params, **kwargs)
    params = (param_groups(model_or_params) if isinstance(model_or_params, nn.Module)
              else model_or_params)
    if composed is not None:
        return COMPOSITION[0](params, **{**composed, **kwargs})
    return OPTIMIZERS[key](params, **kwargs)
