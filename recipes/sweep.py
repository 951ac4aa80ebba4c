"""`memopt compare` as a sweep: every (optimizer, learning rate, seed) in its own process.

``--seeds N`` trains seeds S .. S+N-1 (S: ``--seed``); ``--lrs`` gives the learning rates
(grammar in :func:`lr_spec`); ``--jobs N`` runs N processes at once. Each run is
``python -m memopt.recipes train --optimizer NAME --lr LR --seed S ... --no-progress
--out OUT/runs/NAME/lr-LR/seed-S`` with the options given to compare (``--set``: those that
reach NAME), OMP_NUM_THREADS as the user set it, else 1 on CUDA and on the CPU the cores
shared out among the jobs, and its stdout and stderr in
``stdout.txt`` and ``stderr.txt`` of its folder. After each run ends, ``OUT/results.json``
is rewritten: every run's summary (its loss history stays in the run's ``summary.json``),
or for a run that diverged or failed, its status and the tail of its stderr; the tables
of :func:`.compare.sweep_tables`; and the plot of each optimizer's best rate, averaged
over the seeds.
Ctrl-C stops the running processes and keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arguments import optimizer_name, positive_float, settings_for
from .compare import (PLOT, RESULTS, lr_rows, plot_curves, plural, progress_note,
                      result_header, run_line, save_json, sweep_tables)
from .data import ByteCorpus
from .presets import Preset, get_preset
from .machine import available_cores, resolve_device
from .train import RunConfig

#: How a run is started; the tests put a launcher that knows their preset in its place.
TRAIN_COMMAND = [sys.executable, "-m", "memopt.recipes", "train"]
MAX_GPU_JOBS = 12
STDOUT, STDERR, SUMMARY, COMMAND = "stdout.txt", "stderr.txt", "summary.json", "command.json"
TAIL_LINES = 20
POLL_S = 0.2
LRS_GRAMMAR = ("write V1,V2,... or NAME=V1,V2,..., each V a rate such as 3e-4 or a factor "
               "of the preset's rate such as x0.5")


# ------------------------------------------------------------------ --lrs
@dataclass(frozen=True)
class Rate:
    """A learning rate, or with ``relative`` a factor of the optimizer's preset rate."""

    value: float
    relative: bool = False

    def resolve(self, default: float) -> float:
        lr = self.value * default if self.relative else self.value
        return float(f"{lr:.12g}")                  # x3 of 0.1 is 0.3, not 0.30000000000000004


@dataclass(frozen=True)
class LrSpec:
    """One ``--lrs``: rates for ``optimizer``, or for every optimizer where it is None."""

    optimizer: str | None
    rates: tuple[Rate, ...]


def lr_spec(text: str) -> LrSpec:
    """The argparse type of ``--lrs``: ``V1,V2,...`` or ``NAME=V1,V2,...``, each V a number
    > 0 (``0.01``, ``3e-4``) or ``x`` and a number > 0 (``x0.5``: half the preset's rate)."""
    name, sep, values = text.partition("=")
    try:
        optimizer = optimizer_name(name.strip()) if sep else None
        rates = tuple(_rate(v) for v in (values if sep else text).split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc} ({LRS_GRAMMAR})") from None
    return LrSpec(optimizer, rates)


def _rate(text: str) -> Rate:
    text = text.strip()
    if text.startswith("x"):
        return Rate(positive_float(text[1:]), relative=True)
    return Rate(positive_float(text))


def learning_rates(optimizers: Sequence[str], specs: Sequence[LrSpec], preset: Preset,
                   lr: float | None = None) -> dict[str, list[float]]:
    """The rates each optimizer is trained with, in the order given, each once: its own
    ``NAME=`` specs, else the general ones, else its default (``lr``, or the preset's)."""
    general = [r for s in specs if s.optimizer is None for r in s.rates]
    rates = {}
    for name in optimizers:
        own = [r for s in specs if s.optimizer == name for r in s.rates]
        default = preset.optimizer_kwargs(name, lr)["lr"]
        chosen = own or general or [Rate(1.0, relative=True)]
        rates[name] = list(dict.fromkeys(r.resolve(default) for r in chosen))
    return rates


# ------------------------------------------------------------------ the runs
@dataclass(frozen=True)
class SweepRun:
    optimizer: str
    lr: float
    seed: int

    @property
    def folder(self) -> str:
        return f"runs/{self.optimizer}/lr-{self.lr:g}/seed-{self.seed}"

    @property
    def label(self) -> str:
        return f"{self.optimizer} lr {self.lr:.4g} seed {self.seed}"


def plan_runs(rates: dict[str, list[float]], seeds: Sequence[int]) -> list[SweepRun]:
    """Every (optimizer, lr, seed), seed by seed, so that the first runs to end cover every
    (optimizer, lr)."""
    return [SweepRun(name, lr, seed) for seed in seeds for name, lrs in rates.items()
            for lr in lrs]


def default_jobs(device: str, runs: int) -> int:
    """1 on the CPU; on CUDA up to 12 runs share the GPU."""
    return min(MAX_GPU_JOBS, runs) if resolve_device(device).type == "cuda" else 1


def threads_per_run(device: str, jobs: int) -> int:
    """OMP_NUM_THREADS where the user set it (a whole number); else 1 on CUDA and on the CPU
    the cores shared out among the jobs."""
    users = os.environ.get("OMP_NUM_THREADS", "").strip()
    if users.isdigit() and int(users) > 0:
        return int(users)
    if resolve_device(device).type == "cuda":
        return 1
    return max(1, available_cores() // jobs)


def train_command(base: RunConfig, run: SweepRun, folder: Path) -> list[str]:
    """The ``memopt train`` command line of one run: ``base``'s options with the run's
    optimizer, rate and seed (``--rank`` only for the low-rank optimizers; of the ``--set``
    options those that reach the run's optimizer, as plain KEY=VALUE)."""
    cmd = [*TRAIN_COMMAND, "--optimizer", run.optimizer, "--lr", repr(run.lr),
           "--seed", str(run.seed), "--preset", base.preset, "--device", base.device]
    low_rank = get_preset(base.preset).family(run.optimizer) == "lowrank"
    for flag, value in (("--steps", base.steps), ("--data", base.data),
                        ("--warmup", base.warmup), ("--rank", base.rank if low_rank else None),
                        ("--quantize-weights", base.quantize_weights),
                        ("--weight-rounding", base.weight_rounding)):
        if value is not None:
            cmd += [flag, str(value)]
    for key, value in settings_for(base.optimizer_options, run.optimizer).items():
        cmd += ["--set", f"{key}={value!r}"]
    for flag, on in (("--per-layer", base.per_layer),
                     ("--activation-checkpointing", base.activation_checkpointing)):
        if on:
            cmd.append(flag)
    return cmd + ["--no-progress", "--out", str(folder)]


def read_outcome(run: SweepRun, returncode: int,
                 folder: Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The record of a finished process (its summary, or why it has none) and its history."""
    record: dict[str, Any] = {"optimizer": run.optimizer, "lr": run.lr, "seed": run.seed,
                              "folder": str(folder)}
    if returncode == 0 and (folder / SUMMARY).exists():
        summary = json.loads((folder / SUMMARY).read_text())
        history = summary.pop("history", [])
        return {**summary, **record, "status": "ok"}, history
    tail = (folder / STDERR).read_text(errors="replace").splitlines()[-TAIL_LINES:]
    diverged = re.search(r"diverged at step (\d+)", "\n".join(tail))
    if diverged:
        record.update(status="diverged", steps=int(diverged.group(1)),
                      diverged=f"training diverged at step {diverged.group(1)}")
    else:
        record.update(status="failed", returncode=returncode)
    record["stderr_tail"] = "\n".join(tail)
    return record, []


def outcome_line(label: str, record: dict[str, Any]) -> str:
    if record["status"] != "failed":
        return run_line(label, record)
    last = record["stderr_tail"].strip().splitlines()[-1:] or ["no output"]
    return f"{label}: failed (exit status {record['returncode']}): {last[0]}"


# ------------------------------------------------------------------ running
def run_arguments(base: RunConfig, run: SweepRun) -> list[str]:
    """What makes a run what it is: its ``memopt train`` arguments but the output folder
    (kept in its folder's command.json; ``--resume`` compares them)."""
    command = train_command(base, run, Path("."))
    return command[len(TRAIN_COMMAND):command.index("--out")]


def finished_run(base: RunConfig, run: SweepRun, folder: Path) -> bool:
    """Whether ``folder`` holds a finished run of ``run`` with the same arguments."""
    try:
        same = json.loads((folder / COMMAND).read_text()) == run_arguments(base, run)
    except (OSError, ValueError):
        return False
    return same and (folder / SUMMARY).exists()


def run_sweep(runs: list[SweepRun], base: RunConfig, out: str | Path, jobs: int,
              corpus: ByteCorpus, resume: bool = False) -> dict[str, Any]:
    """Train ``runs``, ``jobs`` at a time; return results.json's content. With ``resume``
    the finished runs already in ``out`` (same arguments) are read, not trained again. On
    Ctrl-C the running processes are stopped, the files keep the finished runs and
    KeyboardInterrupt propagates."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = threads_per_run(base.device, jobs)
    optimizers = list(dict.fromkeys(r.optimizer for r in runs))
    result = result_header(optimizers, base, corpus)
    result["sweep"] = {
        "seeds": sorted({r.seed for r in runs}), "jobs": jobs, "threads_per_run": threads,
        "lrs": {name: sorted({r.lr for r in runs if r.optimizer == name}) for name in optimizers},
        "note": f"ms/step measured with up to {plural(jobs, 'run')} sharing the "
                f"{'GPU' if resolve_device(base.device).type == 'cuda' else 'CPU'}"}
    print(f"sweep: {len(runs)} runs, {jobs} at a time, {plural(threads, 'thread')} each; "
          f"their folders are under {out / 'runs'}", flush=True)
    sweep = Sweep(runs, base, out, jobs, result)
    if resume:
        sweep.reuse_finished()
    return sweep.run()


class Sweep:
    """The processes of a sweep: started ``jobs`` at a time, each recorded as it ends."""

    def __init__(self, runs: list[SweepRun], base: RunConfig, out: Path, jobs: int,
                 result: dict[str, Any]) -> None:
        self.pending, self.total = list(runs), len(runs)
        self.base, self.out, self.jobs, self.result = base, out, jobs, result
        self.env = {**os.environ,
                    "OMP_NUM_THREADS": str(result["sweep"]["threads_per_run"])}
        self.running: dict[subprocess.Popen, tuple[SweepRun, float]] = {}
        self.histories: dict[SweepRun, list[dict[str, float]]] = {}
        self.start = time.perf_counter()

    def reuse_finished(self) -> None:
        """Record the runs already finished in ``out`` instead of training them again."""
        done = [r for r in self.pending if finished_run(self.base, r, self.out / r.folder)]
        for run in done:
            self.pending.remove(run)
            record, history = read_outcome(run, 0, self.out / run.folder)
            self.result["runs"].append({**record, "reused": True})
            self.histories[run] = history
        if done:
            self.result["sweep"]["note"] += (f"; {plural(len(done), 'run')} kept by --resume "
                                             "show the ms/step of the sweep that trained them")
            self.write(complete=not self.pending)
        print(f"--resume: {plural(len(done), 'finished run')} kept, "
              f"{plural(len(self.pending), 'run')} to train", flush=True)

    def run(self) -> dict[str, Any]:
        try:
            while self.pending or self.running:
                while self.pending and len(self.running) < self.jobs:
                    self.launch(self.pending.pop(0))
                if not self.collect():
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.interrupted()
            raise
        finally:
            self.stop()
        return self.result

    def launch(self, run: SweepRun) -> None:
        folder = self.out / run.folder
        shutil.rmtree(folder, ignore_errors=True)       # no summary left from an earlier sweep
        folder.mkdir(parents=True)
        (folder / COMMAND).write_text(json.dumps(run_arguments(self.base, run)))
        with open(folder / STDOUT, "w") as stdout, open(folder / STDERR, "w") as stderr:
            proc = subprocess.Popen(train_command(self.base, run, folder), env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
        self.running[proc] = (run, time.perf_counter())

    def collect(self) -> int:
        """Record the processes that ended; return how many."""
        ended = [proc for proc in self.running if proc.poll() is not None]
        for proc in ended:
            run, started = self.running.pop(proc)
            record, history = read_outcome(run, proc.returncode, self.out / run.folder)
            record["run_wall_s"] = time.perf_counter() - started
            self.result["runs"].append(record)
            if history:
                self.histories[run] = history
            self.write(complete=not (self.pending or self.running))
            self.report(run, record)
        return len(ended)

    def report(self, run: SweepRun, record: dict[str, Any]) -> None:
        done, now = len(self.result["runs"]), time.perf_counter()
        left = time_left([r["run_wall_s"] for r in self.result["runs"] if "run_wall_s" in r],
                         len(self.pending),
                         [now - started for _, started in self.running.values()], self.jobs)
        note = progress_note(now - self.start, left)
        print(f"[{done}/{self.total}] {outcome_line(run.label, record)}  "
              f"({plural(self.total - done, 'run')} left) {note}", flush=True)

    def write(self, complete: bool) -> None:
        self.result.update(wall_s=time.perf_counter() - self.start, complete=complete)
        rows = lr_rows(self.result["runs"])
        self.result["table"], self.result["best_table"] = sweep_tables(rows)
        self.result["best_lr"] = {r["optimizer"]: r["lr"] for r in rows if r["best"]}
        save_json(self.out / RESULTS, self.result)
        plot_curves(best_curves(rows, self.histories), self.out / PLOT,
                    title=f"{self.result['setting']}; best lr of each, mean over seeds")

    def interrupted(self) -> None:
        going = [run.label for run, _ in self.running.values()]
        self.stop()
        self.result["interrupted_during"] = going
        self.write(complete=False)
        print(f"\nmemopt compare: interrupted with {plural(len(going), 'run')} going "
              f"({', '.join(going) or 'none'}); the {len(self.result['runs'])} finished "
              f"run(s) are in {self.out / RESULTS}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        """End the processes still running: SIGTERM, and SIGKILL after 5 s."""
        for proc in self.running:
            proc.terminate()
        for proc in self.running:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.running.clear()


def time_left(run_s: list[float], pending: int, ages: list[float], jobs: int) -> float:
    """Seconds until the last run ends, were every run to take the mean of ``run_s`` (the
    finished ones' wall times): the longest rest of the runs going (``ages``: how long each
    has run), or, if longer, the work left (waiting runs and those rests) shared by the jobs."""
    mean = statistics.fmean(run_s)
    rests = [max(0.0, mean - age) for age in ages]
    return max(max(rests, default=0.0), (pending * mean + sum(rests)) / jobs)


def best_curves(rows: list[dict[str, Any]],
                histories: dict[SweepRun, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per optimizer, its best rate's history averaged over the seeds, for the plot."""
    curves = []
    for row in rows:
        runs = [SweepRun(row["optimizer"], row["lr"], seed) for seed in row["seeds"]]
        found = [histories[r] for r in runs if r in histories]
        if row["best"] and found:
            curves.append({"optimizer": f"{row['optimizer']} lr {row['lr']:.4g}",
                           "history": mean_history(found)})
    return curves


def mean_history(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Step by step mean of the train and validation losses (as long as the shortest)."""
    mean = []
    for records in zip(*histories):
        point = {"step": records[0]["step"],
                 "loss": statistics.fmean(r["loss"] for r in records)}
        if all("val_loss" in r for r in records):
            point["val_loss"] = statistics.fmean(r["val_loss"] for r in records)
        mean.append(point)
    return mean

