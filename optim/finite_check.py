"""The finiteness check of a step: one device sync for every gradient of every group.

The engine checks each gradient, or a witness computed from it before the check (a
projection, a momentum direction, a norm: non-finite whenever the gradient is, and whenever
the update would overflow), so that a bad gradient raises before any parameter or state
changes. The sum of the 2-norms, accumulated in fp64 (which no square of an fp32 or bf16
value overflows), is finite iff every tensor is; with FSDP2 each rank checks its shards and
a count of bad ranks is all-reduced. The sum comes to the host asynchronously, into pinned
memory behind a CUDA event, so the device keeps working while the host waits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .distributed import all_reduce_sum, is_sharded, local


@dataclass
class PendingCheck:
    """A check in flight: (parameter, tensor checked) pairs and the sum of norms (in host
    memory once ``ready``, a CUDA event, has passed; None on the CPU: ready at once)."""
    checked: list[tuple[Tensor, Tensor]]
    flag: Tensor
    ready: Any

    def finish(self, name: Callable[[Tensor], str]) -> None:
        """Wait for the sum (not for later work) and raise FloatingPointError naming
        (``name(p)``) the first parameter whose gradient, or update, is not finite."""
        if self.ready is not None:
            self.ready.synchronize()
        if math.isfinite(float(self.flag)):
            return
        for p, _ in self.checked:
            if not bool(torch.isfinite(local(p.grad)).all()):
                raise FloatingPointError(
                    f"non-finite gradient (inf or nan) in parameter {name(p)}; "
                    "the step was not taken and nothing was changed")
        for p, t in self.checked:
            if not bool(torch.isfinite(local(t)).all()):
                raise FloatingPointError(
                    f"the gradient of parameter {name(p)} is finite but so large that "
                    "its update overflows (inf or nan); the step was not taken and nothing "
                    "was changed")
        raise FloatingPointError("non-finite gradient (inf or nan) on another rank; the step "
                                 "was not taken and nothing was changed")


class FiniteCheck:
    """Starts checks; keeps the pinned host flag and the CUDA event, made on first use."""

    def __init__(self) -> None:
        self._flag_host: Tensor | None = None
        self._flag_ready: Any = None

    def start(self, checked: list[tuple[Tensor, Tensor]]) -> PendingCheck | None:
        """Enqueue the sum of the norms of the checked tensors; None if there are none."""
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
            return PendingCheck(checked, total, None)
        if self._flag_host is None:
            self._flag_host = torch.empty((), dtype=torch.float64, pin_memory=True)
            self._flag_ready = torch.cuda.Event()
        self._flag_host.copy_(total, non_blocking=True)
        self._flag_ready.record()
        return PendingCheck(checked, self._flag_host, self._flag_ready)
