"""The machine a run uses, and its record: the device ("auto" -> cuda when there is one), the
CPU cores this process may use and the threads torch gets, and the environment that every
result file carries (date, versions, device, cores, load)."""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    return device


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask (``taskset``), further limited by a
    cgroup CPU quota (``docker --cpus``, Kubernetes limits), which the mask does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                      # macOS, Windows
        cores = os.cpu_count() or 1
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()[:2]),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            text = Path(path).read_text()
            if parse is None:
                period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text()
                quota, period = text.strip(), period.strip()
            else:
                quota, period = parse(text)
        except (OSError, ValueError):
            continue
        if quota not in ("max", "-1") and int(period) > 0:
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
        break
    return cores


def busy_cores(seconds: float = 0.3) -> float:
    """How many cores other processes keep busy now: the machine's non-idle share of CPU
    time over ``seconds`` (``/proc/stat``) times its cores; elsewhere the 1-minute load
    average, which lags by a minute or more."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields), fields[3] + fields[4]           # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
        share = 1 - (idle1 - idle0) / max(1, total1 - total0)
        return share * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def use_available_cores() -> int:
    """Set torch's intra-op threads to the cores this process may use that other processes
    are not busy on (:func:`busy_cores`, read once), unless OMP_NUM_THREADS says how many;
    return the number set.

    torch's threads spin while they wait for each other, so a thread on a core that another
    process also wants waits for a partner that is preempted: on 2 cores with one other busy
    process, a step of the quick preset took 245 ms median (up to 4.5 s) on 2 threads
    against 115 ms on 1; on an idle machine 2 threads took 62 ms and 1 thread 89 ms."""
    if not os.environ.get("OMP_NUM_THREADS"):
        cores = available_cores()
        torch.set_num_threads(max(1, min(cores, round(cores - busy_cores()))))
    return torch.get_num_threads()


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
        info["cores"] = available_cores()
        if hasattr(os, "getloadavg"):
            info["load"] = round(os.getloadavg()[0], 2)    # 1-minute average, for the record
    return info


def describe_environment(env: dict[str, Any]) -> str:
    """:func:`environment` as readable lines, e.g. "torch 2.13.0, Python 3.12.3" /
    "device: cpu (x86_64), 2 threads on 2 cores" / "date: 2026-12-02"."""
    where = f"device: {env.get('device', '?')}"
    if env.get("gpu"):
        where += f" ({env['gpu']}, CUDA {env.get('cuda')})"
    elif env.get("cpu"):
        where += f" ({env['cpu']})"
    if env.get("threads") is not None:
        where += f", {env['threads']} threads"
        if env.get("cores") is not None:
            where += f" on {env['cores']} cores"
        if env.get("load") is not None:
            where += f" (load average {env['load']} at the start)"
    return "\n".join([f"torch {env.get('torch', '?')}, Python {env.get('python', '?')}", where,
                      f"date: {env.get('date', '?')}"])
