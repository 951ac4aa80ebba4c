"""How much of each projected gradient's energy a rank-r basis keeps, over training: why
DCTAdamW learns slower than GaLoreAdamW (issue 28).

    python -m memopt.recipes.bench.subspace_energy --preset small --device cuda \\
        --steps 2000 --every 100 --data stdlib --out FILE.json

Trains the preset's model as `memopt train` does (recipes/train.py's ``Run``: the same model,
batches and schedule; GaLoreAdamW, or DCTAdamW with ``--optimizer dct``) and, every
``--every`` steps (and at the first and last), reads the gradient G (m x n) of every
projected matrix before the optimizer steps. For a basis B (d x r) on the projector's side
(the smaller one, as the optimizers choose), the fraction of ||G||_F^2 it keeps is
||G B||^2 / ||G||^2 (right, d = n) or ||B^T G||^2 / ||G||^2 (left, d = m). The bases:

- ``svd``: G's top-r singular vectors on that side, the most any r columns keep (Ky Fan);
- ``dct_l2``, ``dct_l1``: the r DCT-II columns chosen from G now
  (``projections.dct.select_dct_indices``), ranked by the L2 norm of G's coefficients
  (DCTAdamW's default) or by their L1 norm (the authors' ``ell_norm=1``);
- ``dct_stale``: the columns chosen at the last DCT refresh (every ``--dct-gap`` steps,
  DCTAdamW's 50), applied to today's G: what DCTAdamW projects with;
- ``svd_stale``: the SVD basis of the last refresh (every ``--svd-gap`` steps, the preset's
  200): what GaLoreAdamW projects with; ``svd_stale_dct_gap``: the same refreshed every
  ``--dct-gap`` steps, which separates the basis from how often it is refreshed;
- ``dct_iter``: one step of subspace iteration from the DCT columns chosen now,
  orth(G^T G B) (right) or orth(G G^T B) (left); ``dct_iter_stale``: the same made at the last
  DCT refresh and applied to today's G (what a DCT basis refined once at each refresh keeps).

Refreshes fall where the optimizers' do (steps 1, 1 + gap, 1 + 2 gap, ...), from that step's
gradient, so the stale bases are those the optimizer trained holds (or the other would).
Energies are computed in float64; the probe only reads gradients, so training is that of
`memopt train` with the same arguments. The tables give the mean per layer kind (q, k, v, o,
gate, up, down; over layers and the measured steps after the first) and per measured step
(over all matrices); the JSON holds every matrix at every measured step.
"""

from __future__ import annotations

import argparse
import inspect
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...projections.base import resolve_side
from ...projections.dct import dct_columns, dct_energy, select_dct_indices
from ..arguments import (ArgumentParser, non_negative_int, positive_float, positive_int,
                         warmup_fraction)
from ..machine import use_available_cores
from ..presets import PRESETS
from ..report import markdown_table, write_json
from ..train import Run, RunConfig

#: measure -> what it is (the module docstring has the details)
MEASURES = {
    "svd": "top-r singular vectors of G now (the optimum)",
    "dct_l2": "r DCT columns chosen from G now by L2 score (DCTAdamW's default)",
    "dct_l1": "r DCT columns chosen from G now by L1 score (the authors' ell_norm=1)",
    "dct_stale": "DCT columns of the last DCT refresh (what DCTAdamW projects with)",
    "svd_stale": "SVD basis of the last SVD refresh (what GaLoreAdamW projects with)",
    "svd_stale_dct_gap": "SVD basis refreshed at the DCT's gap",
    "dct_iter": "one subspace iteration from the DCT columns chosen now",
    "dct_iter_stale": "one subspace iteration from the DCT columns, made at the last DCT refresh",
}
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
OPTIMIZERS = ("galore", "dct")


def kind_of(name: str) -> str:
    """"model.layers.3.self_attn.q_proj.weight" -> "q"; "mlp.down_proj.weight" -> "down"."""
    parts = name.split(".")
    return parts[-2].removesuffix("_proj") if len(parts) > 1 else name


def kept(G: Tensor, B: Tensor, side: str) -> float:
    """||G B||_F^2 (right) or ||B^T G||_F^2 (left): the energy of G that basis B keeps."""
    return float((G @ B if side == "right" else B.mT @ G).square().sum())


def top_basis(G: Tensor, side: str, r: int) -> tuple[Tensor, float]:
    """G's top-r singular vectors on ``side`` (d x r) and the energy they keep, the sum of the
    r largest squared singular values: the eigenpairs of G^T G (right) or G G^T (left)."""
    values, vectors = torch.linalg.eigh(G.mT @ G if side == "right" else G @ G.mT)
    return vectors[:, -r:].flip(-1), float(values[-r:].clamp(min=0).sum())


def iterate_once(G: Tensor, side: str, B: Tensor) -> Tensor:
    """One step of subspace iteration from the orthonormal B: orth(G^T G B) (right) or
    orth(G G^T B) (left), orthonormalised by a thin QR."""
    return torch.linalg.qr(G.mT @ (G @ B) if side == "right" else G @ (G.mT @ B)).Q


def dct_basis(G: Tensor, side: str, indices: Tensor) -> Tensor:
    d = G.shape[1] if side == "right" else G.shape[0]
    return dct_columns(d, indices, G.dtype)


@dataclass
class Held:
    """The bases of one matrix's last refreshes, and the steps they were made at."""
    dct: Tensor | None = None               # indices
    dct_iter: Tensor | None = None
    dct_step: int = 0
    svd: Tensor | None = None
    svd_step: int = 0
    svd_dct_gap: Tensor | None = None


def default_dct_gap() -> int:
    """DCTAdamW's own refresh gap (50), read from its signature."""
    from ...optim import DCTAdamW
    parameter = inspect.signature(DCTAdamW).parameters.get("update_proj_gap")
    return parameter.default if parameter is not None and \
        isinstance(parameter.default, int) else 50


class EnergyProbe:
    """Measures the kept fractions in a step pre-hook of ``run``'s optimizer.

    ``dct_norm``: the score the stale DCT columns (and ``dct_iter``) are chosen by."""

    def __init__(self, run: Run, every: int, dct_gap: int, svd_gap: int,
                 dct_norm: str = "l2") -> None:
        self.run, self.every, self.dct_gap, self.svd_gap = run, every, dct_gap, svd_gap
        self.dct_norm = dct_norm
        names = {id(p): n for n, p in run.model.named_parameters()}
        optimizer = run.optimizer
        self.matrices: list[tuple[str, Tensor, int, str]] = []
        for group in optimizer.param_groups:
            side = (group.get("projector_options") or {}).get("side", "auto")
            for p in group["params"]:
                if optimizer.is_projected(group, p):
                    self.matrices.append((names[id(p)], p, group["rank"], side))
        if not self.matrices:
            raise ValueError("no matrix is projected: nothing to measure")
        self.held = {name: Held() for name, *_ in self.matrices}
        self.records: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.handle = optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = self.run.step + 1                     # the step the optimizer is about to take
        measure = step == 1 or step % self.every == 0 or step == self.run.preset.steps
        refresh_dct = (step - 1) % self.dct_gap == 0
        refresh_svd = (step - 1) % self.svd_gap == 0
        if not (measure or refresh_dct or refresh_svd):
            return
        start = time.perf_counter()
        with torch.no_grad():
            rows = [self.matrix(name, p.grad, rank, side, step, measure, refresh_dct,
                                refresh_svd)
                    for name, p, rank, side in self.matrices if p.grad is not None]
        if measure:
            self.records.append({"step": step, "matrices": [r for r in rows if r]})
        self.seconds += time.perf_counter() - start

    def matrix(self, name: str, grad: Tensor, rank: int, side: str, step: int, measure: bool,
               refresh_dct: bool, refresh_svd: bool) -> dict[str, Any] | None:
        """Refresh what is due for one matrix; at a measured step, its row of fractions."""
        G = grad.reshape(grad.shape[0], -1).double()
        side = resolve_side(side, tuple(G.shape))
        r = min(rank, G.shape[1] if side == "right" else G.shape[0])
        held, top = self.held[name], None
        chosen = select_dct_indices(G, side, r, norm=self.dct_norm)
        if refresh_dct:
            top = top_basis(G, side, r)
            held.dct, held.dct_step, held.svd_dct_gap = chosen, step, top[0]
            held.dct_iter = iterate_once(G, side, dct_basis(G, side, chosen))
        if refresh_svd:
            top = top or top_basis(G, side, r)
            held.svd, held.svd_step = top[0], step
        total = float(G.square().sum())
        if not measure or total == 0:
            return None
        top = top or top_basis(G, side, r)
        energy = dct_energy(G, side, norm="l2")          # sums to ||G||^2 (orthonormal DCT)
        pick = {norm: chosen if norm == self.dct_norm else
                select_dct_indices(G, side, r, norm=norm) for norm in ("l2", "l1")}
        energies = {
            "svd": top[1],
            "dct_l2": float(energy[pick["l2"]].sum()),
            "dct_l1": float(energy[pick["l1"]].sum()),
            "dct_stale": float(energy[held.dct].sum()),
            "svd_stale": kept(G, held.svd, side),
            "svd_stale_dct_gap": kept(G, held.svd_dct_gap, side),
            "dct_iter": kept(G, iterate_once(G, side, dct_basis(G, side, chosen)), side),
            "dct_iter_stale": kept(G, held.dct_iter, side),
        }
        return {"name": name, "kind": kind_of(name), "shape": list(G.shape), "side": side,
                "rank": r, "grad_norm": math.sqrt(total), "dct_age": step - held.dct_step,
                "svd_age": step - held.svd_step,
                **{k: v / total for k, v in energies.items()}}


# ------------------------------------------------------------------ summaries
def means(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {m: statistics.fmean(r[m] for r in rows) for m in MEASURES}


def by_kind(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer kind, the mean over layers and over the measured steps after the first."""
    later = [r for r in records if r["step"] > 1] or records
    rows = [m for r in later for m in r["matrices"]]
    kinds = [k for k in KINDS if any(m["kind"] == k for m in rows)]
    kinds += sorted({m["kind"] for m in rows} - set(kinds))
    out = []
    for kind in kinds:
        chosen = [m for m in rows if m["kind"] == kind]
        out.append({"kind": kind, "shape": "x".join(map(str, chosen[0]["shape"])),
                    "side": chosen[0]["side"], "rank": chosen[0]["rank"], **means(chosen)})
    return out + [{"kind": "all", **means(rows)}] if rows else out


def by_step(records: list[dict[str, Any]], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per measured step, the mean over all matrices, with the step's training loss."""
    loss = {h["step"]: h["loss"] for h in history}
    return [{"step": r["step"], "loss": loss.get(r["step"]),
             "dct_age": r["matrices"][0]["dct_age"], "svd_age": r["matrices"][0]["svd_age"],
             **means(r["matrices"])} for r in records if r["matrices"]]


def tables(kinds: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, str]:
    formats = {m: ".3f" for m in MEASURES} | {"loss": ".3f"}
    return {"by_kind": markdown_table(kinds, ["kind", "shape", "side", *MEASURES],
                                      formats=formats),
            "by_step": markdown_table(steps, ["step", "loss", "dct_age", "svd_age", *MEASURES],
                                      formats=formats)}


# ------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m memopt.recipes.bench.subspace_energy",
                       description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--optimizer", default="galore", choices=OPTIMIZERS,
                   help="the optimizer trained (default: galore); both are measured")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps (default: the preset's)")
    p.add_argument("--every", type=positive_int, default=100,
                   help="measure every N steps, and at the first and the last (default: 100)")
    p.add_argument("--data", default=None, help="as `memopt train --data` (default: stdlib)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--lr", type=positive_float, default=None)
    p.add_argument("--rank", type=positive_int, default=None)
    p.add_argument("--warmup", type=warmup_fraction, default=None, metavar="FRACTION")
    p.add_argument("--dct-gap", type=positive_int, default=None,
                   help="steps between DCT refreshes (default: the trained DCTAdamW's, else "
                        "DCTAdamW's default, 50)")
    p.add_argument("--svd-gap", type=positive_int, default=None,
                   help="steps between SVD refreshes (default: the trained GaLoreAdamW's, "
                        "else the preset's)")
    p.add_argument("--out", default=None, metavar="FILE.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Train with the probe on; return the JSON record (settings, every row, summaries)."""
    run = Run(RunConfig(optimizer=args.optimizer, preset=args.preset, lr=args.lr,
                        rank=args.rank, steps=args.steps, data=args.data, warmup=args.warmup,
                        device=args.device, seed=args.seed, progress=not args.no_progress))
    group = next(g for g in run.optimizer.param_groups if not g["adamw"])
    trained_gap = group["update_proj_gap"]
    dct_gap = args.dct_gap or (trained_gap if args.optimizer == "dct" else default_dct_gap())
    svd_gap = args.svd_gap or (trained_gap if args.optimizer == "galore"
                               else run.preset.update_proj_gap)
    norm = (group.get("projector_options") or {}).get("norm", "l2") \
        if args.optimizer == "dct" else "l2"
    probe = EnergyProbe(run, args.every, dct_gap, svd_gap, norm)
    start = time.perf_counter()
    summary = run.train()
    train_s = time.perf_counter() - start
    kinds, steps = by_kind(probe.records), by_step(probe.records, run.history)
    return {"command": " ".join(["python -m memopt.recipes.bench.subspace_energy",
                                 *sys.argv[1:]]) if args.out else None,
            "settings": {"optimizer": args.optimizer, "preset": run.preset.name,
                         "steps": run.preset.steps, "every": args.every,
                         "warmup": run.preset.warmup, "lr": run.optimizer_kwargs["lr"],
                         "rank": group["rank"], "dct_gap": dct_gap, "svd_gap": svd_gap,
                         "dct_norm": norm, "seed": args.seed, "device": str(run.device)},
            "corpus": run.corpus.describe(), "measures": MEASURES,
            "train_loss": summary["train_loss"], "val_loss": summary["val_loss"],
            "train_s": train_s, "probe_s": probe.seconds,
            "by_kind": kinds, "by_step": steps, "tables": tables(kinds, steps),
            "records": probe.records}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_available_cores()
    result = measure(args)
    s = result["settings"]
    print(f"{s['optimizer']} on {result['corpus']}, preset {s['preset']}, {s['steps']} steps, "
          f"rank {s['rank']}, DCT gap {s['dct_gap']} ({s['dct_norm']}), SVD gap "
          f"{s['svd_gap']}: kept fraction of ||G||^2; probe {result['probe_s']:.1f} s of "
          f"{result['train_s']:.1f} s trained; final train loss {result['train_loss']:.3f}, "
          f"validation {result['val_loss']:.3f} nats/byte")
    print("\nBy layer kind (mean over layers and measured steps after the first):\n")
    print(result["tables"]["by_kind"])
    print("\nBy step (mean over all projected matrices):\n")
    print(result["tables"]["by_step"])
    if args.out:
        write_json(args.out, result)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
