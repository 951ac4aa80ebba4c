"""`memopt compare`: the same pretraining run with several optimizers, side by side.

Every optimizer gets the same model initialisation, the same batches in the same order and
the same schedule; the table shows what each gains and loses (final losses in bits per byte,
time per step, optimizer-state memory, and peak GPU memory on a GPU). ``results.json`` and
``loss_curves.png`` in ``--out`` are rewritten as soon as each run finishes, so an
interrupted comparison (Ctrl-C) keeps every finished run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .data import ByteCorpus, load_corpus
from .presets import get_preset
from .timing import environment, markdown_table, resolve_device
from .train import LN2, Diverged, RunConfig, train

DEFAULT_OPTIMIZERS = ("adamw", "galore", "dct", "fira", "muon", "polargrad")
DEFAULT_PRESET = "quick"
#: Table columns: key in a run's summary -> header. Losses are in bits per byte, as in the plot.
COLUMNS = {"optimizer": "optimizer", "lr": "lr", "train_bits_per_byte": "train bits/byte",
           "val_bits_per_byte": "val bits/byte", "ms_per_step": "ms/step",
           "optimizer_state_mb": "optimizer state MB", "peak_gpu_mb": "peak GPU MB"}
FORMATS = {"lr": ".3g", "train_bits_per_byte": ".3f", "val_bits_per_byte": ".3f",
           "ms_per_step": ".1f", "optimizer_state_mb": ".2f", "peak_gpu_mb": ".0f"}
RESULTS, PLOT = "results.json", "loss_curves.png"


def compare(optimizers: list[str], base: RunConfig, out: str | Path,
            corpus: ByteCorpus | None = None) -> dict[str, Any]:
    """Train ``base`` once per optimizer; after each run, rewrite ``out``/results.json (every
    finished run, the table, the wall time so far) and ``out``/loss_curves.png.

    A run that diverges is recorded with its step and the comparison goes on. On Ctrl-C the
    files hold the finished runs and ``"interrupted_during"`` names the unfinished one;
    a message says so on stderr and KeyboardInterrupt propagates."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else load_corpus(base.data)
    preset = get_preset(base.preset, steps=base.steps)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "environment": environment(resolve_device(base.device)), "corpus": corpus.describe(),
        "preset": preset.name, "setting": describe_setting(preset),
        "optimizers": list(optimizers), "complete": False, "wall_s": 0.0, "runs": []}
    runs: list[dict[str, Any]] = result["runs"]
    name = ""
    try:
        for i, name in enumerate(optimizers):
            cfg = RunConfig(**{**vars(base), "optimizer": name, "out": str(out / name),
                               "resume": False})
            label = f"[{i + 1}/{len(optimizers)}] {name}"
            try:
                summary = train(cfg, corpus, label=label)
            except Diverged as exc:
                summary = {"optimizer": name, "diverged": str(exc), "steps": exc.step,
                           "history": []}
            runs.append(summary)
            elapsed = time.perf_counter() - start
            _write(out, result, elapsed, complete=i + 1 == len(optimizers))
            left = elapsed / (i + 1) * (len(optimizers) - i - 1)
            print(_run_line(label, summary) + f"  [{format_duration(elapsed)} elapsed"
                  + (f", about {format_duration(left)} left]" if left else "]"),
                  flush=True)
    except KeyboardInterrupt:
        result["interrupted_during"] = name
        _write(out, result, time.perf_counter() - start, complete=False)
        done = ", ".join(r["optimizer"] for r in runs) or "none"
        print(f"\nmemopt compare: interrupted during {name}; the {len(runs)} finished run(s) "
              f"({done}) are in {out / RESULTS}", file=sys.stderr, flush=True)
        raise
    return result


def describe_setting(preset: Any) -> str:
    """One line: the model and schedule every optimizer runs."""
    return (f"preset {preset.name}: LLaMA hidden {preset.hidden}, {preset.layers} layers, "
            f"{preset.steps} steps of {preset.batch_size} x {preset.seq_len} bytes, "
            f"validation every {preset.eval_interval()} steps")


def format_duration(seconds: float) -> str:
    """``154.2`` -> "2 min 34 s"; under a minute "41.3 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"


def results_table(runs: list[dict[str, Any]]) -> str:
    """The markdown table of finished runs; the GPU column only where a run measured it."""
    columns = [c for c in COLUMNS if c != "peak_gpu_mb"
               or any(r.get("peak_gpu_mb") is not None for r in runs)]
    rows = []
    for run in runs:
        row = {c: run.get(c) for c in columns}
        if run.get("diverged"):
            row["train_bits_per_byte"] = f"diverged at step {run['steps']}"
        rows.append(row)
    return markdown_table(rows, columns, headers=[COLUMNS[c] for c in columns],
                          formats=FORMATS)


def _run_line(label: str, summary: dict[str, Any]) -> str:
    if summary.get("diverged"):
        return f"{label}: {summary['diverged']}"
    return (f"{label}: train {summary['train_bits_per_byte']:.3f}  "
            f"val {summary['val_bits_per_byte']:.3f} bits/byte  "
            f"{summary['ms_per_step']:.1f} ms/step  "
            f"state {summary['optimizer_state_mb']:.2f} MB")


def _write(out: Path, result: dict[str, Any], elapsed: float, complete: bool) -> None:
    """results.json (atomically: a Ctrl-C during the write leaves the previous file) and the
    plot of the runs so far."""
    result["wall_s"] = elapsed
    result["complete"] = complete
    result["table"] = results_table(result["runs"])
    tmp = out / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / RESULTS)
    plot_curves(result["runs"], out / PLOT, title=result.get("setting"))


def smoothed(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average with weight 2 / (span + 1) on the newest
    value (as pandas' ``ewm(span=...).mean()``): the first values are averages of what has
    been seen, not pulled towards zero, so a short run is smoothed from its first step."""
    alpha = 2 / (span + 1)
    out, mean, weight = [], 0.0, 0.0
    for v in values:
        mean = (1 - alpha) * mean + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


#: One line style and marker per optimizer, so that curves lying on top of each other
#: (galore and fira) stay distinguishable.
STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"),
          ((0, (1, 1)), "P")]


def plot_curves(runs: list[dict[str, Any]], path: Path, title: str | None = None) -> None:
    """Training loss (smoothed) and validation loss per optimizer, in bits per byte."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    finite: list[float] = []
    trained = [r for r in runs if r.get("history")]
    span = max(3, max((len(r["history"]) for r in trained), default=0) // 15)
    for i, run in enumerate(trained):
        style, marker = STYLES[i % len(STYLES)]
        history = run["history"]
        steps = [h["step"] for h in history]
        bits = [h["loss"] / LN2 for h in history]
        finite += [b for b in bits if math.isfinite(b)]
        every = max(1, len(steps) // 8)
        kw = {"linestyle": style, "marker": marker, "label": run["optimizer"],
              "color": f"C{i}", "linewidth": 1.6}
        ax_train.plot(steps, smoothed(bits, span), markevery=(i % every, every),
                      markersize=5, **kw)
        evals = [(h["step"], h["val_loss"] / LN2) for h in history if "val_loss" in h]
        if evals:
            ax_val.plot(*zip(*evals), markersize=5, **kw)
    for ax, label in ((ax_train, f"train loss, bits/byte (moving average, span {span})"),
                      (ax_val, "validation loss, bits/byte")):
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if finite:
        low = min(finite)
        ax_train.set_ylim(low - 0.1, min(max(finite), low + 4.0))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
