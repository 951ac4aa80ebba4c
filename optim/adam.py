"""The Adam moment update, shared by every memopt optimizer.

Adam (Kingma & Ba, 2015) with decoupled weight decay (AdamW, Loshchilov & Hutter, 2019):
m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
u = -(m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)   (the step Adam takes at lr = 1).

Two implementations, chosen by device and tested against each other: torch's fused AdamW
kernel (one multi-tensor pass over g, m, v; CUDA and CPU) and a plain tensor-op reference for
everything else. The low-rank engine gets u for projected gradients from the fused kernel
too, run at lr = 1 on "parameters" that are zero (a zeroed buffer), or that the kernel's
weight decay of 1 zeroes first (the gradient itself: p <- p (1 - 1) + u, in place, which
saves the buffer and a read); either way the parameter ends up holding exactly u.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

FUSED_DEVICES = ("cuda", "cpu")
FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fused_available(t: Tensor) -> bool:
    """Whether torch's fused AdamW kernel runs on this tensor's device and dtype."""
    return (t.device.type in FUSED_DEVICES and t.dtype in FUSED_DTYPES
            and hasattr(torch, "_fused_adamw_") and not hasattr(t, "to_local"))


def eps_at(eps: float, beta2: float, step: int, before_bias_correction: bool) -> float:
    """The eps added to sqrt(v_hat) at ``step``. With ``before_bias_correction`` it is the
    eps of galore-torch's and transformers' AdamW (Kingma & Ba's "efficient" form), added
    to sqrt(v) before the bias correction: m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))."""
    return eps / math.sqrt(1 - beta2**step) if before_bias_correction else eps


def _reference_update(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float,
                      beta2: float, eps: float, step: int) -> Tensor:
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return exp_avg.div(denominator).mul_(-1 / (1 - beta1**step))


@functools.lru_cache(maxsize=16)
def _step_tensor(step: int, device: torch.device) -> Tensor:
    """The step count as the fused kernel reads it (it never writes it): kept for reuse."""
    return torch.full((), float(step), dtype=torch.float32, device=device)


def _steps(step: int, device: torch.device, count: int) -> list[Tensor]:
    """The fused kernel's step tensors (one cached tensor of that count)."""
    return [_step_tensor(step, device)] * count


def adam_updates(grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
                 beta1: float, beta2: float, eps: float, step: int,
                 fused: bool | None = None,
                 in_place: bool = False, out: list[Tensor] | None = None) -> list[Tensor]:
    """Advance the moments of each gradient in place and return Adam's updates u (lr = 1).

    ``step`` is the step count after this update (1 on the first call). All tensors share one
    device and dtype; the gradients must be finite. The updates are written into the
    (contiguous) gradients themselves with ``in_place``, into ``out`` if given, else into
    one new buffer. The fused path is one multi-tensor kernel over all of them;
    ``fused=None`` picks it where it runs. Every way gives the same bits.
    """
    if not grads:
        return []
    if fused is None:
        fused = fused_available(grads[0])
    if in_place:
        out = list(grads)
    if not fused:
        updates = [_reference_update(g, m, v, beta1=beta1, beta2=beta2, eps=eps, step=step)
                   for g, m, v in zip(grads, exp_avgs, exp_avg_sqs)]
        return updates if out is None else [o.copy_(u) for o, u in zip(out, updates)]
    steps = _steps(step, grads[0].device, len(grads))
    if in_place:       # p <- p (1 - lr wd) - lr step with p = g, lr = wd = 1: exactly -step
        torch._fused_adamw_(out, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1.0, beta1=beta1,
                            beta2=beta2, weight_decay=1.0, eps=eps, amsgrad=False,
                            maximize=False)
        return out
    if out is None:
        sizes = [g.numel() for g in grads]
        flat = torch.zeros(sum(sizes), dtype=grads[0].dtype, device=grads[0].device)
        out = [u.view(g.shape) for u, g in zip(flat.split(sizes), grads)]
    else:
        torch._foreach_zero_(out)
    torch._fused_adamw_(out, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1.0, beta1=beta1,
                        beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
    return out


def adamw_steps(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                exp_avg_sqs: list[Tensor], *, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, step: int,
                fused: bool | None = None) -> None:
    """One AdamW step on dense parameters: p <- p (1 - lr wd) + lr u.

    Parameters whose moments share their dtype get torch's fused AdamW in place (one
    kernel, no temporaries); with wider moments (fp32 moments for a bf16 weight) u is
    computed in the moments' dtype and rounded once into the parameter.
    """
    if not params:
        return
    if fused is None:
        fused = fused_available(params[0])
    same = [i for i, (p, g, m) in enumerate(zip(params, grads, exp_avgs))
            if p.dtype == m.dtype == g.dtype]
    if fused and same:
        steps = _steps(step, params[0].device, len(same))
        torch._fused_adamw_([params[i] for i in same], [grads[i] for i in same],
                            [exp_avgs[i] for i in same], [exp_avg_sqs[i] for i in same], [],
                            steps, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                            eps=eps, amsgrad=False, maximize=False)
        rest = sorted(set(range(len(params))) - set(same))
    else:
        rest = list(range(len(params)))
    if not rest:
        return
    updates = adam_updates([grads[i].to(exp_avgs[i].dtype) for i in rest],
                           [exp_avgs[i] for i in rest], [exp_avg_sqs[i] for i in rest],
                           beta1=beta1, beta2=beta2, eps=eps, step=step, fused=fused)
    for i, update in zip(rest, updates):
        if weight_decay != 0:
            params[i].mul_(1 - lr * weight_decay)
        params[i].add_(update.view_as(params[i]), alpha=lr)
