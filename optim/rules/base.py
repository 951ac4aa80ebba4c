"""The contract of an update rule in the subspace (see ``rules/__init__.py``).

A rule declares its state once (``STATE``: :class:`~memopt.optim.states.StateDecl`, whose
shapes are "coordinates", "matrix" or "scalar") and its options as one frozen dataclass
(``Options``: defaults in one place, validated in ``__post_init__``). Its two steps take the
same arguments, as torch's ``_single_tensor_adam`` and ``_multi_tensor_adam`` do:

    reference(items, store, options, keep_input) -> [U]   one matrix at a time
    batched(items, store, options, keep_input)   -> [U]   the same math over whole batches

where each item holds the coordinates R (b, p, q) of b same-shape matrices, their states
(``state["step"]`` already advanced by the composition, the one place it is) and the
matrices' full shape; U (b, p, q) is the update at lr 1 before the composition's ``scale``:
W <- W (1 - lr wd) + lr scale lift(U). ``keep_input`` asks a rule not to write U over R
(Fira's residual reads R after the rule). State tensors are read and written through
``store`` (fp32, or 8-bit blockwise codes).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..states import MomentStore, StateDecl, StateSpec


@dataclass
class Coordinates:
    """Same-shape projected gradients of one step: R (b, p, q), their states (one dict per
    matrix, in R's order) and the full shape (m, n) of the matrices they came from.
    ``sharded``: the parameters, when R holds only this rank's rows of each matrix (FSDP2;
    the basis is then on the column side): a rule that is not elementwise (a polar factor,
    a norm) must combine the ranks' rows (``distributed.py``)."""
    R: Tensor
    states: list[dict[str, Any]]
    shape: tuple[int, int]
    sharded: list[Tensor] | None = None


class Rule(ABC):
    """Base of update rules; subclasses set ``name``, ``STATE``, ``Options``, ``lr_family``
    and implement :meth:`reference` and :meth:`batched`."""

    #: The registry name (``LowRankOptimizer(rule=name)``, CLI names "PROJECTOR+name").
    name: ClassVar[str] = ""
    #: What the rule keeps per matrix (at least one tensor: see ``states.declare``).
    STATE: ClassVar[tuple[StateDecl, ...]] = ()
    #: The rule's options: a frozen dataclass whose fields have defaults.
    Options: ClassVar[type] = type(None)
    #: Which of a recipe preset's learning rates suits the rule ("lowrank", "muon", ...).
    lr_family: ClassVar[str] = "lowrank"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls.Options))

    def state_specs(self, coordinates: tuple[int, ...], matrix: tuple[int, ...],
                    moment: torch.dtype, options: Any) -> list[StateSpec]:
        """The tensors of one matrix (every declared one; override to drop some)."""
        return [decl.spec(coordinates, matrix, moment) for decl in self.STATE]

    def optional_state(self) -> frozenset[str]:
        """Declared keys a state may lack until first use (loading accepts their absence)."""
        return frozenset()

    @abstractmethod
    def adamw_settings(self, group: dict[str, Any], lr: float) -> tuple[float, tuple[float, float],
                                                                     float]:
        """(lr, betas, eps) of the AdamW update of a group's unprojected parameters."""

    @abstractmethod
    def reference(self, items: list[Coordinates], store: MomentStore, options: Any,
                  keep_input: bool) -> list[Tensor]:
        """The rule one matrix at a time (the math as written in its paper)."""

    @abstractmethod
    def batched(self, items: list[Coordinates], store: MomentStore, options: Any,
                keep_input: bool) -> list[Tensor]:
        """The same math over whole batches (fused, stacked); equal to :meth:`reference`."""
