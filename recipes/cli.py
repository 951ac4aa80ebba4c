"""The `memopt` command (also `python -m memopt.recipes`): train, compare, estimate, bench.

Every mistake on the command line ends in one line, ``memopt COMMAND: error: ...``, that
names the flag, and exit status 2, before anything is trained or overwritten: values are
checked as they are parsed; each optimizer is built once on a meta-device copy of the model
with the given options, so a bad ``--set`` is refused before the first run and not minutes
into a comparison; a ``--resume`` is compared with the run recorded in its folder; and
``--out`` must be a folder this process can write.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .arguments import (ArgumentParser, UsageError, check_out_file, check_run_arguments,
                        non_negative_int, option, optimizer_list, optimizer_name,
                        positive_float, positive_int, run_config, warmup_fraction)
from .peers import recipe_optimizers
from .presets import PRESETS, get_preset

# ------------------------------------------------------------------ parser
def _run_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, choices=list(PRESETS),
                        help=f"model and schedule size (default: {default_preset})")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="learning rate (default: the preset's rate for each optimizer "
                             "family)")
    parser.add_argument("--rank", type=positive_int, default=None,
                        help="rank of the low-rank optimizers (galore, dct, fira, trion, "
                             "galoremuon, compositions; default: the preset's)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps (default: the preset's)")
    parser.add_argument("--data", default=None,
                        help="'stdlib' (default: Python source), 'prose' (English; pip install "
                             "'memopt[prose]'), a text file or folder, or hf:NAME[:SPLIT]")
    parser.add_argument("--warmup", type=warmup_fraction, default=None, metavar="FRACTION",
                        help="linear warm-up over this fraction of the steps, then cosine decay "
                             "to 10%% of the rate (default: the preset's, 0.1)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--per-layer", action="store_true",
                        help="update each parameter in the backward pass (frees gradients early)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in backward instead of keeping them")
    parser.add_argument("--quantize-weights", type=int, choices=[8, 16], default=None,
                        metavar="{8,16}",
                        help="keep the weights of the linear layers but the output head in "
                             "INT8 codes with one fp32 scale per 128 columns (8) or in bf16 "
                             "(16), updated on a full-precision copy one layer at a time and "
                             "rounded back (memopt.quantize_weights; default: full-precision "
                             "weights). memopt optimizers; any other with --per-layer; not "
                             "with --ddp / --fsdp")
    parser.add_argument("--weight-rounding", choices=["stochastic", "nearest"], default=None,
                        help="how an updated quantized weight is rounded back: stochastic "
                             "(default; unbiased, so updates below one step still count) or "
                             "nearest; only with --quantize-weights")
    parser.add_argument("--set", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                        type=option, dest="options",
                        help="extra optimizer argument: KEY=VALUE for every optimizer, "
                             "NAME.KEY=VALUE for optimizer NAME only (wins over KEY=VALUE), "
                             "e.g. --set dct.moments_on_refresh=reset (repeatable; values are "
                             "Python literals or plain strings; a key given twice, or also "
                             "through its own flag --lr or --rank, is refused)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ddp", action="store_true", help="DistributedDataParallel (torchrun)")
    mode.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard (torchrun)")


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    from .sweep import lr_spec
    group = parser.add_argument_group(
        "sweep", "With --seeds > 1, --lrs or --jobs > 1, each (optimizer, lr, seed) trains in "
                 "its own `memopt train` process, in OUT/runs/NAME/lr-LR/seed-S; the table "
                 "has one row per (optimizer, lr) with the mean and half the range over the "
                 "seeds, and marks each optimizer's best lr.")
    group.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                       help="train seeds S..S+N-1, S from --seed (default: 1 seed); the seed "
                            "sets the initialisation and the batch order")
    group.add_argument("--lrs", type=lr_spec, action="append", default=[], metavar="SPEC",
                       help="learning rates: V1,V2,... for every optimizer or NAME=V1,V2,... "
                            "for one (wins over the general list); V is a rate (0.01, 3e-4) "
                            "or a factor of the preset's rate (x0.5, x1, x2); repeatable; "
                            "not with --lr")
    group.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                       help="runs at once (default: 1 on the CPU, min(12, runs) on CUDA; "
                            "each run gets OMP_NUM_THREADS threads where it is set, else the "
                            "CPU's cores shared out among the jobs)")


def build_parser() -> argparse.ArgumentParser:
    from . import estimate
    from .compare import DEFAULT_OPTIMIZERS, DEFAULT_PRESET
    parser = ArgumentParser(prog="memopt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a byte-level LLaMA with one optimizer")
    p.add_argument("--optimizer", type=optimizer_name, required=True,
                   help=f"one of {', '.join(recipe_optimizers())}")
    _run_arguments(p, "tiny")
    p.add_argument("--out", default=None,
                   help="folder for log.jsonl, checkpoint.pt, summary.json and config.json "
                        "(the arguments a --resume must match)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from --out/checkpoint.pt; refused where the run there "
                            "had other arguments (optimizer, preset, steps, lr, rank, seed, "
                            "data, --set, --fsdp, --quantize-weights, --weight-rounding)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (without it or --resume, a "
                            "folder holding a run is refused)")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="also checkpoint every N steps (always at the end)")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop (checkpointed) after N steps; continue with --resume")

    p = sub.add_parser(
        "compare", help="the same run with several optimizers, side by side",
        description="Train the same model on the same batches once per optimizer. Each "
                    "finished run is written to OUT/results.json and OUT/loss_curves.png at "
                    "once, so Ctrl-C keeps the finished runs, and --resume continues. --lr "
                    "and --rank apply to every optimizer they concern (--rank: the low-rank "
                    "ones); --set NAME.KEY=VALUE to one optimizer.")
    p.add_argument("--optimizers", type=optimizer_list, default=list(DEFAULT_OPTIMIZERS),
                   help=f"comma-separated (default: {','.join(DEFAULT_OPTIMIZERS)})")
    _run_arguments(p, DEFAULT_PRESET)
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/compare-PRESET); an earlier comparison "
                        "there is replaced, unless --resume")
    p.add_argument("--resume", action="store_true", dest="resume_runs",
                   help="keep each finished run in OUT whose arguments match (OUT/results.json; "
                        "a sweep: each run's command.json and summary.json in OUT/runs) and "
                        "train only the others")
    _sweep_arguments(p)

    p = sub.add_parser("estimate", help=estimate.HELP, description=estimate.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    estimate.add_arguments(p)

    p = sub.add_parser("bench", help="step time and state bytes per parameter (bench.step)")
    p.add_argument("--projectors", action="store_true",
                   help="time projector refreshes instead (bench.projectors)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--only", default=None,
                   help="comma-separated name filters, each a part of a row's name, any case "
                        "(bench.step; a filter that matches no row is refused)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the rows as JSON here")
    return parser


# ------------------------------------------------------------------ sweeps
def is_sweep(args: argparse.Namespace) -> bool:
    """Whether compare runs a sweep of processes; else one run per optimizer in this process,
    as without the sweep flags. Refuses sweep flags that cannot work together."""
    if args.seeds == 1 and not args.lrs and (args.jobs or 1) == 1:
        return False
    if args.lrs and args.lr is not None:
        raise UsageError("argument --lrs: not allowed with argument --lr (give the rates in "
                         "--lrs, as numbers or factors like x0.5)")
    stray = [s.optimizer for s in args.lrs if s.optimizer not in (None, *args.optimizers)]
    if stray:
        raise UsageError(f"argument --lrs: {stray[0]} is not among --optimizers "
                         f"({','.join(args.optimizers)})")
    if args.ddp or args.fsdp:
        raise UsageError(f"argument {'--ddp' if args.ddp else '--fsdp'}: a sweep (--seeds, "
                         "--lrs, --jobs) trains single-process runs")
    rate = next((key for key, _ in args.options if key.rpartition(".")[2] == "lr"), None)
    if rate:
        name = rate.rpartition(".")[0]
        raise UsageError(f"argument --set {rate}: a sweep gives each run its rate; give it in "
                         f"--lrs ({name + '=' if name else ''}V1,V2,...)")
    return True


def plan_sweep(args: argparse.Namespace) -> tuple[list[Any], int]:
    """The runs of a sweep and how many at once."""
    from .sweep import default_jobs, learning_rates, plan_runs
    preset = get_preset(args.preset, steps=args.steps)
    rates = learning_rates(args.optimizers, args.lrs, preset, args.lr)
    runs = plan_runs(rates, range(args.seed, args.seed + args.seeds))
    return runs, args.jobs or default_jobs(args.device, len(runs))


# ------------------------------------------------------------------ commands
def _train(args: argparse.Namespace) -> int:
    from .machine import use_available_cores
    from .train import RUN_FILES, CheckpointMismatch, Diverged, Run
    use_available_cores()
    corpus = check_run_arguments(args, [args.optimizer], args.out)
    if args.overwrite and os.environ.get("RANK", "0") == "0":
        for name in RUN_FILES:
            Path(args.out, name).unlink(missing_ok=True)
        shutil.rmtree(Path(args.out, "sharded"), ignore_errors=True)
    try:
        run = Run(run_config(args, args.optimizer, args.out), corpus)
    except CheckpointMismatch as exc:
        raise UsageError(f"argument --resume: {exc}") from None
    try:
        summary = run.train(args.stop_after)
    except Diverged as exc:
        print(f"memopt train: error: {exc}; try a lower --lr", file=sys.stderr)
        return 1
    brief = {k: v for k, v in summary.items() if k not in ("history", "config")}
    if os.environ.get("RANK", "0") == "0":
        if args.out:
            Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(brief, indent=1))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import RESULTS, compare, describe_setting, format_duration
    from .sweep import run_sweep
    from .machine import describe_environment, use_available_cores
    use_available_cores()
    sweep = is_sweep(args)
    out = args.out or f"runs/compare-{args.preset}"
    corpus = check_run_arguments(args, args.optimizers, out)
    base = run_config(args, args.optimizers[0], None)
    print(describe_setting(get_preset(args.preset, steps=args.steps), base), flush=True)
    if Path(out, RESULTS).exists() and not args.resume_runs:
        print(f"note: replacing the comparison in {out} (--resume keeps its finished runs)",
              flush=True)
    try:
        if sweep:
            runs, jobs = plan_sweep(args)
            result = run_sweep(runs, base, out, jobs, corpus, resume=args.resume_runs)
        else:
            result = compare(args.optimizers, base, out, corpus, resume=args.resume_runs)
    except KeyboardInterrupt:
        return 130
    print(f"\n{result['corpus']}\n{result['setting']}\n"
          f"{describe_environment(result['environment'])}\n")
    print(result["table"])
    if sweep:
        print(f"\n{result['sweep']['note']}\n\nbest lr of each optimizer\n"
              f"{result['best_table']}")
    print(f"\ntotal wall time {format_duration(result['wall_s'])} for "
          f"{len(result['runs'])} runs; wrote {out}/results.json and {out}/loss_curves.png")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for, but torch sees no CUDA device")
    if args.out:
        check_out_file(args.out)
    forwarded = ["--device", args.device] + (["--out", args.out] if args.out else [])
    if args.projectors:
        if args.only:
            raise UsageError("argument --only: filters bench.step's rows, not --projectors")
        from .bench.projectors import main as bench_main
        return bench_main(forwarded)
    from .bench.step import main as bench_main
    forwarded += ["--only", args.only] if args.only else []
    return bench_main(forwarded, prog="memopt bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "estimate":
        from .estimate import run
        command = run
    else:
        command = {"train": _train, "compare": _compare, "bench": _bench}[args.command]
    try:
        return command(args)
    except UsageError as exc:
        print(f"memopt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
