"""Nothing silent: what the optimizers refuse, what they warn about, and what they translate.

Each test names the property it checks; each failed before the change that made it hold
(issue "Nothing silent"): groups opted out with ``rank=None``, states of other optimizers,
typo'd keys, param groups after a load, ``check_finite=False``, the peers' arguments.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import warnings

import pytest
import torch

from memopt import optim as mo


def _params(seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.nn.Parameter(torch.randn(24, 16, generator=gen)),
            torch.nn.Parameter(torch.randn(16, generator=gen)))


def _grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _trained(make, steps: int = 2, seed: int = 0):
    W, b = _params(seed)
    opt = make([W, b])
    for t in range(steps):
        _grads([W, b], t)
        opt.step()
    return opt, (W, b)


def _saved(opt) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------ 1. rank=None
def test_rank_none_opts_out_its_own_group_only():
    W, b = _params()
    opt = mo.GaLoreAdamW([{"params": [b], "rank": None}, {"params": [W]}], lr=1e-2, rank=8)
    assert opt.param_groups[1]["rank"] == 8
    _grads([W, b], 0)
    opt.step()
    assert "proj_basis" in opt.state[W]            # W was projected, not given AdamW


def test_an_integer_rank_in_one_group_makes_groups_without_one_adamw():
    """galore-torch's convention, kept where it applies: some group names an integer rank."""
    W, b = _params()
    V = torch.nn.Parameter(torch.randn(20, 12))
    opt = mo.GaLoreAdamW([{"params": [W], "rank": 4}, {"params": [V, b]}], lr=1e-2)
    assert opt.param_groups[1]["rank"] is None


@pytest.mark.parametrize("make,why", [
    (lambda W, b: mo.GaLoreAdamW([{"params": [W, b], "rank": None}]), "rank=None"),
    (lambda W, b: mo.DCTAdamW([W, b], rank=64), "not below the smaller side"),
    (lambda W, b: mo.FiraAdamW([{"params": [W, b], "adamw": True}]), "adamw=True"),
    (lambda W, b: mo.Muon([{"params": [W, b], "adamw": True}]), "adamw=True"),
    (lambda W, b: mo.PolarGrad([b]), "none of its parameters is a matrix"),
])
def test_an_optimizer_that_applies_its_method_to_no_matrix_warns_once_saying_why(make, why):
    W, b = _params()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make(W, b)
    ours = [w for w in caught if "plain AdamW" in str(w.message)]
    assert len(ours) == 1 and why in str(ours[0].message)


def test_matrices_not_above_the_rank_are_named_in_a_warning():
    W, _ = _params()
    small = torch.nn.Parameter(torch.randn(6, 5))
    with pytest.warns(UserWarning, match=r"\(6, 5\) in group 0.*galore-torch would project"):
        mo.GaLoreAdamW([W, small], rank=8)


# --------------------------------------------------- 2. states of other optimizers
REFUSED = [
    pytest.param(lambda p: mo.DCTAdamW(p, rank=4), lambda p: mo.GaLoreAdamW(p, rank=4),
                 "projector='dct'", id="dct-into-galore"),
    pytest.param(lambda p: mo.GaLoreAdamW(p, rank=4), lambda p: mo.GaLoreAdamW8bit(p, rank=4),
                 "state_bits=32", id="32bit-into-8bit"),
    pytest.param(lambda p: mo.GaLoreAdamW8bit(p, rank=4), lambda p: mo.GaLoreAdamW(p, rank=4),
                 "state_bits=8", id="8bit-into-32bit"),
    pytest.param(lambda p: mo.DCTAdamW(p, rank=4), lambda p: mo.Muon(p),
                 "another optimizer's.*rank", id="dct-into-muon"),
    pytest.param(lambda p: mo.Muon(p), lambda p: mo.GaLoreAdamW(p, rank=4),
                 "another optimizer's.*momentum", id="muon-into-galore"),
    pytest.param(lambda p: mo.Muon(p), lambda p: mo.PolarGrad(p),
                 "scaling='none'", id="muon-into-polargrad"),
    pytest.param(lambda p: mo.GaLoreAdamW(p, rank=4), lambda p: mo.FiraAdamW(p, rank=4),
                 "residual='none'", id="galore-into-fira"),
    pytest.param(lambda p: mo.GaLoreAdamW(p, rank=8), lambda p: mo.GaLoreAdamW(p, rank=4),
                 "rank=8", id="other-rank"),
    pytest.param(lambda p: torch.optim.AdamW(p), lambda p: mo.GaLoreAdamW(p, rank=4),
                 "another optimizer's.*amsgrad", id="torch-adamw-into-galore"),
]


@pytest.mark.parametrize("source,target,what", REFUSED)
def test_a_state_of_another_method_or_layout_is_refused_naming_what_differs(source, target,
                                                                            what):
    saved = _saved(_trained(source)[0])
    opt, params = _trained(target, seed=1)
    before = copy.deepcopy(opt.state_dict())
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=what):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    torch.testing.assert_close(after["state"], before["state"], rtol=0, atol=0)
    assert [dict(g) for g in opt.param_groups] == groups_before


def _other_shapes(p):
    return [torch.nn.Parameter(torch.randn(24, 12)), torch.nn.Parameter(torch.randn(16))]


@pytest.mark.parametrize("name", ["galore", "dct", "fira", "muon", "polargrad"])
def test_a_state_saved_for_other_parameter_shapes_is_refused(name):
    make = {"galore": lambda p: mo.GaLoreAdamW(p, rank=4), "dct": lambda p: mo.DCTAdamW(p, rank=4),
            "fira": lambda p: mo.FiraAdamW(p, rank=4), "muon": mo.Muon,
            "polargrad": mo.PolarGrad}[name]
    saved = _saved(_trained(make)[0])
    opt = make(_other_shapes(None))
    with pytest.raises(ValueError, match=r"shape \(24, 12\)"):
        opt.load_state_dict(saved)
    assert not opt.state


@pytest.mark.parametrize("cut", ["moment", "group", "unknown index"])
def test_a_truncated_state_is_refused(cut):
    source, _ = _trained(lambda p: mo.GaLoreAdamW(p, rank=4))
    saved = _saved(source)
    if cut == "moment":
        del saved["state"][0]["exp_avg_sq"]
    elif cut == "group":
        saved["param_groups"] = saved["param_groups"][:0]
    else:
        saved["state"][7] = saved["state"][0]
    opt = mo.GaLoreAdamW(list(_params()), rank=4)
    with pytest.raises(ValueError, match="lacks|param groups|index"):
        opt.load_state_dict(saved)
    assert not opt.state


def test_safe_hyperparameters_follow_torch_the_loaded_groups_win():
    source, _ = _trained(lambda p: mo.GaLoreAdamW(p, rank=4, lr=0.5, update_proj_gap=7))
    opt = mo.GaLoreAdamW(list(_params()), rank=4, lr=0.1)
    opt.load_state_dict(_saved(source))
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["update_proj_gap"] == 7


# ------------------------------------------------------------------- 3. typo'd keys
CLASSES = [mo.GaLoreAdamW, mo.DCTAdamW, mo.FiraAdamW, mo.Muon, mo.PolarGrad,
           mo.GaLoreAdamW8bit, mo.DCTAdamW8bit, mo.Muon8bit]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_an_unknown_group_key_raises_naming_the_closest_known_one(cls):
    W, _ = _params()
    key, close = ("rnak", "rank") if issubclass(cls, mo.LowRankAdamW) else ("momentun", "momentum")
    with pytest.raises(ValueError, match=f"unknown param group key '{key}' "
                                         f"\\(did you mean '{close}'\\?\\); known: .*lr"):
        cls([{"params": [W], key: 8}])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_an_unknown_keyword_names_the_class_the_user_called(cls):
    W, _ = _params()
    with pytest.raises(TypeError, match=f"^{cls.__name__}: unknown keyword argument 'weight_decy' "
                                        "\\(did you mean 'weight_decay'\\?\\)"):
        cls([W], weight_decy=0.1)


# --------------------------------------------------------- 4. param groups after a load
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_saving_a_loaded_optimizer_gives_the_param_groups_it_came_from(cls):
    kw = {"rank": 4} if issubclass(cls, mo.LowRankAdamW) else {}
    source, _ = _trained(lambda p: cls(p, **kw))
    saved = _saved(source)
    opt = cls(list(_params()), **kw)
    opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == saved["param_groups"]


# ----------------------------------------------------------- 5. check_finite=False
@pytest.mark.parametrize("name", ["galore", "dct", "fira", "muon", "polargrad"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_without_the_check_a_nan_gradient_goes_into_the_weights_on_every_step(name, impl):
    """Documented: check_finite=False takes the step as computed, as torch.optim does, on
    refresh steps (gap 2: steps 1 and 3) and the others alike; nothing raises."""
    make = {"galore": mo.GaLoreAdamW, "dct": mo.DCTAdamW, "fira": mo.FiraAdamW,
            "muon": mo.Muon, "polargrad": mo.PolarGrad}[name]
    kw = {"rank": 4, "update_proj_gap": 2} if name in ("galore", "dct", "fira") else {}
    for bad_step in range(3):
        W, b = _params()
        opt = make([W, b], check_finite=False, impl=impl, **kw)
        for t in range(4):
            _grads([W, b], t)
            if t == bad_step:
                W.grad[0, 0] = float("nan")
            opt.step()
        assert not torch.isfinite(W).all()
        assert opt.state[W]["step"] == 4


# ------------------------------------------------------------ 9. the peers' arguments
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_eps_before_bias_correction_reproduces_galore_torch(impl):
    galore_torch = pytest.importorskip("galore_torch")

    def run(make):
        W, b = _params()
        groups = [{"params": [W], "rank": 4, "update_proj_gap": 200, "scale": 0.25,
                   "proj_type": "std"}, {"params": [b]}]
        opt = make(groups)
        for t in range(3):                 # one basis: signs of SVD vectors cancel
            _grads([W, b], t)
            for p in (W, b):
                p.grad.mul_(1e-3)          # small gradients: where eps matters
            opt.step()
        return torch.cat([W.detach().flatten(), b.detach().flatten()])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = run(lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2))
    ours = run(lambda g: mo.GaLoreAdamW(g, lr=1e-2, eps=1e-6, impl=impl,
                                        eps_before_bias_correction=True))
    default = run(lambda g: mo.GaLoreAdamW(g, lr=1e-2, eps=1e-6, impl=impl))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (default - theirs).abs().max() > 1e-3       # the default places eps as torch does


def test_torch_muon_default_coefficients_are_accepted_and_change_nothing():
    a, (W1, _) = _trained(lambda p: mo.Muon(p, ns_coefficients=(3.4445, -4.775, 2.0315)))
    b, (W2, _) = _trained(lambda p: mo.Muon(p))
    torch.testing.assert_close(W1, W2, rtol=0, atol=0)
    torch.testing.assert_close(a.state[W1]["momentum_buffer"], b.state[W2]["momentum_buffer"],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="ns_coefficients.*polar_express"):
        mo.Muon(list(_params()), ns_coefficients=(3.0, -4.0, 2.0))


@pytest.mark.parametrize("cls", [mo.GaLoreAdamW, mo.Muon], ids=lambda c: c.__name__)
def test_bitsandbytes_arguments_are_translated_or_refused_with_what_to_write(cls):
    pytest.importorskip("bitsandbytes")
    W, b = _params()
    kw = {"rank": 4} if cls is mo.GaLoreAdamW else {}
    assert cls([W, b], optim_bits=8, **kw).param_groups[0]["state_bits"] == 8
    cls([W, b], min_8bit_size=4096, percentile_clipping=100, **kw)     # bitsandbytes' defaults
    with pytest.raises(ValueError, match="min_8bit_size.*4096"):
        cls([W, b], min_8bit_size=16, **kw)
    with pytest.raises(ValueError, match="percentile_clipping.*clip_grad_norm_"):
        cls([W, b], percentile_clipping=5, **kw)


@pytest.mark.parametrize("cls", [mo.GaLoreAdamW, mo.DCTAdamW, mo.Muon, mo.PolarGrad],
                         ids=lambda c: c.__name__)
def test_a_tensor_lr_trains_as_the_float_and_follows_a_scheduler(cls):
    kw = {"rank": 4} if issubclass(cls, mo.LowRankAdamW) else {}
    results = []
    for lr in (0.01, torch.tensor(0.01)):
        W, b = _params()
        opt = cls([W, b], lr=lr, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        for t in range(3):
            _grads([W, b], t)
            opt.step()
            sched.step()
        results.append(torch.cat([W.detach().flatten(), b.detach().flatten()]))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="learning rate"):
        cls(list(_params()), lr=torch.tensor([0.1, 0.2]), **kw)


# ------------------------------------------------------- 10. bitsandbytes is quiet
def test_importing_bitsandbytes_through_memopt_prints_nothing():
    pytest.importorskip("bitsandbytes")
    code = ("import torch; from memopt.optim import create_optimizer, GaLoreAdamW8bit;"
            "create_optimizer('adamw8bit', torch.nn.Linear(4, 4));"
            "GaLoreAdamW8bit(torch.nn.Linear(128, 128).parameters(), rank=4)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gemm_4bit_forward" not in out.stdout + out.stderr


# ------------------------------------------------- found by the fuzz suite (hypothesis)
@pytest.mark.parametrize("cut", ["step", "absmax short", "codes as floats"])
def test_an_8bit_state_with_a_missing_step_or_broken_codes_is_refused(cut):
    pytest.importorskip("bitsandbytes")
    big = [torch.nn.Parameter(torch.randn(64, 80))]
    source = mo.GaLoreAdamW8bit(big, rank=None)
    big[0].grad = torch.randn(64, 80)
    source.step()
    saved = _saved(source)
    state = saved["state"][0]
    if cut == "step":
        del state["step"]
    elif cut == "absmax short":
        state["exp_avg_absmax"] = state["exp_avg_absmax"][:-1]
    else:
        state["exp_avg"] = state["exp_avg"].float()
    opt = mo.GaLoreAdamW8bit([torch.nn.Parameter(torch.randn(64, 80))], rank=None)
    with pytest.raises(ValueError, match="step|exp_avg"):
        opt.load_state_dict(saved)
    assert not opt.state


def test_constructor_values_are_checked_even_where_every_group_sets_its_own():
    W, _ = _params()
    with pytest.raises(ValueError, match="learning rate"):
        mo.GaLoreAdamW([{"params": [W], "lr": 0.1}], lr=-1.0)
    with pytest.raises(ValueError, match="ns_dtype"):
        mo.Muon([{"params": [W], "ns_dtype": "auto"}], ns_dtype="float16")


def test_a_non_finite_scale_is_refused():
    with pytest.raises(ValueError, match="scale.*finite"):
        mo.GaLoreAdamW(list(_params()), rank=4, scale=float("inf"))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_muon_with_the_exact_polar_factor_reports_a_nan_gradient_as_the_others(impl):
    W, _ = _params()
    opt = mo.Muon([W], orthogonalizer="svd", impl=impl)
    W.grad = torch.randn_like(W)
    W.grad[0, 0] = float("nan")
    before = W.detach().clone()
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    assert torch.equal(W, before) and not opt.state
    unchecked = mo.Muon([W], orthogonalizer="svd", impl=impl, check_finite=False)
    unchecked.step()
    assert W.isnan().any()


@pytest.mark.parametrize("make", [lambda p: mo.GaLoreAdamW(p, rank=2), mo.Muon, mo.PolarGrad],
                         ids=["galore", "muon", "polargrad"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 3), (0, 2, 2, 2)])
def test_a_parameter_with_no_elements_steps_as_in_torch(make, shape):
    empty = torch.nn.Parameter(torch.randn(shape))
    W, _ = _params()
    opt = make([empty, W])
    empty.grad, W.grad = torch.randn(shape), torch.randn_like(W)
    before = W.detach().clone()
    opt.step()
    assert empty.shape == shape and not torch.equal(W, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("make", [lambda p: mo.GaLoreAdamW(p, rank=4, lr=0.02, weight_decay=0.1),
                                  mo.Muon, mo.PolarGrad], ids=["galore", "muon", "polargrad"])
def test_weight_decay_of_low_precision_weights_is_the_one_asked_for(make, dtype):
    """With a zero gradient a step is the decay alone: W <- W (1 - lr wd), rounded once. (The
    batched path once multiplied by torch's CPU foreach kernel, which rounds the factor to the
    weights' dtype: 0.998 became 0.996 in bf16, twice the decay.)"""
    W = torch.nn.Parameter((torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
                            * 4).to(dtype))
    expected = W.detach().clone().mul_(1 - 0.02 * 0.1)
    opt = make([W])
    W.grad = torch.zeros_like(W)
    opt.step()
    torch.testing.assert_close(W.detach(), expected, rtol=0, atol=0)


def test_invalid_projector_options_are_refused_even_in_a_group_without_rank():
    with pytest.raises(ValueError, match="projector_options.*side"):
        mo.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(3))], "rank": None,
                         "projector_options": {"side": "top"}}])


def test_the_exact_polar_factor_of_a_non_finite_matrix_is_nan():
    from memopt.projections import orthogonalize
    G = torch.tensor([[[float("inf")]], [[2.0]]])
    X = orthogonalize(G, "svd", check_finite=False)
    assert X[0].isnan().all() and X[1].item() == 1.0
