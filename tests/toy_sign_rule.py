"""A toy update rule, sign descent with momentum in the subspace, written as a user would
add a rule: this one file, registered by its one ``@register_rule`` line. It shows that
everything else (8-bit state, resume, memory estimate, FSDP2 sharding and checkpoints, the
optimizer names) follows from the declaration.

    m <- beta m + (1 - beta) R;   U = -sign(m)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memopt.optim import register_rule
from memopt.optim.rules import Coordinates, Rule
from memopt.optim.states import StateDecl


@dataclass(frozen=True)
class SignOptions:
    beta: float = 0.9

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 1:
            raise ValueError(f"Invalid beta: {self.beta!r} (must be in [0, 1))")


@register_rule
class SignRule(Rule):
    name = "sign"
    STATE = (StateDecl("sign_momentum", "coordinates", quantizable=True, signed=True,
                       basis_change="linear"),)
    Options = SignOptions
    lr_family = "lowrank"

    def adamw_settings(self, group: dict[str, Any], lr: float):
        return lr, (0.9, 0.999), 1e-8

    def reference(self, items: list[Coordinates], store, options: SignOptions,
                  keep_input: bool) -> list[torch.Tensor]:
        out = []
        for item in items:
            U = torch.empty_like(item.R)
            for R, state, Ui in zip(item.R.unbind(0), item.states, U.unbind(0)):
                m = store.read(state, "sign_momentum")
                m.lerp_(R, 1 - options.beta)
                store.write(state, "sign_momentum", m)
                torch.sign(m, out=Ui).neg_()
            out.append(U)
        return out

    def batched(self, items: list[Coordinates], store, options: SignOptions,
                keep_input: bool) -> list[torch.Tensor]:
        out = []
        for item in items:
            momenta = store.read_all(item.states, "sign_momentum")
            torch._foreach_lerp_(momenta, list(item.R.unbind(0)), 1 - options.beta)
            store.write_all(item.states, "sign_momentum", momenta)
            out.append(torch.stack(momenta).sign_().neg_())
        return out
