"""Per-layer updates in the backward pass give the ordinary step's parameters."""

import copy

import pytest
import torch
from helpers import OPTIMIZERS, SmallNet, make, small_loss

from memopt import optim as mo


def ordinary(model, opt, steps, micro=1):
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        for k in range(micro):
            small_loss(model, 10 * t + k).backward()
        opt.step()


def per_layer(model, opt, steps, micro=1, **kw):
    handle = mo.step_in_backward(model, opt, accumulation_steps=micro, **kw)
    for t in range(steps):
        for k in range(micro):
            small_loss(model, 10 * t + k).backward()
    handle.remove()
    return handle


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_per_layer_equals_the_ordinary_step(name, bits):
    torch.manual_seed(0)
    a = SmallNet()
    b = copy.deepcopy(a)
    ordinary(a, make(name, a.parameters(), bits), 5)       # gap 3: crosses a refresh
    per_layer(b, make(name, b.parameters(), bits), 5)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("name", ["galore", "muon"])
def test_gradient_accumulation_is_supported(name):
    torch.manual_seed(0)
    a = SmallNet()
    b = copy.deepcopy(a)
    ordinary(a, make(name, a.parameters()), 3, micro=2)
    per_layer(b, make(name, b.parameters()), 3, micro=2)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)


def test_torch_optimizers_get_one_private_copy_per_parameter():
    torch.manual_seed(0)
    a = SmallNet()
    b = copy.deepcopy(a)
    ordinary(a, torch.optim.AdamW(a.parameters(), lr=1e-2), 4)
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2)
    handle = per_layer(b, opt, 4)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-7)
    assert len(handle.optimizers) == len(list(b.parameters()))


def test_gradients_are_freed_during_backward():
    model = SmallNet()
    opt = mo.GaLoreAdamW(model.parameters(), rank=4)
    seen = []
    model.fc2.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is not None))
    handle = mo.step_in_backward(model, opt)
    small_loss(model, 0).backward()
    assert all(p.grad is None for p in model.parameters())
    handle.remove()


def test_step_is_refused_while_hooks_are_registered():
    model = SmallNet()
    opt = mo.DCTAdamW(model.parameters(), rank=4)
    handle = mo.step_in_backward(model, opt)
    small_loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="step_in_backward"):
        opt.step()
    handle.remove()
    small_loss(model, 1).backward()
    opt.step()                                   # ordinary stepping works again


def test_per_parameter_clipping():
    torch.manual_seed(0)
    a = SmallNet()
    b = copy.deepcopy(a)
    opt_a = mo.FiraAdamW(a.parameters(), rank=4, lr=1e-2)
    for t in range(3):
        opt_a.zero_grad()
        small_loss(a, 10 * t).backward()
        for p in a.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.01)
        opt_a.step()
    per_layer(b, mo.FiraAdamW(b.parameters(), rank=4, lr=1e-2), 3, clip_grad_norm=0.01)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-6)


def test_scheduler_changes_apply_to_private_copies():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=1.0)
    handle = mo.step_in_backward([p], opt)
    opt.param_groups[0]["lr"] = 0.5
    (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(p.detach(), torch.tensor([0.5, 0.0, -0.5]))
    handle.remove()


def test_bad_arguments_and_missing_parameters():
    model = SmallNet()
    opt = mo.GaLoreAdamW([model.fc1.weight])
    with pytest.raises(ValueError, match="not in the optimizer"):
        mo.step_in_backward(model, opt)
    with pytest.raises(ValueError, match="accumulation_steps"):
        mo.step_in_backward([model.fc1.weight], opt, accumulation_steps=0)


def test_non_finite_gradient_raises_before_its_parameter_changes():
    model = SmallNet()
    opt = mo.GaLoreAdamW(model.parameters(), rank=4)
    model.fc2.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = model.fc2.weight.detach().clone()
    handle = mo.step_in_backward(model, opt)
    with pytest.raises(FloatingPointError, match="fc2|80, 96"):
        small_loss(model, 0).backward()
    assert torch.equal(model.fc2.weight, before)
    handle.remove()
