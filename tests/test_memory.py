"""estimate_memory: the state it predicts is the state each optimizer keeps, byte for byte."""

from __future__ import annotations

import resource
import time

import pytest
import torch

from helpers import SmallNet, small_loss, tiny_llama
from memopt.optim import OPTIMIZER_NAMES, create_optimizer, state_bytes
from memopt.optim.memory import estimate_memory

LOWRANK = ("galore", "dct", "fira")


def _kwargs(name: str, rank: int) -> dict:
    """rank for the low-rank optimizers only (the others do not take it)."""
    return {"rank": rank} if name.removesuffix("8bit") in LOWRANK else {}


def _measured_state(opt: torch.optim.Optimizer) -> int:
    """memopt's own count, or every tensor in the state of a baseline."""
    if opt.__module__.startswith("memopt"):
        return state_bytes(opt)
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def _llama_7b_config():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=32, num_attention_heads=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_estimate_matches_state_after_one_step(name, dtype):
    # rank 32 < 64: every hidden matrix is projected; the (128, 32) moments of the MLP's
    # gate and up projections are just big enough (4096) to be 8-bit, the (64, 32) are not.
    model = tiny_llama(dtype=dtype)
    opt = create_optimizer(name, model, **_kwargs(name, 32))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert estimate_memory(model, name, **_kwargs(name, 32))["optimizer_state"] == \
        _measured_state(opt)


@pytest.mark.parametrize("name, kwargs", [
    ("galore", {"rank": 4, "projector": "polar"}),
    ("galore", {"rank": 4, "projector_options": {"side": "right"}}),
    ("dct8bit", {"rank": 4}),
    ("dct", {"rank": 4, "error_feedback": "fp32"}),
    ("galore", {"rank": 4, "error_feedback": "8bit"}),
    ("fira", {"rank": 4}),
    ("muon8bit", {}),
])
def test_estimate_matches_state_with_conv_and_options(name, kwargs):
    model = SmallNet()
    opt = create_optimizer(name, model, **kwargs)
    small_loss(model, 0).backward()
    opt.step()
    assert estimate_memory(model, name, **kwargs)["optimizer_state"] == state_bytes(opt)


def test_7b_config_is_estimated_on_the_meta_device_in_seconds():
    config = _llama_7b_config()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    start = time.perf_counter()
    estimate = estimate_memory(config, "galore8bit")
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 2**20   # < 1 GiB
    assert estimate["parameters"] == pytest.approx(6.74e9, rel=0.01)
    assert estimate["weights"] == 4 * estimate["parameters"]


def test_per_layer_gradients_are_the_largest_parameter():
    model = tiny_llama()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert estimate_memory(model, "adamw", per_layer=True)["gradients"] == largest
    assert largest < estimate_memory(model, "adamw")["gradients"]


def test_total_is_weights_gradients_and_state():
    estimate = estimate_memory(tiny_llama(), "galore", rank=16)
    assert estimate["total"] == (estimate["weights"] + estimate["gradients"]
                                 + estimate["optimizer_state"])


def test_bf16_weights_are_half_of_fp32_and_the_model_is_untouched():
    model = tiny_llama()
    fp32 = estimate_memory(model, "adamw")
    bf16 = estimate_memory(model, "adamw", weight_dtype=torch.bfloat16)
    assert 2 * bf16["weights"] == fp32["weights"]
    # AdamW's two moments follow the weights' dtype (2 x 4 -> 2 x 2 bytes); its steps stay fp32
    assert fp32["optimizer_state"] - bf16["optimizer_state"] == fp32["weights"]
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("name", ["galore", "dct"])
def test_8bit_state_is_smaller_for_7b(name):
    config = _llama_7b_config()
    full = estimate_memory(config, name)["optimizer_state"]
    assert estimate_memory(config, name + "8bit")["optimizer_state"] < full / 2


def test_larger_rank_needs_more_state():
    config = _llama_7b_config()
    assert estimate_memory(config, "galore", rank=128)["optimizer_state"] < \
        estimate_memory(config, "galore", rank=512)["optimizer_state"]


def test_unknown_optimizer_name_raises():
    with pytest.raises(ValueError, match="unknown optimizer"):
        estimate_memory(tiny_llama(), "sgd")
