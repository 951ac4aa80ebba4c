"""Update rules in a subspace: what a low-rank optimizer does with the projected gradient.

A low-rank optimizer is a composition (``lowrank.py``): projector x rule x residual x state
precision. A rule maps the coordinates R of a gradient in the subspace (the projected
gradient) to its update U there; the composition lifts U back and applies it. Each rule is
one file holding its reference step and its batched step with one signature
(:class:`~memopt.optim.rules.base.Rule`), registered in ``registry.py``.
"""

from .base import Coordinates, Rule

__all__ = ["Coordinates", "Rule"]
