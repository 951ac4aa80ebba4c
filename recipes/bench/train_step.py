"""The whole training step (forward + backward + optimizer) of a LLaMA, per optimizer.

    python -m memopt.recipes.bench.train_step [--device cuda] [--only NAME,...] [--repeats 2]
        [--steps 20] [--warmup 5] [--out FILE.json]

What: a ``LlamaForCausalLM`` built from a ``LlamaConfig`` (default hidden 1024, 12 layers,
intermediate 2736, vocabulary 32000, 16 heads: 216.8M parameters; no download), fp32 weights,
bf16 autocast, batch 8 x 512 random tokens. Per optimizer: milliseconds per step and tokens/s;
the peak GPU memory (``torch.cuda.max_memory_allocated``) of the steady state and of a basis
refresh step, reported apart; optimizer state in bytes, total and per parameter
(``memopt.optim.state_bytes`` for memopt; the tensors in the state, looked for inside the
objects peers keep there, for the others). Rows: torch AdamW (fused), bitsandbytes AdamW8bit,
galore-torch GaLoreAdamW (its README's groups: the Linear weights of modules named "attn" or
"mlp" with rank, gap, scale 0.25, proj_type "std"; the rest plain), torch.optim.Muon on the
hidden matrices stepped with a fused torch AdamW on the rest, and memopt's GaLoreAdamW,
DCTAdamW, FiraAdamW, GaLoreAdamW8bit, DCTAdamW8bit, Muon and PolarGrad, each built with
``param_groups(model, ...)`` (embeddings, head and norms on AdamW inside the optimizer).
A peer that is not installed is skipped with a note.

How: every (repeat, optimizer) runs in a fresh process (in one process, later rows inherited
about 0.8 GB of allocator state from earlier ones), and the repeats are interleaved: repeat r
runs every row once, in order, so a drift of the machine (clocks, neighbours) spreads over all
rows instead of landing on one. In a process: the GPU is kept busy for half a second (an idle
GPU runs at a low clock), ``--warmup`` steps are run (step 0 builds the state and the first
bases), then ``--steps`` steps are timed as one window between CUDA events, with no
synchronization inside it beyond what the optimizers do themselves: the process's ms per step
is the window over the steps (hiccups included, as a training run gets them; the JSON also has
every step's time); the window's peak memory is the steady peak. The low-rank rows refresh
their bases every ``warmup + steps`` steps (instead of 200) so that no refresh falls in the
timed window and the step right after it refreshes every basis: that step is timed and its
peak measured apart (``reset_peak_memory_stats`` before it), and the number of bases it
rebuilt is recorded. Muon, PolarGrad and AdamW have no refresh: their refresh columns stay
empty. The table gives, per row, the median over the repeats of ms per step with its spread
[min-max], and the ratio of that median to fused AdamW's median; the JSON (``--out``) holds
every raw measurement, the environment and the command. GB and MB are 10^9 and 10^6 bytes. On
the CPU (``--device cpu``) everything runs but peaks are "n/a"; the model-size flags make that
run small (the test uses hidden 64, 2 layers).

The default run takes about 8 minutes on an H200: 11 rows x 2 repeats, each process about
20-25 s (measured 2026-12-02, one repeat in 246 s: interpreter, torch and transformers imports,
CUDA start and model build are most of it; galore-torch's SVD refreshes add about 11 s);
``--repeats 3`` takes about 12 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..machine import environment, resolve_device
from ..peers import build_peer, peer_state_bytes
from ..report import markdown_table, write_json
from .timing import synchronize, warm_up

#: Learning rates: sane for a few dozen steps of this model; the time does not depend on them.
ADAMW_LR = 1e-3           # torch / bitsandbytes AdamW, and memopt's low-rank default
LOWRANK_LR = 1e-3         # memopt LowRankAdamW's default; galore-torch gets the same
MUON_LR = 0.02            # memopt Muon's default, and torch.optim.Muon's here
MUON_ADAMW_LR = 3e-4      # memopt Muon's adamw_lr default: torch Muon's AdamW partner gets it
SCALE = 0.25              # GaLore's scale (paper default)
#: Seconds of matrix products before anything is timed, so the GPU runs at its working clock.
WARM_UP_S = 0.5


@dataclass(frozen=True)
class Row:
    """One optimizer of the table: ``key`` for ``--only``, ``name`` as printed."""
    key: str
    name: str
    build: Callable[[torch.nn.Module, dict[str, Any]], list[torch.optim.Optimizer]]
    requires: str | None = None      # module a peer needs; missing -> the row is skipped
    memopt: bool = False             # state measured with memopt.optim.state_bytes
    lowrank: bool = False            # has a basis refresh


def _torch_adamw(model: torch.nn.Module, opts: dict[str, Any]) -> list[torch.optim.Optimizer]:
    return [torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, fused=True)]


def _bnb_adamw8bit(model: torch.nn.Module, opts: dict[str, Any]) -> list[torch.optim.Optimizer]:
    from ...optim.states import import_bitsandbytes
    bnb = import_bitsandbytes("the bitsandbytes AdamW8bit row")
    return [bnb.optim.AdamW8bit(model.parameters(), lr=ADAMW_LR)]


def _galore_torch(model: torch.nn.Module, opts: dict[str, Any]) -> list[torch.optim.Optimizer]:
    """galore-torch with its README's groups (``peers.projected_groups``)."""
    return [build_peer("peer-galore-torch", model, lr=LOWRANK_LR, rank=opts["rank"],
                       update_proj_gap=opts["gap"], scale=SCALE)]


def _torch_muon(model: torch.nn.Module, opts: dict[str, Any]) -> list[torch.optim.Optimizer]:
    """torch.optim.Muon (2-D parameters only) on the hidden matrices, fused AdamW on the rest;
    the split is memopt's ``param_groups``, as for memopt's Muon row (``peers.Together``)."""
    return [build_peer("peer-torch-muon", model, lr=MUON_LR, adamw_lr=MUON_ADAMW_LR,
                       weight_decay=0.0)]


def _memopt_lowrank(cls_name: str) -> Callable[..., list[torch.optim.Optimizer]]:
    def build(model: torch.nn.Module, opts: dict[str, Any]) -> list[torch.optim.Optimizer]:
        from ... import optim as mo
        from ...optim import param_groups
        groups = param_groups(model, rank=opts["rank"], update_proj_gap=opts["gap"], scale=SCALE)
        return [getattr(mo, cls_name)(groups, lr=LOWRANK_LR)]
    return build


def _memopt_polar(cls_name: str, **kwargs: Any) -> Callable[..., list[torch.optim.Optimizer]]:
    def build(model: torch.nn.Module, opts: dict[str, Any]) -> list[torch.optim.Optimizer]:
        from ... import optim as mo
        from ...optim import param_groups
        return [getattr(mo, cls_name)(param_groups(model), **kwargs)]
    return build


ROWS: tuple[Row, ...] = (
    Row("adamw", "torch AdamW (fused)", _torch_adamw),
    Row("adamw8bit", "bitsandbytes AdamW8bit", _bnb_adamw8bit, requires="bitsandbytes"),
    Row("galore-torch", "galore-torch GaLoreAdamW", _galore_torch, requires="galore_torch",
        lowrank=True),
    Row("torch-muon", "torch.optim.Muon + AdamW (fused)", _torch_muon,
        requires="torch.optim.Muon"),
    Row("galore", "memopt GaLoreAdamW", _memopt_lowrank("GaLoreAdamW"), memopt=True,
        lowrank=True),
    Row("dct", "memopt DCTAdamW", _memopt_lowrank("DCTAdamW"), memopt=True, lowrank=True),
    Row("fira", "memopt FiraAdamW", _memopt_lowrank("FiraAdamW"), memopt=True, lowrank=True),
    Row("galore8bit", "memopt GaLoreAdamW8bit", _memopt_lowrank("GaLoreAdamW8bit"),
        memopt=True, lowrank=True),
    Row("dct8bit", "memopt DCTAdamW8bit", _memopt_lowrank("DCTAdamW8bit"), memopt=True,
        lowrank=True),
    Row("muon", "memopt Muon", _memopt_polar("Muon", lr=MUON_LR), memopt=True),
    Row("polargrad", "memopt PolarGrad", _memopt_polar("PolarGrad"), memopt=True),
)
BASELINE = "adamw"


def available(row: Row) -> bool:
    """Whether the peer a row needs is installed (without importing it)."""
    if row.requires is None:
        return True
    if row.requires == "torch.optim.Muon":
        return hasattr(torch.optim, "Muon")
    return importlib.util.find_spec(row.requires) is not None


def select(only: str | None) -> list[Row]:
    """The rows named in ``only`` (keys or printed names, comma-separated), in table order."""
    if not only:
        return list(ROWS)
    wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
    known = {r.key: r for r in ROWS} | {r.name.lower(): r for r in ROWS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(r.key for r in ROWS)}")
    keys = {known[w].key for w in wanted}
    return [r for r in ROWS if r.key in keys]


# ------------------------------------------------------------------ one process, one row
def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False,
                       use_cache=False)


def basis_versions(opts: list[torch.optim.Optimizer]) -> list[Any]:
    """One token per projected parameter that changes whenever its basis is rebuilt: memopt
    keeps the count of basis updates in the state ("proj_num_updates", part of its
    state_dict); galore-torch replaces its projector's ``ortho_matrix``."""
    tokens = []
    for opt in opts:
        for state in opt.state.values():
            if "proj_num_updates" in state:
                tokens.append(int(state["proj_num_updates"]))
            elif "projector" in state:
                tokens.append(id(getattr(state["projector"], "ortho_matrix", None)))
    return tokens


class Clock:
    """Time marks on the device's timeline: CUDA events (no synchronization when a mark is
    taken), or the host clock on the CPU, where work is synchronous."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the last one)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def peaks(device: torch.device) -> dict[str, int | None]:
    """Peak allocated and reserved bytes since the last reset (None on the CPU)."""
    if device.type != "cuda":
        return {"allocated": None, "reserved": None}
    synchronize(device)
    return {"allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.max_memory_reserved(device)}


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def measure(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and ``row``'s optimizer in this process and measure it."""
    phases = {"started_s": time.time() - args.spawned_at} if args.spawned_at else {}
    mark = time.perf_counter()

    def phase(name: str) -> None:                # seconds of each phase of the process
        nonlocal mark
        synchronize(device)
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    device = torch.device(args.device)
    from transformers import LlamaForCausalLM
    phase("import_s")
    torch.manual_seed(args.seed)
    config = llama_config(args)
    with device:
        model = LlamaForCausalLM(config)
    model.train()
    gap = args.warmup + args.steps               # bases rebuilt at steps 0, gap, 2 gap, ...
    opts = row.build(model, {"rank": args.rank, "gap": gap})
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device=device).manual_seed(args.seed)
    data = torch.randint(0, args.vocab, (gap + 1, args.batch, args.seq), device=device,
                         generator=gen)

    def step(i: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=data[i], labels=data[i]).loss
        loss.backward()
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    phase("build_s")
    warm_up(device, seconds=WARM_UP_S)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    phase("clock_warm_up_s")
    out: dict[str, Any] = {"key": row.key, "optimizer": row.name, "n_params": n_params,
                           "update_proj_gap": gap if row.lowrank else None}

    reset_peaks(device)                          # step 0: state made, first bases
    first = Clock(device)
    first.mark()
    losses = [step(0)]
    first.mark()
    out["first_step_ms"] = first.intervals_ms()[0]
    out["first_step_peak_bytes"] = peaks(device)["allocated"]
    for i in range(1, args.warmup):
        step(i)
    phase("warmup_steps_s")

    reset_peaks(device)                          # the timed window: no refresh in it
    clock = Clock(device)
    clock.mark()
    for i in range(args.warmup, gap):
        losses.append(step(i))
        clock.mark()
    step_ms = clock.intervals_ms()
    steady = peaks(device)
    out.update(window_ms=sum(step_ms), ms_per_step=sum(step_ms) / len(step_ms), step_ms=step_ms,
               step_ms_median=statistics.median(step_ms),
               steady_peak_bytes=steady["allocated"], steady_reserved_bytes=steady["reserved"])

    out.update(refresh_step=None, refresh_step_ms=None, refresh_peak_bytes=None,
               refresh_reserved_bytes=None, projected_matrices=None, bases_rebuilt=None)
    if row.lowrank:                              # step `gap` rebuilds every basis
        before = basis_versions(opts)
        reset_peaks(device)
        refresh = Clock(device)
        refresh.mark()
        losses.append(step(gap))
        refresh.mark()
        out["refresh_step_ms"] = refresh.intervals_ms()[0]
        after = basis_versions(opts)
        top = peaks(device)
        out.update(refresh_step=gap, refresh_peak_bytes=top["allocated"],
                   refresh_reserved_bytes=top["reserved"], projected_matrices=len(after),
                   bases_rebuilt=sum(a != b for a, b in zip(before, after)))

    if row.memopt:
        from ...optim import state_bytes
        total = sum(state_bytes(opt) for opt in opts)
    else:
        total = sum(peer_state_bytes(opt) for opt in opts)
    phase("timed_and_refresh_s")
    out.update(phases=phases, state_bytes=total, state_bytes_per_param=total / n_params,
               loss_first=float(losses[0]), loss_last=float(losses[-1]),
               attn_implementation=getattr(model.config, "_attn_implementation", None),
               environment=environment(device))
    return out


def run_worker(row: Row, args: argparse.Namespace, timeout_s: float) -> dict[str, Any]:
    """``measure`` in a fresh Python process; its result (or its error) as a dict."""
    argv = [sys.executable, "-m", "memopt.recipes.bench.train_step", "--worker", row.key,
            "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--rank", str(args.rank), "--seed", str(args.seed), "--spawned-at", str(time.time())]
    for flag in ("hidden", "layers", "intermediate", "vocab", "heads", "batch", "seq"):
        argv += [f"--{flag}", str(getattr(args, flag))]
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"key": row.key, "optimizer": row.name, "error": f"timed out after {timeout_s} s",
                "process_s": time.perf_counter() - start}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1][len("RESULT "):])
    else:
        tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        result = {"key": row.key, "optimizer": row.name,
                  "error": f"exit {done.returncode}: {tail[-1][:200]}",
                  "stderr_tail": "\n".join(tail[-15:])}
    result["process_s"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------ the table
def summarize(row: Row, runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Median and [min, max] over the repeats of one row."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"key": row.key, "optimizer": row.name, "repeats_ok": len(ok),
                           "errors": [r["error"] for r in runs if "error" in r] or None}
    if not ok:
        return out

    def med(field: str) -> float | None:
        values = [r[field] for r in ok if r.get(field) is not None]
        return float(statistics.median(values)) if values else None

    times = [r["ms_per_step"] for r in ok]
    ms = float(statistics.median(times))
    gb = lambda b: None if b is None else b / 1e9          # noqa: E731
    out.update(ms_per_step_median=ms, ms_per_step_min=min(times), ms_per_step_max=max(times),
               tokens_per_s=tokens / ms * 1e3, refresh_step_ms=med("refresh_step_ms"),
               first_step_ms=med("first_step_ms"),
               steady_peak_gb=gb(med("steady_peak_bytes")),
               refresh_peak_gb=gb(med("refresh_peak_bytes")),
               first_step_peak_gb=gb(med("first_step_peak_bytes")),
               steady_reserved_gb=gb(med("steady_reserved_bytes")),
               state_bytes=ok[0]["state_bytes"],
               state_bytes_per_param=ok[0]["state_bytes_per_param"],
               state_mb=ok[0]["state_bytes"] / 1e6, n_params=ok[0]["n_params"],
               bases_rebuilt=ok[0]["bases_rebuilt"], projected_matrices=ok[0]["projected_matrices"],
               loss_last=ok[-1]["loss_last"])
    return out


def table(rows: list[dict[str, Any]], cuda: bool) -> str:
    """The Markdown table: times as median [min-max] over the repeats."""
    base = next((r["ms_per_step_median"] for r in rows
                 if r["key"] == BASELINE and "ms_per_step_median" in r), None)
    lines = []
    for r in rows:
        if "ms_per_step_median" not in r:
            lines.append({"optimizer": r["optimizer"], "ms/step median [min-max]":
                          "failed: " + "; ".join(r["errors"] or [])[:120]})
            continue
        memory = (lambda v: "n/a" if not cuda else ("" if v is None else f"{v:.2f}"))
        lines.append({
            "optimizer": r["optimizer"],
            "ms/step median [min-max]": f"{r['ms_per_step_median']:.1f} "
                                        f"[{r['ms_per_step_min']:.1f}-{r['ms_per_step_max']:.1f}]",
            "x fused AdamW": None if base is None else f"{r['ms_per_step_median'] / base:.3f}",
            "tokens/s": f"{r['tokens_per_s']:.0f}",
            "refresh step ms": None if r["refresh_step_ms"] is None
            else f"{r['refresh_step_ms']:.0f}",
            "steady peak GB": memory(r["steady_peak_gb"]),
            "refresh peak GB": memory(r["refresh_peak_gb"]) if r["refresh_step_ms"] is not None
            else "",
            "state bytes/param": f"{r['state_bytes_per_param']:.3f}",
            "state MB": f"{r['state_mb']:.1f}",
        })
    return markdown_table(lines, ["optimizer", "ms/step median [min-max]", "x fused AdamW",
                                  "tokens/s", "refresh step ms", "steady peak GB",
                                  "refresh peak GB", "state bytes/param", "state MB"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--only", default=None,
                   help="comma-separated rows: " + ", ".join(r.key for r in ROWS))
    p.add_argument("--repeats", type=int, default=2,
                   help="processes per row, interleaved (3: about 12 min on an H200)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    p.add_argument("--rank", type=int, default=256, help="rank of the low-rank rows")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2736)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds per process")
    p.add_argument("--out", default=None, help="write every measurement as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # child process
    p.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("--warmup, --steps and --repeats must be >= 1 (step 0, which builds "
                         "the first bases, is never timed)")
    if args.worker:
        row = next(r for r in ROWS if r.key == args.worker)
        print("RESULT " + json.dumps(measure(row, args)), flush=True)
        return 0
    args.device = str(resolve_device(args.device))
    cuda = args.device.startswith("cuda")
    rows, skipped = [], []
    for row in select(args.only):
        if available(row):
            rows.append(row)
        else:
            skipped.append({"key": row.key, "optimizer": row.name,
                            "reason": f"{row.requires} is not installed"})
            print(f"note: skipping {row.name}: {row.requires} is not installed", flush=True)
    if BASELINE not in {r.key for r in rows}:
        print("note: no torch AdamW row, so no ratios", flush=True)

    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):            # interleaved: every row once per repeat
        for row in rows:
            result = run_worker(row, args, args.timeout)
            result["repeat"] = repeat
            runs.append(result)
            said = (f"{result['ms_per_step']:.1f} ms/step" if "error" not in result
                    else result["error"])
            print(f"[repeat {repeat + 1}/{args.repeats}] {row.name}: {said} "
                  f"({result['process_s']:.0f} s)", file=sys.stderr, flush=True)
            write_json(args.out, {"partial": True, "runs": runs})    # kept if stopped early
    wall_s = time.perf_counter() - started

    tokens = args.batch * args.seq
    summary = [summarize(row, [r for r in runs if r["key"] == row.key], tokens) for row in rows]
    base = next((s["ms_per_step_median"] for s in summary
                 if s["key"] == BASELINE and "ms_per_step_median" in s), None)
    for s in summary:
        if base is not None and "ms_per_step_median" in s:
            s["vs_fused_adamw"] = s["ms_per_step_median"] / base
    env = next((r["environment"] for r in runs if "environment" in r),
               environment(torch.device(args.device)))
    env["utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for package in ("transformers", "bitsandbytes", "galore-torch"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = None
    n_params = next((s["n_params"] for s in summary if "n_params" in s), None)
    settings = {k: getattr(args, k) for k in ("device", "repeats", "steps", "warmup", "rank",
                                             "hidden", "layers", "intermediate", "vocab",
                                             "heads", "batch", "seq", "seed")}
    settings.update(update_proj_gap=args.warmup + args.steps, refresh_step=args.warmup + args.steps,
                    tokens_per_step=tokens, n_params=n_params, scale=SCALE, wall_s=wall_s)
    command = "python -m memopt.recipes.bench.train_step " + shlex.join(argv)
    print(f"\nLLaMA (hidden {args.hidden}, {args.layers} layers, intermediate "
          f"{args.intermediate}, vocabulary {args.vocab}, {args.heads} heads"
          + (f", {n_params / 1e6:.4g}M parameters" if n_params else "")
          + f"), fp32 weights, bf16 autocast, batch {args.batch} x {args.seq} tokens; "
          f"{args.steps} timed steps after {args.warmup}, {args.repeats} repeat(s) in fresh "
          f"processes, interleaved; low-rank rows: rank {args.rank}, bases rebuilt at step "
          f"{args.warmup + args.steps} (measured apart); {env.get('gpu', env.get('cpu'))}, "
          f"torch {env['torch']}; {wall_s:.0f} s\n")
    print(table(summary, cuda))
    for s in skipped:
        print(f"\nskipped: {s['optimizer']} ({s['reason']})")
    write_json(args.out, {"command": command, "environment": env, "settings": settings,
                          "rows": summary, "skipped": skipped, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
