"""The optimizer contract of DESIGN.md, checked for every optimizer and bit width."""

import copy
import math

import pytest
import torch
from helpers import (LOWRANK, OPTIMIZERS, SmallNet, all_optimizer_params, byte_batches, make,
                     round_trip, small_loss, tiny_llama, train)

from memopt import optim as mo

PROJECTORS = ["svd", "dct", "polar"]


def snapshot(model, opt):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return params, copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name,bits", all_optimizer_params())
def test_resume_is_bit_exact_across_refresh(name, bits):
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    opt = make(name, model.parameters(), bits)
    train(model, opt, 4)                       # gap 3: a refresh happened at step 3
    saved_model = round_trip(model.state_dict())
    saved_opt = round_trip(opt.state_dict())   # weights_only=True
    train(model, opt, 5, start=4)              # crosses the refresh at step 6

    resumed = copy.deepcopy(reference)
    resumed.load_state_dict(saved_model)
    opt2 = make(name, resumed.parameters(), bits)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 5, start=4)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert_same(round_trip(opt.state_dict())["state"], round_trip(opt2.state_dict())["state"])


@pytest.mark.parametrize("name,bits", all_optimizer_params())
def test_state_dict_holds_only_tensors_and_numbers(name, bits):
    model = SmallNet()
    opt = make(name, model.parameters(), bits)
    train(model, opt, 2)
    for state in opt.state_dict()["state"].values():
        for key, value in state.items():
            assert isinstance(value, (torch.Tensor, int, float)), (key, type(value))


@pytest.mark.parametrize("name,bits", all_optimizer_params())
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_gradient_raises_and_changes_nothing(name, bits, bad):
    model = SmallNet()
    opt = make(name, model.parameters(), bits)
    train(model, opt, 3)
    opt.zero_grad()
    small_loss(model, 99).backward()
    model.fc2.weight.grad[1, 2] = float(bad)        # a late parameter: earlier ones come first
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"params'\]\[4\] of shape \(80, 96\)"):
        opt.step()
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_finite_error_names_the_parameter(name):
    model = SmallNet()
    opt = make(name, model.named_parameters())
    small_loss(model, 0).backward()
    model.fc1.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="'fc1.weight'"):
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_and_complex_gradients_are_clear_errors(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = make(name, emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    z = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    opt = make(name, [z])
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train_with_fp32_state(name, dtype):
    torch.manual_seed(0)
    model = SmallNet(dtype)
    opt = make(name, model.parameters())
    losses = train(model, opt, 25)
    assert all(p.dtype == dtype for p in model.parameters())
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                assert value.dtype == torch.float32, key
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("name,bits", all_optimizer_params())
def test_loss_falls_on_a_small_regression(name, bits):
    torch.manual_seed(0)
    model = SmallNet()
    losses = train(model, make(name, model.parameters(), bits), 40)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def llama_cases():
    cases = []
    for name in ("galore", "dct", "fira"):
        for projector in PROJECTORS:
            for bits in (32, 8):
                cases.append(pytest.param(name, {"projector": projector}, bits,
                                          id=f"{name}-{projector}-{bits}bit"))
    for name in ("muon", "polargrad", "trion", "galoremuon"):
        for bits in (32, 8):
            cases.append(pytest.param(name, {}, bits, id=f"{name}-{bits}bit"))
    return cases


@pytest.mark.parametrize("name,kwargs,bits", llama_cases())
def test_loss_falls_on_a_tiny_llama(name, kwargs, bits):
    model = tiny_llama()
    if name in ("muon", "polargrad"):
        groups = mo.param_groups(model)
        opt = make(name, groups, bits, lr=0.02 if name == "muon" else 0.05, adamw_lr=3e-3)
    elif name in ("trion", "galoremuon"):          # low-rank, orthogonalized: Muon's rates
        opt = make(name, mo.param_groups(model, rank=16), bits, lr=0.02, adamw_lr=3e-3)
    else:
        opt = make(name, mo.param_groups(model, rank=16, update_proj_gap=10), bits,
                   lr=3e-3, **kwargs)
    batches = byte_batches(30)
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # from ln(256) = 5.55 to under 3.6 nats: the model learns the byte statistics of the text
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < 3.6


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lr_scheduler_and_step_hooks(name):
    model = SmallNet()
    opt = make(name, model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    lrs = []
    for t in range(4):
        opt.zero_grad()
        small_loss(model, t).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert calls == ["pre", "post"] * 4
    base = lrs[0]
    assert lrs == pytest.approx([base, base / 2, base / 2, base / 4])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_closure_returns_the_loss(name):
    model = SmallNet()
    opt = make(name, model.parameters())

    def closure():
        opt.zero_grad()
        loss = small_loss(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_learning_rate_changes_nothing(name):
    model = SmallNet()
    opt = make(name, model.parameters(), lr=0.0, **({"adamw_lr": 0.0} if name in ("muon", "polargrad") else {}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_add_param_group_validates_and_rolls_back(name):
    model = SmallNet()
    opt = make(name, [model.fc1.weight])
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [model.fc2.weight], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [model.fc2.weight], "lr": 1e-3})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parameters_without_gradients_are_left_alone(name):
    model = SmallNet()
    opt = make(name, model.parameters())
    model.head.weight.requires_grad_(False)
    before = model.head.weight.detach().clone()
    train(model, opt, 2)
    assert torch.equal(model.head.weight, before)
    assert model.head.weight not in opt.state


@pytest.mark.parametrize("name,bits", all_optimizer_params())
def test_state_bytes_counts_every_state_tensor(name, bits):
    model = SmallNet()
    opt = make(name, model.parameters(), bits)
    train(model, opt, 2)
    counted = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor))
    shared = opt.shared_state_bytes()
    assert mo.state_bytes(opt) == counted + shared
    assert (shared > 0) == (name in ("dct", "trion"))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_8bit_state_is_smaller_than_32bit(name):
    sizes = {}
    for bits in (32, 8):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 192))
        opt = make(name, model.parameters(), bits, rank=32) if name not in ("muon", "polargrad") \
            else make(name, model.parameters(), bits)
        model(torch.randn(4, 256)).sum().backward()
        opt.step()
        moments = sum(v.numel() * v.element_size() for s in opt.state.values()
                      for k, v in s.items() if k.startswith(("exp_avg", "momentum_buffer")))
        sizes[bits] = (moments, mo.state_bytes(opt))
    assert sizes[8][0] < 0.3 * sizes[32][0]        # moments: 1 byte + 4 / 256 vs 4 bytes
    assert sizes[8][1] < sizes[32][1]


def test_state_bytes_of_a_torch_optimizer():
    model = SmallNet()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, 1)
    n = sum(p.numel() for p in model.parameters())
    assert mo.state_bytes(opt) == 8 * n + 4 * len(list(model.parameters()))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_keeps_fp32_moments_of_bf16_parameters(name):
    model = SmallNet(torch.bfloat16)
    opt = make(name, model.parameters())
    train(model, opt, 2)
    opt2 = make(name, model.parameters())
    opt2.load_state_dict(round_trip(opt.state_dict()))
    for p in model.parameters():
        for key, value in opt.state[p].items():
            other = opt2.state[p][key]
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other, value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,bits", all_optimizer_params())
def test_resume_from_cpu_onto_gpu(name, bits):
    torch.manual_seed(0)
    model = SmallNet()
    # the same arithmetic on both devices: full fp32 products, fp32 Newton-Schulz
    exact = {"ns_dtype": "float32"} if name in ("muon", "polargrad") else \
        {"projection_precision": "highest"}
    opt = make(name, model.parameters(), bits, **exact)
    train(model, opt, 4)
    saved_model, saved_opt = round_trip(model.state_dict()), round_trip(opt.state_dict())
    cpu_losses = train(model, opt, 1, start=4)
    cpu_first = [p.detach().clone() for p in model.parameters()]
    cpu_losses += train(model, opt, 2, start=5)      # crosses the refresh at step 6
    gpu = SmallNet().cuda()
    gpu.load_state_dict(saved_model)
    opt2 = make(name, gpu.parameters(), bits, **exact)
    opt2.load_state_dict(saved_opt)
    assert all(v.device.type == "cuda" for s in opt2.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and k != "step")
    gpu_losses, gpu_first = [], None
    for t in range(4, 7):
        opt2.zero_grad()
        x, y = (a.cuda() for a in __import__("helpers").small_batch(t))
        loss = ((gpu(x) - y) ** 2).mean()
        loss.backward()
        opt2.step()
        gpu_losses.append(loss.item())
        if gpu_first is None:
            gpu_first = [p.detach().cpu() for p in gpu.parameters()]
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    # one step from the loaded state: the same to fp32 rounding, 8-bit state included
    for a, b in zip(cpu_first, gpu_first):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # later steps: CPU and CUDA quantizers may round a value to neighbouring 8-bit codes
    if bits == 32:
        for a, b in zip(model.parameters(), gpu.parameters()):
            assert torch.allclose(a, b.cpu(), atol=1e-4, rtol=1e-3)


def bad_hyperparameters():
    common = [("lr", -1.0, "learning rate"), ("weight_decay", -0.1, "weight_decay"),
              ("state_bits", 16, "state_bits"), ("lr", float("nan"), "learning rate")]
    low = [("rank", 0, "rank"), ("rank", 2.5, "rank"), ("betas", (1.0, 0.9), "beta"),
           ("betas", (0.9, -0.1), "beta"), ("eps", -1e-8, "epsilon"),
           ("update_proj_gap", 0, "update_proj_gap"), ("scale", 0.0, "scale"),
           ("scale", -1.0, "scale"), ("projector", "pca", "projector"),
           ("moments_on_refresh", "drop", "moments_on_refresh"),
           ("limiter_gamma", 0.5, "limiter_gamma")]
    polar = [("momentum", 1.0, "momentum"), ("ns_steps", 0, "ns_steps"),
             ("orthogonalizer", "qr", "orthogonalizer"), ("adjust_lr", "sqrt", "adjust_lr"),
             ("adamw_betas", (0.9, 1.5), "beta"), ("adamw_lr", -1.0, "adamw_lr")]
    cases = []
    for name in OPTIMIZERS:
        extra = low if name in ("galore", "dct", "fira") else polar
        if name in ("trion", "galoremuon"):     # the low-rank options and the rule's
            extra = [c for c in low if c[0] not in ("betas", "eps")] + polar
        for key, value, match in common + extra:
            cases.append(pytest.param(name, key, value, match, id=f"{name}-{key}={value}"))
    return cases


@pytest.mark.parametrize("name,key,value,match", bad_hyperparameters())
def test_bad_hyperparameters_are_value_errors_naming_them(name, key, value, match):
    model = SmallNet()
    with pytest.raises(ValueError, match=match):
        make(name, model.parameters(), **{key: value})


def test_param_groups_split_a_llama():
    model = tiny_llama()
    hidden, rest = mo.param_groups(model, rank=8)
    hidden_names = [n for n, _ in hidden["params"]]
    rest_names = [n for n, _ in rest["params"]]
    assert hidden["rank"] == 8 and rest["adamw"] is True
    assert all(("self_attn" in n or "mlp" in n) and n.endswith("weight") for n in hidden_names)
    assert len(hidden_names) == 2 * 7
    assert "model.embed_tokens.weight" in rest_names and "lm_head.weight" in rest_names
    assert any("norm" in n for n in rest_names)
    opt = mo.GaLoreAdamW(mo.param_groups(model, rank=8))
    assert opt.param_groups[0]["param_names"] == hidden_names


def test_projection_routing():
    model = SmallNet()
    opt = mo.GaLoreAdamW(model.parameters(), rank=8)
    group = opt.param_groups[0]
    routed = {name: opt.is_projected(group, p) for name, p in model.named_parameters()}
    assert routed == {"conv.weight": False,        # (8, 12): smaller side 8 is not > 8
                      "conv.bias": False, "fc1.weight": True, "fc1.bias": False,
                      "fc2.weight": True, "norm.weight": False, "norm.bias": False,
                      "head.weight": False, "head.bias": False}
    opt = mo.GaLoreAdamW([{"params": [model.fc1.weight], "rank": None}])
    assert not opt.is_projected(opt.param_groups[0], model.fc1.weight)


def test_conv_kernels_are_projected_as_matrices():
    conv = torch.nn.Conv2d(16, 24, kernel_size=3)
    opt = mo.GaLoreAdamW(conv.parameters(), rank=4, lr=1e-2)
    conv(torch.randn(2, 16, 8, 8)).square().mean().backward()
    opt.step()
    state = opt.state[conv.weight]
    assert state["exp_avg"].shape == (4, 144)       # left basis of the (24, 144) matrix
    assert state["proj_basis"].shape == (24, 4)


def test_callable_projector_survives_state_dict_round_trip():
    from memopt.projections import SVDProjector
    model = SmallNet()
    opt = mo.GaLoreAdamW(model.parameters(), rank=4, projector=lambda r: SVDProjector(r, method="randomized"))
    train(model, opt, 2)
    sd = round_trip(opt.state_dict())
    opt.load_state_dict(sd)
    assert callable(opt.param_groups[0]["projector"])
    train(model, opt, 2, start=2)


def test_fp32_math_survives_an_nan_free_huge_gradient():
    p = torch.nn.Parameter(torch.zeros(64, 64))
    opt = mo.GaLoreAdamW([p], rank=4, lr=1e-3)
    p.grad = torch.full((64, 64), 1e30)
    opt.step()
    assert torch.isfinite(p).all()
    assert math.isfinite(float(p.abs().max()))


@pytest.mark.parametrize("name,bits", all_optimizer_params())
def test_checked_and_unchecked_steps_give_the_same_bits(name, bits, monkeypatch):
    """The finiteness check reads witnesses computed before it (projections, momentum
    directions); without the check, or with no room to prepare them, the step streams in
    pieces. Every way gives the same parameters and state."""
    from memopt.optim import executors, lowrank, muon
    results = []
    for check_finite, prepare_bytes, chunk_bytes in ((True, 2**40, 2**40), (False, 2**40, 1),
                                                      (True, 0, 1)):
        monkeypatch.setattr(lowrank, "PREPARE_BYTES", prepare_bytes)
        monkeypatch.setattr(muon, "PREPARE_BYTES", prepare_bytes)
        monkeypatch.setattr(executors, "CHUNK_BYTES", chunk_bytes)
        torch.manual_seed(0)
        model = SmallNet()
        opt = make(name, model.parameters(), bits, check_finite=check_finite)
        train(model, opt, 5)                    # gap 3: refreshes at steps 0 and 3
        params, state = snapshot(model, opt)
        results.append((params, state["state"]))
    for other in results[1:]:
        assert_same(other, results[0])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_one_non_finite_entry_anywhere_is_caught(name, shape):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = make(name, [p], **({"update_proj_gap": 100} if name in LOWRANK else {}))
    for t in range(2):                          # then a step that keeps its basis
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
    for trial, bad in enumerate([float("nan"), float("inf"), -float("inf")] * 4):
        g = torch.randn(shape, generator=gen)
        i, j = (int(torch.randint(0, s, (), generator=gen)) for s in shape)
        g[i, j] = bad
        p.grad = g
        before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            opt.step()
        assert_same((p.detach(), opt.state_dict()), before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_finite_gradient_whose_update_overflows_raises_and_changes_nothing(name):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(48, 32, generator=gen))
    opt = make(name, [p], **({"update_proj_gap": 100} if name in LOWRANK else {}))
    for _ in range(2):
        p.grad = torch.randn(48, 32, generator=gen)
        opt.step()
    p.grad = torch.randn(48, 32, generator=gen).sign() * 3e38   # finite; its projection is not
    before = (p.detach().clone(), copy.deepcopy(opt.state_dict()))
    with pytest.raises(FloatingPointError, match="finite but so large"):
        opt.step()
    assert_same((p.detach(), opt.state_dict()), before)


@pytest.mark.parametrize("name", list(LOWRANK))
def test_recorded_steps_are_refused_but_old_groups_load(name):
    """cuda_graph=True (recorded CUDA-graph steps) was removed: a clear ValueError; False,
    as saved in the param groups of old state dicts, is still accepted."""
    p = torch.nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match="recorded CUDA-graph steps were removed"):
        make(name, [p], cuda_graph=True)
    opt = make(name, [p], cuda_graph=False)
    p.grad = torch.randn(16, 12)
    opt.step()
    opt.load_state_dict(round_trip(opt.state_dict()))
    assert opt.param_groups[0]["cuda_graph"] is False
