"""What a basis refresh does to the state kept in the old subspace (``moments_on_refresh``).

With C = P_new^T P_old (r x r), a tensor X of coordinates in the old basis becomes, in the
new one (left basis: X is r x n; right: X is m x r, mixed on its columns):

    keep:         X as it is (galore-torch)
    reset:        0, and the step count restarts (Adam's bias correction with it)
    rotate:       "linear" state (first moment, momentum): C X;  "quadratic" state (second
                  moment): (C o C) X -- the DCT authors' ``rotate_subspace`` (Modoranu et al.,
                  2025). A direction new to the subspace starts at 0.
    rotate_fill:  rotate, then each quadratic tensor gets (1 - rowsum(C o C)) bias2 R^2 added,
                  R = the gradient's coordinates in the new basis and bias2 = 1 - b2^t, so
                  that a direction new to the subspace starts with Adam's bias-corrected
                  second moment R^2 instead of 0 (ours: with v = 0 its first steps would be
                  about (1 - b1) / sqrt(1 - b2) = 3.2 times their usual size).

Which kind a tensor is comes from its declaration (``StateDecl.basis_change``).
"""

from __future__ import annotations

from torch import Tensor

REFRESH_MODES = ("keep", "reset", "rotate", "rotate_fill")


def rotate(X: Tensor, C: Tensor, side: str, kind: str) -> Tensor:
    """X in the new basis: C X (left) or X C^T (right); C o C for "quadratic" state."""
    K = C.square() if kind == "quadratic" else C
    return K @ X if side == "left" else X @ K.mT


def fill_outside(v: Tensor, C: Tensor, side: str, R: Tensor, bias2: float) -> Tensor:
    """v + (1 - rowsum(C o C)) bias2 R^2 (in place): the part of each new direction outside
    the old subspace gets the current coordinates' square."""
    outside = (1 - C.square().sum(dim=1)).clamp_(min=0)
    outside = outside[:, None] if side == "left" else outside[None, :]
    return v.addcmul_(R.square(), outside, value=bias2)


def carry_moments(m: Tensor, v: Tensor, mode: str, P_new: Tensor, P_old: Tensor | None,
                  side: str, R: Tensor | None = None, bias2: float = 1.0) -> tuple[Tensor, Tensor]:
    """Adam's moments (m linear, v quadratic) after a refresh under ``mode``."""
    if mode == "reset":
        return m.zero_(), v.zero_()
    if mode in ("rotate", "rotate_fill"):
        C = P_new.mT @ P_old.to(P_new.dtype)
        m, v = rotate(m, C, side, "linear"), rotate(v, C, side, "quadratic")
        if mode == "rotate_fill":
            v = fill_outside(v, C, side, R, bias2)
    return m, v
