"""The `memopt` command (also `python -m memopt`): train, compare, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memopt.optim import OPTIMIZER_NAMES

from .presets import PRESETS


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS),
                        help="model and schedule size (default: tiny, for a CPU)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (preset default)")
    parser.add_argument("--rank", type=int, default=None, help="rank of low-rank optimizers")
    parser.add_argument("--steps", type=int, default=None, help="training steps (preset default)")
    parser.add_argument("--data", default=None,
                        help="'stdlib' (default), a text file or folder, or hf:NAME[:SPLIT]")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--per-layer", action="store_true",
                        help="update each parameter in the backward pass (frees gradients early)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in backward instead of keeping them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        type=_option, dest="options",
                        help="extra optimizer argument, e.g. --set moments_on_refresh=rotate "
                             "(repeatable; values are Python literals or plain strings)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--ddp", action="store_true", help="DistributedDataParallel (torchrun)")
    mode.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard (torchrun)")


def _run_config(args: argparse.Namespace, optimizer: str, out: str | None):
    from .train import RunConfig
    return RunConfig(optimizer=optimizer, preset=args.preset, lr=args.lr, rank=args.rank,
                     steps=args.steps, data=args.data, device=args.device, out=out,
                     seed=args.seed, resume=getattr(args, "resume", False),
                     checkpoint_every=getattr(args, "checkpoint_every", None),
                     progress=not args.no_progress, per_layer=args.per_layer,
                     activation_checkpointing=args.activation_checkpointing,
                     distributed="ddp" if args.ddp else "fsdp" if args.fsdp else None,
                     optimizer_options=dict(args.options))


def _option(text: str) -> tuple[str, object]:
    import ast
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _optimizer_name(name: str) -> str:
    if name.lower() not in OPTIMIZER_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    return name.lower()


def _optimizer_list(value: str) -> list[str]:
    return [_optimizer_name(n.strip()) for n in value.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a byte-level LLaMA with one optimizer")
    p.add_argument("--optimizer", type=_optimizer_name, required=True,
                   help=f"one of {', '.join(OPTIMIZER_NAMES)}")
    _run_arguments(p)
    p.add_argument("--out", default=None, help="folder for log.jsonl, checkpoint.pt, summary.json")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also checkpoint every N steps (always at the end)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (checkpointed) after N steps; continue with --resume")

    p = sub.add_parser("compare", help="the same run with several optimizers, side by side")
    from .compare import DEFAULT_OPTIMIZERS
    p.add_argument("--optimizers", type=_optimizer_list, default=list(DEFAULT_OPTIMIZERS),
                   help=f"comma-separated (default: {','.join(DEFAULT_OPTIMIZERS)})")
    _run_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/compare-PRESET)")

    p = sub.add_parser("bench", help="step time and state bytes per parameter (bench_step)")
    p.add_argument("--projectors", action="store_true",
                   help="time projector refreshes instead (bench_projectors)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--only", default=None, help="comma-separated name filters (bench_step)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from .train import Run
        summary = Run(_run_config(args, args.optimizer, args.out)).train(args.stop_after)
        brief = {k: v for k, v in summary.items() if k not in ("history", "config")}
        import os
        if os.environ.get("RANK", "0") == "0":
            if args.out:
                Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
            print(json.dumps(brief, indent=1))
        return 0
    if args.command == "compare":
        from .compare import compare
        out = args.out or f"runs/compare-{args.preset}"
        result = compare(args.optimizers, _run_config(args, args.optimizers[0], None), out)
        print(f"\n{result['corpus']}; preset {args.preset}; {result['environment']}\n")
        print(result["table"])
        print(f"\nwrote {out}/results.json and {out}/loss_curves.png")
        return 0
    if args.projectors:
        from .bench_projectors import main as bench_main
        forwarded = ["--device", args.device] + (["--out", args.out] if args.out else [])
    else:
        from .bench_step import main as bench_main
        forwarded = ["--device", args.device] + (["--out", args.out] if args.out else []) + \
            (["--only", args.only] if args.only else [])
    return bench_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
