"""`memopt compare`: the same pretraining run with several optimizers, side by side.

Every optimizer gets the same model initialisation, the same batches in the same order and
the same schedule; the table shows what each gains and loses (final losses, bits per byte,
time per step, optimizer-state memory, peak GPU memory), and ``results.json`` and
``loss_curves.png`` in ``--out`` keep the details.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .data import load_corpus
from .timing import environment, markdown_table, resolve_device
from .train import RunConfig, train

DEFAULT_OPTIMIZERS = ("adamw", "galore", "dct", "fira", "muon", "polargrad")
COLUMNS = ("optimizer", "lr", "train_loss", "val_loss", "val_bits_per_byte", "ms_per_step",
           "optimizer_state_mb", "peak_gpu_mb")


def compare(optimizers: list[str], base: RunConfig, out: str | Path) -> dict[str, Any]:
    """Train ``base`` once per optimizer; write results.json and loss_curves.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(base.data)
    runs = []
    for name in optimizers:
        cfg = RunConfig(**{**vars(base), "optimizer": name, "out": str(out / name),
                           "resume": False})
        summary = train(cfg, corpus)
        runs.append(summary)
        print(f"{name:>12}: train {summary['train_loss']:.4f}  val {summary['val_loss']:.4f}  "
              f"{summary['ms_per_step']:.1f} ms/step  "
              f"state {summary['optimizer_state_mb']:.2f} MB", flush=True)
    device = resolve_device(base.device)
    result = {"environment": environment(device), "corpus": corpus.describe(),
              "preset": runs[0]["preset"] if runs else base.preset, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot_curves(runs, out / "loss_curves.png")
    rows = [{k: r.get(k) for k in COLUMNS} for r in runs]
    result["table"] = markdown_table(rows, COLUMNS)
    return result


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    """Training loss (smoothed) and validation loss per optimizer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        steps = [h["step"] for h in run["history"]]
        losses = [h["loss"] for h in run["history"]]
        window = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax_train.plot(steps, smooth, label=run["optimizer"])
        evals = [(h["step"], h["val_loss"]) for h in run["history"] if "val_loss" in h]
        if evals:
            ax_val.plot(*zip(*evals), marker="o", label=run["optimizer"])
    for ax, title in ((ax_train, "train loss (nats/byte, smoothed)"),
                      (ax_val, "validation loss (nats/byte)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    finite = [h["loss"] for r in runs for h in r["history"] if math.isfinite(h["loss"])]
    if finite:
        ax_train.set_ylim(min(finite) - 0.1, min(max(finite), min(finite) + 3.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
