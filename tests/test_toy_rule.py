"""A new rule is one file plus one registry line (tests/toy_sign_rule.py): with no other
edit it gets 8-bit state, bit-exact resume, estimate_memory, FSDP2 sharding and checkpoints,
and optimizer names for create_optimizer and the command line."""

from __future__ import annotations

import io
import json
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import toy_sign_rule  # noqa: F401  (registers the rule "sign")
from helpers import SmallNet, small_batch, train

from memopt import optim as mo
from memopt.optim.distributed import ROW_SHARDED_STATE

NAME = "svd+sign"


def build(bits=32, impl="fast", **kw):
    torch.manual_seed(0)
    model = SmallNet()
    opt = mo.create_optimizer(NAME + ("+8bit" if bits == 8 else ""), model.parameters(),
                              **{"lr": 3e-3, "rank": 4, "update_proj_gap": 3, "impl": impl,
                                 **kw})
    return model, opt


def test_the_rule_is_registered_with_its_declared_state():
    assert "sign" in mo.RULES
    assert "sign_momentum" in ROW_SHARDED_STATE
    with pytest.raises(ValueError, match="declares no state"):
        mo.register_rule(type("Empty", (toy_sign_rule.SignRule,), {"name": "empty", "STATE": ()}))
    with pytest.raises(ValueError, match="beta"):
        build(beta=1.5)
    with pytest.raises(TypeError, match="option of rule 'adam'"):
        build(betas=(0.9, 0.99))


def test_it_trains_and_its_batched_step_is_its_reference_step():
    losses = {}
    for impl in ("fast", "reference"):
        model, opt = build(impl=impl)
        losses[impl] = train(model, opt, 40)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        losses[impl + "-weights"] = weights
    assert sum(losses["fast"][-5:]) / 5 < 0.6 * losses["fast"][0]      # 0.60 -> 0.30
    for k, v in losses["fast-weights"].items():
        torch.testing.assert_close(v, losses["reference-weights"][k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [32, 8])
def test_8bit_state_and_bit_exact_resume_across_refresh(bits):
    pytest.importorskip("bitsandbytes") if bits == 8 else None
    model, opt = build(bits, rank=40)      # fc1's (40, 128) coordinates: 8 bits from 4096
    train(model, opt, 4)
    if bits == 8:
        codes = [s["sign_momentum"] for s in opt.state.values() if "sign_momentum" in s]
        assert any(c.dtype == torch.uint8 for c in codes)
        assert all(s["sign_momentum" + "_absmax"].dtype == torch.float32
                   for s in opt.state.values() if s.get("sign_momentum", torch.zeros(0)).dtype
                   == torch.uint8)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    train(model, opt, 5, start=4)                      # crosses the refresh at step 7
    model2, opt2 = build(bits, rank=40)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    train(model2, opt2, 5, start=4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [32, 8])
def test_estimate_memory_is_the_state_after_a_step(bits):
    pytest.importorskip("bitsandbytes") if bits == 8 else None
    model, opt = build(bits)
    estimate = mo.estimate_memory(SmallNet(), NAME + ("+8bit" if bits == 8 else ""), rank=4)
    train(model, opt, 1)
    assert estimate["optimizer_state"] == mo.state_bytes(opt)


def test_a_command_line_name():
    from memopt.recipes.cli import main
    out = tempfile.mkdtemp()
    assert main(["train", "--optimizer", NAME, "--preset", "tiny", "--steps", "3",
                 "--out", out, "--no-progress"]) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["optimizer"] == NAME


WORLD = 2


def fsdp_worker(rank, path, folder):
    import torch.distributed.checkpoint as dcp
    from test_distributed import train_on_rank, wrap
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    import toy_sign_rule  # noqa: F401,F811  (a spawned process registers it again)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)

    def make():
        torch.manual_seed(0)
        model = wrap(SmallNet(), "fsdp")
        return model, mo.create_optimizer(NAME, model.parameters(), lr=3e-3, rank=4,
                                          update_proj_gap=3)

    def steps(model, opt, ts):
        train_on_rank(model, opt, ts, rank)

    model, opt = make()
    steps(model, opt, range(4))
    where = os.path.join(folder, "ckpt")
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=where)
    steps(model, opt, range(4, 7))
    model2, opt2 = make()
    state = {"model": model2.state_dict(), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=where)
    model2.load_state_dict(state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    steps(model2, opt2, range(4, 7))
    full = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    resumed = max(float((a.full_tensor() - b.full_tensor()).abs().max())
                  for a, b in zip(model.parameters(), model2.parameters()))
    torch.save({"params": full, "resumed": resumed}, os.path.join(folder, f"out.{rank}"))
    dist.barrier()    # every rank done before teardown (gloo aborted at exit otherwise)
    dist.destroy_process_group()


def test_fsdp2_shards_its_state_and_matches_one_process():
    folder = tempfile.mkdtemp()
    mp.spawn(fsdp_worker, args=(os.path.join(folder, "store"), folder), nprocs=WORLD)
    torch.manual_seed(0)
    model, opt = build(projector_options={"side": "right"})     # FSDP2's side: rows sharded
    for t in range(7):
        opt.zero_grad()
        ((model(small_batch(t)[0]) - small_batch(t)[1]) ** 2).mean().backward()
        opt.step()
    for rank in range(WORLD):
        result = torch.load(os.path.join(folder, f"out.{rank}"), weights_only=True)
        assert result["resumed"] == 0.0
        for k, v in model.state_dict().items():
            torch.testing.assert_close(result["params"][k], v, atol=2e-5, rtol=1e-4)
