"""Error feedback for low-rank steps (Modoranu et al., 2025, "SVD-Free Low-Rank Adaptive
Gradient Optimization"; the authors' ``DCTAdamW`` calls it ``use_ef``, off by default): what a
projection discards is carried into the next gradient instead of being lost.

    G' = G + E                   (E = 0 before the first step)
    the step runs on G': the basis is refreshed from G' when due, R = project(G'), Adam(R)
    E <- G' - project_back(R)    (the part of G' outside the subspace; so that
                                  project_back(R) + E = G')

E has the matrix's full shape: 4 bytes per element in fp32, about 1 in 8 bits (bitsandbytes'
blockwise quantization, as the moments; the authors quantize to 16 levels per row instead).
The buffer doubles as the step's workspace: G' is formed in it, so fp32 feedback costs no
memory beyond the buffer. Not with Fira, whose residual already applies the discarded part.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

import torch

from ..projections import lift, project_onto

from .distributed import is_sharded
from .executors import as_matrix
from .groups import check_choice
from .residual import Residual
from .states import MomentStore, StateDecl, StateSpec

#: ``error_feedback`` choices -> bits of the buffer (None: off).
ERROR_FEEDBACK = {"none": None, "fp32": 32, "8bit": 8}


def check_error_feedback(group: dict[str, Any]) -> None:
    """ValueError for an unknown ``error_feedback`` or one combined with Fira's residual."""
    check_choice("error_feedback", group["error_feedback"], tuple(ERROR_FEEDBACK))
    if group["error_feedback"] != "none" and group["residual"] == "fira":
        raise ValueError("Invalid error_feedback with residual='fira': Fira's residual "
                         "already applies what the projection discards")


class ErrorFeedback(Residual):
    """``error_feedback="fp32"`` or ``"8bit"``: the buffer E, the matrix's shape, in the
    option's width whatever the optimizer's ``state_bits``."""

    name = "error_feedback"
    STATE = (StateDecl("error_buffer", "matrix", quantizable=True, signed=True),)

    def state_specs(self, coordinates: tuple[int, ...], matrix: tuple[int, ...],
                    moment: torch.dtype, group: dict[str, Any]) -> list[StateSpec]:
        bits = ERROR_FEEDBACK[group["error_feedback"]]
        return [decl.spec(coordinates, matrix, moment, bits) for decl in self.STATE]


def discarded(G: Tensor, P: Tensor, side: str) -> Tensor:
    """G - project_back(project(G)): the part of G outside the subspace of the basis P."""
    return G - lift(project_onto(G, P, side), P, side)


@contextmanager
def corrected_gradients(optimizer: Any, group: dict[str, Any], params: list[Tensor],
                        store: MomentStore) -> Iterator[None]:
    """Within the block each projected parameter's ``.grad`` is G' = G + E (the step reads
    it there); afterwards E <- G' - project_back(project(G')) with the basis the step used,
    and ``.grad`` is G again. Runs after the finiteness check, so a failed step has not
    changed E. ``optimizer.projector(p)`` gives p's basis."""
    if ERROR_FEEDBACK[group["error_feedback"]] is None or not params:
        yield
        return
    if any(is_sharded(p) for p in params):
        raise ValueError("error_feedback is not supported for FSDP2-sharded parameters")
    grads = [p.grad for p in params]
    corrected = []
    for p, G in zip(params, grads):
        state = optimizer.state[p]
        if "error_buffer" in state:
            E = store.read(state, "error_buffer")
            corrected.append(E.add_(as_matrix(G).to(E.dtype)))       # G' in the buffer
        else:
            corrected.append(as_matrix(G).clone())                  # E = 0 at the start
        p.grad = corrected[-1].view(p.shape).to(G.dtype)
    try:
        yield
    finally:
        for p, G in zip(params, grads):
            p.grad = G
    for p, Gc in zip(params, corrected):          # E <- G' - project_back(project(G'))
        state, proj = optimizer.state[p], optimizer.projector(p, group)
        P = proj.basis().to(Gc.dtype)
        E = Gc.sub_(lift(project_onto(Gc, P, proj.side), P, proj.side))
        store.write(state, "error_buffer", E)       # (made with the state, at step 0)
