"""Linear layers whose weights live in INT8 (or bf16) and train with stochastic rounding.

``quantize_weights(model, bits=8)`` (``quantize_model.py``) replaces, in place, each
``nn.Linear`` of a model (but the output head) by a :class:`QuantizedLinear`: its weight is
kept as INT8 codes with one fp32 scale per ``group_size`` input columns (``bits=16``:
bf16), dequantized layer by layer in the forward and again in the backward (nothing
full-size is saved for backward). No full-precision copy of the model exists after the call.

The weight is still a parameter of the model, a :class:`QuantizedWeight`: it has the
weight's shape, receives an fp32 gradient, and memopt optimizers (and ``step_in_backward``
with any torch optimizer) update it. The update runs on a temporary fp32 copy of that one
weight (``materialized``), then the result is rounded back, stochastically by default, so
updates far below one quantization step are not lost (Q-GaLore, Zhang et al., 2024).
Outside an update the parameter's own data holds no values (a single NaN, broadcast): read
a weight with ``module.dequantize()``.

The layer's state dict holds ``weight_codes``, ``weight_scales`` (INT8) and, as extra state,
the rounding generator's (seed, count): it saves with ``torch.save``, loads with
``torch.load(weights_only=True)``, and training resumes bit for bit. A full-precision
``weight`` in a state dict (a pretrained checkpoint) is quantized while loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .stochastic_rounding import (bf16_round_, generator, groups_of,
                                  int8_dequantize, int8_quantize_)

#: bits -> what the weight is stored as.
BITS = {8: "INT8 codes with one fp32 scale per group", 16: "bf16"}
#: The dtype a quantized weight is updated in (and its gradient's).
UPDATE_DTYPE = torch.float32
#: Most bytes of quantized weights an update materializes at once (the engine batches the
#: weights of a step up to it; a larger weight is materialized alone).
MATERIALIZE_BYTES = 256 * 2**20


class QuantizedWeight(nn.Parameter):
    """The parameter of a :class:`QuantizedLinear`: shape and gradient of the weight, values
    in its layer (``layer``). Its data is a broadcast NaN except inside :func:`materialized`."""

    layer: "QuantizedLinear"
    #: whether the data holds the weight's values now (inside :func:`materialized`)
    materialized: bool = False

    def __new__(cls, layer: "QuantizedLinear", requires_grad: bool = True,
                shape: torch.Size | None = None,
                device: torch.device | None = None) -> "QuantizedWeight":
        codes = None if shape is not None else layer.weight_codes
        self = super().__new__(cls, _empty(shape or codes.shape, device or codes.device),
                               requires_grad)
        self.layer = layer
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "QuantizedWeight":
        import copy
        if id(self) not in memo:      # (the layer may be half-copied here: take nothing from it)
            memo[id(self)] = QuantizedWeight(None, self.requires_grad, self.shape, self.device)
            memo[id(self)].layer = copy.deepcopy(self.layer, memo)
        return memo[id(self)]

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.layer.describe()})"


def _empty(shape: torch.Size, device: torch.device) -> Tensor:
    """A tensor of ``shape`` that owns one element (NaN): a quantized weight's data."""
    return torch.full((), float("nan"), dtype=UPDATE_DTYPE, device=device).expand(shape)


class QuantizedLinear(nn.Linear):
    """``nn.Linear`` with its weight in INT8 codes + per-group scales (``bits=8``) or bf16
    (``bits=16``), updated with ``rounding`` ("stochastic" or "nearest").

    Forward: y = x dequantize(W)^T + b in ``compute_dtype`` (the original weight's dtype;
    it follows ``module.to(dtype)``). Backward: dL/dx = dL/dy dequantize(W) and the weight
    gradient dL/dW = dL/dy^T x in fp32, the dtype the weight is updated in.
    """

    def __init__(self, linear: nn.Linear, bits: int = 8, *, group_size: int = 128,
                 rounding: str = "stochastic", seed: int = 0) -> None:
        nn.Module.__init__(self)
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.rounding = bits, group_size, rounding
        self.compute_dtype = weight.dtype
        self.seed, self.count = seed, 0
        rows, cols = weight.shape
        if bits == 8:
            self.register_buffer("weight_codes", torch.empty(
                rows, cols, dtype=torch.int8, device=weight.device))
            self.register_buffer("weight_scales", torch.empty(
                rows, groups_of(cols, group_size), dtype=torch.float32, device=weight.device))
        else:
            self.register_buffer("weight_codes", torch.empty(
                rows, cols, dtype=torch.bfloat16, device=weight.device))
            self.register_buffer("weight_scales", None)
        self._round(weight, "nearest")
        self.weight = QuantizedWeight(self, linear.weight.requires_grad)
        self.bias = linear.bias

    # ------------------------------------------------------------------ values
    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight as a new dense tensor of ``dtype`` (default: ``compute_dtype``)."""
        dtype = dtype or self.compute_dtype
        if self.bits == 8:
            return int8_dequantize(self.weight_codes, self.weight_scales, self.group_size, dtype)
        return self.weight_codes.to(dtype)

    def store(self, w: Tensor) -> None:
        """Round ``w`` (the updated weight) into the codes, by this layer's rounding."""
        self._round(w, self.rounding)

    def _round(self, w: Tensor, rounding: str) -> None:
        g = None
        if rounding == "stochastic":
            g = generator(w.device, self.seed, self.count)
            self.count += 1
        if self.bits == 8:
            int8_quantize_(w, self.weight_codes, self.weight_scales, self.group_size, rounding, g)
        else:
            bf16_round_(w, self.weight_codes, rounding, g)

    def describe(self) -> str:
        held = f"INT8, group {self.group_size}" if self.bits == 8 else "bf16"
        return (f"({self.out_features}, {self.in_features}) {held}, {self.rounding} rounding, "
                f"computed in {str(self.compute_dtype).removeprefix('torch.')}")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, "
                + (f"group_size={self.group_size}, " if self.bits == 8 else "")
                + f"rounding={self.rounding}")

    def reset_parameters(self) -> None:
        raise RuntimeError("a QuantizedLinear is not re-initialised: quantize the layer after "
                           "initialising it, or load a state dict")

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x = x.to(dtype)
        y = _QuantizedMatmul.apply(x, self.weight, dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # ------------------------------------------- device moves and state dicts
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "QuantizedLinear":
        """Moves follow ``fn``; dtype casts change ``compute_dtype`` only: the codes keep
        their format, the scales and the weight's update dtype stay fp32."""
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight_codes.device))
        weight, codes, scales = (self._parameters["weight"], self._buffers["weight_codes"],
                                 self._buffers["weight_scales"])
        self._parameters["weight"] = None
        self._buffers["weight_codes"] = self._buffers["weight_scales"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
            self._buffers["weight_codes"] = codes.to(probe.device)
            self._buffers["weight_scales"] = None if scales is None else scales.to(probe.device)
        self.compute_dtype = probe.dtype
        weight.data = _empty(codes.shape, probe.device)
        if weight.grad is not None:
            weight.grad = weight.grad.to(probe.device)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        weight, self._parameters["weight"] = self._parameters["weight"], None
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters["weight"] = weight

    def get_extra_state(self) -> Tensor:
        """The rounding generator's state: (seed, number of roundings so far)."""
        return torch.tensor([self.seed, self.count], dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        if not (isinstance(state, Tensor) and state.shape == (2,)
                and state.dtype == torch.int64):
            raise ValueError(f"QuantizedLinear: the rounding state must be an int64 tensor "
                             f"(seed, count), got {state!r}")
        self.seed, self.count = (int(v) for v in state)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        full = state_dict.pop(prefix + "weight", None)
        codes = state_dict.get(prefix + "weight_codes")
        if codes is not None and codes.dtype != self.weight_codes.dtype:
            raise RuntimeError(
                f"{prefix}weight_codes: the state holds {codes.dtype} codes, this layer keeps "
                f"{self.weight_codes.dtype} (bits={self.bits}); quantize with the bits the "
                "checkpoint was saved with")
        if full is not None and codes is None:      # a full-precision checkpoint
            if full.shape != self.weight_codes.shape:
                raise RuntimeError(f"size mismatch for {prefix}weight: the checkpoint has "
                                   f"{tuple(full.shape)}, the layer {tuple(self.weight_codes.shape)}")
            self._round(full.to(self.weight_codes.device), "nearest")
            for key, value in (("weight_codes", self.weight_codes),
                               ("weight_scales", self.weight_scales),
                               ("_extra_state", self.get_extra_state())):
                if value is not None:
                    state_dict.setdefault(prefix + key, value)
        weight, self._parameters["weight"] = self._parameters["weight"], None
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            self._parameters["weight"] = weight


class _QuantizedMatmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly, forward and backward (only x is saved)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: QuantizedWeight, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x)
        ctx.weight, ctx.dtype = weight, dtype
        return F.linear(x, weight.layer.dequantize(dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.layer.dequantize(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(UPDATE_DTYPE)
            grad_w = g.t() @ x.reshape(-1, x.shape[-1]).to(UPDATE_DTYPE)
        return grad_x, grad_w, None


@contextmanager
def materialized(params: Iterable[Tensor]) -> Iterator[None]:
    """Give each :class:`QuantizedWeight` among ``params`` its values (fp32) for an update,
    then round the updated values back into its codes. If the block raises, the codes are
    left as they were."""
    quantized = [p for p in params if isinstance(p, QuantizedWeight)]
    for p in quantized:
        p.data = p.layer.dequantize(UPDATE_DTYPE)
        p.materialized = True
    try:
        yield
        for p in quantized:
            p.layer.store(p.data)
    finally:
        for p in quantized:
            p.data = _empty(p.shape, p.device)
            p.materialized = False


def _refuse_unmaterialized(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """A global step pre-hook: another optimizer's ``step()`` would write into a quantized
    weight's placeholder (after changing its own state); refuse before anything changes."""
    if getattr(optimizer, "MATERIALIZES_QUANTIZED_WEIGHTS", False):    # memopt's engine
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, QuantizedWeight) and p.grad is not None and not p.materialized:
                raise RuntimeError(
                    f"{type(optimizer).__name__}.step() cannot update a quantized weight "
                    f"({p.layer.describe()}) by itself: use a memopt optimizer, or "
                    "memopt.optim.step_in_backward(model, optimizer), which rounds each "
                    "updated weight back into its codes")


_HOOK: list[Any] = []


def refuse_other_optimizers() -> None:
    """Register (once) the step pre-hook that refuses other optimizers' ``step()`` on
    quantized weights (:func:`_refuse_unmaterialized`)."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_refuse_unmaterialized))


def materialize_in_turns(work: list[tuple[Any, list[Tensor]]],
                         budget: int | None = None) -> list[tuple[Any, list[Tensor]]]:
    """A step's (group, params) work with its quantized weights in items of their own, each
    holding at most ``budget`` bytes of materialized (fp32) weights (one weight at least):
    the update batches small weights and never holds a full-precision copy of the model."""
    budget = MATERIALIZE_BYTES if budget is None else budget
    out = []
    for group, params in work:
        plain = [p for p in params if not isinstance(p, QuantizedWeight)]
        if plain or not params:
            out.append((group, plain))
        turn: list[Tensor] = []
        held = 0
        for p in params:
            if not isinstance(p, QuantizedWeight):
                continue
            size = p.numel() * UPDATE_DTYPE.itemsize
            if turn and held + size > budget:
                out.append((group, turn))
                turn, held = [], 0
            turn.append(p)
            held += size
        if turn:
            out.append((group, turn))
    return out
