"""The contract of a residual: what a low-rank step does with the part of the gradient its
subspace leaves out (``fira.py``: add it back, scaled and limited; ``error_feedback.py``:
carry it into the next gradient). A residual declares its state once, as a rule does
(``STATE``, registered in ``registry.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .states import StateDecl, StateSpec


class Residual:
    """Base of residuals: ``name`` and ``STATE``; :meth:`state_specs` makes the tensors."""

    name: ClassVar[str] = ""
    STATE: ClassVar[tuple[StateDecl, ...]] = ()

    def state_specs(self, coordinates: tuple[int, ...], matrix: tuple[int, ...],
                    moment: torch.dtype, group: dict[str, Any]) -> list[StateSpec]:
        return [decl.spec(coordinates, matrix, moment) for decl in self.STATE]
