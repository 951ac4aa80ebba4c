"""`memopt estimate`: will it fit? The peak memory of a training step, before training.

    memopt estimate --model llama-7b --weights int8 --optimizers dct8bit,galore8bit \\
        --rank 1024 --per-layer yes --batch 1 --seq-len 256

One row per (optimizer, per-layer) from memopt.optim.estimate_memory, which builds the
model on the meta device (nothing is allocated) and counts, byte for byte, the state each
optimizer holds after its first step. peak = weights + gradients + optimizer state +
activations (+ the temporaries of updating INT8 weights): activations for --batch
sequences of --seq-len tokens, with activation checkpointing unless --checkpointing no
(memopt.optim.activations names every term). Kernels' own workspaces are not counted.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..optim.registry import is_low_rank, low_rank_names

HELP = ("peak memory of a training step (weights, gradients, optimizer state, activations), "
        "before training")
DESCRIPTION = __doc__.split("\n\n", 1)[1]

#: LLaMA shapes (hidden, intermediate, heads, layers), vocabulary 32000, and the GaLore
#: paper's rank for each (Zhao et al., 2024, Table 8; 7B: its 8-bit 7B run). "llama-7b" is
#: LLaMA-7B itself; the others are the GaLore paper's LLaMA sizes.
NAMED_MODELS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "llama-60m": ((512, 1376, 8, 8), 128),
    "llama-130m": ((768, 2048, 12, 12), 256),
    "llama-350m": ((1024, 2736, 16, 24), 256),
    "llama-1b": ((2048, 5461, 32, 24), 512),
    "llama-7b": ((4096, 11008, 32, 32), 1024),
}
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: --weights int8: memopt.quantize_weights' INT8 linears, the rest (and the compute) in bf16.
INT8 = "int8"
#: Tokens per sequence without --seq-len, unless --model is a preset (its own): the GaLore
#: paper's LLaMA pretraining length, which the presets 60m ... 1b and bench.memory use.
SEQ_LEN = 256
GB = 1e9


class EstimateError(ValueError):
    """A bad argument; the message names the flag."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .arguments import option, optimizer_list, positive_int
    p.add_argument("--model", default=None, metavar="NAME|CONFIG",
                   help=f"a named LLaMA size ({', '.join(NAMED_MODELS)}; vocabulary 32000), "
                        "a recipe preset (tiny, small, 60m, ..., 1b; vocabulary 256), or a "
                        "Hugging Face config.json (or the folder holding it)")
    for flag, what in (("--hidden", "hidden size"), ("--intermediate", "MLP intermediate size"),
                       ("--layers", "decoder layers"), ("--heads", "attention heads"),
                       ("--kv-heads", "key/value heads (default: --heads)"),
                       ("--vocab", "vocabulary size")):
        p.add_argument(flag, type=positive_int, default=None,
                       help=f"{what}: a LLaMA of this shape, or this field of --model replaced")
    p.add_argument("--optimizers", type=optimizer_list,
                   default=["adamw", "adamw8bit", "galore8bit", "dct8bit", "muon8bit"],
                   help="comma-separated (default: adamw,adamw8bit,galore8bit,dct8bit,muon8bit)")
    p.add_argument("--bits", default=None, choices=["32", "8", "32,8"], metavar="32|8|32,8",
                   help="state bits: each optimizer in its 32-bit or 8-bit version, or both "
                        "(default: as named)")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="rank of galore, dct and fira (default: the named size's or preset's "
                        "rank, else the optimizer's)")
    p.add_argument("--per-layer", default="no", nargs="?", const="yes",
                   choices=["no", "yes", "both"],
                   help="gradients freed one parameter at a time in the backward pass "
                        "(step_in_backward): only the largest gradient is counted "
                        "(default: no; both: a row for each)")
    p.add_argument("--weights", default="bf16", choices=[*WEIGHT_DTYPES, INT8],
                   help="dtype of the weights and gradients (default: bf16); int8: the "
                        "linear layers but the output head in INT8 codes with one fp32 scale "
                        "per 128 input columns (memopt.quantize_weights), fp32 gradients for "
                        "them, the rest in bf16")
    p.add_argument("--batch", type=positive_int, default=1,
                   help="sequences per step, for the activations (default: 1)")
    p.add_argument("--seq-len", type=positive_int, default=None, metavar="N",
                   help=f"tokens per sequence, for the activations (default: a preset's own, "
                        f"else {SEQ_LEN})")
    p.add_argument("--checkpointing", default="yes", choices=["yes", "no"],
                   help="activation checkpointing of every decoder layer (non-reentrant, as "
                        "model.gradient_checkpointing_enable): each layer keeps its input and "
                        "is recomputed in the backward pass (default: yes)")
    p.add_argument("--set", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                   type=option, dest="options",
                   help="extra optimizer argument: KEY=VALUE for every optimizer, "
                        "NAME.KEY=VALUE for optimizer NAME only (repeatable; a key given "
                        "twice, or rank with --rank, is refused)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows here")


def model_config(args: argparse.Namespace) -> tuple[Any, str, int | None]:
    """The transformers config to estimate, a one-line description, and a default rank."""
    from transformers import AutoConfig, LlamaConfig

    from .presets import PRESETS
    shape = {"hidden_size": args.hidden, "intermediate_size": args.intermediate,
             "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
             "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab}
    given = {k: v for k, v in shape.items() if v is not None}
    rank = None
    if args.model is None:
        missing = [f for f, k in (("--hidden", "hidden_size"), ("--intermediate",
                                  "intermediate_size"), ("--layers", "num_hidden_layers"))
                   if k not in given]
        if missing:
            raise EstimateError(f"argument --model: give a model (--model llama-7b, a preset or "
                                f"a config.json) or its shape ({', '.join(missing)} missing)")
        heads = given.get("num_attention_heads") or max(1, given["hidden_size"] // 128)
        config = LlamaConfig(vocab_size=given.get("vocab_size", 32000),
                             hidden_size=given["hidden_size"],
                             intermediate_size=given["intermediate_size"],
                             num_hidden_layers=given["num_hidden_layers"],
                             num_attention_heads=heads,
                             num_key_value_heads=given.get("num_key_value_heads", heads),
                             tie_word_embeddings=False)
        return config, "LLaMA", rank
    name = args.model
    if name.lower() in NAMED_MODELS:
        (hidden, intermediate, heads, layers), rank = NAMED_MODELS[name.lower()]
        config = LlamaConfig(vocab_size=32000, hidden_size=hidden,
                             intermediate_size=intermediate, num_attention_heads=heads,
                             num_key_value_heads=heads, num_hidden_layers=layers,
                             tie_word_embeddings=False)
        title = "LLaMA-" + name.lower().removeprefix("llama-").upper()
    elif name in PRESETS:
        config, rank, title = PRESETS[name].llama_config(), PRESETS[name].rank, f"preset {name}"
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise EstimateError(
                f"argument --model: {name!r} is neither a named size "
                f"({', '.join(NAMED_MODELS)}), a preset ({', '.join(PRESETS)}) nor a config.json")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EstimateError(f"argument --model: cannot read {path} as a transformers "
                                f"config: {first}") from None
        title = getattr(config, "model_type", "model") + f" ({path})"
    for key, value in given.items():
        setattr(config, key, value)
    if "num_attention_heads" in given and "num_key_value_heads" not in given:
        config.num_key_value_heads = given["num_attention_heads"]
    return config, title, rank


def expand_optimizers(names: list[str], bits: str | None) -> list[str]:
    """``--bits 32,8`` turns each name into its 32-bit and 8-bit versions (in that order)."""
    if bits is None:
        return list(dict.fromkeys(names))
    out = []
    for name in names:
        base = name.removesuffix("8bit")
        out += [base + ("8bit" if b == "8" else "") for b in bits.split(",")]
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class Step:
    """What a training step holds besides the optimizer: weights and activations."""

    weights: str                   # a WEIGHT_DTYPES key or INT8
    batch: int
    seq_len: int
    checkpointing: bool

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.weights == INT8 else WEIGHT_DTYPES[self.weights]

    def estimate_kwargs(self) -> dict[str, Any]:
        """``estimate_memory``'s arguments for this step."""
        return {"weight_dtype": self.weight_dtype, "weights": INT8 if self.weights == INT8
                else None, "batch": self.batch, "seq_len": self.seq_len,
                "checkpointing": self.checkpointing}

    def activations(self, config: Any) -> Any:
        """The ``ActivationEstimate`` of this step (the same for every optimizer)."""
        from ..optim.activations import estimate_activations
        from ..optim.memory import quantizable_linears
        largest = 0
        if self.weights == INT8:
            import transformers
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config)
            largest = max((m.weight.numel() for m in quantizable_linears(model)), default=0)
        return estimate_activations(config, batch=self.batch, seq_len=self.seq_len,
                                    dtype=self.weight_dtype, checkpointing=self.checkpointing,
                                    quantized_numel=largest)


def estimate_rows(config: Any, optimizers: list[str], per_layer: list[bool], step: Step,
                  rank: int | None, options: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (optimizer, per-layer): bytes of each term and of the peak."""
    import transformers

    from ..optim import estimate_memory

    from .arguments import settings_for
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    rows = []
    for name in optimizers:
        kwargs = settings_for(options, name)
        low_rank = is_low_rank(name)
        if low_rank and rank is not None:
            kwargs.setdefault("rank", rank)
        for layered in per_layer:
            try:
                e = estimate_memory(model, name, per_layer=layered, **step.estimate_kwargs(),
                                    **kwargs)
            except TypeError as exc:
                raise EstimateError(f"argument --set: {name}: {exc}") from None
            except ValueError as exc:
                raise EstimateError(f"argument --set or --rank: {name}: {exc}") from None
            rows.append({"optimizer": name, "rank": kwargs.get("rank") if low_rank else None,
                         "per_layer": "yes" if layered else "no",
                         "parameters": e["parameters"], "weights": e["weights"],
                         "gradients": e["gradients"], "optimizer_state": e["optimizer_state"],
                         "activations": e["activations"],
                         "update_temporaries": e["update_temporaries"], "peak": e["total"],
                         "state_bytes_per_param": e["optimizer_state"] / e["parameters"],
                         "batch": step.batch, "seq_len": step.seq_len,
                         "checkpointing": "yes" if step.checkpointing else "no"})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    from .report import markdown_table
    terms = [("weights", "weights"), ("gradients", "gradients"), ("optimizer_state", "state"),
             ("activations", "activations")]
    if any(r["update_temporaries"] for r in rows):
        terms.append(("update_temporaries", "update temporaries"))
    terms.append(("peak", "peak"))
    columns = ["optimizer", "rank", "per_layer", *(f"{key}_gb" for key, _ in terms),
               "state_bytes_per_param"]
    headers = ["optimizer", "rank", "per-layer", *(f"{label} GB" for _, label in terms),
               "state bytes/param"]
    shown = [{**r, **{f"{key}_gb": r[key] / GB for key, _ in terms}} for r in rows]
    formats = {c: ".2f" for c in columns if c.endswith("_gb")}
    formats["state_bytes_per_param"] = ".3f"
    return markdown_table(shown, columns, headers=headers, formats=formats)


def describe_model(config: Any, title: str, parameters: int, weights: str) -> str:
    shape = ", ".join(f"{label} {getattr(config, key)}" for label, key in (
        ("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
        ("layers", "num_hidden_layers"), ("heads", "num_attention_heads"),
        ("vocab", "vocab_size")) if getattr(config, key, None) is not None)
    count = f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.2f}M"
    held = (f"{weights} weights and gradients" if weights != INT8 else
            "INT8 linear weights (one fp32 scale per 128 input columns) with fp32 gradients, "
            "embeddings, norms and head in bf16")
    return f"{title}: {count} parameters ({shape}), {held}"


def describe_activations(step: Step, activations: Any) -> str:
    """One line: the step the activations are for, their peak moment and its largest terms."""
    terms = sorted(((v, k) for k, v in activations.moments[activations.moment].items() if v),
                   reverse=True)
    largest = ", ".join(f"{k.replace('_', ' ')} {v / GB:.2f}" for v, k in terms[:4])
    checkpointing = "activation checkpointing" if step.checkpointing else "no checkpointing"
    dtype = "bf16" if step.weights == INT8 else step.weights
    return (f"activations: batch {step.batch} x {step.seq_len} tokens, {checkpointing}, "
            f"{dtype}; peak {activations.peak / GB:.2f} GB at {activations.moment} "
            f"({largest}, ...)")


def run(args: argparse.Namespace) -> int:
    """The `memopt estimate` command: print the table (and write --json)."""
    from .. import optim, projections
    from .arguments import UsageError, check_settings
    from .presets import PRESETS
    try:
        config, title, default_rank = model_config(args)
        optimizers = expand_optimizers(args.optimizers, args.bits)
        check_settings(args, optimizers, "estimate")
        rank = args.rank if args.rank is not None else default_rank
        if args.rank is not None and not any(map(is_low_rank, optimizers)):
            raise EstimateError(f"argument --rank: none of {', '.join(optimizers)} has a rank "
                                f"(--rank is for {', '.join(low_rank_names())} and the "
                                "compositions)")
        per_layer = {"no": [False], "yes": [True], "both": [False, True]}[args.per_layer]
        seq_len = args.seq_len if args.seq_len is not None else (
            PRESETS[args.model].seq_len if args.model in PRESETS else SEQ_LEN)
        step = Step(args.weights, args.batch, seq_len, args.checkpointing == "yes")
        try:
            activations = step.activations(config)
        except ValueError as exc:
            raise EstimateError(f"argument --model: {exc}") from None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = estimate_rows(config, optimizers, per_layer, step, rank, dict(args.options))
    except EstimateError as exc:
        raise UsageError(str(exc)) from None
    print(describe_model(config, title, rows[0]["parameters"], args.weights))
    print(format_table(rows))
    print(describe_activations(step, activations))
    temporaries = " + update temporaries" if any(r["update_temporaries"] for r in rows) else ""
    print(f"peak = weights + gradients + optimizer state + activations{temporaries} "
          "(memopt.optim.estimate_memory), each at its own peak; kernels' workspaces are not "
          "included. GB = 1e9 bytes.")
    ours = tuple(str(Path(m.__file__).parent) for m in (optim, projections))
    for message in dict.fromkeys(str(w.message) for w in caught if w.filename.startswith(ours)):
        print(f"note: {message}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": title, "weights": args.weights, "batch": step.batch,
             "seq_len": step.seq_len, "checkpointing": args.checkpointing,
             "activation_moment": activations.moment,
             "activation_terms": activations.moments[activations.moment], "rows": rows},
            indent=1))
    return 0
