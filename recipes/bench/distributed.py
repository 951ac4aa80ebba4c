"""Every memopt optimizer under DDP and FSDP2 against one process: equality, time, bytes.

    torchrun --standalone --nproc_per_node 2 -m memopt.recipes.bench.distributed \\
        [--device auto|cpu|cuda] [--steps 8] [--preset tiny] [--out FILE]

Each rank trains the preset's LLaMA on its share of the same batches, wrapped in DDP and then
in FSDP2 (``fully_shard`` per decoder layer), and rank 0 also runs the one-process reference
on the whole batches (for FSDP2 with low-rank bases on the column side, as FSDP2 uses them).
Printed per optimizer: the largest parameter difference to the reference, the median step
time of each mode, and the bytes per step this rank's optimizer sent into collectives
(``memopt.optim.distributed.communication_bytes``) beside the prediction of
:func:`predicted_bytes_per_step`. With one process it is a rehearsal of the same code path
(FSDP2 on a mesh of one).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from ...optim import create_optimizer
from ...optim.distributed import communication_bytes, reset_communication_bytes
from ..data import batch_at, load_corpus
from ..machine import environment
from ..presets import get_preset
from ..report import markdown_table, write_json
from ..train import build_model, init_distributed, next_byte_loss, wrap_model

NAMES = ("galore", "dct", "fira", "muon", "polargrad", "galore8bit", "dct8bit", "fira8bit",
         "muon8bit", "polargrad8bit")
LOWRANK = ("galore", "dct", "fira")


def predicted_bytes_per_step(model: torch.nn.Module, name: str, world: int, gap: int,
                             rank: int) -> float:
    """What one rank's optimizer sends per step under FSDP2 (row shards of dim 0).

    Every step: a 4-byte finiteness flag. Low-rank, at each refresh (every ``gap`` steps):
    SVD bases all-gather each projected matrix (this rank sends its padded shard,
    ceil(m / world) x n x 4 bytes), DCT all-reduces an n-vector (4n bytes); Fira adds a
    4-byte norm per projected matrix per step. Muon / PolarGrad: each matrix's padded shard
    of the update is gathered on its owner (ceil(m / world) x n x 4 bytes sent by every
    rank), and the owner scatters every rank's shard of the result (world x ceil(m / world)
    x n x wire bytes: 2 for bf16 on CUDA, 4 on the CPU); PolarGrad adds 4 bytes per matrix.
    Parameters that are not projected or orthogonalized send nothing (AdamW is local).
    """
    base = name.removesuffix("8bit")
    hidden = [p for n, p in model.named_parameters()
              if p.ndim >= 2 and "embed" not in n and "lm_head" not in n]
    total = 4.0
    wire = 2 if next(model.parameters()).is_cuda else 4
    for k, p in enumerate(hidden):
        m, n = p.shape[0], p.numel() // p.shape[0]
        shard = math.ceil(m / world) * n
        if base in LOWRANK:
            total += (4 * n if base == "dct" else 4 * shard) / gap
            total += 4 if base == "fira" else 0
        else:
            total += 4 * shard
            if k % world == rank:
                total += world * shard * wire
            total += 4 if base == "polargrad" else 0
    return total


def run(name: str, mode: str | None, preset: Any, corpus: Any, device: torch.device,
        steps: int, rank: int, world: int, column_side: bool) -> dict[str, Any]:
    """``steps`` steps of one optimizer; mode None = this process alone on whole batches."""
    model = build_model(preset, device, seed=0)
    trained = wrap_model(model, mode, device) if mode else model
    kwargs = preset.optimizer_kwargs(name)
    if column_side and name.removesuffix("8bit") in LOWRANK:
        kwargs["projector_options"] = {"side": "right"}
    opt = create_optimizer(name, model, **kwargs)
    share = preset.batch_size // (world if mode else 1)
    part = rank if mode else 0
    times = []
    reset_communication_bytes()
    for step in range(steps):
        x, y = batch_at(corpus.train, step, preset.batch_size, preset.seq_len, 0, device)
        x, y = x[part * share:(part + 1) * share], y[part * share:(part + 1) * share]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = next_byte_loss(trained, x, y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    sent = sum(communication_bytes().values())
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu()
              for n, p in model.named_parameters()}
    start = {n: p.detach().float().cpu() for n, p in build_model(preset, device, 0).named_parameters()}
    gap = preset.update_proj_gap
    return {"params": params, "moved": max_difference(params, start), "loss": loss.item(),
            "ms": statistics.median(times[1:] or times),
            "bytes_per_step": sent / steps,
            "predicted": predicted_bytes_per_step(model, name, world, gap, rank)
            if mode == "fsdp" else 0.0}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"torchrun --nproc_per_node N -m {__spec__.name}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--only", default=None, help="comma-separated optimizer names")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rank, world, device = init_distributed(args.device)
    # a short refresh gap so that a basis refresh and its traffic fall inside the run
    preset = get_preset(args.preset, steps=args.steps, update_proj_gap=max(2, args.steps // 2))
    corpus = load_corpus(None)
    names = args.only.split(",") if args.only else NAMES
    rows = []
    for name in names:
        refs = {}
        if rank == 0:
            refs = {side: run(name, None, preset, corpus, device, args.steps, 0, world, side)
                    for side in (False, True)}
        ddp = run(name, "ddp", preset, corpus, device, args.steps, rank, world, False)
        fsdp = run(name, "fsdp", preset, corpus, device, args.steps, rank, world, True)
        if rank == 0:
            rows.append({"optimizer": name, "final_loss": refs[False]["loss"],
                         "max_param_change": refs[False]["moved"],
                         "ddp_max_diff": max_difference(ddp["params"], refs[False]["params"]),
                         "fsdp_max_diff": max_difference(fsdp["params"], refs[True]["params"]),
                         "one_process_ms": refs[False]["ms"], "ddp_ms": ddp["ms"],
                         "fsdp_ms": fsdp["ms"], "ddp_optimizer_bytes": ddp["bytes_per_step"],
                         "fsdp_optimizer_bytes": fsdp["bytes_per_step"],
                         "fsdp_predicted_bytes": fsdp["predicted"]})
            print(rows[-1], flush=True)
        dist.barrier()
    if rank == 0:
        env = {**environment(device), "world_size": world, "steps": args.steps,
               "preset": preset.name, "update_proj_gap": preset.update_proj_gap}
        print(f"\n{env}\n")
        print(markdown_table(rows, list(rows[0])))
        write_json(args.out, {"environment": env, "rows": rows})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
