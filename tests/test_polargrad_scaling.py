"""PolarGrad's scaling="relative_nuclear_norm" (ours): D = (nu_t / abar_t) polar(x), abar_t the
bias-corrected running average (beta NUCLEAR_AVERAGE_BETA) of the matrix's nuclear norm nu_t;
checked against float64 by hand, fast against reference, across a resume, in 8 bits, and on
zero and non-finite gradients."""

from __future__ import annotations

import copy
import io
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SmallNet, small_batch

from memopt import optim as mo
from memopt.optim.muon import NUCLEAR_AVERAGE_BETA
from memopt.optim.registry import create_optimizer
from memopt.optim.states import NUCLEAR_AVERAGE
from memopt.projections import orthogonalize

VARIANTS = ["momentum_first", "polar_first"]
RELATIVE = "relative_nuclear_norm"


def matrices(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def grads(shapes, t):
    """Gradients whose size changes from step to step, so the factor is not 1."""
    gen = torch.Generator().manual_seed(1000 + t)
    return [(0.5 + t) * torch.randn(s, generator=gen) for s in shapes]


def run(opt, params, steps, first=0):
    shapes = [p.shape for p in params]
    for t in range(first, first + steps):
        for p, g in zip(params, grads(shapes, t)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_is_muons_times_nuclear_norm_over_its_bias_corrected_average(variant):
    shape, lr, mu = (40, 24), 1e-2, 0.9
    p = matrices([shape])[0]
    W = p.detach().double().clone()
    opt = mo.PolarGrad([p], lr=lr, momentum=mu, orthogonalizer="svd", variant=variant,
                       scaling=RELATIVE, weight_decay=0.0)
    buf, a, beta = torch.zeros(shape, dtype=torch.float64), 0.0, NUCLEAR_AVERAGE_BETA
    for t in range(1, 6):
        G = grads([shape], t - 1)[0]
        p.grad = G
        before = p.detach().double().clone()
        opt.step()
        if variant == "momentum_first":
            buf = mu * buf + (1 - mu) * G.double()
            x, D = buf, orthogonalize(buf, "svd")
        else:
            x, U = G.double(), orthogonalize(G.double(), "svd")
            buf = mu * buf + (1 - mu) * U
            D = buf
        nu = torch.linalg.svdvals(x).sum().item()
        a = beta * a + (1 - beta) * nu
        factor = nu / (a / (1 - beta ** t))
        if t == 1:
            assert factor == pytest.approx(1.0, abs=1e-12)
            muon_step = -lr * D                           # Muon's step (adjust_lr "none")
            assert torch.allclose(p.detach().double() - before, muon_step, atol=1e-6)
        else:
            assert abs(factor - 1) > 1e-3                 # the gradients' size changes
        W = W - lr * factor * D
        assert torch.allclose(p.detach().double(), W, atol=1e-5), t
        average = opt.state[p][NUCLEAR_AVERAGE]
        assert average.dtype == torch.float32 and average.shape == ()
        assert average.item() == pytest.approx(a / (1 - beta ** t), rel=1e-5)


def test_first_factor_is_exactly_one():
    p = matrices([(16, 24)])[0]
    opt = mo.PolarGrad([p], lr=1e-2, orthogonalizer="svd", scaling=RELATIVE, impl="reference")
    ref = copy.deepcopy(p)
    muon = mo.PolarGrad([ref], lr=1e-2, orthogonalizer="svd", scaling="none", impl="reference")
    run(opt, [p], 1)
    run(muon, [ref], 1)
    assert torch.equal(p, ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_matches_reference(variant):
    shapes = [(32, 48), (32, 48), (32, 48), (24, 20)]
    out = {}
    for impl in ("fast", "reference"):
        params = matrices(shapes)
        opt = mo.PolarGrad(params, lr=0.02, weight_decay=0.1, variant=variant,
                           scaling=RELATIVE, impl=impl)
        run(opt, params, 4)
        out[impl] = (params, [opt.state[p][NUCLEAR_AVERAGE] for p in params])
    start = matrices(shapes)
    for a, b, w in zip(out["fast"][0], out["reference"][0], start):
        assert (a - b).abs().max() <= 1e-5 * (b - w).abs().max() + 4e-7
    for a, b in zip(out["fast"][1], out["reference"][1]):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_fast_matches_reference_when_step_counts_differ_within_a_batch():
    shapes = [(32, 48)] * 3
    out = {}
    for impl in ("fast", "reference"):
        params = matrices(shapes)
        opt = mo.PolarGrad(params, lr=0.02, scaling=RELATIVE, impl=impl)
        for p, g in zip(params[:2], grads(shapes, 0)):
            p.grad = g                       # the third matrix has no gradient on step 1
        opt.step()
        run(opt, params, 3, first=1)
        assert [opt.state[p]["step"] for p in params] == [4, 4, 3]
        out[impl] = params
    for a, b, w in zip(out["fast"], out["reference"], matrices(shapes)):
        assert (a - b).abs().max() <= 1e-5 * (b - w).abs().max() + 4e-7


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_switching_to_relative_scaling_starts_at_factor_one(impl):
    shapes = [(16, 24), (16, 24)]
    params, muon_params = matrices(shapes), matrices(shapes)
    opt, muon = (mo.PolarGrad(ps, lr=0.02, orthogonalizer="svd", impl=impl,
                              scaling="nuclear_norm") for ps in (params, muon_params))
    run(opt, params, 2)
    run(muon, muon_params, 2)
    opt.param_groups[0]["scaling"], muon.param_groups[0]["scaling"] = RELATIVE, "none"
    run(opt, params, 1, first=2)
    run(muon, muon_params, 1, first=2)
    for a, b in zip(params, muon_params):
        assert torch.allclose(a, b, atol=1e-6)
        assert opt.state[a][NUCLEAR_AVERAGE].item() > 0


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_is_bit_exact(variant, impl):
    shapes = [(32, 48), (32, 48), (24, 20)]
    kw = dict(lr=0.02, weight_decay=0.1, variant=variant, scaling=RELATIVE, impl=impl)
    params = matrices(shapes)
    opt = mo.PolarGrad(params, **kw)
    run(opt, params, 6)
    resumed = matrices(shapes)
    first = mo.PolarGrad(resumed, **kw)
    run(first, resumed, 3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = mo.PolarGrad(resumed, **kw)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    run(second, resumed, 3, first=3)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a][NUCLEAR_AVERAGE], second.state[b][NUCLEAR_AVERAGE])


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_8bit_keeps_the_average_fp32_and_counts_4_bytes_per_matrix(impl):
    pytest.importorskip("bitsandbytes")
    shapes = [(128, 96), (128, 96), (64, 80)]
    sizes = {}
    for scaling in ("nuclear_norm", RELATIVE):
        params = matrices(shapes)
        opt = mo.PolarGrad8bit(params, lr=0.02, scaling=scaling, impl=impl)
        run(opt, params, 2)
        sizes[scaling] = mo.state_bytes(opt)
        assert opt.state[params[0]]["momentum_buffer"].dtype == torch.uint8
    assert sizes[RELATIVE] - sizes["nuclear_norm"] == 4 * len(shapes)
    for p in params:
        assert opt.state[p][NUCLEAR_AVERAGE].dtype == torch.float32


def test_memory_estimate_counts_the_average():
    pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(torch.nn.Linear(96, 128, bias=False),
                                torch.nn.Linear(128, 96, bias=False))
    estimate = {s: mo.estimate_memory(model, "polargrad8bit", scaling=s)["optimizer_state"]
                for s in ("nuclear_norm", RELATIVE)}
    opt = create_optimizer("polargrad8bit", model, scaling=RELATIVE)   # the last layer: AdamW
    run(opt, list(model.parameters()), 1)
    matrices_ = [p for g in opt.param_groups for p in g["params"] if opt.is_orthogonalized(g, p)]
    assert len(matrices_) == 1
    assert estimate[RELATIVE] - estimate["nuclear_norm"] == 4 * len(matrices_)
    assert estimate[RELATIVE] == mo.state_bytes(opt)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_gradient_gives_zero_update(variant, impl):
    shapes = [(16, 24), (16, 24)]
    params = matrices(shapes)
    start = [p.detach().clone() for p in params]
    opt = mo.PolarGrad(params, lr=0.02, variant=variant, scaling=RELATIVE, impl=impl,
                       weight_decay=0.0)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, w in zip(params, start):
        assert torch.equal(p, w)
        assert opt.state[p][NUCLEAR_AVERAGE].item() == 0.0
    run(opt, params, 2)
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], start[0])


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_non_finite_gradient_raises_and_changes_nothing(impl):
    shapes = [(16, 24), (16, 24)]
    params = matrices(shapes)
    opt = mo.PolarGrad(params, lr=0.02, scaling=RELATIVE, impl=impl)
    run(opt, params, 2)
    weights = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    for p, g in zip(params, grads(shapes, 2)):
        p.grad = g
    params[1].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    for p, w in zip(params, weights):
        assert torch.equal(p, w)
    after = opt.state_dict()["state"]
    for key, values in state["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(after[key][name]), torch.as_tensor(value)), name


def test_invalid_scaling_names_the_argument():
    with pytest.raises(ValueError, match="scaling"):
        mo.PolarGrad(matrices([(4, 4)]), scaling="relative")


def _fsdp_worker(rank, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = SmallNet()
    mesh = init_device_mesh("cpu", (2,))
    for module in (model.conv, model.fc1, model.fc2, model.norm, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = mo.PolarGrad(model.parameters(), lr=0.02, scaling=RELATIVE)
    for t in range(4):
        x, y = small_batch(t)
        opt.zero_grad()
        rows = slice(rank * 16, (rank + 1) * 16)
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        opt.step()
    params = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    averages = [s[NUCLEAR_AVERAGE] for s in opt.state.values() if NUCLEAR_AVERAGE in s]
    torch.save({"params": params, "averages": averages}, f"{out}.{rank}")
    dist.barrier()    # every rank done before teardown (gloo aborted at exit otherwise)
    dist.destroy_process_group()


def test_fsdp2_equals_one_process_and_averages_agree_across_ranks():
    torch.manual_seed(0)
    model = SmallNet()
    opt = mo.PolarGrad(model.parameters(), lr=0.02, scaling=RELATIVE)
    for t in range(4):
        x, y = small_batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    folder = tempfile.mkdtemp()
    path, out = os.path.join(folder, "store"), os.path.join(folder, "result")
    mp.spawn(_fsdp_worker, args=(path, out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    expected = sorted(s[NUCLEAR_AVERAGE].item() for s in opt.state.values()
                      if NUCLEAR_AVERAGE in s)
    assert len(expected) == 4                             # conv, fc1, fc2, head
    assert torch.equal(torch.stack(ranks[0]["averages"]), torch.stack(ranks[1]["averages"]))
    assert sorted(a.item() for a in ranks[0]["averages"]) == pytest.approx(expected, rel=1e-4)
    for k, v in model.state_dict().items():
        for result in ranks:
            assert torch.allclose(result["params"][k], v, atol=2e-5, rtol=1e-4), k
