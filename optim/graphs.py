"""Recorded steps: the device work of an optimizer step launched as one CUDA graph.

An eager step pays host time for every kernel it launches, and a low-rank step launches two
matrix products per matrix: on a fast GPU the host, not the device, sets its pace. A CUDA
graph (``torch.cuda.CUDAGraph``) records the kernels of a step once and launches all of them
with one call. A graph bakes in what its kernels read: tensor addresses, and every Python
number passed to a kernel. So the recorded work must read what changes from step to step
(learning rate, step count) from device tensors that are rewritten before each replay, and
a step is recorded again when anything baked in changes: its *key* (addresses of the
parameters, gradients and state, and the hyperparameters passed as numbers).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

import torch

Work = Callable[[], None]
#: records ``work`` and returns (replay, whether recording already ran the work once)
Capture = Callable[[Work], tuple[Work, bool]]


def capture_cuda(work: Work) -> tuple[Work, bool]:
    """Record ``work`` into a CUDA graph; nothing runs while it is recorded. Temporaries
    come from the graph's private memory pool, which lives as long as the graph: blocks
    freed during the recording are reused later in it, so the pool holds the work's peak
    of live temporaries, not their sum. Only this thread's CUDA calls are held to the rules
    of a capture, so that another thread (a data loader pinning memory) may go on."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        work()
    return graph.replay, False


#: device type -> how a step is recorded there (tests add an emulation for the CPU)
CAPTURES: dict[str, Capture] = {"cuda": capture_cuda}

#: Side streams that a recorded step spreads independent matrix products over, so that
#: products too small to fill the GPU run side by side (1: one after another, in order).
#: Two suit bench_step's model on an H200 (2026-12-01, ``bench_step --products``): its 56
#: products took 2.65 ms in order, 2.30 ms over two streams and 2.41 ms over four.
SIDE_STREAMS = 2
_side_streams: dict[torch.device, list[Any]] = {}


def side_streams(device: torch.device) -> list[Any]:
    """The device's side streams (created once), or [] where products run in order."""
    if device.type != "cuda" or SIDE_STREAMS <= 1:
        return []
    streams = _side_streams.get(device)
    if streams is None or len(streams) != SIDE_STREAMS:
        streams = _side_streams[device] = [torch.cuda.Stream(device) for _ in range(SIDE_STREAMS)]
    return streams


T = TypeVar("T")


def fan_out(fn: Callable[[T], None], items: Iterable[T], streams: list[Any]) -> None:
    """``fn(item)`` for every item, dealt round-robin over ``streams`` after they wait for
    the current stream, which then waits for all of them; in order where ``streams`` is
    empty. The items must be independent: each writes only its own outputs. Tensors made
    before the fan-out and freed after it stay safe to reuse, since the current stream
    waits for every side stream before it goes on."""
    if not streams:
        for item in items:
            fn(item)
        return
    current = torch.cuda.current_stream(streams[0].device)
    for stream in streams:
        stream.wait_stream(current)
    for i, item in enumerate(items):
        with torch.cuda.stream(streams[i % len(streams)]):
            fn(item)
    for stream in streams:
        current.wait_stream(stream)


class DeviceScalars:
    """Numbers that recorded work reads on the device (``values``, float32), rewritten by
    the host before each replay. On CUDA they travel through a pinned buffer, so the copy
    is asynchronous and never waits for the device; the host only waits, before rewriting
    the buffer, for the previous copy out of it, queued a step earlier."""

    def __init__(self, count: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.values = torch.zeros(count, dtype=torch.float32, device=device)
        self._host = torch.zeros(count, dtype=torch.float32, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None

    def write(self, numbers: list[float]) -> torch.Tensor:
        """Queue ``numbers`` into ``values`` (on the current stream); returns ``values``."""
        if self._copied is not None:
            self._copied.synchronize()
        self._host.copy_(torch.tensor(numbers, dtype=torch.float32))
        self.values.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        return self.values


class RecordingFailed(RuntimeError):
    """The step could not be recorded (an operation that cannot be captured); nothing ran."""


class StepGraph:
    """One param group's recorded step.

    ``run(key, work)``: a key seen for the first time runs ``work`` eagerly, which warms up
    what the kernels need (library handles, workspaces, per-stream state) outside any
    recording; the same key on the next call records ``work`` and replays it; later calls
    only replay. A new key drops the graph and its memory first. Eager runs and replays
    launch the same kernels on the same inputs, so they give the same bits.
    """

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.key: Hashable = None
        self.replay: Work | None = None
        self.recordings = 0
        self.replays = 0

    def run(self, key: Hashable, work: Work) -> None:
        if key != self.key:
            self.key, self.replay = key, None
            work()
            return
        if self.replay is None:
            try:
                replay, ran = self.capture(work)
            except Exception as exc:
                self.key = None
                raise RecordingFailed(f"{type(exc).__name__}: {exc}") from exc
            self.replay = replay
            self.recordings += 1
            if ran:
                return
        self.replay()
        self.replays += 1


__all__ = ["CAPTURES", "Capture", "DeviceScalars", "RecordingFailed", "SIDE_STREAMS", "StepGraph",
           "capture_cuda", "fan_out", "side_streams"]
