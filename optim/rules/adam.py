"""Adam in the subspace (GaLore's rule: Zhao et al., 2024, "GaLore: Memory-Efficient LLM
Training by Gradient Low-Rank Projection"; Adam: Kingma & Ba, 2015).

For the coordinates R of a matrix's gradient:

    m <- b1 m + (1 - b1) R,   v <- b2 v + (1 - b2) R^2
    U = -(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

The moments have R's shape, so they cost 2 r n (or 2 m r) numbers instead of AdamW's 2 m n.
Both steps run :mod:`memopt.optim.adam`'s one Adam: ``reference`` matrix by matrix through its
plain tensor-op update, ``batched`` as one fused multi-tensor call per step count for every
matrix of the step (``MomentStore.adam_updates``: torch's fused kernel, or bitsandbytes'
8-bit blockwise one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import adam
from ..groups import check_betas, check_choice, check_nonnegative
from ..states import MomentStore, StateDecl
from .base import Coordinates, Rule


@dataclass(frozen=True)
class AdamOptions:
    """Adam's options. ``eps_before_bias_correction``: False (torch's Adam: eps added to
    sqrt(v_hat)) or True (galore-torch's and transformers' AdamW: eps / sqrt(1 - b2^t))."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_before_bias_correction: bool = False

    def __post_init__(self) -> None:
        check_betas("betas", self.betas)
        check_nonnegative("epsilon value", self.eps)
        check_choice("eps_before_bias_correction", self.eps_before_bias_correction,
                     (True, False))


class AdamRule(Rule):
    """Adam on the coordinates (the rule of GaLoreAdamW, DCTAdamW and FiraAdamW)."""

    name = "adam"
    STATE = (StateDecl("exp_avg", "coordinates", quantizable=True, signed=True,
                       basis_change="linear"),
             StateDecl("exp_avg_sq", "coordinates", quantizable=True, signed=False,
                       basis_change="quadratic"))
    Options = AdamOptions
    lr_family = "lowrank"

    def adamw_settings(self, group: dict[str, Any], lr: float
                       ) -> tuple[float, tuple[float, float], float]:
        return lr, group["betas"], group["eps"]

    def reference(self, items: list[Coordinates], store: MomentStore, options: AdamOptions,
                  keep_input: bool) -> list[Tensor]:
        """Matrix by matrix: read the moments (8 bits: dequantized), Adam, write them back."""
        out = []
        beta1, beta2 = options.betas
        for item in items:
            U = torch.empty_like(item.R)
            for R, state, Ui in zip(item.R.unbind(0), item.states, U.unbind(0)):
                m, v = store.read(state, "exp_avg"), store.read(state, "exp_avg_sq")
                step = state["step"]
                adam.adam_updates([R], [m], [v], beta1=beta1, beta2=beta2, step=step,
                                  eps=self.eps_at(options, step), fused=False, out=[Ui])
                store.write(state, "exp_avg", m)
                store.write(state, "exp_avg_sq", v)
            out.append(U)
        return out

    def batched(self, items: list[Coordinates], store: MomentStore, options: AdamOptions,
                keep_input: bool) -> list[Tensor]:
        """Every matrix of the step in one fused call per step count; U is written over R
        unless ``keep_input``."""
        Rs = [R for item in items for R in item.R.unbind(0)]
        states = [s for item in items for s in item.states]
        Us = [torch.empty_like(item.R) if keep_input else item.R for item in items]
        outs = [U for U_item in Us for U in U_item.unbind(0)]
        by_step: dict[int, list[int]] = {}
        for i, state in enumerate(states):
            by_step.setdefault(state["step"], []).append(i)
        beta1, beta2 = options.betas
        for step, idx in by_step.items():
            store.adam_updates([states[i] for i in idx], [Rs[i] for i in idx], beta1=beta1,
                               beta2=beta2, eps=self.eps_at(options, step), step=step,
                               in_place=not keep_input,
                               out=[outs[i] for i in idx] if keep_input else None)
        return Us

    @staticmethod
    def eps_at(options: AdamOptions, step: int) -> float:
        return adam.eps_at(options.eps, options.betas[1], step,
                           options.eps_before_bias_correction)
