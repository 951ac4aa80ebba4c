"""The one-line swap and moving over from the peers: what is projected, what peers' argument
names mean here, and that a group's lr governs all of its parameters."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from helpers import OPTIMIZERS, make
from torch import nn

from memopt import optim as mo


class LanguageModel(nn.Module):
    """Embedding -> two hidden Linears -> head: the shapes the README's swap is about."""

    def __init__(self, vocab=300, hidden=96):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, vocab)    # no name in HEAD_NAMES: found as the last Linear

    def forward(self, x):
        return self.out(self.down(torch.relu(self.up(self.embed(x)))))


def _loss_step(model, opt):
    x = torch.randint(0, 300, (4, 8))
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_model_gives_embeddings_and_head_adamw(name):
    model = LanguageModel()
    opt = make(name, model)
    special = {id(model.embed.weight), id(model.out.weight)}
    matrices = {id(model.up.weight), id(model.down.weight)}
    adamw = [p for g in opt.param_groups if g.get("adamw") for p in g["params"]]
    hidden = [p for g in opt.param_groups if not g.get("adamw") for p in g["params"]]
    assert {id(p) for p in adamw} >= special
    assert {id(p) for p in hidden} == matrices
    _loss_step(model, opt)
    # the embedding's and head's state is AdamW's: full-size moments
    state = opt.state[model.out.weight]
    assert state["exp_avg"].shape == model.out.weight.shape


def test_last_linear_of_a_sequential_is_the_head():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    groups = mo.param_groups(model)
    hidden = {id(p) for _, p in groups[0]["params"]}
    assert hidden == {id(model[0].weight), id(model[2].weight)}


def test_parameters_list_projects_every_matrix():
    """Documented: given parameters (not a model), every matrix is projected, the embedding
    included, as galore-torch would in a low-rank group."""
    model = LanguageModel()
    opt = mo.GaLoreAdamW(model.parameters(), rank=16)
    _loss_step(model, opt)
    assert opt.state[model.embed.weight]["exp_avg"].numel() < model.embed.weight.numel()


def test_galore_torch_groups_unranked_group_is_adamw():
    model = LanguageModel()
    mats = [model.up.weight, model.down.weight]
    others = [p for p in model.parameters() if all(p is not m for m in mats)]
    opt = mo.GaLoreAdamW([{"params": others},
                          {"params": mats, "rank": 16, "update_proj_gap": 200, "scale": 0.25,
                           "proj_type": "std"}], lr=1e-3)
    assert opt.param_groups[0]["rank"] is None and opt.param_groups[1]["rank"] == 16
    _loss_step(model, opt)
    assert opt.state[model.embed.weight]["exp_avg"].shape == model.embed.weight.shape
    assert opt.state[model.up.weight]["exp_avg"].numel() < model.up.weight.numel()


@pytest.mark.parametrize("proj_type,side", [("left", "left"), ("right", "right")])
def test_proj_type_picks_the_side(proj_type, side):
    W = nn.Parameter(torch.randn(48, 64))
    opt = mo.GaLoreAdamW([{"params": [W], "rank": 8, "proj_type": proj_type}])
    W.grad = torch.randn(48, 64)
    opt.step()
    expected = (8, 64) if side == "left" else (48, 8)
    assert opt.state[W]["exp_avg"].shape == expected


@pytest.mark.parametrize("group,words", [
    ({"proj_type": "reverse_std"}, "projector_options"),
    ({"proj_type": "full"}, "proj_type"),
    ({"alpha": 0.25}, "scale"),
    ({"proj_type": "left", "projector_options": {"side": "right"}}, "contradicts"),
])
def test_peer_group_keys_that_do_not_translate_raise(group, words):
    W = nn.Parameter(torch.randn(48, 64))
    with pytest.raises(ValueError, match=words):
        mo.FiraAdamW([{"params": [W], "rank": 8, **group}])


@pytest.mark.parametrize("value,expected", [("match_rms_adamw", "match_rms_adamw"),
                                            ("original", "original"), (None, "original")])
def test_muon_takes_torch_adjust_lr_fn(value, expected):
    W = nn.Parameter(torch.randn(32, 48))
    assert mo.Muon([W], adjust_lr_fn=value).param_groups[0]["adjust_lr"] == expected


def test_muon_adjust_lr_fn_matches_adjust_lr():
    torch.manual_seed(0)
    W1 = nn.Parameter(torch.randn(32, 48))
    W2 = nn.Parameter(W1.detach().clone())
    a = mo.Muon([W1], adjust_lr_fn="match_rms_adamw")
    b = mo.Muon([W2], adjust_lr="match_rms_adamw")
    for _ in range(2):
        g = torch.randn(32, 48)
        W1.grad, W2.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert torch.equal(W1, W2)


@pytest.mark.parametrize("kwargs,words", [({"ns_coefficients": (3.4, -4.7, 2.0)}, "orthogonalizer"),
                                          ({"eps": 1e-5}, "adamw_eps"),
                                          ({"adjust_lr_fn": lambda lr, shape: lr}, "names")])
def test_muon_peer_arguments_that_do_not_translate_raise(kwargs, words):
    W = nn.Parameter(torch.randn(32, 48))
    with pytest.raises(ValueError, match=words):
        mo.Muon([W], **kwargs)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_group_at_lr_zero_is_frozen(name):
    torch.manual_seed(0)
    W0, W1 = nn.Parameter(torch.randn(24, 32)), nn.Parameter(torch.randn(24, 32))
    b0, b1 = nn.Parameter(torch.randn(24)), nn.Parameter(torch.randn(24))
    opt = make(name, [{"params": [W0, b0], "lr": 0.0, "weight_decay": 0.0},
                      {"params": [W1, b1]}])
    frozen = [W0.detach().clone(), b0.detach().clone()]
    moving = [W1.detach().clone(), b1.detach().clone()]
    for _ in range(3):
        for p in (W0, W1, b0, b1):
            p.grad = torch.randn_like(p)
        opt.step()
    assert torch.equal(W0, frozen[0]) and torch.equal(b0, frozen[1])
    assert not torch.equal(b1, moving[1]) and not torch.equal(W1, moving[0])


@pytest.mark.parametrize("name", ["muon", "polargrad"])
def test_adamw_part_follows_a_manual_lr_change(name):
    """Halving a group's lr by hand halves the AdamW step of its vectors (first Adam step:
    the update is lr * sign(g), so the change is exactly proportional)."""
    moves = []
    for factor in (1.0, 0.5):
        b = nn.Parameter(torch.zeros(16))
        opt = make(name, [b], adamw_lr=1e-2)
        opt.param_groups[0]["lr"] *= factor
        b.grad = torch.ones(16)
        opt.step()
        moves.append(b.detach().abs().max().item())
    assert moves[1] == pytest.approx(moves[0] / 2, rel=1e-5)


def test_eight_bit_warns_once_when_nothing_is_quantized():
    W = nn.Parameter(torch.randn(40, 50))    # 2000 elements: under bitsandbytes' 4096
    opt = mo.Muon8bit([W])
    W.grad = torch.randn_like(W)
    with pytest.warns(UserWarning, match="fewer than 4096"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_eight_bit_that_quantizes_does_not_warn():
    W = nn.Parameter(torch.randn(128, 128))
    opt = mo.Muon8bit([W])
    W.grad = torch.randn_like(W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.state[W]["momentum_buffer"].dtype == torch.uint8


def test_eight_bit_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)    # import now raises ImportError
    W = nn.Parameter(torch.randn(128, 128))
    with pytest.raises(ImportError, match=r"memopt\[8bit\]"):
        mo.GaLoreAdamW8bit([W])
    mo.GaLoreAdamW([W], rank=16)                             # 32-bit needs no bitsandbytes


def test_step_in_backward_with_a_scheduler_does_not_warn():
    model = LanguageModel()
    opt = mo.GaLoreAdamW(model, rank=16)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    handle = mo.step_in_backward(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            x = torch.randint(0, 300, (4, 8))
            nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            sched.step()
    handle.remove()
