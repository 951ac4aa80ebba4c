"""Peak GPU memory and speed of a LLaMA training step per optimizer, beside memopt's estimate.

    python -m memopt.recipes.bench.memory [--models 7b,1b] [--seq-len 256] [--batch 1]
        [--optimizers NAMES] [--weights bf16,int8] [--steps 4] [--out FILE]

Each row (model, optimizer, weights, per-layer updates, arguments) runs in a fresh process:
the model is built in bf16 directly on the GPU; an "int8" row then keeps every linear
weight but the output head in INT8 codes with one fp32 scale per 128 columns
(``memopt.quantize_weights(model, bits=8)``), before memory is counted, so that the bf16
copy it replaces does not count. Activation checkpointing is on (non-reentrant), and the
update runs per layer in the backward pass (``step_in_backward``) where the row says so.
``--steps`` training steps on random tokens; ``peak_gb`` is ``torch.cuda.max_memory_allocated``
over all of them, the first (optimizer state created, bases built) included; ``tokens_per_s``
is batch x sequence over the median time of the steps after the first, each timed between
two ``torch.cuda.synchronize``. ``weights_gb`` is what the model's weights take (codes and
scales for INT8 layers), ``estimate_gb`` ``estimate_memory``'s total for the row (with the
activations and INT8 weights where the installed ``estimate_memory`` takes them).

A row that runs out of memory or fails is reported with its error, the other rows go on.
The 7B rows with INT8 weights, per-layer updates and checkpointing are issue 29's "7B step
under 12 GB" configuration, at rank 1024 and 512, for each 8-bit low-rank optimizer.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..arguments import positive_int
from ..machine import environment
from ..report import markdown_table, write_json

#: LLaMA shapes: hidden, intermediate, heads, layers (LLaMA-7B; the GaLore paper's 1B).
MODELS = {"7b": (4096, 11008, 32, 32), "1b": (2048, 5461, 32, 24)}
VOCAB = 32000
WEIGHTS = ("bf16", "int8")
#: The 8-bit low-rank optimizers of the INT8 rows; galore8bit also with a 4-bit SVD basis.
INT8_OPTIMIZERS = ("galore8bit", "dct8bit", "fira8bit", "trion8bit", "galoremuon8bit")
FOUR_BIT_BASIS = {"projector_options": {"bits": 4}}
SEQ_LEN, BATCH, STEPS = 256, 1, 4
ROW_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Row:
    """One measurement: ``optimizer`` with ``kwargs`` on ``model``, weights in ``weights``
    ("bf16" or "int8"), updated per layer in the backward pass with ``per_layer``."""

    model: str
    optimizer: str
    per_layer: bool
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = "bf16"


def int8_rows(model: str, ranks: tuple[int, ...]) -> list[Row]:
    """INT8 weights, per-layer updates: each 8-bit low-rank optimizer at each rank."""
    rows = []
    for rank in ranks:
        for name in INT8_OPTIMIZERS:
            rows.append(Row(model, name, True, {"rank": rank}, "int8"))
            if name == "galore8bit":
                rows.append(Row(model, name, True, {"rank": rank, **FOUR_BIT_BASIS}, "int8"))
    return rows


#: Rank 1024 for 7B and 512 for 1B as in the GaLore paper; the 7B INT8 rows also at 512.
ROWS: dict[str, list[Row]] = {
    "7b": [Row("7b", "adamw", False), Row("7b", "adamw8bit", False),
           Row("7b", "adamw8bit", True), Row("7b", "galore8bit", True, {"rank": 1024}),
           Row("7b", "dct8bit", True, {"rank": 1024})] + int8_rows("7b", (1024, 512)),
    "1b": [Row("1b", "adamw", False), Row("1b", "adamw8bit", False),
           Row("1b", "galore", False, {"rank": 512}), Row("1b", "dct", False, {"rank": 512}),
           Row("1b", "fira", False, {"rank": 512}), Row("1b", "muon", False),
           Row("1b", "polargrad", False), Row("1b", "galore8bit", True, {"rank": 512}),
           Row("1b", "dct8bit", True, {"rank": 512}), Row("1b", "muon8bit", True)],
}
COLUMNS = ["model", "optimizer", "weights", "per_layer", "kwargs", "peak_gb", "tokens_per_s",
           "weights_gb", "estimate_gb", "estimate_state_gb", "error"]


# ------------------------------------------------------------------ arguments and rows
def names(text: str) -> list[str]:
    """A comma-separated list, empty items dropped."""
    return [n.strip() for n in text.split(",") if n.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--models", type=names, default=["7b", "1b"],
                   help=f"comma-separated, of {', '.join(MODELS)} (default: all)")
    p.add_argument("--optimizers", type=names, default=None,
                   help="comma-separated: only the rows of these optimizers")
    p.add_argument("--weights", type=names, default=list(WEIGHTS),
                   help="comma-separated: only the rows with these weights, bf16 or int8 "
                        "(default: both)")
    p.add_argument("--ranks", type=lambda t: [positive_int(x) for x in names(t)], default=None,
                   help="comma-separated: only the rows at these ranks (and those without one)")
    p.add_argument("--seq-len", type=positive_int, default=SEQ_LEN,
                   help=f"tokens per sequence (default: {SEQ_LEN}; issue 29 also asks 2048)")
    p.add_argument("--batch", type=positive_int, default=BATCH,
                   help=f"sequences per step (default: {BATCH})")
    p.add_argument("--steps", type=positive_int, default=STEPS,
                   help=f"training steps per row, the first untimed (default: {STEPS})")
    p.add_argument("--timeout", type=positive_int, default=ROW_TIMEOUT_S, metavar="S",
                   help=f"seconds a row may take (default: {ROW_TIMEOUT_S})")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child process
    return p


def select_rows(models: list[str], optimizers: list[str] | None = None,
                weights: list[str] | None = None, ranks: list[int] | None = None) -> list[Row]:
    """The rows of ``models`` (in that order), kept to ``optimizers``, ``weights`` and
    ``ranks`` (rows without a rank stay) when given; ValueError naming the flag for a name
    that selects nothing."""
    unknown = [m for m in models if m not in ROWS]
    if unknown:
        raise ValueError(f"--models: unknown model {unknown[0]!r}; choose from "
                         f"{', '.join(ROWS)}")
    bad = [w for w in weights or [] if w not in WEIGHTS]
    if bad:
        raise ValueError(f"--weights: unknown {bad[0]!r}; choose from {', '.join(WEIGHTS)}")
    rows = [r for m in models for r in ROWS[m]]
    missing = [o for o in optimizers or [] if o not in {r.optimizer for r in rows}]
    if missing:
        raise ValueError(f"--optimizers: no row of {', '.join(models)} has {missing[0]!r}")
    rows = [r for r in rows if (optimizers is None or r.optimizer in optimizers)
            and (weights is None or r.weights in weights)
            and (ranks is None or r.kwargs.get("rank") in (None, *ranks))]
    if not rows:
        raise ValueError("--optimizers / --weights / --ranks: together they select no row")
    return rows


# ------------------------------------------------------------------ one measurement
def llama_config(model: str, seq_len: int, shape: tuple[int, int, int, int] | None = None,
                 vocab: int = VOCAB) -> Any:
    """The LLaMA config of ``model`` (or of ``shape``: hidden, intermediate, heads, layers)."""
    from transformers import LlamaConfig
    hidden, intermediate, heads, layers = shape or MODELS[model]
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       num_hidden_layers=layers, max_position_embeddings=seq_len,
                       tie_word_embeddings=False)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created inside are made in ``dtype`` (no fp32 copy first)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def estimate(config: Any, row: Row, seq_len: int, batch: int) -> dict[str, Any]:
    """``estimate_memory`` of the row in GB; the INT8 weights, sequence, batch and
    checkpointing are passed only where the installed ``estimate_memory`` names them."""
    from ...optim import estimate_memory
    extra = estimate_extras(estimate_memory, row, seq_len, batch)
    try:
        out = estimate_memory(config, row.optimizer, per_layer=row.per_layer,
                              weight_dtype=torch.bfloat16, **extra, **row.kwargs)
    except Exception as exc:                      # noqa: BLE001 (the measurement goes on)
        return {"estimate_error": one_line(exc)}
    gb = {"estimate_gb": out["total"] / 1e9, "estimate_state_gb": out["optimizer_state"] / 1e9}
    if "activations" in out:
        gb["estimate_activations_gb"] = out["activations"] / 1e9
    return gb


def estimate_extras(estimate_memory: Any, row: Row, seq_len: int,
                    batch: int) -> dict[str, Any]:
    """The keyword arguments beyond the optimizer's that ``estimate_memory`` declares by
    name (not through ``**kwargs``, which go to the optimizer): ``weights`` ("int8" rows),
    ``seq_len``, ``batch`` and ``checkpointing``."""
    declared = {name for name, p in inspect.signature(estimate_memory).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    wanted = {"seq_len": seq_len, "batch": batch, "checkpointing": True}
    if row.weights == "int8":
        wanted["weights"] = "int8"
    return {k: v for k, v in wanted.items() if k in declared}


def measure(model: str, optimizer: str, per_layer: bool, kwargs: dict[str, Any],
            weights: str = "bf16", seq_len: int = SEQ_LEN, batch: int = BATCH,
            steps: int = STEPS, device: str = "cuda",
            shape: tuple[int, int, int, int] | None = None, vocab: int = VOCAB) -> dict:
    """Train the row's model ``steps`` steps in this process; its peak memory (CUDA only),
    tokens per second after the first step, the weights' bytes and the estimate."""
    from transformers import LlamaForCausalLM

    from ...optim import create_optimizer, step_in_backward
    from ...optim.quantize_model import quantize_weights
    from ..train import enable_activation_checkpointing, weight_bytes
    row = Row(model, optimizer, per_layer, kwargs, weights)
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    config = llama_config(model, seq_len, shape, vocab)
    where = torch.device(device)
    cuda = where.type == "cuda"
    torch.manual_seed(0)
    with where, default_dtype(torch.bfloat16):
        net = LlamaForCausalLM(config).to(torch.bfloat16)
    if weights == "int8":
        quantize_weights(net, bits=8)
    gc.collect()                                  # the replaced bf16 weights are freed now,
    if cuda:                                      # before the peak is counted
        torch.cuda.empty_cache()
    enable_activation_checkpointing(net)
    net.train()
    result: dict[str, Any] = {**asdict(row), "seq_len": seq_len, "batch": batch,
                              "weights_gb": weight_bytes(net) / 1e9,
                              **estimate(config, row, seq_len, batch)}
    opt = create_optimizer(optimizer, net, lr=1e-4, **kwargs)
    handle = step_in_backward(net, opt) if per_layer else None
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=where)
    if cuda:
        torch.cuda.synchronize(where)
        torch.cuda.reset_peak_memory_stats(where)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        if handle is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(where)
        seconds.append(time.perf_counter() - start)
    if cuda:
        result["peak_gb"] = torch.cuda.max_memory_allocated(where) / 1e9
    timed = seconds[1:]
    result.update(loss=loss.item(), step_s=seconds,
                  tokens_per_s=batch * seq_len / statistics.median(timed) if timed else None)
    return result


def one_line(exc: BaseException, limit: int = 300) -> str:
    said = " ".join(str(exc).split()) or type(exc).__name__
    said = f"{type(exc).__name__}: {said}"
    return said if len(said) <= limit else said[:limit - 3] + "..."


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """``measure(**spec)``; out of memory or any other failure as the row with its error
    (and, on CUDA, the peak reached before it)."""
    try:
        return measure(**spec)
    except Exception as exc:                      # noqa: BLE001 (reported in the row)
        row = {k: spec.get(k) for k in ("model", "optimizer", "per_layer", "kwargs", "weights",
                                        "seq_len", "batch")}
        if isinstance(exc, torch.OutOfMemoryError):
            row["error"] = "out of memory: " + one_line(exc, 200)
        else:
            row["error"] = one_line(exc)
        if torch.device(spec.get("device", "cuda")).type == "cuda" and torch.cuda.is_available():
            row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return row


def run_row(row: Row, seq_len: int, batch: int, steps: int, timeout: float = ROW_TIMEOUT_S,
            **where: Any) -> dict[str, Any]:
    """The row measured in a fresh process (``where``: ``device``, ``shape``, ``vocab`` for
    :func:`measure`); a process that dies or outlasts ``timeout`` is a row with its error."""
    spec = {**asdict(row), "seq_len": seq_len, "batch": batch, "steps": steps, **where}
    failed = {**asdict(row), "seq_len": seq_len, "batch": batch}
    try:
        done = subprocess.run([sys.executable, "-m", "memopt.recipes.bench.memory",
                               "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"timed out after {timeout:g} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {**failed, "error": f"exit status {done.returncode}: {tail[:200]}"}


# ------------------------------------------------------------------ the command
def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(child(json.loads(args.one))), flush=True)
        return 0
    try:
        rows = select_rows(args.models, args.optimizers, args.weights, args.ranks)
    except ValueError as exc:
        p.error(str(exc))
    if not torch.cuda.is_available():
        raise SystemExit("bench.memory measures GPU memory and needs a CUDA device")
    results = []
    for row in rows:
        result = run_row(row, args.seq_len, args.batch, args.steps, args.timeout)
        results.append(result)
        print(result, flush=True)
    env = environment(torch.device("cuda"))
    columns = COLUMNS[:-1] + ["estimate_activations_gb"] * any(
        "estimate_activations_gb" in r for r in results) + COLUMNS[-1:]
    print(f"\nTraining steps of batch {args.batch} x sequence {args.seq_len}, bf16 compute, "
          f"activation checkpointing, {args.steps} steps (tokens/s: the median after the "
          f"first); {env}\n")
    print(markdown_table(results, columns, formats={"tokens_per_s": ".0f"}))
    write_json(args.out, {"environment": env, "seq_len": args.seq_len, "batch": args.batch,
                          "steps": args.steps, "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
