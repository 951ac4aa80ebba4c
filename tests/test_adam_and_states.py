"""The shared Adam update (fused and reference paths) and 8-bit moment storage."""

import pytest
import torch

from memopt.optim.adam import adam_updates, adamw_steps
from memopt.optim.states import MIN_8BIT_NUMEL, MomentStore, dequantize, quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_and_reference_adam_agree(dtype):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(40, 30, generator=gen, dtype=dtype) for _ in range(5)]
    moments = {fused: (torch.zeros(40, 30, dtype=dtype), torch.zeros(40, 30, dtype=dtype))
               for fused in (True, False)}
    for t, g in enumerate(grads, start=1):
        out = {f: adam_updates([g], *([x] for x in moments[f]), beta1=0.9, beta2=0.99,
                               eps=1e-8, step=t, fused=f)[0] for f in (True, False)}
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert torch.allclose(out[True], out[False], atol=tol, rtol=tol)
        for a, b in zip(moments[True], moments[False]):
            assert torch.allclose(a, b, atol=tol, rtol=tol)


def test_first_adam_update_is_minus_sign_like():
    g = torch.tensor([[2.0, -3.0], [0.5, -1e-3]])
    (u,) = adam_updates([g], [torch.zeros(2, 2)], [torch.zeros(2, 2)], beta1=0.9, beta2=0.999,
                        eps=1e-8, step=1)
    assert torch.allclose(u, -g / (g.abs() + 1e-8), atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_step_matches_torch_adamw(fused):
    torch.manual_seed(0)
    p = torch.randn(17, 5)
    q = torch.nn.Parameter(p.clone())
    ref = torch.optim.AdamW([q], lr=0.01, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1,
                            fused=fused, foreach=None if fused else False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 5):
        g = torch.randn(17, 5)
        q.grad = g.clone()
        ref.step()
        adamw_steps([p], [g], [m], [v], lr=0.01, beta1=0.8, beta2=0.95, eps=1e-7,
                    weight_decay=0.1, step=t, fused=fused)
    assert torch.allclose(p, q.detach(), atol=1e-7, rtol=1e-6)


def test_bf16_parameter_with_fp32_moments():
    p = torch.randn(16, 16).to(torch.bfloat16)
    m, v = torch.zeros(16, 16), torch.zeros(16, 16)
    g = torch.randn(16, 16).to(torch.bfloat16)
    before = p.clone()
    adamw_steps([p], [g], [m], [v], lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                step=1)
    assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
    expected = before.float() - 0.01 * g.float() / (g.float().abs() + 1e-8)
    assert torch.allclose(p.float(), expected, atol=1e-2)


def test_several_tensors_in_one_fused_call_equal_one_by_one():
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen) for s in [(5, 7), (11,), (3, 4, 2)]]
    together = [(torch.zeros_like(g), torch.zeros_like(g)) for g in grads]
    alone = [(torch.zeros_like(g), torch.zeros_like(g)) for g in grads]
    for t in (1, 2):
        us = adam_updates(grads, [m for m, _ in together], [v for _, v in together], beta1=0.9,
                          beta2=0.999, eps=1e-8, step=t)
        for g, (m, v), u in zip(grads, alone, us):
            (u1,) = adam_updates([g], [m], [v], beta1=0.9, beta2=0.999, eps=1e-8, step=t)
            assert torch.equal(u, u1) and u.shape == g.shape


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_round_trip_is_close_and_matches_bitsandbytes(signed):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(300, 70)
    x = x if signed else x.square()
    q, absmax = quantize(x, signed)
    assert q.dtype == torch.uint8 and q.shape == x.shape and absmax.numel() == -(-x.numel() // 256)
    ref, state = bnbF.quantize_blockwise(x, code=bnbF.create_dynamic_map(signed=signed),
                                         blocksize=256)
    assert torch.equal(q.flatten(), ref.flatten()) and torch.equal(absmax, state.absmax)
    y = dequantize(q, absmax, signed)
    # dynamic 8-bit codes: relative error of a few percent of each block's maximum
    blocks = x.flatten()[: (x.numel() // 256) * 256].view(-1, 256).abs().amax(1)
    err = (y - x).flatten()[: blocks.numel() * 256].view(-1, 256).abs().amax(1)
    assert (err <= 0.05 * blocks).all()


def test_moment_store_keeps_small_tensors_in_fp32():
    store = MomentStore(8, {"exp_avg": True})
    state = {}
    store.init(state, "exp_avg", (MIN_8BIT_NUMEL - 1,), torch.device("cpu"))
    assert state["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in state
    big = {}
    store.init(big, "exp_avg", (64, 64), torch.device("cpu"))
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg_absmax"].dtype == torch.float32
    m = store.read(big, "exp_avg")
    m.add_(1.0)
    store.write(big, "exp_avg", m)
    assert torch.allclose(store.read(big, "exp_avg"), torch.ones(64, 64), atol=1e-2)


def test_moment_store_rejects_other_widths():
    with pytest.raises(ValueError, match="state_bits"):
        MomentStore(16, {})


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_in_place_adam_gives_the_same_bits_as_a_zeroed_buffer(fused, device):
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 30), (7,), (5, 3, 2)]
    moments = {p: [(torch.zeros(s, device=device), torch.zeros(s, device=device)) for s in shapes]
               for p in (True, False)}
    for t in range(1, 4):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        kept = [g.clone() for g in grads]
        out = {}
        for in_place in (True, False):
            gs = [g.clone() for g in grads]
            ms, vs = zip(*moments[in_place])
            out[in_place] = adam_updates(gs, list(ms), list(vs), beta1=0.9, beta2=0.99,
                                         eps=1e-8, step=t, fused=fused, in_place=in_place)
            if in_place:
                assert all(u.data_ptr() == g.data_ptr() for u, g in zip(out[True], gs))
        for a, b in zip(out[True], out[False]):
            assert torch.equal(a, b)
        for (m1, v1), (m2, v2) in zip(moments[True], moments[False]):
            assert torch.equal(m1, m2) and torch.equal(v1, v2)
        assert all(torch.equal(g, k) for g, k in zip(grads, kept))
