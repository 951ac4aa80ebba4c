"""How many bytes a model's weights, gradients and optimizer state take, before training.

Works on meta-device copies (nothing is allocated), so a LLaMA-7B config is estimated in
seconds. The state counts what each optimizer keeps after its first step, byte for byte.
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from .engine import MemoptOptimizer, state_bytes
from .registry import create_optimizer
from .states import spec_bytes, tensor_bytes

META = torch.device("meta")


def estimate_memory(model_or_config: Any, optimizer_name: str, *, per_layer: bool = False,
                    weight_dtype: torch.dtype | None = None,
                    **optimizer_kwargs: Any) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer state for training a model with an optimizer.

    total = weights + gradients + optimizer_state, with weights = sum numel(p) size(dtype),
    gradients = the same sum over trainable parameters (``per_layer=True``: only the largest
    one, as when each gradient is freed right after its update in the backward pass, i.e.
    ``step_in_backward`` without gradient accumulation), and
    optimizer_state = what ``create_optimizer(optimizer_name, model, **optimizer_kwargs)``
    holds after one step (``state_bytes``). Activations and temporaries are not counted.

    Args:
        model_or_config: an ``nn.Module`` (left untouched) or a ``transformers`` config, whose
            causal-LM model is built on the meta device.
        optimizer_name: a name of ``OPTIMIZER_NAMES``; ValueError otherwise.
        per_layer: gradients freed one parameter at a time (see above).
        weight_dtype: the dtype the floating-point parameters are kept in, and so their
            gradients and torch AdamW's moments (default: the model's own dtypes).
        optimizer_kwargs: passed to the optimizer as by ``create_optimizer`` (e.g. ``rank``).

    Returns:
        dict with ``weights``, ``gradients``, ``optimizer_state``, ``total`` (bytes) and
        ``parameters`` (count).
    """
    model = _meta_copy(_as_module(model_or_config), weight_dtype)
    optimizer = create_optimizer(optimizer_name, model, **optimizer_kwargs)
    params = list(model.parameters())
    grads = [tensor_bytes(p) for p in params if p.requires_grad]
    if isinstance(optimizer, MemoptOptimizer):
        state = _memopt_state_bytes(optimizer)
    else:
        state = _stepped_state_bytes(optimizer, params)
    out = {"weights": sum(tensor_bytes(p) for p in params),
           "gradients": max(grads, default=0) if per_layer else sum(grads),
           "optimizer_state": state}
    out["total"] = sum(out.values())
    out["parameters"] = sum(p.numel() for p in params)
    return out


def _memopt_state_bytes(optimizer: MemoptOptimizer) -> int:
    """``state_bytes(optimizer)`` after its first step, from shapes alone: each parameter's
    state as the optimizer declares it (``expected_state``: the rule's, residual's and
    projector's tensors for a matrix its method updates, AdamW's two moments otherwise),
    plus the state its projectors share (DCT tables, once per size)."""
    total, shared = 0, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad:
                continue
            specs = optimizer.expected_state(group, p)
            table = optimizer.estimated_shared_table(group, p, META)
            if table is not None:
                shared[table[0]] = table[1]
            total += spec_bytes(specs, group["state_bits"])
    return total + sum(shared.values())


def _stepped_state_bytes(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> int:
    """State of any other optimizer (torch, bitsandbytes): one real step on meta tensors."""
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    return state_bytes(optimizer)


def _as_module(model_or_config: Any) -> nn.Module:
    """The module itself, or the causal-LM model of a transformers config on the meta device."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    import transformers
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(model_or_config)


def _meta_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device (tied ones stay
    tied), floating-point ones cast to ``dtype`` when given."""
    memo: dict[int, Any] = {}
    for t in chain(model.parameters(), model.buffers()):
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        meta = torch.empty_like(t, device=META, dtype=cast)
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


__all__ = ["estimate_memory"]
