"""What every memopt optimizer shares: gradient checks, flat state, exact resume.

Per-parameter state is flat: tensors and plain numbers (``"step"`` is a Python int, so the
step counter costs no tensor operation).

A subclass validates its hyperparameters in ``_check_group`` and updates one param group in
``_step_group``; this class makes sure that a bad gradient (sparse, complex, inf / nan) is
reported, naming the parameter, before any parameter or state changes, and that a loaded
state keeps its dtypes (torch.optim would cast fp32 moments of a bf16 parameter to bf16, and
8-bit codes to floats). A step runs in three phases over all groups: ``_prepare_group``
(work that changes nothing, and may offer "witnesses": tensors computed from a gradient that
are non-finite whenever it is, so the check need not read the gradient again), one
finiteness check with one device sync, then ``_step_group``.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .distributed import (all_reduce_sum, as_sharded_state, from_sharded_state, is_sharded, local,
                          trim_absmax)
from .groups import param_groups
from .states import MIN_8BIT_NUMEL, MomentStore, tensor_bytes


def check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (must be a pair of numbers in [0, 1))")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i} of {name}: {beta!r} "
                             "(must be in [0, 1))")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose one of {choices})")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


def as_matrix(t: Tensor) -> Tensor:
    """A k-D weight as the matrix it acts as: (out, in * k * k) for a conv kernel."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], -1)


def add_to_matrix_(W: Tensor, T: Tensor, alpha: float, factor: Tensor | None = None) -> None:
    """W <- W + alpha T (times ``factor``, broadcast), T being W's matrix form (conv kernels
    as (out, in * k * k)); one pass over W when W can be viewed as that matrix."""
    if W.ndim == 2 or W.is_contiguous():
        Wm = as_matrix(W)
        if factor is None:
            Wm.add_(T, alpha=alpha)
        else:
            Wm.addcmul_(T, factor, value=alpha)
    else:
        W.add_((T if factor is None else T * factor).reshape(W.shape), alpha=alpha)


def moment_dtype(param: Tensor) -> torch.dtype:
    """Moments are fp32 (fp64 for fp64 parameters), whatever the parameter's dtype."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


#: Largest total of bytes a step may compute for all parameters before its finiteness check
#: (projections, momentum directions), so that the check reads them instead of the
#: gradients; above it the gradients are checked and the step streams in bounded pieces.
PREPARE_BYTES = 1024 * 2**20


@dataclass
class Prepared:
    """What a group's step computed before the finiteness check, having changed nothing.

    ``witnesses`` maps a parameter to a tensor that is non-finite whenever its gradient is
    (a projection or momentum direction computed from it), checked instead of the gradient
    so the step reads each gradient once; ``data`` is the subclass's, for ``_step_group``.
    """
    witnesses: dict[Tensor, Tensor] = field(default_factory=dict)
    data: Any = None


@dataclass
class _Check:
    """A finiteness check in flight: what was checked, the sum of norms (in host memory once
    ``ready``, a CUDA event, has passed; None on the CPU, where it is ready at once)."""
    checked: list[tuple[Tensor, Tensor]]
    flag: Tensor
    ready: Any


class MemoptOptimizer(Optimizer, ABC):
    """Base of memopt optimizers (a torch.optim.Optimizer; see the module docstring)."""

    #: pinned host memory and an event for the check's flag, made on first use on CUDA
    _flag_host: Tensor | None = None
    _flag_ready: Any = None

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if isinstance(params, nn.Module):      # hidden matrices vs. the rest, by module type
            params = param_groups(params)
        self._eight_bit_unused_checked = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            check_choice("check_finite", group.get("check_finite", True), (True, False))
            self._check_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming any invalid hyperparameter of ``group``."""

    def _prepare_group(self, group: dict[str, Any], params: list[Tensor]) -> Prepared:
        """Work of ``group``'s step that changes nothing and may stand in for the gradient
        check (subclasses; default: none). Runs before the finiteness check."""
        return Prepared()

    @abstractmethod
    def _step_group(self, group: dict[str, Any], params: list[Tensor],
                    prepared: Prepared) -> None:
        """Update the parameters of ``group`` that have gradients (already checked)."""

    # ---------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run(self._collect())
        self._warn_if_8bit_unused()
        return loss

    @torch.no_grad()
    def step_param(self, param: Tensor) -> None:
        """Update one parameter from its gradient now, as ``step()`` would.

        Used for per-layer updates during the backward pass (:func:`step_in_backward`); the
        gradient is checked first, so a bad one raises before this parameter changes.
        """
        self._run([(g, ps) for g, ps in self._collect(only=param) if ps])
        self._warn_if_8bit_unused()

    def _warn_if_8bit_unused(self) -> None:
        """Warn once when ``state_bits=8`` was asked but every state tensor made so far is
        under ``MIN_8BIT_NUMEL`` elements and stays fp32 (as in bitsandbytes' own 8-bit
        optimizers): such a model trains exactly as with 32-bit state."""
        if self._eight_bit_unused_checked:
            return
        eight = [p for g in self.param_groups if g.get("state_bits") == 8 for p in g["params"]]
        states = [v for p in eight for v in self.state.get(p, {}).values()
                  if isinstance(v, Tensor) and v.is_floating_point()]
        if not states:
            self._eight_bit_unused_checked = not eight
            return
        self._eight_bit_unused_checked = True
        if not any(v.dtype == torch.uint8 for p in eight for v in self.state[p].values()
                   if isinstance(v, Tensor)):
            warnings.warn(f"{type(self).__name__}: state_bits=8, but every state tensor has "
                          f"fewer than {MIN_8BIT_NUMEL} elements and stays fp32 (as in "
                          "bitsandbytes), so this model's state is not quantized", stacklevel=5)

    def _run(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        """Prepare every group, check every gradient (or its witness), then update: a bad
        gradient anywhere raises before any parameter or state of any group changes. While
        the host waits for the check's flag, the device runs work that changes nothing
        (``_launch_ahead``), so the wait leaves no gap."""
        prepared = [self._prepare_group(group, params) for group, params in work]
        check = self._start_check(work, prepared)
        for (group, _), prep in zip(work, prepared):
            self._launch_ahead(group, prep)
        self._finish_check(check)
        for (group, params), prep in zip(work, prepared):
            self._step_group(group, params, prep)

    def _launch_ahead(self, group: dict[str, Any], prepared: Prepared) -> None:
        """Start prepared work that changes no parameter or state (subclasses)."""

    def _collect(self, only: Tensor | None = None) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Parameters with gradients per group (or just ``only``); sparse or complex ones raise."""
        work = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None or (only is not None and p is not only):
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter {self._label(gi, pi)})")
                if grad.is_complex() or p.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex "
                                       f"parameters (parameter {self._label(gi, pi)})")
                params.append(p)
            work.append((group, params))
        return work

    def _start_check(self, work: list[tuple[dict[str, Any], list[Tensor]]],
                     prepared: list[Prepared]) -> _Check | None:
        """Enqueue the finiteness check of every checked gradient, or of its witness: the
        sum of the 2-norms, accumulated in fp64 (which no square of an fp32 or bf16 value
        overflows), is finite iff every tensor is. With FSDP2 each rank checks its shards
        and the sums are all-reduced. The sum comes to the host asynchronously."""
        checked = []
        for (group, params), prep in zip(work, prepared):
            if group.get("check_finite", True):
                witnesses = prep.witnesses
                checked += [(p, witnesses.get(p, p.grad)) for p in params]
        if not checked:
            return None
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for _, t in checked:
            t = local(t)
            by_kind.setdefault((t.device, t.dtype), []).append(t)
        total = None
        for ts in by_kind.values():
            norms = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)).sum()
            total = norms if total is None else total + norms.to(total.device)
        sharded = next((p.grad for p, _ in checked if is_sharded(p.grad)), None)
        if sharded is not None:       # one 4-byte count of the ranks that saw a bad value
            total = (~total.isfinite()).float()
            all_reduce_sum(total, sharded, "finite_check")
            total = total.double().mul_(math.inf).nan_to_num_(nan=0.0, posinf=math.inf)  # 0 or inf
        if not total.is_cuda:
            return _Check(checked, total, None)
        if self._flag_host is None:
            self._flag_host = torch.empty((), dtype=torch.float64, pin_memory=True)
            self._flag_ready = torch.cuda.Event()
        self._flag_host.copy_(total, non_blocking=True)
        self._flag_ready.record()
        return _Check(checked, self._flag_host, self._flag_ready)

    def _finish_check(self, check: _Check | None) -> None:
        """Wait for the sum (not for later work) and raise FloatingPointError naming the
        first parameter whose gradient is not finite."""
        if check is None:
            return
        if check.ready is not None:
            check.ready.synchronize()
        if math.isfinite(float(check.flag)):
            return
        for p, _ in check.checked:
            if not bool(torch.isfinite(local(p.grad)).all()):
                raise FloatingPointError(
                    f"non-finite gradient (inf or nan) in parameter {self._name(p)}; "
                    "the step was not taken and nothing was changed")
        for p, t in check.checked:
            if not bool(torch.isfinite(local(t)).all()):
                raise FloatingPointError(
                    f"the gradient of parameter {self._name(p)} is finite but so large that "
                    "its update overflows (inf or nan); the step was not taken and nothing "
                    "was changed")
        raise FloatingPointError("non-finite gradient (inf or nan) on another rank; the step "
                                 "was not taken and nothing was changed")

    def _name(self, param: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    return self._label(gi, pi)
        return f"of shape {tuple(param.shape)}"

    def _label(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        p = group["params"][pi]
        names = group.get("param_names")
        where = f"'{names[pi]}'" if names else f"param_groups[{gi}]['params'][{pi}]"
        return f"{where} of shape {tuple(p.shape)}"

    def _adamw(self, params: list[Tensor], store: MomentStore, *, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        """Plain AdamW for the parameters a method does not project or orthogonalize
        (on the local shard of an FSDP2 parameter: AdamW is elementwise)."""
        buckets: dict[tuple[int, torch.device], list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                for key in ("exp_avg", "exp_avg_sq"):
                    store.init(state, key, local(p).shape, p.device, moment_dtype(p),
                               full_numel=p.numel())
            state["step"] += 1
            buckets.setdefault((state["step"], p.device), []).append(p)
        for (step, _), bucket in buckets.items():
            store.adamw_steps([self.state[p] for p in bucket], [local(p) for p in bucket],
                              [local(p.grad) for p in bucket], lr=lr, beta1=betas[0],
                              beta2=betas[1], eps=eps, weight_decay=weight_decay, step=step)

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Like torch.optim's, with group values that are not plain data replaced by a name.

        For FSDP2 parameters the row-sharded state (moments, momentum, their 8-bit codes and
        absmax) is returned as DTensors, so ``torch.distributed.checkpoint`` saves each shard
        once; the rest (bases, indices, norms) is the same on every rank."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            for key, value in list(group.items()):
                if callable(value):
                    group[key] = f"<callable {getattr(value, '__name__', type(value).__name__)}>"
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for index, values in sd["state"].items():
            if is_sharded(params[index]):
                sd["state"][index] = {k: as_sharded_state(v, k, params[index])
                                      for k, v in values.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; tensors keep their saved dtype and move to their parameter's device."""
        saved_state = state_dict["state"]
        callables = [{k: v for k, v in g.items() if callable(v)} for g in self.param_groups]
        super().load_state_dict({**state_dict, "state": {}})
        for group, kept in zip(self.param_groups, callables):
            group.update(kept)   # a callable cannot be saved; the live one stays
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        for key, values in saved_state.items():
            if key not in id_map:
                continue
            param = id_map[key]
            self.state[param] = {k: self._load_value(param, k, v) for k, v in values.items()}
            trim_absmax(self.state[param])
        self._after_load()

    @staticmethod
    def _load_value(param: Tensor, key: str, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        return from_sharded_state(value, key).detach().to(device=param.device, copy=True)

    def _after_load(self) -> None:
        """Drop caches derived from state (subclasses)."""

    # --------------------------------------------------------------------- bytes
    def state_bytes(self) -> int:
        """Bytes of all optimizer state: moments, bases or indices, norms, steps."""
        own = sum(tensor_bytes(v) for s in self.state.values() for v in s.values())
        return own + self._shared_state_bytes()

    def _shared_state_bytes(self) -> int:
        """State shared between parameters (e.g. one DCT matrix per size); subclasses."""
        return 0


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of all state of ``optimizer`` (any torch.optim.Optimizer), shared matrices included."""
    if isinstance(optimizer, MemoptOptimizer):
        return optimizer.state_bytes()
    return sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values())
