"""Where optimizer moments live: fp32 tensors, or 8-bit blockwise-quantized ones.

8-bit follows Dettmers et al. (2022), "8-bit Optimizers via Block-wise Quantization", through
bitsandbytes: each block of 256 values is scaled by its absolute maximum and coded with the
dynamic (signed for first moments, unsigned for second moments) map. Tensors under 4096
elements stay fp32, as bitsandbytes' own 8-bit optimizers do. An 8-bit moment ``key`` is kept
in per-parameter state as ``key`` (uint8, the tensor's shape) and ``key + "_absmax"`` (fp32,
one value per block): plain tensors, so ``torch.load(weights_only=True)`` reads them.

The Adam update runs where the moments are: torch's fused AdamW kernel for fp32 moments,
bitsandbytes' fused 8-bit blockwise Adam kernel (dequantize, update, requantize in one pass)
for 8-bit ones.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import adam

BLOCKSIZE = 256          # bitsandbytes' block size for its blockwise 8-bit optimizers
MIN_8BIT_NUMEL = 4096    # smaller tensors stay fp32 (bitsandbytes' min_8bit_size)
ABSMAX_SUFFIX = "_absmax"


class _QuietFourBitKernel(logging.Filter):
    """Drops bitsandbytes' CPU notice that its optional 4-bit matmul kernel is missing
    (memopt uses only the blockwise 8-bit quantization, which needs no such kernel)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


_QUIET = _QuietFourBitKernel()


def import_bitsandbytes(needed_for: str = "state_bits=8") -> Any:
    """The bitsandbytes package, imported without its CPU 4-bit-kernel notice; every place
    in memopt that imports bitsandbytes (8-bit state, the adamw8bit baseline, the peers and
    benchmarks) goes through here. ``needed_for`` names what asked, for the ImportError."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError as exc:
        raise ImportError(f"{needed_for} needs bitsandbytes (>= 0.45), an optional dependency: "
                          "pip install 'memopt[8bit]' (or pip install bitsandbytes)") from exc
    return bitsandbytes


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool, device: str) -> Tensor:
    return import_bitsandbytes().functional.create_dynamic_map(signed=signed).to(device)


def quantize(value: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Blockwise 8-bit codes (uint8, value's shape) and fp32 absmax (one per 256 values)."""
    import_bitsandbytes()
    code = _dynamic_map(signed, str(value.device))
    q, absmax = torch.ops.bitsandbytes.quantize_blockwise(value.float().contiguous(), code,
                                                          BLOCKSIZE)
    return q.view(value.shape), absmax


def dequantize(q: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """fp32 values of blockwise 8-bit codes."""
    import_bitsandbytes()
    code = _dynamic_map(signed, str(q.device))
    out = torch.ops.bitsandbytes.dequantize_blockwise(q, absmax, code, BLOCKSIZE, torch.float32)
    return out.view(q.shape)


#: Whether each quantizable state key may be negative (the signed dynamic map) or not, and
#: which keys follow a parameter's rows (FSDP2 shards them with it): both filled from the
#: pieces' declarations (:func:`declare`, called by ``registry``), never written by hand.
SIGNED: dict[str, bool] = {}
ROW_SHARDED: set[str] = set()
#: How each key's tensor changes when its basis does (``StateDecl.basis_change``).
BASIS_CHANGE: dict[str, str | None] = {}

SHAPES = ("coordinates", "matrix", "scalar")
BASIS_CHANGES = (None, "linear", "quadratic")


@dataclass(frozen=True)
class StateDecl:
    """One tensor a piece (update rule, residual) keeps per matrix, declared once.

    ``shape``: "coordinates" (the projected gradient's shape, (r, n) or (m, r)), "matrix"
    (the parameter as a matrix) or "scalar". ``quantizable``: 8 bits under ``state_bits=8``;
    ``signed``: may be negative (the signed 8-bit map). ``basis_change``: at a basis refresh
    with rotation, "linear" tensors are mixed by C = P_new^T P_old (a first moment,
    momentum), "quadratic" ones by C o C (a second moment), None ones kept. ``fill``: its
    first value; ``dtype``: "moment" (fp32, fp64 for fp64 parameters) or "float32".
    """
    key: str
    shape: str
    quantizable: bool = False
    signed: bool = True
    basis_change: str | None = None
    fill: float = 0.0
    dtype: str = "moment"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"StateDecl {self.key!r}: shape must be one of {SHAPES}, got "
                             f"{self.shape!r}")
        if self.basis_change not in BASIS_CHANGES:
            raise ValueError(f"StateDecl {self.key!r}: basis_change must be one of "
                             f"{BASIS_CHANGES}, got {self.basis_change!r}")

    def spec(self, coordinates: tuple[int, ...], matrix: tuple[int, ...], moment: torch.dtype,
             bits: int | None = None) -> "StateSpec":
        """The concrete tensor for a matrix of shape ``matrix`` whose coordinates have shape
        ``coordinates``, moments in ``moment``; ``bits`` overrides the optimizer's width."""
        shape = {"coordinates": coordinates, "matrix": matrix, "scalar": ()}[self.shape]
        dtype = moment if self.dtype == "moment" else torch.float32
        return StateSpec(self.key, tuple(shape), dtype, self.quantizable, self.fill, bits)


def declare(decls: tuple[StateDecl, ...], owner: str) -> None:
    """Record what ``owner`` declares (signedness, row sharding, basis change); a key
    declared twice must be declared alike. ValueError for an owner that declares nothing."""
    if not decls:
        raise ValueError(f"{owner} declares no state: every piece says what it keeps "
                         "(StateDecl), so that its memory, 8-bit storage, checkpoints and "
                         "sharding follow from the declaration")
    for decl in decls:
        if not isinstance(decl, StateDecl):
            raise TypeError(f"{owner}: STATE must hold StateDecl objects, got {decl!r}")
        known = SIGNED.get(decl.key), BASIS_CHANGE.get(decl.key, decl.basis_change)
        if decl.key in SIGNED and known != (decl.signed, decl.basis_change):
            raise ValueError(f"{owner}: state key {decl.key!r} is declared elsewhere with "
                             f"signed={known[0]}, basis_change={known[1]!r}")
        SIGNED[decl.key] = decl.signed
        BASIS_CHANGE[decl.key] = decl.basis_change
        if decl.shape != "scalar":
            ROW_SHARDED.add(decl.key)


@dataclass(frozen=True)
class StateSpec:
    """One tensor of a parameter's state: its key, shape and dtype when kept unquantized;
    ``quantizable``: kept in 8 bits (codes + absmax) with ``state_bits=8`` when it has at
    least ``MIN_8BIT_NUMEL`` elements (of the whole tensor, for an FSDP2 shard); ``fill``:
    its first value (quantizable ones start at zero); ``bits``: a width of its own (8 or
    32) instead of the optimizer's ``state_bits``."""
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    quantizable: bool = False
    fill: float = 0.0
    bits: int | None = None


#: Prefix of the projector's keys (``Projector.state_dict``) in a low-rank matrix's state.
PROJ_PREFIX = "proj_"

#: PolarGrad's "relative_nuclear_norm" scaling: the bias-corrected running average of a
#: matrix's nuclear norm, one fp32 scalar (never quantized).
NUCLEAR_AVERAGE = "nuclear_norm_average"


def spec_bytes(specs: list[StateSpec], bits: int) -> int:
    """Bytes the tensors of ``specs`` take once made at ``bits`` (what ``init`` makes)."""
    total = 0
    for spec in specs:
        numel = math.prod(spec.shape)
        if spec.quantizable and (spec.bits or bits) == 8 and numel >= MIN_8BIT_NUMEL:
            total += numel + 4 * -(-numel // BLOCKSIZE)          # uint8 codes + fp32 absmax
        else:
            total += numel * torch.empty((), dtype=spec.dtype, device="meta").element_size()
    return total


class MomentStore:
    """Makes, reads and writes the state of :class:`StateSpec` s at a fixed bit width.

    ``read`` returns an fp32 tensor to update in place; ``write`` stores it back (a no-op
    for fp32 moments, which ``read`` returned themselves). ``signed`` maps each quantizable
    key to whether it can be negative (default :data:`SIGNED`).
    """

    def __init__(self, bits: int, signed: Mapping[str, bool] | None = None) -> None:
        if bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {bits!r}")
        if bits == 8:
            import_bitsandbytes()
        self.bits = bits
        self.signed = SIGNED if signed is None else dict(signed)

    def make(self, state: dict, specs: list[StateSpec], device: torch.device,
             rows: tuple[int, int] = (1, 1)) -> None:
        """Zero tensors for ``specs`` in ``state``. ``rows``: (global, local) rows of an FSDP2
        shard, whose state has local shapes but is kept in 8 bits as the whole would be."""
        for spec in specs:
            if spec.quantizable:
                self.init(state, spec.key, spec.shape, device, spec.dtype,
                          full_numel=math.prod(spec.shape) * rows[0] // max(1, rows[1]),
                          bits=spec.bits)
            else:
                state[spec.key] = torch.full(spec.shape, spec.fill, dtype=spec.dtype,
                                             device=device)

    def quantized(self, numel: int, bits: int | None = None) -> bool:
        return (bits or self.bits) == 8 and numel >= MIN_8BIT_NUMEL

    def init(self, state: dict, key: str, shape: torch.Size | tuple[int, ...],
             device: torch.device, dtype: torch.dtype = torch.float32,
             full_numel: int | None = None, bits: int | None = None) -> None:
        """Zero moment of ``shape`` (``dtype`` when kept unquantized). ``full_numel``: the
        size of the whole moment when this is one shard of it (FSDP2), so that every shard
        is stored as the unsharded moment would be. ``bits``: instead of the store's."""
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        if self.quantized(zeros.numel() if full_numel is None else full_numel, bits):
            self._quantize_into(state, key, zeros)
        else:
            state[key] = zeros

    def read(self, state: dict, key: str) -> Tensor:
        """The moment as fp32 (the stored tensor itself when it is not quantized)."""
        value = state[key]
        if value.dtype != torch.uint8:
            return value
        return dequantize(value, state[key + ABSMAX_SUFFIX], self.signed[key])

    def read_all(self, states: list[dict], key: str) -> list[Tensor]:
        """:meth:`read` of ``key`` in each state (no call per state for fp32 moments)."""
        return [v if (v := s[key]).dtype != torch.uint8 else self.read(s, key) for s in states]

    def write_all(self, states: list[dict], key: str, values: list[Tensor]) -> None:
        """:meth:`write` of each value (nothing to do for fp32 moments: read gave them)."""
        for state, value in zip(states, values):
            if value is not state[key]:
                self.write(state, key, value)

    def write(self, state: dict, key: str, value: Tensor) -> None:
        """Store an fp32 moment returned by :meth:`read` (after updating it)."""
        if state[key].dtype == torch.uint8:
            self._quantize_into(state, key, value)
        elif value is not state[key]:
            state[key].copy_(value)

    def adam_updates(self, states: list[dict], grads: list[Tensor], *, beta1: float,
                     beta2: float, eps: float, step: int, in_place: bool = False,
                     out: list[Tensor] | None = None) -> list[Tensor]:
        """Advance ``exp_avg`` / ``exp_avg_sq`` of each state with its gradient (all of one
        device) and return Adam's updates u (lr = 1): written over the (contiguous)
        gradients with ``in_place`` (fp32 moments; 8-bit ones need a separate tensor), into
        ``out`` if given, else into new tensors."""
        result: list[Tensor | None] = [None] * len(states)
        plain = [i for i, s in enumerate(states) if s["exp_avg"].dtype != torch.uint8]
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in plain:
            by_dtype.setdefault(grads[i].dtype, []).append(i)
        for indices in by_dtype.values():
            updates = adam.adam_updates(
                [grads[i] for i in indices], [states[i]["exp_avg"] for i in indices],
                [states[i]["exp_avg_sq"] for i in indices], beta1=beta1, beta2=beta2, eps=eps,
                step=step, in_place=in_place,
                out=None if out is None else [out[i] for i in indices])
            for i, u in zip(indices, updates):
                result[i] = u
        for i in sorted(set(range(len(states))) - set(plain)):
            if in_place or out is None:
                update = torch.zeros(grads[i].shape, dtype=torch.float32, device=grads[i].device)
            else:
                update = out[i].zero_()
            self._bnb_adam(states[i], grads[i].float().contiguous(), update, lr=1.0,
                           weight_decay=0.0, beta1=beta1, beta2=beta2, eps=eps, step=step)
            result[i] = grads[i].copy_(update) if in_place else update
        return result

    def adamw_steps(self, states: list[dict], params: list[Tensor], grads: list[Tensor], *,
                    lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, step: int) -> None:
        """One AdamW step of dense parameters (all of one device) with moments kept here."""
        plain = [i for i, s in enumerate(states) if s["exp_avg"].dtype != torch.uint8]
        adam.adamw_steps([params[i] for i in plain], [grads[i] for i in plain],
                         [states[i]["exp_avg"] for i in plain],
                         [states[i]["exp_avg_sq"] for i in plain], lr=lr, beta1=beta1,
                         beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
        for i in sorted(set(range(len(states))) - set(plain)):
            param, grad = params[i], grads[i]
            if param.is_contiguous() and grad.is_contiguous() and grad.dtype == param.dtype:
                self._bnb_adam(states[i], grad, param, lr=lr, weight_decay=weight_decay,
                               beta1=beta1, beta2=beta2, eps=eps, step=step)
                continue
            (update,) = self.adam_updates([states[i]], [grad], beta1=beta1, beta2=beta2,
                                          eps=eps, step=step)
            if weight_decay != 0:
                param.mul_(1 - lr * weight_decay)
            param.add_(update.view_as(param), alpha=lr)

    def _bnb_adam(self, state: dict, grad: Tensor, param: Tensor, *, lr: float,
                  weight_decay: float, beta1: float, beta2: float, eps: float, step: int) -> None:
        device = str(grad.device)
        torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
            "adam", grad, param, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, 0.0, 0.0,
            eps, step, lr, _dynamic_map(True, device), _dynamic_map(False, device),
            state["exp_avg" + ABSMAX_SUFFIX], state["exp_avg_sq" + ABSMAX_SUFFIX],
            weight_decay, 1.0, False)

    def _quantize_into(self, state: dict, key: str, value: Tensor) -> None:
        state[key], state[key + ABSMAX_SUFFIX] = quantize(value, self.signed[key])


def eight_bit_unused(states: list[dict]) -> bool | None:
    """Whether the states of 8-bit parameters quantized nothing (every tensor under
    ``MIN_8BIT_NUMEL`` elements); None while none has a floating-point tensor yet. Only
    8-bit codes with their absmax count (an INT4 basis's packed uint8 codes do not)."""
    values = [v for s in states for v in s.values() if isinstance(v, Tensor)]
    if not any(v.is_floating_point() for v in values):
        return None
    return not any(isinstance(v, Tensor) and v.dtype == torch.uint8 and k + ABSMAX_SUFFIX in s
                   for s in states for k, v in s.items())


def tensor_bytes(value: Any) -> int:
    """Bytes of a tensor's elements (0 for anything else)."""
    if isinstance(value, Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    return 0


def nuclear_average(state: dict[str, Any], device: torch.device,
                    beta: float) -> tuple[Tensor, float]:
    """A matrix's running average of its nuclear norm (``NUCLEAR_AVERAGE``, made on first
    use) and this step's weight in it, (1 - beta) / (1 - beta^t): the bias-corrected average
    kept directly. A state made under another scaling gets weight 1, so the average starts
    at this step's norm."""
    if NUCLEAR_AVERAGE in state:
        return state[NUCLEAR_AVERAGE], (1 - beta) / (1 - beta ** state["step"])
    state[NUCLEAR_AVERAGE] = torch.zeros((), dtype=torch.float32, device=device)
    return state[NUCLEAR_AVERAGE], 1.0

