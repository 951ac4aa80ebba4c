"""Peak GPU memory of one LLaMA training step per optimizer, beside memopt's estimate.

    python -m memopt.recipes.bench.memory [--models 7b,1b] [--out FILE]

Each (model, optimizer) runs in a fresh process: bf16 weights built on the GPU, sequence
256, batch 1, activation checkpointing, and one forward / backward / update, with the
update per layer in the backward pass (``step_in_backward``) where the row says so. The
table shows ``torch.cuda.max_memory_allocated`` and ``estimate_memory``'s weights +
gradients + optimizer state (activations are not in the estimate).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import torch

from ..machine import environment
from ..report import markdown_table, write_json

#: LLaMA shapes: hidden, intermediate, heads, layers (LLaMA-7B; the GaLore paper's 1B).
MODELS = {"7b": (4096, 11008, 32, 32), "1b": (2048, 5461, 32, 24)}
#: (optimizer, per-layer updates, extra arguments) per row; rank 1024 for 7B and 512 for 1B
#: as in the GaLore paper.
ROWS = {
    "7b": [("adamw", False, {}), ("adamw8bit", False, {}), ("adamw8bit", True, {}),
           ("galore8bit", True, {"rank": 1024}), ("dct8bit", True, {"rank": 1024})],
    "1b": [("adamw", False, {}), ("adamw8bit", False, {}), ("galore", False, {"rank": 512}),
           ("dct", False, {"rank": 512}), ("fira", False, {"rank": 512}), ("muon", False, {}),
           ("polargrad", False, {}), ("galore8bit", True, {"rank": 512}),
           ("dct8bit", True, {"rank": 512}), ("muon8bit", True, {})],
}
SEQ_LEN, BATCH = 256, 1


def llama_config(name: str) -> Any:
    from transformers import LlamaConfig
    hidden, intermediate, heads, layers = MODELS[name]
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       num_hidden_layers=layers, max_position_embeddings=SEQ_LEN,
                       tie_word_embeddings=False)


def measure(model_name: str, optimizer: str, per_layer: bool, kwargs: dict[str, Any]) -> dict:
    """One step in this process; returns peak and estimated bytes."""
    from transformers import LlamaForCausalLM

    from ...optim import create_optimizer, estimate_memory, step_in_backward
    config = llama_config(model_name)
    device = torch.device("cuda")
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    estimate = estimate_memory(config, optimizer, per_layer=per_layer,
                               weight_dtype=torch.bfloat16, **kwargs)
    opt = create_optimizer(optimizer, model, lr=1e-4, **kwargs)
    handle = step_in_backward(model, opt) if per_layer else None
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):                        # the second step has all state in place
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if handle is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return {"model": model_name, "optimizer": optimizer, "per_layer": per_layer,
            "kwargs": kwargs, "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "estimate_gb": estimate["total"] / 1e9,
            "estimate_state_gb": estimate["optimizer_state"] / 1e9,
            "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="7b,1b")
    parser.add_argument("--optimizers", default=None,
                        help="comma-separated: only these rows (e.g. muon,polargrad)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child process
    args = parser.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(measure(**spec)), flush=True)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench.memory measures GPU memory and needs a CUDA device")
    rows = []
    for model_name in args.models.split(","):
        for optimizer, per_layer, kwargs in ROWS[model_name]:
            if args.optimizers and optimizer not in args.optimizers.split(","):
                continue
            spec = json.dumps({"model_name": model_name, "optimizer": optimizer,
                               "per_layer": per_layer, "kwargs": kwargs})
            done = subprocess.run([sys.executable, "-m", "memopt.recipes.bench.memory",
                                   "--one", spec], capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                row = json.loads(lines[-1][len("RESULT "):])
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"model": model_name, "optimizer": optimizer, "per_layer": per_layer,
                       "kwargs": kwargs, "error": tail[:160]}
            rows.append(row)
            print(row, flush=True)
    env = environment(torch.device("cuda"))
    print(f"\nOne training step, bf16 weights, sequence {SEQ_LEN}, batch {BATCH}, activation "
          f"checkpointing; {env}\n")
    print(markdown_table(rows, ["model", "optimizer", "per_layer", "kwargs", "peak_gb",
                                "estimate_gb", "estimate_state_gb", "error"]))
    write_json(args.out, {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
