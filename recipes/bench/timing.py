"""Timing for the benchmarks.

Device work is asynchronous: each timed call is bracketed by CUDA events (or a synchronize
and the host clock on the CPU); warm-up calls are run and dropped; the median is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device, seconds: float = 2.0) -> None:
    """Keep the device busy with matrix products for ``seconds`` before anything is timed.

    An idle GPU runs at a low clock and takes a moment to raise it, so whatever is timed
    first (the fused AdamW baseline) would otherwise look slower than the rest. No-op on
    the CPU."""
    if device.type != "cuda":
        return
    a = torch.randn(4096, 4096, device=device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a = torch.mm(a, a).mul_(1 / 64)
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 10,
            warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))
