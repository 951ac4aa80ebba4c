"""Per-layer updates: each parameter is updated, and its gradient freed, as soon as the
backward pass has finished accumulating it, so a full set of gradients never exists at once.

This is how GaLore (Zhao et al., 2024) trains LLaMA-7B on a 24 GB GPU. Global gradient
clipping needs every gradient and is impossible here; ``clip_grad_norm`` clips each
parameter's gradient on its own instead. A non-finite gradient raises before its own
parameter changes, but parameters updated earlier in the same backward pass stay updated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .engine import MemoptOptimizer
from .quantized_weights import materialized


class PerLayerHandle:
    """What :func:`step_in_backward` registered; ``remove()`` restores ordinary stepping.

    ``optimizers`` maps each parameter to the optimizer that updates it: the given memopt
    optimizer itself, or, for any other torch optimizer, a private copy holding that
    parameter's state (learning rates are read from the original's groups every update).
    """

    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.optimizers: dict[Tensor, torch.optim.Optimizer] = {}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def step_in_backward(model_or_params: nn.Module | Iterable[Tensor],
                     optimizer: torch.optim.Optimizer, *, accumulation_steps: int = 1,
                     clip_grad_norm: float | None = None) -> PerLayerHandle:
    """Update every parameter of ``optimizer`` inside the backward pass.

    Call ``loss.backward()`` as usual and do not call ``optimizer.step()`` (it raises while
    the hooks are registered); ``optimizer.zero_grad()`` is unnecessary. With
    ``accumulation_steps=k`` a parameter is updated on every k-th backward pass, its
    gradient accumulating in between. Learning-rate schedulers work unchanged.
    """
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
            or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
    params = list(model_or_params.parameters() if isinstance(model_or_params, nn.Module)
                  else model_or_params)
    groups = {p: g for g in optimizer.param_groups for p in g["params"]}
    missing = [i for i, p in enumerate(params) if p.requires_grad and p not in groups]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters (first: index {missing[0]}) are "
                         "not in the optimizer's param groups")
    handle = PerLayerHandle()

    def refuse_step(*_: Any) -> None:
        raise RuntimeError("optimizer.step() was called while step_in_backward() updates the "
                           "parameters during backward; drop the call (or handle.remove())")

    handle.hooks.append(optimizer.register_step_pre_hook(refuse_step))
    counts: dict[Tensor, int] = {}
    for p in params:
        if not p.requires_grad:
            continue
        if isinstance(optimizer, MemoptOptimizer):
            handle.optimizers[p] = optimizer
        else:
            group = {k: v for k, v in groups[p].items() if k not in ("params", "param_names")}
            handle.optimizers[p] = type(optimizer)([{"params": [p], **group}])

        def hook(param: Tensor) -> None:
            counts[param] = counts.get(param, 0) + 1
            if counts[param] % accumulation_steps:
                return
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([param], clip_grad_norm)
            opt = handle.optimizers[param]
            optimizer._opt_called = True   # what torch's LR schedulers check that step() set
            if opt is optimizer:
                optimizer.step_param(param)
            else:
                for key, value in groups[param].items():
                    if key not in ("params", "param_names"):
                        opt.param_groups[0][key] = value
                with materialized([param]):     # a quantized weight: its values, rounded back
                    opt.step()
            param.grad = None

        handle.hooks.append(p.register_post_accumulate_grad_hook(hook))
    return handle
