"""Shared models, data and optimizer factories for the optimizer tests (imported as `helpers`)."""

from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import torch
from torch import nn

from memopt import optim as mo

warnings.filterwarnings("ignore", message=".*kernels.*")

#: name -> factory(params, **overrides); small ranks and gaps so tests cross refreshes.
LOWRANK = {
    "galore": lambda params, **kw: mo.GaLoreAdamW(params, **{"lr": 1e-2, "rank": 4,
                                                            "update_proj_gap": 3, **kw}),
    "dct": lambda params, **kw: mo.DCTAdamW(params, **{"lr": 1e-2, "rank": 4,
                                                      "update_proj_gap": 3, **kw}),
    "fira": lambda params, **kw: mo.FiraAdamW(params, **{"lr": 1e-2, "rank": 4,
                                                        "update_proj_gap": 3, **kw}),
    # Trion refreshes every step (its default); GaLoreMuon crosses refreshes as the others
    "trion": lambda params, **kw: mo.Trion(params, **{"lr": 0.02, "rank": 4, **kw}),
    "galoremuon": lambda params, **kw: mo.GaLoreMuon(params, **{"lr": 0.02, "rank": 4,
                                                               "update_proj_gap": 3, **kw}),
}
POLAR = {
    "muon": lambda params, **kw: mo.Muon(params, **{"lr": 0.02, **kw}),
    "polargrad": lambda params, **kw: mo.PolarGrad(params, **{"lr": 0.02, **kw}),
}
OPTIMIZERS = {**LOWRANK, **POLAR}


def make(name: str, params, bits: int = 32, **kw):
    return OPTIMIZERS[name](params, **{"state_bits": bits, **kw})


def all_optimizer_params():
    """(name, bits) for every optimizer and bit width, as pytest params."""
    return [pytest.param(n, b, id=f"{n}-{b}bit") for n in OPTIMIZERS for b in (32, 8)]


class SmallNet(nn.Module):
    """Matrices big enough to be projected at rank 4 and quantized in 8 bits, plus a conv,
    a norm, a bias and a 1-D parameter: every kind of parameter an optimizer must route."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(8 * 16, 96)
        self.fc2 = nn.Linear(96, 80, bias=False)
        self.norm = nn.LayerNorm(80)
        self.head = nn.Linear(80, 3)
        self.to(dtype)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc1(h))
        return self.head(self.norm(self.fc2(h)))


_TEACHER = torch.randn(64, 3, generator=torch.Generator().manual_seed(1234)) / 8


def small_batch(seed: int = 0, dtype=torch.float32):
    """Inputs and the targets of a fixed random teacher, y = sin(x W) (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, 16, generator=gen)
    y = torch.sin(x.flatten(1) @ _TEACHER)
    return x.to(dtype), y.to(dtype)


def small_loss(model, seed: int):
    x, y = small_batch(seed, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def train(model, opt, steps: int, start: int = 0):
    losses = []
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss = small_loss(model, t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def clone_state(opt) -> dict:
    """A deep copy of an optimizer's state dict (tensors cloned)."""
    return copy.deepcopy(opt.state_dict())


def round_trip(obj):
    """torch.save then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def tiny_llama(seed: int = 0, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(dtype)


def byte_batches(n_batches: int, batch: int = 8, seq: int = 32, seed: int = 0):
    """Batches of byte tokens from a fixed text (this file's source of json, in the stdlib)."""
    data = torch.tensor(list(open(json.__file__, "rb").read()), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        out.append(torch.stack([data[s:s + seq] for s in starts.tolist()]))
    return out
