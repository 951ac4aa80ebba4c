"""Step time and state bytes of every optimizer on the same parameters, in one process.

    python -m memopt.recipes.bench.step [--device cuda] [--only NAME,...] [--out FILE]
                                        [--profile FILE]

The parameters are four LLaMA-1B blocks (hidden 2048, intermediate 5461: 28 matrices and 8
norm vectors, fp32, about 201M parameters; a quarter of the width on the CPU), with fixed
random gradients. For each optimizer: the first step (state creation and, for low-rank
methods, the first basis), the median of the following steps (no refresh), a refresh step
timed apart (ours: the basis rebuilt from the previous one), bytes of optimizer state per
parameter, and the step-time ratio to torch.optim.AdamW(fused=True) measured in the same run.
The GPU is kept busy for two seconds first, so that the baseline, timed first, does not run
at an idle clock (it measured up to 25% slower that way).
``--profile FILE`` appends, per optimizer, torch.profiler's table of the kernels of three
non-refresh steps (device time per kernel, and the host time of the whole step).
The "projection_precision=medium" rows multiply bf16 factors (fp32 sums and results) in the
step's projections and lifts instead of TF32 ones. The two steps after the first one are
not timed (warm-up).
``--products`` adds a row for the matrix products alone, a floor under every low-rank step:
each matrix's projection and lift (``project_onto`` and ``executors_lowrank.lift_into_``,
TF32 on CUDA, on random orthonormal bases of the rank), one after another, eagerly.
Peers (bitsandbytes, galore-torch, fira) are measured when installed (``pip install
memopt[bench]``), bitsandbytes imported without its CPU notice (``states.import_bitsandbytes``).
``--only`` keeps the rows whose names contain one of its filters (any case) and the AdamW
baseline; a filter that matches no row is refused.
"""

from __future__ import annotations

import gc
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ... import optim as mo
from ...optim.states import import_bitsandbytes
from ..arguments import ArgumentParser
from ..machine import environment, resolve_device
from ..peers import import_peer, peer_state_bytes
from ..report import markdown_table, write_json
from .timing import median, synchronize, time_ms, warm_up


@dataclass
class Entry:
    name: str
    build: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.optim.Optimizer]
    ours: bool = False
    lowrank: bool = False
    slow: bool = False


def llama_blocks(n_blocks: int, hidden: int, intermediate: int, device: torch.device,
                 seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights of ``n_blocks`` LLaMA decoder blocks: 7 matrices and 2 norm vectors each,
    with fixed random gradients in ``.grad``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    matrices, vectors = [], []
    for _ in range(n_blocks):
        for shape in shapes:
            w = torch.randn(shape, generator=gen) * 0.02
            matrices.append(torch.nn.Parameter(w.to(device)))
        vectors += [torch.nn.Parameter(torch.ones(hidden, device=device)) for _ in range(2)]
    for p in matrices + vectors:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return matrices, vectors


def stepper(opt: torch.optim.Optimizer, params: list[torch.Tensor],
            grads: list[torch.Tensor]) -> Callable[[], None]:
    """opt.step() on the fixed gradients ``grads``. They are re-bound (not copied) before
    every step, because galore-torch's 8-bit class replaces p.grad by its projection."""
    def step() -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return step


def entries(rank: int) -> list[Entry]:
    def lowrank(cls: type, **kw: Any) -> Callable:
        return lambda mats, vecs: cls([{"params": mats, "rank": rank, **kw},
                                       {"params": vecs, "adamw": True}], lr=1e-3)

    def polar(cls: type, **kw: Any) -> Callable:
        return lambda mats, vecs: cls([{"params": mats}, {"params": vecs, "adamw": True}],
                                      lr=0.02, **kw)

    out = [Entry("torch AdamW (fused)", lambda m, v: torch.optim.AdamW(
        m + v, lr=1e-3, fused=True))]
    try:
        bnb = import_bitsandbytes("the bitsandbytes AdamW8bit row")
        out.append(Entry("bitsandbytes AdamW8bit", lambda m, v: bnb.optim.AdamW8bit(m + v, lr=1e-3)))
    except ImportError:
        pass
    try:
        galore_torch = import_peer("galore_torch")

        def galore(cls: type, **kw: Any) -> Callable:
            return lambda m, v: cls([{"params": m, "rank": rank, "update_proj_gap": 200,
                                      "scale": 0.25, "proj_type": "std"}, {"params": v}],
                                    lr=1e-3, **kw)
        out.append(Entry("galore-torch GaLoreAdamW",
                         galore(galore_torch.GaLoreAdamW, no_deprecation_warning=True)))
        out.append(Entry("galore-torch GaLoreAdamW8bit", galore(galore_torch.GaLoreAdamW8bit)))
    except ImportError:
        pass
    try:
        fira = import_peer("fira")
        out.append(Entry("fira FiraAdamW", lambda m, v: fira.FiraAdamW(
            [{"params": m, "rank": rank, "update_proj_gap": 200, "alpha": 0.25,
              "proj_type": "std"}, {"params": v}], lr=1e-3, no_deprecation_warning=True)))
    except ImportError:
        pass
    out += [
        Entry("memopt GaLoreAdamW", lowrank(mo.GaLoreAdamW), ours=True, lowrank=True),
        Entry("memopt GaLoreAdamW (check_finite=False)", lowrank(mo.GaLoreAdamW, check_finite=False),
              ours=True, lowrank=True),
        Entry("memopt GaLoreAdamW (svd randomized)", lowrank(
            mo.GaLoreAdamW, projector_options={"method": "randomized"}), ours=True, lowrank=True),
        Entry("memopt GaLoreAdamW (polar)", lowrank(mo.GaLoreAdamW, projector="polar"),
              ours=True, lowrank=True),
        Entry("memopt GaLoreAdamW8bit", lowrank(mo.GaLoreAdamW8bit), ours=True, lowrank=True),
        Entry("memopt DCTAdamW", lowrank(mo.DCTAdamW), ours=True, lowrank=True),
        Entry("memopt DCTAdamW (check_finite=False)", lowrank(mo.DCTAdamW, check_finite=False),
              ours=True, lowrank=True),
        Entry("memopt DCTAdamW8bit", lowrank(mo.DCTAdamW8bit), ours=True, lowrank=True),
        Entry("memopt FiraAdamW", lowrank(mo.FiraAdamW), ours=True, lowrank=True),
        Entry("memopt FiraAdamW8bit", lowrank(mo.FiraAdamW8bit), ours=True, lowrank=True),
        # the orthogonalized rule in a subspace: Trion selects DCT columns every step
        Entry("memopt Trion", lowrank(mo.Trion), ours=True, lowrank=True),
        Entry("memopt Trion8bit", lowrank(mo.Trion8bit), ours=True, lowrank=True),
        Entry("memopt GaLoreMuon", lowrank(mo.GaLoreMuon), ours=True, lowrank=True),
    ]
    for cls in (mo.GaLoreAdamW, mo.DCTAdamW, mo.FiraAdamW):     # bf16 factors
        out.append(Entry(f"memopt {cls.__name__} (projection_precision=medium)",
                         lowrank(cls, projection_precision="medium"), ours=True, lowrank=True))
    if hasattr(torch.optim, "Muon"):
        out.append(Entry("torch.optim.Muon (matrices only)",
                         lambda m, v: torch.optim.Muon(m, lr=0.02, weight_decay=0.0)))
    for method in ("newton_schulz", "polar_express", "svd"):
        slow = method == "svd"
        out.append(Entry(f"memopt Muon ({method})", polar(mo.Muon, orthogonalizer=method),
                         ours=True, slow=slow))
        out.append(Entry(f"memopt PolarGrad ({method})", polar(mo.PolarGrad, orthogonalizer=method),
                         ours=True, slow=slow))
    out.append(Entry("memopt Muon (newton_schulz, check_finite=False)",
                     polar(mo.Muon, check_finite=False), ours=True))
    out.append(Entry("memopt Muon8bit", polar(mo.Muon8bit), ours=True))
    return out


def products_rows(matrices: list[torch.Tensor], grads: list[torch.Tensor], rank: int,
                  device: torch.device, steps: int) -> list[dict[str, Any]]:
    """Time of the low-rank products alone: for each matrix, its projection onto a random
    orthonormal basis of ``rank`` (on the smaller side) and the lift of the result added
    into a copy of the weight, as the low-rank step does them, one after another."""
    from ...optim.executors import precision
    from ...optim.executors_lowrank import lift_into_
    from ...projections.base import project_onto, resolve_side
    weights = fresh_copy(matrices)
    sides = [resolve_side("auto", tuple(W.shape)) for W in weights]
    gen = torch.Generator(device="cpu").manual_seed(1)
    bases_ = [torch.linalg.qr(torch.randn(W.shape[0] if side == "left" else W.shape[1], rank,
                                          generator=gen))[0].to(device)
              for W, side in zip(weights, sides)]
    outs = [torch.empty((rank, W.shape[1]) if side == "left" else (W.shape[0], rank),
                        device=device) for W, side in zip(weights, sides)]
    flops = sum(4 * W.numel() * rank for W in weights)

    def work() -> None:
        with precision("auto", device):
            for i in range(len(weights)):
                project_onto(grads[i], bases_[i], sides[i], out=outs[i])
                lift_into_(weights[i].data, outs[i], bases_[i], sides[i], -1e-6, 1.0)
    ms = median(time_ms(work, device, repeats=steps, warmup=2))
    return [{"optimizer": "products only (1 stream)", "step_ms": ms, "tflops": flops / ms / 1e9}]


def force_refresh(opt: torch.optim.Optimizer, step: Callable[[], None]) -> Callable[[], None]:
    """One ``step`` of ``opt`` (a memopt low-rank optimizer) that rebuilds every basis."""
    def refresh_step() -> None:
        gaps = [g["update_proj_gap"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["update_proj_gap"] = 1
        try:
            step()
        finally:
            for g, gap in zip(opt.param_groups, gaps):
                g["update_proj_gap"] = gap
    return refresh_step


def fresh_copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """New parameters with the same values (a peer that fails mid-step may leave its
    parameters changed: galore-torch's 8-bit class swaps p.data for a projection)."""
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def profile_table(step: Callable[[], None], device: torch.device, steps: int = 3) -> str:
    """torch.profiler's kernel table for ``steps`` calls of ``step`` (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)


def run_entry(entry: Entry, master_matrices: list[torch.Tensor],
              master_vectors: list[torch.Tensor], grads: list[torch.Tensor],
              device: torch.device, steps: int, profile_to: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"optimizer": entry.name}
    matrices, vectors = fresh_copy(master_matrices), fresh_copy(master_vectors)
    n_params = sum(p.numel() for p in matrices + vectors)
    opt = step = None
    try:
        opt = entry.build(matrices, vectors)
        step = stepper(opt, matrices + vectors, grads)
        first = time_ms(step, device, repeats=1, warmup=0)[0]
        row["first_step_ms"] = first
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        reps, warm = (1, 0) if entry.slow else (steps, 2)
        for _ in range(warm):
            step()
        row["step_ms"] = median(time_ms(step, device, repeats=reps, warmup=0))
        if device.type == "cuda":
            row["step_peak_extra_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        if entry.ours and entry.lowrank:
            row["refresh_ms"] = median(time_ms(force_refresh(opt, step), device, repeats=2,
                                               warmup=0))
        row["state_bytes_per_param"] = (mo.state_bytes(opt) if entry.ours
                                        else peer_state_bytes(opt)) / n_params
        if profile_to and not entry.slow:
            with open(profile_to, "a") as f:
                f.write(f"\n## {entry.name} (3 steps)\n{profile_table(step, device)}\n")
    except Exception as exc:     # a peer that crashes is a result, not a reason to stop
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        traceback.print_exc()
    finally:
        del opt, step, matrices, vectors     # step holds opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        synchronize(device)
    return row


def select(entries_: list[Entry], only: str | None) -> list[Entry]:
    """The entries whose names contain one of the comma-separated ``only`` filters (any
    case), and the AdamW baseline; ValueError naming each filter that matches nothing."""
    if not only:
        return entries_
    keys = [k.strip() for k in only.split(",") if k.strip()]
    unmatched = [k for k in keys if not any(k.lower() in e.name.lower() for e in entries_)]
    if unmatched or not keys:
        raise ValueError(f"no row's name contains {', '.join(map(repr, unmatched or [only]))} "
                         f"(rows: {', '.join(e.name for e in entries_)})")
    return [e for e in entries_ if any(k.lower() in e.name.lower() for k in keys)
            or e.name.startswith("torch AdamW")]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = ArgumentParser(prog=prog or f"python -m {__spec__.name}",
                            description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=None, help="2048 on GPU, 512 on CPU")
    parser.add_argument("--intermediate", type=int, default=None, help="5461 on GPU, 1365 on CPU")
    parser.add_argument("--rank", type=int, default=None, help="512 on GPU, 128 on CPU")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--only", default=None,
                        help="comma-separated parts of row names, any case (each must match)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--profile", default=None, help="append kernel tables to this file")
    parser.add_argument("--products", action="store_true",
                        help="add rows for the low-rank matrix products alone")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    hidden = args.hidden or (2048 if gpu else 512)
    intermediate = args.intermediate or (5461 if gpu else 1365)
    rank = args.rank or (512 if gpu else 128)
    try:
        selected = select(entries(rank), args.only)
    except ValueError as exc:
        parser.error(f"argument --only: {exc}")
    matrices, vectors = llama_blocks(args.blocks, hidden, intermediate, device)
    grads = [p.grad for p in matrices + vectors]
    for p in matrices + vectors:
        p.grad = None
    n_params = sum(p.numel() for p in matrices + vectors)
    warm_up(device)
    rows = []
    for entry in selected:
        rows.append(run_entry(entry, matrices, vectors, grads, device, args.steps, args.profile))
        print(f"done {entry.name}: {rows[-1]}", flush=True)
    if args.products:
        rows += products_rows(matrices, grads[:len(matrices)], rank, device, args.steps)
        print(f"done products: {rows[-1:]}", flush=True)
    base = next((r["step_ms"] for r in rows if r["optimizer"].startswith("torch AdamW")
                 and "step_ms" in r), math.nan)
    muon = next((r["step_ms"] for r in rows if r["optimizer"].startswith("torch.optim.Muon")
                 and "step_ms" in r), math.nan)
    for r in rows:
        if "step_ms" in r:
            r["vs_fused_adamw"] = r["step_ms"] / base
            r["vs_torch_muon"] = r["step_ms"] / muon if "Muon" in r["optimizer"] or \
                "PolarGrad" in r["optimizer"] else None
    env = environment(device)
    print(f"\n{args.blocks} LLaMA blocks (hidden {hidden}, intermediate {intermediate}), "
          f"{n_params / 1e6:.1f}M fp32 parameters, rank {rank}; {env}\n")
    print(markdown_table(rows, ["optimizer", "step_ms", "vs_fused_adamw", "vs_torch_muon",
                                "first_step_ms", "refresh_ms", "state_bytes_per_param",
                                "step_peak_extra_mb", "tflops", "error"]))
    write_json(args.out, {"environment": env, "hidden": hidden, "intermediate": intermediate,
                          "blocks": args.blocks, "rank": rank, "n_params": n_params,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
