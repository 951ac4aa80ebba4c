"""State dicts saved by memopt 0.1 (main at 11c3d34, before the core rebuild) still load and
continue as that code continued them (to float32 rounding: see ATOL).

The fixtures ``tests/fixtures/state_v0_1_<name>_<bits>.pt`` were written by this file's
``write_fixtures()`` (``python tests/test_saved_state.py``) at commit 11c3d34: for each of
GaLore, DCT, Fira, Muon and PolarGrad at 32 and 8 bits, a tiny model (a linear layer, a conv
kernel, a bias; with 8 bits also a matrix large enough for its state to be quantized) is
trained ``STEPS`` steps on seeded gradients (``update_proj_gap=3``: a basis refresh at steps
0 and 3), and the file holds the parameters, ``optimizer.state_dict()``, and the parameters
after one more step on the gradients of seed ``STEPS``. Do not regenerate them with newer
code: they are the old format and the old numbers.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from memopt import optim as mo

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")
STEPS = 4
# On the machine that wrote the fixtures the continuation was bit-exact. Another CPU or torch
# build rounds the same float32 arithmetic differently (seen: 1 ulp, 6e-8, on an AMD EPYC with the
# same torch 2.13.0; a larger difference in Muon's 64 x 64 Newton-Schulz under torch 2.11 on a GPU
# machine's CPU), so the parameters must agree to ATOL. A state that did not load (a fresh
# optimizer) misses the expected parameters by 1.6e-2 or more in every case: 1600 x ATOL.
ATOL = 1e-5
CLASSES = {"galore": mo.GaLoreAdamW, "dct": mo.DCTAdamW, "fira": mo.FiraAdamW,
           "muon": mo.Muon, "polargrad": mo.PolarGrad}
LOWRANK_KW = {"lr": 1e-2, "rank": 4, "update_proj_gap": 3, "weight_decay": 0.1}
CASES = [(name, bits) for name in CLASSES for bits in (32, 8)]


def shapes(name: str, bits: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes: a linear weight, a conv kernel, a bias; with 8 bits one matrix whose
    moments (low-rank: 4 x 1024) or momentum (64 x 64) reach bitsandbytes' 4096 elements."""
    out = {"fc": (16, 12), "conv": (6, 2, 3), "bias": (16,)}
    if bits == 8:
        out["big"] = (5, 1024) if name in ("galore", "dct", "fira") else (64, 64)
    return out


#: Options whose 0.1 default has changed and which decide what the state holds: a 0.1 state
#: loads into an optimizer built with the value it was saved with (a default one refuses it).
OLD_STRUCTURE = {"polargrad": {"scaling": "nuclear_norm"}}


def build(name: str, bits: int, params: dict[str, torch.Tensor],
          old_defaults: bool = True) -> torch.optim.Optimizer:
    named = list(params.items())
    kw = LOWRANK_KW if name in ("galore", "dct", "fira") else {"lr": 0.02, "weight_decay": 0.1}
    if old_defaults:
        kw = {**kw, **OLD_STRUCTURE.get(name, {})}
    return CLASSES[name]([{"params": named}], state_bits=bits, **kw)


def gradients(params: dict[str, torch.Tensor], seed: int) -> None:
    gen = torch.Generator().manual_seed(1000 + seed)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen)


def fixture_path(name: str, bits: int) -> str:
    return os.path.join(FIXTURES, f"state_v0_1_{name}_{bits}.pt")


def write_fixtures() -> None:
    os.makedirs(FIXTURES, exist_ok=True)
    for name, bits in CASES:
        gen = torch.Generator().manual_seed(7)
        params = {k: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.3)
                  for k, s in shapes(name, bits).items()}
        opt = build(name, bits, params)
        for t in range(STEPS):
            gradients(params, t)
            opt.step()
        saved = {k: p.detach().clone() for k, p in params.items()}
        state = copy.deepcopy(opt.state_dict())     # the step below changes it in place
        gradients(params, STEPS)
        opt.step()
        expected = {k: p.detach().clone() for k, p in params.items()}
        torch.save({"params": saved, "optimizer": state, "expected": expected},
                   fixture_path(name, bits))


@pytest.mark.parametrize("name,bits", CASES)
def test_saved_state_of_v0_1_loads_and_continues_exactly(name, bits):
    if bits == 8:
        pytest.importorskip("bitsandbytes")
    saved = torch.load(fixture_path(name, bits), weights_only=True)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    opt = build(name, bits, params)
    opt.load_state_dict(saved["optimizer"])
    gradients(params, STEPS)
    opt.step()
    for k, p in params.items():
        torch.testing.assert_close(p.detach(), saved["expected"][k], rtol=0, atol=ATOL,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_saved_state_of_v0_1_polargrad_is_refused_under_the_new_default_scaling():
    """0.1's PolarGrad scaled by the nuclear norm; today's default scales relative to its
    average, whose state the old one lacks: loading names the option to pass."""
    saved = torch.load(fixture_path("polargrad", 32), weights_only=True)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in saved["params"].items()}
    opt = build("polargrad", 32, params, old_defaults=False)
    with pytest.raises(ValueError, match="scaling='nuclear_norm'"):
        opt.load_state_dict(saved["optimizer"])
    assert not opt.state


if __name__ == "__main__":
    sys.exit(write_fixtures())
