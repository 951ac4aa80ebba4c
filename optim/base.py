"""What every memopt optimizer shares: gradient checks, flat state, exact resume.

Per-parameter state is flat: tensors and plain numbers (``"step"`` is a Python int, so the
step counter costs no tensor operation).

A subclass validates its hyperparameters in ``_check_group`` and updates one param group in
``_step_group``; this class makes sure that a bad gradient (sparse, complex, inf / nan) is
reported, naming the parameter, before any parameter or state changes, and that a loaded
state keeps its dtypes (torch.optim would cast fp32 moments of a bf16 parameter to bf16, and
8-bit codes to floats).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import (any_flag, as_sharded_state, from_sharded_state, is_sharded, local,
                          trim_absmax)
from .states import MomentStore, tensor_bytes


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


def moment_dtype(param: Tensor) -> torch.dtype:
    """Moments are fp32 (fp64 for fp64 parameters), whatever the parameter's dtype."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class MemoptOptimizer(Optimizer, ABC):
    """Base of memopt optimizers (a torch.optim.Optimizer; see the module docstring)."""

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

    @abstractmethod
    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Update the parameters of ``group`` that have gradients (already checked)."""

    # ---------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._checked_params()
        for group, params in work:
            self._step_group(group, params)
        return loss

    @torch.no_grad()
    def step_param(self, param: Tensor) -> None:
        """Update one parameter from its gradient now, as ``step()`` would.

        Used for per-layer updates during the backward pass (:func:`step_in_backward`); the
        gradient is checked first, so a bad one raises before this parameter changes.
        """
        for group, params in self._checked_params(only=param):
            if params:
                self._step_group(group, params)

    def _checked_params(self, only: Tensor | None = None
                        ) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Parameters with gradients per group (or just ``only``), after checking them."""
        work, checked = [], []
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
                if group.get("check_finite", True):
                    checked.append((gi, pi, grad))
            work.append((group, params))
        if checked:
            self._raise_if_non_finite(checked)
        return work

    def _raise_if_non_finite(self, checked: list[tuple[int, int, Tensor]]) -> None:
        """One device sync for all gradients: the 2-norm of each, accumulated in fp64 (which
        no square of an fp32 or bf16 value overflows), is finite iff the gradient is.
        With FSDP2 each rank checks its shards and one all-reduced flag tells them all."""
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for _, _, g in checked:
            groups.setdefault((g.device, g.dtype), []).append(local(g))
        bad = None
        for gs in groups.values():
            norms = torch._foreach_norm(gs, 2, dtype=torch.float64)
            flag = (~torch.stack(norms).isfinite().all()).float()
            bad = flag if bad is None else bad + flag.to(bad.device)
        sharded = next((g for _, _, g in checked if is_sharded(g)), None)
        if not any_flag(bad, sharded):
            return
        for gi, pi, g in checked:
            if not bool(torch.isfinite(local(g)).all()):
                raise FloatingPointError(
                    f"non-finite gradient (inf or nan) in parameter {self._label(gi, pi)}; "
                    "the step was not taken and nothing was changed")
        raise FloatingPointError("non-finite gradient (inf or nan) on another rank; the step "
                                 "was not taken and nothing was changed")

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
