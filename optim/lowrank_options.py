"""The options every low-rank composition has, as one typed, validated object.

The rule's own options are its ``Options`` dataclass (``rules/``); :class:`LowRankOptimizer`
(``lowrank.py``) builds both from each param group (``LowRankOptimizer.options``) when the
group is added and whenever one of its values changes, so every option is checked once, in
one place, and read from a typed field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Union

from ..projections import PROJECTORS, Projector, make_projector

from .basis_change import REFRESH_MODES
from .error_feedback import ERROR_FEEDBACK
from .executors import PROJECTION_PRECISIONS
from .groups import (check_above, check_choice, check_learning_rate, check_nonnegative,
                     check_positive_int)
from .registry import RULES

ProjectorSpec = Union[str, Callable[[int], Projector]]
RESIDUAL_CHOICES = ("none", "fira")


@dataclass(frozen=True)
class LowRankOptions:
    """The options every low-rank composition has (the rule's own are in its ``Options``).

    Validated on construction: each raises ValueError naming the option. The defaults here
    are the only ones; presets (``LowRankOptimizer.PRESET``) override some.
    """
    lr: Any = 1e-3
    weight_decay: float = 0.0
    rank: int | None = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    projector: ProjectorSpec = "svd"
    projector_options: dict[str, Any] | None = None
    rule: str = "adam"
    residual: str = "none"
    limiter_gamma: float = 1.01
    moments_on_refresh: str = "keep"
    projection_precision: str = "auto"
    error_feedback: str = "none"
    state_bits: int = 32
    adamw: bool = False
    check_finite: bool = True
    impl: str = "fast"
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        check_learning_rate(self.lr)
        check_nonnegative("weight_decay value", self.weight_decay)
        if self.rank is not None:
            check_positive_int("rank", self.rank)
        check_positive_int("update_proj_gap", self.update_proj_gap)
        check_above("scale", self.scale, 0)
        check_above("limiter_gamma", self.limiter_gamma, 1, inclusive=True)
        check_choice("rule", self.rule, tuple(RULES))
        spec, options = self.projector, self.projector_options
        if not callable(spec):
            check_choice("projector", spec, PROJECTORS)
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"Invalid projector_options: {options!r} (must be a dict or None)")
        for key, choices in (("state_bits", (8, 32)), ("residual", RESIDUAL_CHOICES),
                             ("moments_on_refresh", REFRESH_MODES), ("adamw", (True, False)),
                             ("projection_precision", PROJECTION_PRECISIONS),
                             ("error_feedback", tuple(ERROR_FEEDBACK)),
                             ("check_finite", (True, False)), ("impl", ("fast", "reference"))):
            check_choice(key, getattr(self, key), choices)
        if self.error_feedback != "none" and self.residual == "fira":
            raise ValueError("Invalid error_feedback with residual='fira': Fira's residual "
                             "already applies what the projection discards")
        if self.cuda_graph is not False:
            raise ValueError(f"Invalid cuda_graph: {self.cuda_graph!r}: recorded CUDA-graph "
                             "steps were removed (slower than the eager step); use False")
        if not callable(spec):          # the options are valid (whether or not a rank uses them)
            try:
                make_projector(spec, self.rank or 1, **(options or {}))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"Invalid projector_options {options!r} for projector "
                                 f"{spec!r}: {exc}") from exc


COMMON_OPTIONS = tuple(f.name for f in fields(LowRankOptions))
_COMMON_DEFAULTS = {f.name: f.default for f in fields(LowRankOptions)}


#: The common options' names and defaults (the only defaults; presets override some).
COMMON_OPTIONS = tuple(f.name for f in fields(LowRankOptions))
COMMON_DEFAULTS = {f.name: f.default for f in fields(LowRankOptions)}
