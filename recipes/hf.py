"""memopt optimizers for Hugging Face ``transformers.Trainer``.

Build the pair that ``Trainer(optimizers=(optimizer, scheduler))`` takes: a memopt optimizer
over the model's usual parameter split and a warmup + cosine (or linear) decay LambdaLR.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..optim import create_optimizer

#: Shapes of the decay after warmup.
SCHEDULES = ("cosine", "linear")


def create_trainer_optimizer(model: nn.Module, name: str, *, lr: float | None = None,
                             weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see ``memopt.optim.OPTIMIZER_NAMES``) for ``model``.

    Memopt optimizers get ``param_groups(model)``: hidden matrices projected or
    orthogonalized, embeddings, head, norms and biases on AdamW. ``lr`` is passed only when
    given, so each class keeps its own default (GaLore 1e-3, Muon 0.02, ...);
    ``weight_decay`` defaults to 0, as in ``TrainingArguments``. ``kwargs`` go to the
    optimizer (``rank=``, ``update_proj_gap=``, ``adamw_lr=``, ...).
    Raises ValueError for an unknown name.

    Put the model on its device first: the optimizer holds the parameters it is given.
    """
    options: dict[str, Any] = {"weight_decay": weight_decay, **kwargs}
    if lr is not None:
        options["lr"] = lr
    return create_optimizer(name, model, **options)


def warmup_decay_factor(step: int, num_training_steps: int, warmup_steps: int = 0,
                        schedule: str = "cosine") -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based).

    Warmup: (step + 1) / warmup_steps, reaching 1 at the last warmup step; then with
    p = (step - warmup_steps) / (num_training_steps - warmup_steps) in [0, 1]:
    cosine 0.5 (1 + cos(pi p)), linear 1 - p.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, num_training_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def create_trainer_optimizer_and_scheduler(
        model: nn.Module, name: str, num_training_steps: int, *, warmup_steps: int = 0,
        schedule: str = "cosine", lr: float | None = None, weight_decay: float = 0.0,
        **kwargs: Any) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    The optimizer is :func:`create_trainer_optimizer`'s; the scheduler multiplies each
    group's ``lr`` by :func:`warmup_decay_factor` (linear warmup over ``warmup_steps``, then
    ``schedule`` decay to 0 at ``num_training_steps``). Raises ValueError on bad steps or
    an unknown schedule, before building anything.

    For Muon and PolarGrad the AdamW parameters (embeddings, head, norms) use the group
    key ``adamw_lr``, scaled by the same factor as the group's ``lr``, so the whole model
    follows the schedule.
    """
    if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) \
            or num_training_steps < 1:
        raise ValueError(f"Invalid num_training_steps: {num_training_steps!r} "
                         "(must be an integer >= 1)")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) \
            or not 0 <= warmup_steps <= num_training_steps:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} "
                         f"(must be an integer in [0, num_training_steps={num_training_steps}])")
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid schedule: {schedule!r} (choose one of {SCHEDULES})")
    optimizer = create_trainer_optimizer(model, name, lr=lr, weight_decay=weight_decay, **kwargs)
    factor = functools.partial(warmup_decay_factor, num_training_steps=num_training_steps,
                               warmup_steps=warmup_steps, schedule=schedule)
    return optimizer, LambdaLR(optimizer, factor)
