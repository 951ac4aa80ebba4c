"""`memopt compare`: the same pretraining run with several optimizers, side by side.

Every optimizer gets the same model initialisation, the same batches in the same order and
the same schedule; the table shows what each gains and loses (final losses in bits per byte,
time per step, optimizer-state memory, and peak GPU memory on a GPU). ``results.json`` and
``loss_curves.png`` in ``--out`` are rewritten as soon as each run finishes, so an
interrupted comparison (Ctrl-C) keeps every finished run, and ``--resume`` keeps those whose
arguments match (``train.run_identity``) and trains the others.

With ``--seeds N``, ``--lrs SPEC`` or ``--jobs N`` (> 1) the comparison becomes a sweep
(:mod:`.sweep`): each (optimizer, learning rate, seed) trains in its own ``memopt train``
process, ``--jobs`` of them at once, and the table gives one row per (optimizer, lr) with
the mean and spread over the seeds and a mark on each optimizer's best rate.

- ``--seeds N``: seeds S .. S+N-1, S from ``--seed`` (default 0); the seed sets the model's
  initialisation and the order of the training batches.
- ``--lrs V1,V2,...`` (every optimizer) or ``--lrs NAME=V1,V2,...`` (one optimizer; wins over
  the general list), repeatable; V is a rate (``0.01``, ``3e-4``) or a factor of the
  optimizer's rate in the preset (``x0.5``, ``x1``, ``x2``). Not with ``--lr``.
- ``--jobs N``: runs at once (default 1 on the CPU, min(12, runs) on CUDA).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .data import ByteCorpus, load_corpus
from .presets import get_preset
from .machine import environment, resolve_device
from .report import markdown_table
from .train import (LN2, WEIGHT_FORMATS, Diverged, RunConfig, config_from, run_identity,
                    train, weight_rounding)

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
            corpus: ByteCorpus | None = None, resume: bool = False) -> dict[str, Any]:
    """Train ``base`` once per optimizer; after each run, rewrite ``out``/results.json (every
    finished run, the table, the wall time so far) and ``out``/loss_curves.png. With
    ``resume``, the finished runs of ``out``/results.json whose arguments match are kept
    (marked ``"reused"``) and only the others are trained.

    A run that diverges is recorded with its step and the comparison goes on. On Ctrl-C the
    files hold the finished runs and ``"interrupted_during"`` names the unfinished one;
    a message says so on stderr and KeyboardInterrupt propagates."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus if corpus is not None else load_corpus(base.data)
    start = time.perf_counter()
    result = result_header(optimizers, base, corpus)
    runs: list[dict[str, Any]] = result["runs"]
    configs = {name: RunConfig(**{**vars(base), "optimizer": name, "out": str(out / name),
                                  "resume": False}) for name in optimizers}
    kept = finished_runs(out, configs) if resume else {}
    runs += [{**kept[name], "reused": True} for name in optimizers if name in kept]
    todo = [name for name in optimizers if name not in kept]
    if resume:
        print(f"--resume: {plural(len(kept), 'finished run')} kept, "
              f"{plural(len(todo), 'run')} to train", flush=True)
    if kept:
        result["note"] = ("runs kept by --resume show the ms/step of the comparison that "
                          "trained them")
        _write(out, result, 0.0, complete=not todo)
    name = ""
    try:
        for done, name in enumerate(todo, 1):
            label = f"[{optimizers.index(name) + 1}/{len(optimizers)}] {name}"
            try:
                summary = train(configs[name], corpus, label=label)
            except Diverged as exc:
                summary = {"optimizer": name, "diverged": str(exc), "steps": exc.step,
                           "history": []}
            runs.append(summary)
            runs.sort(key=lambda r: optimizers.index(r["optimizer"]))
            elapsed = time.perf_counter() - start
            _write(out, result, elapsed, complete=done == len(todo))
            left = elapsed / done * (len(todo) - done)
            print(f"{run_line(label, summary)}  {progress_note(elapsed, left)}", flush=True)
    except KeyboardInterrupt:
        result["interrupted_during"] = name
        _write(out, result, time.perf_counter() - start, complete=False)
        finished = ", ".join(r["optimizer"] for r in runs) or "none"
        print(f"\nmemopt compare: interrupted during {name}; the {len(runs)} finished run(s) "
              f"({finished}) are in {out / RESULTS}", file=sys.stderr, flush=True)
        raise
    return result


def finished_runs(out: Path, configs: dict[str, RunConfig]) -> dict[str, dict[str, Any]]:
    """The runs of ``out``/results.json (a comparison's, not a sweep's) that finished without
    diverging under the same arguments as ``configs[name]``, by optimizer name."""
    try:
        earlier = json.loads((out / RESULTS).read_text())
        records = [] if "sweep" in earlier else list(earlier["runs"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    kept: dict[str, dict[str, Any]] = {}
    for record in records:
        name = record.get("optimizer") if isinstance(record, dict) else None
        if name not in configs or name in kept or record.get("diverged"):
            continue
        config = config_from(record.get("config"))
        try:
            same = config is not None and (run_identity(config, measured=True)
                                           == run_identity(configs[name], measured=True))
        except ValueError:                          # a preset this version does not know
            same = False
        if same:
            kept[name] = record
    return kept


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + "s" * (count != 1)


def result_header(optimizers: list[str], base: RunConfig, corpus: ByteCorpus) -> dict[str, Any]:
    """The start of results.json: what was measured where, and no runs yet."""
    preset = get_preset(base.preset, steps=base.steps)
    return {"environment": environment(resolve_device(base.device)),
            "corpus": corpus.describe(), "preset": preset.name,
            "setting": describe_setting(preset, base), "optimizers": list(optimizers),
            "complete": False, "wall_s": 0.0, "runs": []}


def describe_setting(preset: Any, config: RunConfig | None = None) -> str:
    """One line: the model and schedule every optimizer runs (and, when ``config``
    quantizes them, how its weights are kept)."""
    line = (f"preset {preset.name}: LLaMA hidden {preset.hidden}, {preset.layers} layers, "
            f"{preset.steps} steps of {preset.batch_size} x {preset.seq_len} bytes, "
            f"validation every {preset.eval_interval()} steps")
    if config is not None and config.quantize_weights is not None:
        line += (f"; {WEIGHT_FORMATS[config.quantize_weights]} weights, "
                 f"{weight_rounding(config)} rounding")
    return line


def format_duration(seconds: float) -> str:
    """``154.2`` -> "2 min 34 s"; under a minute "41.3 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"


def progress_note(elapsed: float, left: float) -> str:
    """"[1 min 2 s elapsed, about 2 min 4 s left]"; "[1 min 2 s elapsed]" when none is left."""
    return (f"[{format_duration(elapsed)} elapsed"
            + (f", about {format_duration(left)} left]" if left else "]"))


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


# ------------------------------------------------------------------ sweep tables
#: Headers of a sweep's table (:mod:`.sweep`): one row per (optimizer, lr), over the seeds.
SWEEP_HEADERS = {**COLUMNS, "best": "best lr",
                 "val_bits_per_byte": "val bits/byte (mean ± half range)",
                 "val_by_seed": "val bits/byte by seed",
                 "train_bits_per_byte": "train bits/byte (mean)",
                 "ms_per_step": "ms/step (median)"}


def lr_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (optimizer, lr) of run records, optimizers in the order first seen and
    rates rising, with ``best`` set on each optimizer's best rate (:func:`mark_best`)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["optimizer"], run["lr"]), []).append(run)
    order = list(dict.fromkeys(name for name, _ in groups))
    keys = sorted(groups, key=lambda key: (order.index(key[0]), key[1]))
    rows = [lr_row(name, lr, groups[name, lr]) for name, lr in keys]
    mark_best(rows)
    return rows


def lr_row(optimizer: str, lr: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the seeds of one (optimizer, lr): means over the finished runs, the median
    of their ms/step, the largest state and peak memory; per seed its value or status."""
    runs = sorted(runs, key=lambda r: r["seed"])
    ok = [r for r in runs if r["status"] == "ok"]
    vals = [r["val_bits_per_byte"] for r in ok]
    gpu = [r["peak_gpu_mb"] for r in ok if r.get("peak_gpu_mb") is not None]
    return {"optimizer": optimizer, "lr": lr, "seeds": [r["seed"] for r in runs],
            "by_seed": [r["val_bits_per_byte"] if r["status"] == "ok" else r["status"]
                        for r in runs],
            "finished": len(ok), "failed": len(runs) - len(ok),
            "val_mean": statistics.fmean(vals) if ok else None,
            "val_half_range": (max(vals) - min(vals)) / 2 if ok else None,
            "train_mean": statistics.fmean(r["train_bits_per_byte"] for r in ok) if ok else None,
            "ms_per_step": statistics.median(r["ms_per_step"] for r in ok) if ok else None,
            "optimizer_state_mb": max((r["optimizer_state_mb"] for r in ok), default=None),
            "peak_gpu_mb": max(gpu, default=None), "best": False}


def mark_best(rows: list[dict[str, Any]]) -> None:
    """Per optimizer, the row with the fewest failed seeds and, among those, the lowest mean
    validation loss gets ``best``; rows without a finished run never do."""
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        candidates = [r for r in rows if r["optimizer"] == name and r["finished"]]
        if candidates:
            min(candidates, key=lambda r: (r["failed"], r["val_mean"]))["best"] = True


def sweep_tables(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """The markdown table of every row (the best rates marked) and the one of the best."""
    return (rows_table(rows, mark=True),
            rows_table([r for r in rows if r["best"]], mark=False))


def rows_table(rows: list[dict[str, Any]], mark: bool) -> str:
    columns = ["optimizer", "lr", "best", "val_bits_per_byte"] if mark else \
        ["optimizer", "lr", "val_bits_per_byte"]
    if any(len(r["seeds"]) > 1 for r in rows):
        columns.append("val_by_seed")
    columns += ["train_bits_per_byte", "ms_per_step", "optimizer_state_mb"]
    if any(r["peak_gpu_mb"] is not None for r in rows):
        columns.append("peak_gpu_mb")
    return markdown_table([table_cells(r) for r in rows], columns,
                          headers=[SWEEP_HEADERS[c] for c in columns],
                          formats={**FORMATS, "lr": ".4g"})


def table_cells(row: dict[str, Any]) -> dict[str, Any]:
    """A row's cells: the validation loss as "1.262 ± 0.007" (one finished seed: "1.262"), its
    seeds as "1.262 / 1.260 / diverged"."""
    by_seed = [f"{v:.3f}" if isinstance(v, float) else v for v in row["by_seed"]]
    if not row["finished"]:
        val = " / ".join(dict.fromkeys(by_seed))
    elif row["finished"] == 1:
        val = f"{row['val_mean']:.3f}"
    else:
        val = f"{row['val_mean']:.3f} ± {row['val_half_range']:.3f}"
    return {"optimizer": row["optimizer"], "lr": row["lr"],
            "best": "best" if row["best"] else "", "val_bits_per_byte": val,
            "val_by_seed": " / ".join(by_seed), "train_bits_per_byte": row["train_mean"],
            "ms_per_step": row["ms_per_step"], "optimizer_state_mb": row["optimizer_state_mb"],
            "peak_gpu_mb": row["peak_gpu_mb"]}


def run_line(label: str, summary: dict[str, Any]) -> str:
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
    save_json(out / RESULTS, result)
    plot_curves(result["runs"], out / PLOT, title=result.get("setting"))


def save_json(path: Path, payload: dict[str, Any]) -> None:
    """Write through a temporary file, so that a Ctrl-C during the write leaves the
    previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


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
