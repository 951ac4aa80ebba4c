"""The `memopt` command line's values and the checks made before anything runs.

Value types parse one flag's text or raise argparse's error saying what is wrong, so that
the parser prints one line naming the flag (exit status 2). The checks
(:func:`check_run_arguments`) raise :class:`UsageError` naming the flag, which the command
prints the same way, before anything is trained, loaded or overwritten.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from ..optim.registry import is_known, is_low_rank, low_rank_names
from .peers import is_peer, recipe_optimizers
from .presets import get_preset


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``memopt train: error: argument --lr: ...`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def whole_number(text: str, minimum: int) -> int:
    """``text`` as an int of at least ``minimum``, or argparse's error saying what is wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value}" if minimum == 1 else
            f"must be {minimum} or more, got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def warmup_fraction(text: str) -> float:
    """``--warmup``: the fraction of the steps spent warming up, a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the steps in [0, 1), got {text}")
    return value


def option(text: str) -> tuple[str, object]:
    """``--set`` text: ``KEY=VALUE`` for every optimizer or ``NAME.KEY=VALUE`` for one; the
    value a Python literal, else the plain string. Returns (``KEY`` or ``NAME.KEY``, value)."""
    key, sep, value = text.partition("=")
    name, dot, bare = key.rpartition(".")
    if not sep or not bare.isidentifier() or (dot and not name):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or NAME.KEY=VALUE, got {text!r}")
    if dot:
        key = f"{optimizer_name(name)}.{bare}"
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


#: ``--set`` keys that have their own flag: both at once is refused (no silent winner).
DEDICATED = {"lr": "--lr", "rank": "--rank"}


def settings_for(options: Mapping[str, Any], optimizer: str) -> dict[str, Any]:
    """The ``--set`` options that reach ``optimizer``: ``KEY`` ones, and its own ``NAME.KEY``
    ones (without ``NAME.``), which win over a ``KEY`` one; other optimizers' are left out."""
    plain = {k: v for k, v in options.items() if "." not in k}
    own = {k.partition(".")[2]: v for k, v in options.items()
           if k.partition(".")[0] == optimizer and "." in k}
    return {**plain, **own}


def show_value(value: Any) -> str:
    """A ``--set`` value as the user would type it: strings bare, the rest as literals."""
    return value if isinstance(value, str) else repr(value)


def optimizer_name(name: str) -> str:
    if name.lower() not in recipe_optimizers() and not is_known(name):
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {name!r}; choose one of {', '.join(recipe_optimizers())}, "
            "or a composition PROJECTOR+RULE[+RESIDUAL][+8bit] (e.g. dct+orthogonalized)")
    return name.lower()


def optimizer_list(value: str) -> list[str]:
    names = [optimizer_name(n.strip()) for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one optimizer name")
    return names


class UsageError(Exception):
    """A command-line value that cannot work; the message names the flag."""


# ------------------------------------------------------------------ checks before a run
def _is_low_rank(name: str) -> bool:
    return not is_peer(name) and is_low_rank(name)


def check_settings(args: argparse.Namespace, optimizers: list[str], command: str) -> None:
    """``--set`` (``args.options``): no key twice, none also given through its own flag
    (``--lr``, ``--rank``: no silent winner), and a ``NAME.KEY`` only for an optimizer of the
    run; else :class:`UsageError` naming the key."""
    seen: dict[str, Any] = {}
    for key, value in args.options:
        if key in seen:
            raise UsageError(f"argument --set {key}: given twice ({show_value(seen[key])} and "
                             f"{show_value(value)}); give it once")
        seen[key] = value
        name, _, bare = key.rpartition(".")
        if bare in DEDICATED and getattr(args, bare, None) is not None:
            raise UsageError(f"argument --set {key}: conflicts with {DEDICATED[bare]} "
                             f"{getattr(args, bare)}; give the value once")
        if name and name not in optimizers:
            where = (f"--optimizer {optimizers[0]}" if command == "train" else
                     f"among --optimizers {','.join(optimizers)}")
            raise UsageError(f"argument --set {key}: {name} is not {where}")


def run_config(args: argparse.Namespace, optimizer: str, out: str | None) -> Any:
    """The RunConfig of a `train` or `compare` command line, for ``optimizer``."""
    from .train import RunConfig
    return RunConfig(optimizer=optimizer, preset=args.preset, lr=args.lr, rank=args.rank,
                     steps=args.steps, data=args.data, warmup=args.warmup,
                     device=args.device, out=out,
                     seed=args.seed, resume=getattr(args, "resume", False),
                     checkpoint_every=getattr(args, "checkpoint_every", None),
                     progress=not args.no_progress, per_layer=args.per_layer,
                     activation_checkpointing=args.activation_checkpointing,
                     distributed="ddp" if args.ddp else "fsdp" if args.fsdp else None,
                     quantize_weights=args.quantize_weights,
                     weight_rounding=args.weight_rounding,
                     optimizer_options=dict(args.options))


def _meta_model(args: argparse.Namespace) -> Any:
    """The preset's model on the meta device: shapes only, no memory, no initialisation."""
    import torch
    from transformers import LlamaForCausalLM
    with torch.device("meta"):
        return LlamaForCausalLM(get_preset(args.preset, steps=args.steps).llama_config())


def _builds(name: str, args: argparse.Namespace, model: Any, **extra: Any) -> bool:
    """Whether ``name`` builds with the run's arguments and ``extra``."""
    from .peers import build_optimizer
    kwargs = get_preset(args.preset, steps=args.steps).optimizer_kwargs(name, args.lr, args.rank)
    try:
        build_optimizer(name, model, **{**kwargs, **settings_for(dict(args.options), name),
                                        **extra})
    except Exception:                               # noqa: BLE001 (any refusal is a "no")
        return False
    return True


def check_optimizer(name: str, args: argparse.Namespace, model: Any = None,
                    optimizers: list[str] | None = None) -> None:
    """Build ``name`` as the run will, on a meta-device copy of the preset's model: first
    with the preset's arguments and --lr / --rank, then adding each --set option that
    reaches it in turn, so that an error names the option that caused it. An unqualified
    option that ``name`` does not take, in a run of several ``optimizers``, is refused with
    the NAME.KEY=VALUE that sets it for the others."""
    from .peers import build_optimizer
    model = model if model is not None else _meta_model(args)
    optimizers = optimizers or [name]
    given = dict(args.options)
    kwargs = get_preset(args.preset, steps=args.steps).optimizer_kwargs(name, args.lr, args.rank)
    flag = "--lr" if args.lr is not None else "--optimizer"
    for key, value in [(None, None)] + list(settings_for(given, name).items()):
        if key is not None:
            kwargs[key] = value
            qualified = f"{name}.{key}" in given
            flag = f"--set {name}.{key}" if qualified else f"--set {key}"
        try:
            build_optimizer(name, model, **kwargs)
        except TypeError as exc:
            if key is not None and repr(key) in str(exc):
                raise UsageError(f"argument {flag}: {name} has no argument {key!r}"
                                 + _elsewhere(name, key, value, qualified, args, model,
                                              optimizers)) from None
            raise UsageError(f"argument {flag}: {name}: {exc}") from None
        except (ValueError, ImportError) as exc:
            raise UsageError(f"argument {flag}: {name}: {exc}") from None


def _elsewhere(name: str, key: str, value: Any, qualified: bool, args: argparse.Namespace,
               model: Any, optimizers: list[str]) -> str:
    """The end of a "has no argument" error: how to set ``key`` for the optimizers that
    take it, or where the arguments are documented."""
    others = [o for o in optimizers if o != name]
    if qualified or not others:
        return " (see help(memopt.optim) for each optimizer's arguments)"
    takers = [o for o in others if _builds(o, args, model, **{key: value})]
    if not takers:
        return f" (nor has {', '.join(others)}; see help(memopt.optim))"
    names = " and ".join([", ".join(takers[:-1]), takers[-1]] if len(takers) > 1 else takers)
    return (f"; to set it for {names} only, write "
            + " ".join(f"--set {o}.{key}={show_value(value)}" for o in takers))


def check_resume(args: argparse.Namespace) -> None:
    """``train --resume``: a checkpoint in --out, of a run with the same arguments (its
    config.json, else its summary.json), checked before anything is loaded."""
    from .train import CHECKPOINT, identity_differences, recorded_identity, run_identity
    if not args.out:
        raise UsageError("argument --resume: needs --out, the folder of the checkpoint")
    if not Path(args.out, CHECKPOINT).exists():
        raise UsageError(f"argument --resume: no {CHECKPOINT} in {args.out}")
    recorded = recorded_identity(args.out)
    if recorded is None:
        return                      # nothing recorded: loading the checkpoint will tell
    requested = run_identity(run_config(args, args.optimizer, args.out))
    differences = identity_differences(recorded, requested)
    if differences:
        raise UsageError(f"argument --resume: {args.out} was trained "
                         f"{'; '.join(differences)}")


def check_quantized_weights(args: argparse.Namespace, optimizers: list[str]) -> None:
    """--quantize-weights and --weight-rounding: rounding only with quantized weights, and
    quantized weights only where every optimizer of the run updates them (train.py's
    :func:`~.train.quantized_weights_refusal`)."""
    from .train import quantized_weights_refusal
    for name in optimizers:
        refusal = quantized_weights_refusal(run_config(args, name, None))
        if refusal:
            raise UsageError("argument {}: {}".format(*refusal))


def check_out(out: str, command: str, args: argparse.Namespace) -> None:
    """--out is not a file, and `train` replaces a run there only with --overwrite."""
    from .train import RUN_FILES
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"argument --out: {out} is a file, not a folder")
    if command == "train" and not args.resume and not args.overwrite:
        found = [f for f in (*RUN_FILES, "sharded") if (path / f).exists()]
        if found:
            raise UsageError(f"argument --out: {out} holds a run ({', '.join(found)}); "
                             "continue it with --resume or replace it with --overwrite")


def writable_folder(folder: str | Path, flag: str = "--out") -> None:
    """Create ``folder`` (and its parents) and write a file in it, or refuse naming ``flag``."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"argument {flag}: cannot write to {folder} "
                         f"({exc.strerror or exc})") from None


def check_run_arguments(args: argparse.Namespace, optimizers: list[str],
                        out: str | None = None) -> Any:
    """Everything that can be checked before training; returns the loaded corpus. ``out``
    (the command's output folder) is created last, once everything else passed."""
    import torch

    from .data import load_corpus
    command = args.command
    if args.rank is not None and not any(_is_low_rank(n) for n in optimizers):
        raise UsageError(f"argument --rank: {', '.join(optimizers)} has no rank (--rank is for "
                         f"{', '.join(low_rank_names())}, their 8bit versions and the "
                         "compositions PROJECTOR+RULE)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for, but torch sees no CUDA device")
    if (args.ddp or args.fsdp) and "RANK" not in os.environ:
        raise UsageError(f"argument {'--ddp' if args.ddp else '--fsdp'}: needs torchrun "
                         "(torchrun --nproc_per_node N -m memopt.recipes train ...)")
    check_settings(args, optimizers, command)
    check_quantized_weights(args, optimizers)
    if getattr(args, "resume", False):
        check_resume(args)
    if out:
        check_out(out, command, args)
    model = _meta_model(args)
    for name in optimizers:
        check_optimizer(name, args, model, optimizers)
    try:
        corpus = load_corpus(args.data)
    except (ValueError, OSError) as exc:           # data.py's messages start with "--data"
        message = str(exc).removeprefix("--data").lstrip(": ")
        raise UsageError(f"argument --data: {message}") from None
    preset = get_preset(args.preset, steps=args.steps)
    for split in ("train", "val"):
        size = getattr(corpus, split).numel()
        if size <= preset.seq_len + 1:
            raise UsageError(f"argument --data: its {split} split has {size} bytes, fewer than "
                             f"one sequence of the preset ({preset.seq_len + 1})")
    if out:
        writable_folder(out)
    return corpus


def check_out_file(path: str) -> None:
    """A --out FILE: not a folder, in a folder this process can write."""
    if Path(path).is_dir():
        raise UsageError(f"argument --out: {path} is a folder; give a file for the JSON rows")
    writable_folder(Path(path).parent)
