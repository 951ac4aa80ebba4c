"""How many bytes a training step of a model takes, before training: weights, gradients,
optimizer state, activations and the temporaries of an update, each a named term.

Works on meta-device copies (nothing is allocated), so a LLaMA-7B config is estimated in
seconds. The state counts what each optimizer keeps after its first step, byte for byte;
the activations follow ``activations.py``; INT8 weights the layout of
``quantized_weights.py`` (``memopt.quantize_weights``).
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from .activations import estimate_activations
from .engine import MemoptOptimizer, state_bytes
from .quantized_weights import UPDATE_DTYPE, QuantizedLinear, QuantizedWeight
from .registry import create_optimizer
from .states import spec_bytes, tensor_bytes
from .stochastic_rounding import groups_of

META = torch.device("meta")
#: ``weights=`` values: None (floating-point parameters, ``weight_dtype``) or "int8".
WEIGHT_FORMATS = (None, "int8")
#: Bytes of a quantized layer's rounding state, (seed, count) as two int64.
ROUNDING_STATE_BYTES = 16
#: fp32 copies of the largest INT8 weight live while it is updated: the weight
#: ``materialized`` for the update, the optimizer's full-size update (the lift of its
#: low-rank direction) and, at a refresh, the basis fit's chunked work. Counted with
#: ``python -m memopt.recipes.bench.update_peak``: 2.75-2.84 for every 8-bit low-rank
#: optimizer (results/issue29_update_peak_cpu.txt); the GPU's solvers may add workspace.
UPDATE_FP32_COPIES = 3


def estimate_memory(model_or_config: Any, optimizer_name: str, *, per_layer: bool = False,
                    weight_dtype: torch.dtype | None = None, weights: str | None = None,
                    weight_group_size: int = 128, batch: int = 1, seq_len: int | None = None,
                    checkpointing: bool = True, **optimizer_kwargs: Any) -> dict[str, int]:
    """Bytes of one training step of a model with an optimizer, term by term.

    total = weights + gradients + optimizer_state + activations + update_temporaries:

    - weights: sum numel(p) size(dtype). With ``weights="int8"`` every ``nn.Linear`` but
      the output head (``get_output_embeddings()``) is counted as ``memopt.quantize_weights``
      keeps it: INT8 codes (1 byte per element), one fp32 scale per row per
      ``weight_group_size`` input columns (4 out ceil(in / group), a ragged last group
      counting as one) and 16 bytes of rounding state; the rest (embeddings, norms, head,
      biases) in ``weight_dtype`` (default bf16, the compute dtype).
    - gradients: the same sum over trainable parameters in their dtype (a quantized weight's
      gradient is fp32); ``per_layer=True``: only the largest one, as when each gradient is
      freed right after its update in the backward pass (``step_in_backward`` without
      gradient accumulation).
    - optimizer_state: what ``create_optimizer(optimizer_name, model, **optimizer_kwargs)``
      holds after one step (``state_bytes``); a quantized weight's parameter is an fp32
      tensor of the weight's shape, and its state is declared for that.
    - activations: with ``seq_len``, the peak of ``estimate_activations`` for ``batch``
      sequences of ``seq_len`` tokens (``checkpointing``: non-reentrant activation
      checkpointing), in the compute dtype; 0 without ``seq_len``.
    - update_temporaries: with INT8 weights, ``UPDATE_FP32_COPIES`` fp32 copies of the
      largest quantized weight, live while it is updated; 0 otherwise.

    Each term is its own peak over the step; they are summed, so the total is an upper
    bound where two of them peak at different moments (the loss's logits gradient is gone
    before the largest weight gradient is made). Temporaries of the optimizers' own
    kernels (projections, Newton-Schulz) are not counted.

    Args:
        model_or_config: an ``nn.Module`` (left untouched) or a ``transformers`` config, whose
            causal-LM model is built on the meta device; activations need a LLaMA-style
            config (the module's ``config``).
        optimizer_name: a name of ``OPTIMIZER_NAMES``; ValueError otherwise.
        per_layer: gradients freed one parameter at a time (see above).
        weight_dtype: the dtype the floating-point parameters are kept in, and so their
            gradients and torch AdamW's moments (default: the model's own dtypes; bf16 for
            what INT8 weights leave in floating point).
        weights: None, or "int8" for ``memopt.quantize_weights(model, bits=8)``.
        weight_group_size: input columns per INT8 scale (``quantize_weights``' group_size).
        batch, seq_len: sequences per step and tokens per sequence, for the activations.
        checkpointing: activation checkpointing of every decoder layer.
        optimizer_kwargs: passed to the optimizer as by ``create_optimizer`` (e.g. ``rank``).

    Returns:
        dict with ``weights``, ``gradients``, ``optimizer_state``, ``activations``,
        ``update_temporaries``, ``total`` (bytes) and ``parameters`` (count).
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"estimate_memory: weights must be None or 'int8', got {weights!r}")
    if isinstance(weight_group_size, bool) or not isinstance(weight_group_size, int) \
            or weight_group_size < 1:
        raise ValueError(f"estimate_memory: weight_group_size must be an integer >= 1, got "
                         f"{weight_group_size!r}")
    source = _as_module(model_or_config)
    if weights == "int8":
        weight_dtype = weight_dtype or torch.bfloat16
    model = _meta_copy(source, weight_dtype)
    held = _quantized_weight_bytes(model, weights, weight_group_size)
    optimizer = create_optimizer(optimizer_name, model, **optimizer_kwargs)
    params = list(model.parameters())
    grads = [tensor_bytes(p) for p in params if p.requires_grad]
    if isinstance(optimizer, MemoptOptimizer):
        state = _memopt_state_bytes(optimizer)
    else:
        state = _stepped_state_bytes(optimizer, params)
    out = {"weights": sum(held.get(id(p), tensor_bytes(p)) for p in params),
           "gradients": max(grads, default=0) if per_layer else sum(grads),
           "optimizer_state": state}
    largest = max((p.numel() for p in params if id(p) in held), default=0)
    out["activations"] = 0 if seq_len is None else estimate_activations(
        _config_of(model_or_config), batch=batch, seq_len=seq_len,
        dtype=_compute_dtype(model, weight_dtype), checkpointing=checkpointing,
        quantized_numel=largest).peak
    out["update_temporaries"] = (UPDATE_FP32_COPIES * _element_size(UPDATE_DTYPE) * largest)
    out["total"] = sum(out.values())
    out["parameters"] = sum(p.numel() for p in params)
    return out


def _quantized_weight_bytes(model: nn.Module, weights: str | None,
                            group_size: int) -> dict[int, int]:
    """Bytes each quantized weight takes, by the id of its parameter: the layers of a model
    quantized already, and with ``weights="int8"`` every linear ``quantize_weights`` would
    quantize (the meta copy's layers are swapped for it)."""
    held = {id(m.weight): _quantized_bytes(m) for m in model.modules()
            if isinstance(m, QuantizedLinear)}
    if weights == "int8":
        held.update({id(m.weight): int8_linear_bytes(m.out_features, m.in_features,
                                                     group_size)
                     for m in _quantize_meta(model)})
    return held


def _config_of(model_or_config: Any) -> Any:
    """The transformers config activations are estimated from (a model's ``config``)."""
    config = model_or_config if not isinstance(model_or_config, nn.Module) \
        else getattr(model_or_config, "config", None)
    if config is None:
        raise ValueError("estimate_memory: activations (seq_len) need a transformers "
                         "config, or a model with one (model.config)")
    return config


def int8_linear_bytes(out_features: int, in_features: int, group_size: int = 128) -> int:
    """Bytes of one linear weight under ``quantize_weights(bits=8)``: INT8 codes, fp32
    scales (one per row per group of ``group_size`` input columns) and the rounding state:
    out in + 4 out ceil(in / group_size) + 16."""
    return (out_features * in_features + 4 * out_features * groups_of(in_features, group_size)
            + ROUNDING_STATE_BYTES)


def quantizable_linears(model: nn.Module) -> list[nn.Linear]:
    """The linear layers ``quantize_weights(model)`` quantizes by default: every plain
    ``nn.Linear`` but the output head, whose weight no other module shares."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [m for m in model.modules()
            if isinstance(m, nn.Linear) and m is not head
            and type(m).forward is nn.Linear.forward
            and m.weight.is_floating_point() and owners[id(m.weight)] == 1]


def _quantized_bytes(linear: QuantizedLinear) -> int:
    """Bytes a :class:`QuantizedLinear`'s weight takes: its codes (INT8 with their scales,
    or bf16) and its rounding state."""
    if linear.bits == 8:
        return int8_linear_bytes(linear.out_features, linear.in_features, linear.group_size)
    return tensor_bytes(linear.weight_codes) + ROUNDING_STATE_BYTES


def _quantize_meta(model: nn.Module) -> list[nn.Linear]:
    """Give each linear ``quantize_weights`` would quantize an fp32 weight parameter (the
    dtype of a ``QuantizedWeight``: its gradient's and its update's); returns them."""
    linears = quantizable_linears(model)
    for linear in linears:
        w = linear.weight
        linear.weight = nn.Parameter(torch.empty_like(w, dtype=UPDATE_DTYPE), w.requires_grad)
    return linears


def _compute_dtype(model: nn.Module, weight_dtype: torch.dtype | None) -> torch.dtype:
    """The activations' dtype: ``weight_dtype``, else the largest floating parameter's."""
    if weight_dtype is not None:
        return weight_dtype
    floating = [p for p in model.parameters() if p.is_floating_point()]
    return max(floating, key=Tensor.numel).dtype if floating else torch.float32


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device=META).element_size()


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
        if isinstance(t, QuantizedWeight):
            cast = UPDATE_DTYPE         # its gradient and update are fp32 whatever the compute
        meta = torch.empty_like(t, device=META, dtype=cast)
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


__all__ = ["estimate_memory", "int8_linear_bytes", "quantizable_linears"]
