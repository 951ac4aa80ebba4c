"""The Adam moment update, shared by every memopt optimizer.

Adam (Kingma & Ba, 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter, 2019):
m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
direction psi = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
The low-rank engine runs it on projected gradients; every optimizer runs it on the
parameters it does not project or orthogonalize. Same arithmetic, in the same order, as
``torch.optim.AdamW(foreach=True)``, so the dense path matches it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def update_moments(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                   beta1: float, beta2: float, eps: float, step: int) -> list[Tensor]:
    """Advance the moments in place; return the denominators sqrt(v / (1 - b2^t)) + eps.

    The direction is then psi = m / denominator / (1 - b1^t); callers fold 1 / (1 - b1^t)
    into their step size, as torch.optim.AdamW does.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denominators, eps)
    return denominators


def bias_correction1(beta1: float, step: int) -> float:
    """1 - b1^t: the first moment's bias correction."""
    return 1 - beta1**step


def adamw_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
               exp_avg_sqs: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int) -> None:
    """One AdamW step on dense parameters: p <- p (1 - lr wd) - lr psi.

    Moments may be wider than the parameters (fp32 moments for bf16 weights); the
    direction is then computed in the moments' dtype and rounded once into the parameter.
    """
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    denominators = update_moments(grads, exp_avg_sqs=exp_avg_sqs, exp_avgs=exp_avgs,
                                  beta1=beta1, beta2=beta2, eps=eps, step=step)
    alpha = -lr / bias_correction1(beta1, step)
    same = [i for i, (p, m) in enumerate(zip(params, exp_avgs)) if p.dtype == m.dtype]
    if same:
        torch._foreach_addcdiv_([params[i] for i in same], [exp_avgs[i] for i in same],
                                [denominators[i] for i in same], alpha)
    for i in sorted(set(range(len(params))) - set(same)):   # bf16 / fp16 parameters
        params[i].add_(exp_avgs[i] / denominators[i], alpha=alpha)
