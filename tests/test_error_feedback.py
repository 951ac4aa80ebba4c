"""Error feedback (``error_feedback="fp32" | "8bit"``) of the low-rank optimizers: what the
projection discards is carried into the next gradient (optim/error_feedback.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import round_trip
from memopt import optim as mo
from memopt.projections import lift, project_onto


def matrix(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)


def gradient(shape, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(shape, generator=gen)


def lifted(G, opt, p):
    proj = opt.projector(p)
    P = proj.basis()
    return lift(project_onto(G, P, proj.side), P, proj.side)


@pytest.mark.parametrize("gap", [1, 3])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])      # right and left bases
@pytest.mark.parametrize("cls", [mo.GaLoreAdamW, mo.DCTAdamW])
def test_lifted_projection_plus_new_buffer_is_the_corrected_gradient(cls, shape, gap):
    p = matrix(shape)
    opt = cls([p], lr=0.01, rank=4, update_proj_gap=gap, error_feedback="fp32")
    E = torch.zeros(shape)
    for t in range(4):
        p.grad = gradient(shape, t)
        corrected = p.grad + E
        opt.step()
        E = opt.state[p]["error_buffer"].clone()
        torch.testing.assert_close(lifted(corrected, opt, p) + E, corrected, rtol=0, atol=1e-5)
        P = opt.projector(p).basis()
        inside = P.mT @ E if opt.projector(p).side == "left" else E @ P
        assert inside.abs().max() < 1e-5                     # E lies outside the subspace
        assert E.abs().max() > 0.1                           # and is not trivially zero
        assert torch.equal(p.grad, gradient(shape, t))       # the caller's gradient is kept


@pytest.mark.parametrize("gap", [1, 2])
def test_the_step_runs_on_the_corrected_gradient(gap):
    """A GaLore step with feedback equals a GaLore step without it fed G + E: the basis is
    refreshed from G + E (gap 1: every step) and Adam sees its projection."""
    shape = (32, 48)
    p, q = matrix(shape), matrix(shape)
    ef = mo.GaLoreAdamW([p], lr=0.01, rank=4, update_proj_gap=gap, error_feedback="fp32")
    plain = mo.GaLoreAdamW([q], lr=0.01, rank=4, update_proj_gap=gap)
    E = torch.zeros(shape)
    for t in range(5):
        G = gradient(shape, t)
        p.grad, q.grad = G.clone(), G + E
        ef.step()
        plain.step()
        E = ef.state[p]["error_buffer"].clone()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


def test_fast_and_reference_steps_agree_with_feedback():
    shape = (64, 40)
    params = [matrix(shape, s) for s in range(3)]
    twins = [copy.deepcopy(p) for p in params]
    fast = mo.DCTAdamW(params, lr=0.01, rank=6, update_proj_gap=2, error_feedback="fp32")
    ref = mo.DCTAdamW(twins, lr=0.01, rank=6, update_proj_gap=2, error_feedback="fp32",
                      impl="reference")
    for t in range(5):
        for i, (a, b) in enumerate(zip(params, twins)):
            a.grad, b.grad = gradient(shape, 10 * t + i), gradient(shape, 10 * t + i)
        fast.step()
        ref.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def test_8bit_buffer_is_quantized_and_counted():
    pytest.importorskip("bitsandbytes")
    shape = (96, 128)                                        # 12288 elements >= 4096
    sizes = {}
    for mode in ("none", "fp32", "8bit"):
        p = matrix(shape)
        opt = mo.GaLoreAdamW([p], lr=0.01, rank=8, error_feedback=mode)
        p.grad = gradient(shape, 0)
        corrected = p.grad.clone()
        opt.step()
        sizes[mode] = mo.state_bytes(opt)
        if mode == "8bit":
            assert opt.state[p]["error_buffer"].dtype == torch.uint8
            E = opt._store(8).read(opt.state[p], "error_buffer")
            exact = corrected - lifted(corrected, opt, p)    # what fp32 feedback keeps
            assert (E - exact).abs().max() < 0.02 * exact.abs().max()
    n = shape[0] * shape[1]
    assert sizes["fp32"] - sizes["none"] == 4 * n
    assert sizes["8bit"] - sizes["none"] == n + 4 * (n // 256)


def test_a_failed_step_leaves_the_buffer_as_it_was():
    shape = (40, 24)
    p = matrix(shape)
    opt = mo.GaLoreAdamW([p], lr=0.01, rank=4, error_feedback="fp32")
    p.grad = gradient(shape, 0)
    opt.step()
    before = opt.state[p]["error_buffer"].clone()
    weights = p.detach().clone()
    p.grad = gradient(shape, 1)
    p.grad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(opt.state[p]["error_buffer"], before)
    assert torch.equal(p.detach(), weights)


def test_resume_with_feedback_is_bit_exact():
    shape = (40, 24)
    p, q = matrix(shape), matrix(shape)
    a = mo.DCTAdamW([p], lr=0.01, rank=4, update_proj_gap=2, error_feedback="fp32")
    for t in range(3):
        p.grad = gradient(shape, t)
        a.step()
    q.data.copy_(p.detach())
    b = mo.DCTAdamW([q], lr=0.01, rank=4, update_proj_gap=2, error_feedback="fp32")
    b.load_state_dict(round_trip(a.state_dict()))
    for t in range(3, 6):
        p.grad, q.grad = gradient(shape, t), gradient(shape, t)
        a.step()
        b.step()
    assert torch.equal(p.detach(), q.detach())


def test_bad_settings_are_clear_errors():
    p = matrix((40, 24))
    with pytest.raises(ValueError, match="error_feedback"):
        mo.GaLoreAdamW([p], rank=4, error_feedback="yes")
    with pytest.raises(ValueError, match="error_feedback.*fira"):
        mo.FiraAdamW([p], rank=4, error_feedback="fp32")


def test_bf16_weights_keep_an_fp32_buffer_and_their_gradient():
    p = torch.nn.Parameter(torch.randn(40, 24, dtype=torch.bfloat16))
    opt = mo.DCTAdamW([p], lr=0.01, rank=4, error_feedback="fp32")
    for t in range(3):
        G = gradient((40, 24), t).to(torch.bfloat16)
        p.grad = G
        opt.step()
        assert p.grad is G
    assert opt.state[p]["error_buffer"].dtype == torch.float32
    assert torch.isfinite(p).all()
