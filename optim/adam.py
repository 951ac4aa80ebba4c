"""The Adam moment update, shared by every memopt optimizer.

Adam (Kingma & Ba, 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter, 2019):
m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
u = -(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   (the step Adam takes at lr = 1).

Two implementations, chosen by device and tested against each other: torch's fused AdamW
kernel (one pass over g, m, v; CUDA and CPU) and a plain tensor-op reference for everything
else. The low-rank engine gets u for a projected gradient by running the fused kernel on a
zero "parameter": one kernel instead of seven passes, and nothing full-size kept alive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FUSED_DEVICES = ("cuda", "cpu")
FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fused_available(t: Tensor) -> bool:
    """Whether torch's fused AdamW kernel runs on this tensor's device and dtype."""
    return (t.device.type in FUSED_DEVICES and t.dtype in FUSED_DTYPES
            and hasattr(torch, "_fused_adamw_") and not hasattr(t, "to_local"))


def _reference_update(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float,
                      beta2: float, eps: float, step: int) -> Tensor:
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return exp_avg.div(denominator).mul_(-1 / (1 - beta1**step))


def adam_update(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float,
                beta2: float, eps: float, step: int, fused: bool | None = None) -> Tensor:
    """Advance the moments of ``grad`` in place and return Adam's update u (lr = 1).

    ``step`` is the step count after this update (1 on the first call). ``fused=None``
    picks the fused kernel where it runs.
    """
    if fused is None:
        fused = fused_available(grad)
    if not fused:
        return _reference_update(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps,
                                 step=step)
    update = torch.zeros_like(grad)
    steps = torch.full((), float(step), dtype=torch.float32, device=grad.device)
    torch._fused_adamw_([update], [grad], [exp_avg], [exp_avg_sq], [], [steps], lr=1.0,
                        beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False,
                        maximize=False)
    return update


def adamw_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float,
               beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               fused: bool | None = None) -> None:
    """One AdamW step on a dense parameter: p <- p (1 - lr wd) + lr u.

    With moments of the parameter's dtype this is torch's fused AdamW in place (no
    temporaries); with wider moments (fp32 moments for a bf16 weight) u is computed in the
    moments' dtype and rounded once into the parameter.
    """
    if fused is None:
        fused = fused_available(param)
    if fused and param.dtype == exp_avg.dtype and grad.dtype == param.dtype:
        steps = torch.full((), float(step), dtype=torch.float32, device=param.device)
        torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [steps], lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            amsgrad=False, maximize=False)
        return
    update = adam_update(grad.to(exp_avg.dtype), exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2,
                         eps=eps, step=step, fused=fused)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.add_(update, alpha=lr)
