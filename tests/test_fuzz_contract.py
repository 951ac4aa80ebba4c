"""The optimizer contract (DESIGN.md) fuzzed with hypothesis, for GaLoreAdamW, DCTAdamW,
FiraAdamW, Muon and PolarGrad at 32 and 8 bits.

Generated: parameter shapes (0-D to 4-D, tiny, odd, rank >= a side), dtypes (fp32, bf16,
fp16), hyperparameters (valid and invalid), group layouts (mixed, empty, duplicated, frozen,
without gradients) and state dicts (valid, from another optimizer, truncated, wrong shapes or
dtypes). Every case either trains finite and agrees with ``impl="reference"``, or raises a
clear error naming what is wrong, with parameters and optimizer state unchanged.

Profiles (tests/conftest.py): "ci", the default, is derandomized with fixed example counts
(all of this file in well under 90 s on a 2-core CPU); the long one runs on request:
``MEMOPT_FUZZ=long python -m pytest -m fuzz`` (or ``--hypothesis-profile long``).
"""

from __future__ import annotations

import copy
import difflib
import io
import math
import re
import warnings
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from memopt import optim as mo  # noqa: E402

pytestmark = pytest.mark.fuzz

LOWRANK = ("galore", "dct", "fira")
POLAR = ("muon", "polargrad")
NAMES = LOWRANK + POLAR
CLASSES = {("galore", 32): mo.GaLoreAdamW, ("galore", 8): mo.GaLoreAdamW8bit,
           ("dct", 32): mo.DCTAdamW, ("dct", 8): mo.DCTAdamW8bit,
           ("fira", 32): mo.FiraAdamW, ("fira", 8): mo.FiraAdamW8bit,
           ("muon", 32): mo.Muon, ("muon", 8): mo.Muon8bit,
           ("polargrad", 32): mo.PolarGrad, ("polargrad", 8): mo.PolarGrad8bit}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: hyperparameters whose loaded value wins over the constructor's, as in torch.optim
SAFE = ("lr", "betas", "eps", "weight_decay", "adamw_lr", "adamw_betas", "adamw_eps")
#: group keys torch, its LR schedulers and memopt itself put into param groups
BOOKKEEPING = ("params", "param_names", "initial_lr", "lr_at_start", "max_lr", "min_lr",
               "base_momentum", "max_momentum", "swa_lr", "differentiable", "foreach", "fused",
               "maximize", "capturable")
#: names other libraries use, which memopt translates or refuses with its own message
COMPAT = ("proj_type", "alpha", "eps", "adjust_lr_fn", "ns_coefficients")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tensors here are tiny, and on a busy 2-core machine OpenMP's
    hand-off costs milliseconds per kernel (measured: fused AdamW 2 ms vs 3 us)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def examples(n: int) -> settings:
    """``n`` examples under the "ci" profile, scaled by the loaded profile's max_examples."""
    base = settings.get_profile("ci").max_examples
    return settings(max_examples=max(1, n * settings().max_examples // base))


# ------------------------------------------------------------------ strategies
def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


BETAS = st.tuples(floats(0.0, 0.99), floats(0.5, 0.999))
VALID = {
    "lowrank": {
        "lr": floats(1e-4, 0.1), "betas": BETAS, "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
        "weight_decay": floats(0.0, 0.2), "rank": st.integers(1, 6),
        "update_proj_gap": st.integers(1, 3), "scale": floats(0.05, 1.0),
        "projector": st.sampled_from(["svd", "dct", "polar"]),
        "projector_options": st.sampled_from([None, {"side": "left"}, {"side": "right"}]),
        "moments_on_refresh": st.sampled_from(["keep", "reset", "rotate", "rotate_fill"]),
        "projection_precision": st.sampled_from(["auto", "highest", "high"]),
        "adamw": st.booleans(), "state_bits": st.sampled_from([32, 8]),
    },
    "polar": {
        "lr": floats(1e-4, 0.1), "momentum": floats(0.0, 0.99), "nesterov": st.booleans(),
        "weight_decay": floats(0.0, 0.2), "ns_steps": st.integers(1, 7),
        "orthogonalizer": st.sampled_from(["newton_schulz", "polar_express", "svd"]),
        "adjust_lr": st.sampled_from(["original", "match_rms_adamw", "none"]),
        "adamw_lr": floats(1e-4, 1e-2), "adamw_betas": BETAS,
        "adamw_eps": st.sampled_from([1e-8, 1e-6]),
        "ns_dtype": st.sampled_from(["auto", "float32"]),
        "adamw": st.booleans(), "state_bits": st.sampled_from([32, 8]),
    },
}
EXTRA = {
    "galore": {"error_feedback": st.sampled_from(["none", "fp32", "8bit"])},
    "dct": {"error_feedback": st.sampled_from(["none", "fp32", "8bit"])},
    "fira": {"limiter_gamma": floats(1.0, 1.5)},
    "muon": {},
    "polargrad": {"variant": st.sampled_from(["momentum_first", "polar_first"]),
                  "scaling": st.sampled_from(["none", "nuclear_norm", "relative_nuclear_norm"])},
}
#: drawn for param groups only: adamw=True or 8-bit state for the whole optimizer would leave
#: the method or the class's bit width untested
LAYOUT_KEYS = ("adamw", "state_bits")


def family(name: str) -> str:
    return "lowrank" if name in LOWRANK else "polar"


def valid_pool(name: str) -> dict[str, st.SearchStrategy[Any]]:
    return {**VALID[family(name)], **EXTRA[name]}


SHAPES = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 16)),
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
)


@dataclass(frozen=True)
class Case:
    """One generated optimizer setup: parameters, their gradients, groups, hyperparameters."""
    name: str
    bits: int
    dtype: torch.dtype
    shapes: tuple[tuple[int, ...], ...]
    modes: tuple[str, ...]            # per parameter: "grad", "none" (no gradient), "frozen"
    groups: tuple[tuple[tuple[int, ...], dict[str, Any]], ...]   # (param indices, overrides)
    kwargs: dict[str, Any]
    named: bool
    steps: int
    seed: int
    grad_scale: float

    @property
    def cls(self) -> type:
        return CLASSES[(self.name, self.bits)]


def big_shape(name: str, rank: int) -> tuple[int, int]:
    """A matrix whose state reaches bitsandbytes' 4096 elements, so 8-bit state is quantized
    (low-rank: r x n moments of a left basis; Muon / PolarGrad: the momentum)."""
    return (rank + 1, -(-4096 // rank)) if name in LOWRANK else (64, 64)


@st.composite
def cases(draw: Any, names: tuple[str, ...] = NAMES, layouts: bool = True,
          no_grads: bool = True, min_steps: int = 2, max_steps: int = 4,
          check_finite: bool = True) -> Case:
    name = draw(st.sampled_from(names))
    bits = draw(st.sampled_from([32, 8]))
    dtype = draw(st.sampled_from(DTYPES))
    pool = valid_pool(name)
    shapes = draw(st.lists(SHAPES, min_size=1, max_size=5))
    modes = [draw(st.sampled_from(["grad", "grad", "grad", "none", "frozen"])) if no_grads
             else "grad" for _ in shapes]
    kwargs: dict[str, Any] = {}
    if name in LOWRANK:
        kwargs.update(rank=draw(st.integers(1, 6)), update_proj_gap=draw(st.integers(1, 3)))
    for key in sorted(draw(st.sets(st.sampled_from(sorted(set(pool) - set(LAYOUT_KEYS))),
                                   max_size=4))):
        kwargs[key] = draw(pool[key])
    if not check_finite:
        kwargs["check_finite"] = False
    if bits == 8 and draw(st.booleans()):
        shapes.append(big_shape(name, kwargs.get("rank", 4)))
        modes.append("grad")
    named = draw(st.booleans())
    n_groups = draw(st.integers(1, 3)) if layouts else 1
    assign = [draw(st.integers(0, n_groups - 1)) for _ in shapes]
    groups = []
    for g in range(n_groups):
        overrides = {}
        if layouts:
            for key in sorted(draw(st.sets(st.sampled_from(sorted(pool)), max_size=3))):
                overrides[key] = draw(pool[key])
            if name in LOWRANK and draw(st.integers(0, 3)) == 0:
                overrides["rank"] = None          # this group alone opts out of projection
        members = tuple(i for i, a in enumerate(assign) if a == g)
        if members or not named:       # torch: an empty group is unnamed, names are all or none
            groups.append((members, overrides))
    return Case(name, bits, dtype, tuple(map(tuple, shapes)), tuple(modes), tuple(groups),
                kwargs, named, draw(st.integers(min_steps, max_steps)),
                draw(st.integers(0, 2**16)), draw(st.sampled_from([1e-3, 1.0, 100.0])))


# ------------------------------------------------------------------- running
def make_params(case: Case, shapes: Any = None) -> list[torch.Tensor]:
    """The parameters of ``case`` (or of the same case with other ``shapes``), seeded."""
    gen = torch.Generator().manual_seed(case.seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.5).to(case.dtype),
                               requires_grad=mode != "frozen")
            for s, mode in zip(shapes or case.shapes, case.modes)]


def group_list(case: Case, params: list[torch.Tensor], **scale_safe: float) -> list[dict[str, Any]]:
    groups = []
    for members, overrides in case.groups:
        overrides = dict(overrides)
        for key, factor in scale_safe.items():
            if key in overrides:
                overrides[key] = overrides[key] * factor
        ps = [(f"p{i}", params[i]) if case.named else params[i] for i in members]
        groups.append({"params": ps, **overrides})
    return groups


def build(case: Case, params: list[torch.Tensor], **extra: Any) -> torch.optim.Optimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return case.cls(group_list(case, params), **{**case.kwargs, **extra})


def set_grads(case: Case, params: list[torch.Tensor], t: int) -> None:
    gen = torch.Generator().manual_seed(case.seed * 7919 + t + 1)
    for p, mode in zip(params, case.modes):
        g = torch.randn(p.shape, generator=gen) * case.grad_scale
        p.grad = g.to(p.dtype) if mode == "grad" else None


def train(case: Case, params: list[torch.Tensor], opt: torch.optim.Optimizer, start: int,
          stop: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(start, stop):
            set_grads(case, params, t)
            opt.step()


def run(case: Case, **extra: Any) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = make_params(case)
    opt = build(case, params, **extra)
    train(case, params, opt, 0, case.steps)
    return params, opt


def round_trip(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structure and values; tensors equal in dtype, shape and bits (nan == nan)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def snapshot(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> tuple[Any, Any]:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def quantized(opt: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8
               for v in opt.state.get(p, {}).values())


def assert_agree(fast: torch.Tensor, ref: torch.Tensor, start: torch.Tensor, steps: int,
                 eight_bit: bool, where: str) -> None:
    """Fast and reference weights agree to rounding. Per element: two roundings per step of
    the weight's largest magnitude on the way (the paths round in another order: the reference
    rounds the decayed bf16 weight, the fast path only the updated one) and one rounding per
    step of the largest move (a step's scale may be rounded to the weights' dtype, as
    PolarGrad's nuclear norm on the fast path); 1e-5 of the largest weight (fp32 sums in
    another order); where 8-bit state was quantized, a value may land on a neighbouring code:
    5% of the largest move."""
    f, r, start = fast.detach().double(), ref.detach().double(), start.detach().double()
    if not r.numel():
        return
    eps = torch.finfo(ref.dtype).eps
    moved = float((r - start).abs().max())
    allowed = 2 * steps * eps * torch.maximum(torch.maximum(f.abs(), r.abs()), start.abs()) \
        + steps * eps * moved + 1e-5 * float(r.abs().max())
    if eight_bit:
        allowed = allowed + 0.05 * moved
    excess = (f - r).abs() - allowed
    assert not bool((excess > 0).any()), (where, float((f - r).abs().max()), float(allowed.max()))


def routes(case: Case) -> list[bool]:
    """Which parameters get the method (projection / orthogonalization), by the contract:
    ndim >= 2, the group not ``adamw``; low-rank: the group's rank is an int below the
    matrix's smaller side, where a group naming no rank is AdamW only when some group names
    an integer rank (galore-torch's convention), and ``rank=None`` opts out one group."""
    out = [False] * len(case.shapes)
    ranks_named = any(isinstance(over.get("rank"), int) for _, over in case.groups)
    for members, over in case.groups:
        adamw = over.get("adamw", case.kwargs.get("adamw", False))
        if "rank" in over:
            rank = over["rank"]
        else:
            rank = None if ranks_named else case.kwargs.get("rank", 128)
        for i in members:
            shape = case.shapes[i]
            if len(shape) < 2 or adamw:
                continue
            rows, cols = shape[0], math.prod(shape[1:])
            out[i] = case.name in POLAR or (rank is not None and min(rows, cols) > rank)
    return out


def observed_route(case: Case, opt: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    """Projected: Adam's moments are not of the parameter's shape; orthogonalized: a
    momentum buffer and no Adam moments."""
    state = opt.state[p]
    if case.name in LOWRANK:
        return tuple(state["exp_avg"].shape) != tuple(p.shape)
    return "momentum_buffer" in state and "exp_avg" not in state


def message_names(error: BaseException, names: Any) -> bool:
    text = str(error)
    return any(n in text for n in names)


# ----------------------------------------------------------- valid training
@examples(300)
@given(case=cases())
def test_valid_case_trains_finite_and_fast_matches_reference(case):
    """Valid hyperparameters, any layout: finite weights and state, weights moved, and the
    fast executors agree with the reference path."""
    fast, opt_fast = run(case)
    ref, opt_ref = run(case, impl="reference")
    start = make_params(case)
    moved = False
    for i, (f, r, s) in enumerate(zip(fast, ref, start)):
        assert torch.isfinite(f).all() and torch.isfinite(r).all(), i
        for v in opt_fast.state.get(f, {}).values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert torch.isfinite(v).all(), i
        assert_agree(f, r, s, case.steps, quantized(opt_fast, f) or quantized(opt_ref, r),
                     f"param {i} {tuple(f.shape)}")
        moved |= not torch.equal(f, s)
    # with lr >= 1e-4 some fp32 weight moves (a bf16 / fp16 one may round back; PolarGrad's
    # "nuclear_norm" step is tiny with tiny gradients)
    nuclear = any(o.get("scaling", case.kwargs.get("scaling")) == "nuclear_norm"
                  for _, o in case.groups)
    assert moved or case.dtype != torch.float32 or nuclear or \
        all(m != "grad" for m in case.modes)


@examples(120)
@given(case=cases())
def test_parameters_without_gradients_are_untouched(case):
    """Frozen parameters and parameters whose gradient is None keep their values and get no
    state; every other parameter gets state."""
    assume(any(m != "grad" for m in case.modes))
    params, opt = run(case)
    for p, start, mode in zip(params, make_params(case), case.modes):
        if mode == "grad":
            assert opt.state.get(p), tuple(p.shape)
        else:
            assert torch.equal(p, start) and not opt.state.get(p), (mode, tuple(p.shape))


@examples(200)
@given(case=cases(max_steps=2))
def test_routing_follows_group_settings_and_warns_when_nothing_is_projected(case):
    """Which parameters get the method follows the contract (``routes``); when no matrix
    given gets it, exactly one UserWarning says that nothing gets it and why (adamw / rank);
    when some matrix gets it, no warning says that nothing does (other warnings, e.g. about
    matrices not above the rank, may come)."""
    params = make_params(case)
    expected = routes(case)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = case.cls(group_list(case, params), **case.kwargs)
        for t in range(case.steps):
            set_grads(case, params, t)
            opt.step()
    for i, (p, mode) in enumerate(zip(params, case.modes)):
        if mode == "grad":
            assert observed_route(case, opt, p) == expected[i], (i, case.shapes[i])
    nothing = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
               and re.search(r"\bno matri|\bnone of", str(w.message))]
    note(f"warnings: {[str(w.message) for w in caught]}")
    if any(len(case.shapes[i]) >= 2 for members, _ in case.groups for i in members):
        if any(expected):
            assert not nothing
        else:
            assert len(nothing) == 1 and re.search("adamw|rank", nothing[0])


@examples(100)
@given(case=cases(), factor=st.sampled_from([0.5, 2.0]))
def test_lr_may_be_a_zero_dim_tensor(case, factor):
    """``lr`` as a 0-d tensor trains as the same float (torch accepts both)."""
    lr = case.kwargs.get("lr", 0.01) * factor
    floated, _ = run(case, lr=lr)
    tensored, _ = run(case, lr=torch.tensor(lr))
    for i, (a, b, s) in enumerate(zip(floated, tensored, make_params(case))):
        assert_agree(b, a, s, case.steps, False, f"param {i}")


# ------------------------------------------------------------- bad input
def invalid_values() -> dict[str, dict[str, list[Any]]]:
    nan, inf = float("nan"), float("inf")
    common = {"lr": [-1e-3, -1.0, nan, inf, "0.01", None, True, torch.tensor(-0.1),
                     torch.tensor(nan), torch.tensor([0.01, 0.02])],
              "weight_decay": [-0.1, nan, inf, "0"], "state_bits": [0, 4, 16, "8", None],
              "impl": ["slow", "", None], "check_finite": ["yes", None, 2],
              "adamw": ["yes", None, 2]}
    lowrank = {"betas": [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9, nan), (0.9,), 0.9, "0.9"],
               "eps": [-1e-8, nan, inf, "1e-8"], "rank": [0, -2, 2.5, "4", True],
               "update_proj_gap": [0, -1, 1.5, "2", True], "scale": [0.0, -1.0, nan, inf, "1"],
               "projector": ["nosuch", "", 3, None],
               "projector_options": [[1], "side=left", {"side": "top"}],
               "moments_on_refresh": ["drop", None], "projection_precision": ["low", None],
               "error_feedback": ["16bit", None], "residual": ["nope", None],
               "cuda_graph": [True]}
    polar = {"momentum": [1.0, -0.1, nan, "0.9"], "nesterov": ["yes", None],
             "ns_steps": [0, -1, 2.5, "5"], "orthogonalizer": ["qr", None],
             "adjust_lr": ["sqrt", 1], "adamw_lr": [-1.0, nan, inf],
             "adamw_betas": [(1.0, 0.9), (0.9, 1.5), (0.9,)], "adamw_eps": [-1.0, nan],
             "ns_dtype": ["float16", None], "variant": ["x"], "scaling": ["x"],
             "redundant": ["x"]}
    return {"galore": {**common, **lowrank}, "dct": {**common, **lowrank},
            "fira": {**common, **lowrank, "limiter_gamma": [0.5, nan, "1.01"]},
            "muon": {**common, **polar}, "polargrad": {**common, **polar}}


INVALID = invalid_values()
#: other words an error may use for an argument
ALIASES = {"lr": ("learning rate",), "eps": ("epsilon",), "betas": ("beta",),
           "projector_options": ("side",)}


@examples(300)
@given(case=cases(max_steps=2), data=st.data(),
       where=st.sampled_from(["constructor", "group", "add_param_group"]))
def test_invalid_hyperparameter_is_a_clear_error_and_changes_nothing(case, data, where):
    """An invalid value anywhere (constructor, a group, a group added later) raises
    ValueError or TypeError naming the argument; parameters, groups and state unchanged."""
    bad = INVALID[case.name]
    key = data.draw(st.sampled_from(sorted(bad)), label="key")
    value = data.draw(st.sampled_from(bad[key]), label="value")
    params = make_params(case)
    names = (key,) + ALIASES.get(key, ())
    if where == "add_param_group":
        opt = build(case, params)
        train(case, params, opt, 0, case.steps)
        before = snapshot(params, opt)
        new = torch.nn.Parameter(torch.randn(8, 6).to(case.dtype))
        group = {"params": [("new", new)] if case.named else [new], key: value}
        with pytest.raises((ValueError, TypeError)) as error:
            opt.add_param_group(group)
        assert_same(snapshot(params, opt), before)
        assert len(opt.param_groups) == len(case.groups)
    else:
        start = [p.detach().clone() for p in params]
        groups = group_list(case, params)
        kwargs = dict(case.kwargs)
        if where == "group":
            groups[0][key] = value
        else:
            kwargs[key] = value
        with pytest.raises((ValueError, TypeError)) as error:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                case.cls(groups, **kwargs)
        assert_same([p.detach() for p in params], start)
    assert message_names(error.value, names), (names, str(error.value))


def typo(key: str, kind: int, at: int) -> str:
    at %= len(key) - 1
    if kind == 0:                                       # swap two neighbours
        return key[:at] + key[at + 1] + key[at] + key[at + 2:]
    if kind == 1:                                       # drop one
        return key[:at] + key[at + 1:]
    return key[:at] + key[at] + key[at:]                # double one


def known_keys(case: Case) -> set[str]:
    """Every key a param group of ``case``'s optimizer may hold."""
    return set(build(case, make_params(case)).defaults) | set(BOOKKEEPING) | set(COMPAT)


def options(known: set[str]) -> list[str]:
    """The optimizer's own options, of 4 letters or more (so that a typo is closest to one)."""
    return sorted(k for k in known - set(BOOKKEEPING) - set(COMPAT) if len(k) >= 4)


@examples(120)
@given(case=cases(min_steps=1, max_steps=1), data=st.data(),
       where=st.sampled_from(["group", "add_param_group"]))
def test_unknown_group_key_names_it_and_the_closest_known_key(case, data, where):
    """A misspelled group key raises ValueError naming the key, the known keys and the
    closest match; the optimizer is unchanged."""
    known = known_keys(case)
    key = data.draw(st.sampled_from(options(known)), label="key")
    wrong = typo(key, data.draw(st.integers(0, 2)), data.draw(st.integers(0, 40)))
    assume(wrong not in known and difflib.get_close_matches(wrong, known, n=1) == [key])
    params = make_params(case)
    if where == "group":
        groups = group_list(case, params)
        groups[-1][wrong] = 1
        with pytest.raises(ValueError) as error:
            case.cls(groups, **case.kwargs)
    else:
        opt = build(case, params)
        train(case, params, opt, 0, case.steps)
        before = snapshot(params, opt)
        with pytest.raises(ValueError) as error:
            opt.add_param_group({"params": [("new", torch.nn.Parameter(torch.randn(4, 3)))]
                                 if case.named else [torch.nn.Parameter(torch.randn(4, 3))],
                                 wrong: 1})
        assert_same(snapshot(params, opt), before)
    text = str(error.value)
    assert wrong in text and key in text, text
    assert sum(k in text for k in options(known) if k != key) >= 3, text     # the known keys


@examples(60)
@given(case=cases(layouts=False, min_steps=1, max_steps=1), data=st.data())
def test_unknown_constructor_argument_is_a_type_error_naming_the_class(case, data):
    """A misspelled keyword raises TypeError naming the class called and the keyword."""
    known = known_keys(case)
    key = data.draw(st.sampled_from(options(known)), label="key")
    wrong = typo(key, data.draw(st.integers(0, 2)), data.draw(st.integers(0, 40)))
    assume(wrong not in known)
    with pytest.raises(TypeError) as error:
        case.cls(make_params(case), **{wrong: 1})
    text = str(error.value)
    assert re.search(rf"\b{case.cls.__name__}\b", text) and wrong in text, text


@examples(200)
@given(name=st.sampled_from(NAMES), bits=st.sampled_from([32, 8]),
       layout=st.lists(st.lists(st.integers(0, 3), max_size=4), max_size=3))
def test_group_layout_errors_match_torch(name, bits, layout):
    """Empty parameter lists, empty groups and parameters repeated within or across groups
    are accepted or refused exactly as torch.optim.AdamW does (same error, same duplicate
    warning); an accepted layout steps every parameter once."""
    pool = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 5), (5,), (3, 2, 2), (7, 6)]]

    def outcome(make):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt = make([{"params": [pool[i] for i in g]} for g in layout])
            except (ValueError, TypeError) as e:
                return type(e), str(e), None
        return None, any("duplicate" in str(w.message) for w in caught), opt

    expected = outcome(torch.optim.AdamW)
    kwargs = {"rank": 2, "update_proj_gap": 1} if name in LOWRANK else {}
    got = outcome(lambda groups: CLASSES[(name, bits)](groups, **kwargs))
    assert got[:2] == expected[:2]
    if got[2] is not None and not got[1]:
        start = [p.detach().clone() for p in pool]
        gen = torch.Generator().manual_seed(0)
        for p in pool:
            p.grad = torch.randn(p.shape, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got[2].step()
        listed = {i for g in layout for i in g}
        for i, (p, s) in enumerate(zip(pool, start)):
            assert torch.isfinite(p).all()
            assert (i in listed) != torch.equal(p, s), i


@examples(60)
@given(case=cases(max_steps=2), data=st.data())
def test_adding_a_parameter_already_present_is_refused_and_changes_nothing(case, data):
    """add_param_group with a parameter some group holds: torch's ValueError, no change."""
    present = [i for members, _ in case.groups for i in members]
    assume(present)
    params = make_params(case)
    opt = build(case, params)
    train(case, params, opt, 0, case.steps)
    before = snapshot(params, opt)
    i = data.draw(st.sampled_from(present))
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [(f"p{i}", params[i])] if case.named else [params[i]]})
    assert_same(snapshot(params, opt), before)
    assert len(opt.param_groups) == len(case.groups)


ZERO_SHAPES = st.one_of(st.just((0,)), st.tuples(st.just(0), st.integers(1, 6)),
                        st.tuples(st.integers(1, 6), st.just(0)),
                        st.tuples(st.integers(0, 3), st.integers(0, 3), st.just(0), st.just(2)))


@examples(80)
@given(name=st.sampled_from(NAMES), bits=st.sampled_from([32, 8]),
       impl=st.sampled_from(["fast", "reference"]), shape=ZERO_SHAPES)
def test_parameters_with_no_elements_step_like_torch(name, bits, impl, shape):
    """A parameter with a zero-size dimension steps without error (as in torch.optim),
    beside a matrix that trains."""
    empty = torch.nn.Parameter(torch.randn(shape))
    other = torch.nn.Parameter(torch.randn(6, 5))
    kwargs = {"rank": 2, "update_proj_gap": 1} if name in LOWRANK else {}
    opt = CLASSES[(name, bits)]([empty, other], impl=impl, **kwargs)
    start = other.detach().clone()
    for _ in range(2):
        empty.grad, other.grad = torch.randn(shape), torch.randn(6, 5)
        opt.step()
    assert empty.shape == shape and torch.isfinite(other).all() and not torch.equal(other, start)


# -------------------------------------------------------- non-finite gradients
BAD = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@examples(200)
@given(case=cases(max_steps=3), data=st.data(), bad=BAD)
def test_non_finite_gradient_raises_naming_the_parameter_and_changes_nothing(case, data, bad):
    """check_finite (default): a single inf / nan anywhere, at any step, raises
    FloatingPointError naming the parameter; weights and state are untouched."""
    with_grad = [i for i, m in enumerate(case.modes) if m == "grad"
                 and any(i in members for members, _ in case.groups)]
    assume(with_grad)
    target = data.draw(st.sampled_from(with_grad), label="target")
    params = make_params(case)
    opt = build(case, params)
    train(case, params, opt, 0, case.steps - 1)
    set_grads(case, params, case.steps - 1)
    grad = params[target].grad
    grad.view(-1)[data.draw(st.integers(0, grad.numel() - 1), label="at")] = bad
    before = snapshot(params, opt)
    with pytest.raises(FloatingPointError) as error:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    assert_same(snapshot(params, opt), before)
    gi, pi = next((g, m.index(target)) for g, (m, _) in enumerate(case.groups) if target in m)
    text = str(error.value)
    if case.named:
        assert f"'p{target}'" in text, text
    else:
        assert f"[{gi}]" in text and f"[{pi}]" in text, text


@examples(160)
@given(case=cases(check_finite=False, no_grads=False), data=st.data(), bad=BAD)
def test_unchecked_non_finite_gradient_goes_into_weights_on_every_step(case, data, bad):
    """check_finite=False: the step is taken as computed on every step, basis refreshes
    included: the non-finite value reaches the weights (no exception), and the other
    parameters stay finite."""
    target = data.draw(st.integers(0, len(case.shapes) - 1), label="target")
    at_step = data.draw(st.integers(0, case.steps - 1), label="step")
    params = make_params(case)
    opt = build(case, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(case.steps):
            set_grads(case, params, t)
            if t == at_step:
                params[target].grad.view(-1)[0] = bad
            opt.step()
            if t == at_step:
                assert not torch.isfinite(params[target]).all()
    for i, p in enumerate(params):
        if i != target:
            assert torch.isfinite(p).all(), i


# ------------------------------------------------------------------ state dicts
@examples(200)
@given(case=cases(max_steps=3), more=st.integers(1, 3))
def test_resume_is_bit_exact_and_loaded_hyperparameters_win(case, more):
    """Save after some steps (torch.save / torch.load(weights_only=True)), load into a fresh
    optimizer built with other lr and weight decay, continue: the same weights and state, bit
    for bit, as never stopping (across refreshes: gap <= 3)."""
    params = make_params(case)
    opt = build(case, params)
    train(case, params, opt, 0, case.steps)
    saved_params = round_trip([p.detach().clone() for p in params])
    saved = round_trip(opt.state_dict())
    train(case, params, opt, case.steps, case.steps + more)

    fresh = make_params(case)
    with torch.no_grad():
        for p, v in zip(fresh, saved_params):
            p.copy_(v)
    other = replace(case, kwargs={**case.kwargs, "lr": case.kwargs.get("lr", 0.01) * 3,
                                  "weight_decay": 0.05})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt2 = other.cls(group_list(case, fresh, lr=3.0), **other.kwargs)
    opt2.load_state_dict(saved)
    train(case, fresh, opt2, case.steps, case.steps + more)
    for i, (a, b) in enumerate(zip(params, fresh)):
        assert torch.equal(a, b), i
    assert_same(round_trip(opt.state_dict())["state"], round_trip(opt2.state_dict())["state"])


@examples(80)
@given(case=cases(max_steps=2))
def test_loaded_param_groups_equal_the_saved_ones(case):
    """After load_state_dict, state_dict()["param_groups"] is the saved one exactly."""
    params, opt = run(case)
    saved = round_trip(opt.state_dict())
    opt2 = build(case, make_params(case))
    opt2.load_state_dict(saved)
    assert_same(opt2.state_dict()["param_groups"], saved["param_groups"])


def refused_load(case: Case, target: torch.optim.Optimizer, params: list[torch.Tensor],
                 state: dict[str, Any]) -> ValueError:
    """Load ``state`` into ``target``: ValueError, nothing changed; return the error."""
    before = snapshot(params, target)
    with pytest.raises(ValueError) as error:
        target.load_state_dict(state)
    assert_same(snapshot(params, target), before)
    return error.value


def trained_target(case: Case, shapes: Any = None) -> tuple[list[torch.Tensor], Any]:
    params = make_params(case, shapes)
    opt = build(case, params)
    train(case, params, opt, 0, 1)
    return params, opt


@examples(200)
@given(source=cases(layouts=False, no_grads=False, max_steps=3),
       target=st.sampled_from(sorted(CLASSES)))
def test_state_of_another_optimizer_is_refused(source, target):
    """A state from another method, projector, rule or bit width raises ValueError naming
    something that differs (a group key, a state key or a class); the target is unchanged."""
    assume(target != (source.name, source.bits))
    # the method is the class's: the source sets only safe hyperparameters, rank and gap
    source = replace(source, kwargs={k: v for k, v in source.kwargs.items()
                                     if k in SAFE or k in ("rank", "update_proj_gap")})
    _, opt = run(source)
    saved = round_trip(opt.state_dict())
    kwargs = {k: v for k, v in source.kwargs.items()
              if target[0] in LOWRANK and k in ("rank", "update_proj_gap")}
    dest = replace(source, name=target[0], bits=target[1], kwargs=kwargs)
    params, opt2 = trained_target(dest)
    mine, theirs = opt2.state_dict(), saved
    differs = {c.__name__ for o in (opt, opt2) for c in type(o).__mro__
               if c.__module__.startswith("memopt")}
    for a, b in ((mine, theirs), (theirs, mine)):
        for k, v in a["param_groups"][0].items():
            if k not in SAFE + BOOKKEEPING and b["param_groups"][0].get(k, object()) != v:
                differs.add(k)
        for pid, s in a["state"].items():
            differs |= set(s) - set(b["state"].get(pid, {}))
    error = refused_load(dest, opt2, params, saved)
    assert message_names(error, differs), (sorted(differs), str(error))


def tensor_keys(state: dict[str, Any]) -> list[tuple[int, str]]:
    """(parameter index, key) of every state tensor that is not a scalar (moments,
    momentum, bases, indices, 8-bit codes and absmax, error buffers)."""
    return sorted((pid, k) for pid, s in state.items() for k, v in s.items()
                  if isinstance(v, torch.Tensor) and v.ndim >= 1)


@examples(200)
@given(case=cases(max_steps=3), data=st.data(),
       how=st.sampled_from(["key", "step", "group", "param"]))
def test_truncated_state_is_refused(case, data, how):
    """A state missing a tensor or the step of a parameter, a whole group, or a parameter of
    a group raises ValueError (naming the missing key); the target is unchanged. (A parameter
    without any state is not truncation: it had no gradient yet, as a frozen one.)"""
    _, opt = run(case)
    saved = round_trip(opt.state_dict())
    names: tuple[str, ...] = ()
    if how in ("key", "step"):
        keys = tensor_keys(saved["state"]) if how == "key" else \
            sorted((pid, "step") for pid, s in saved["state"].items() if "step" in s)
        assume(keys)
        pid, key = data.draw(st.sampled_from(keys), label="drop")
        del saved["state"][pid][key]
        names = (key,)
    elif how == "group":
        assume(len(saved["param_groups"]) >= 2)
        del saved["param_groups"][data.draw(st.integers(0, len(saved["param_groups"]) - 1))]
    else:
        full = [g for g in saved["param_groups"] if g["params"]]
        assume(full)
        group = data.draw(st.sampled_from(full), label="group")
        pid = group["params"].pop()
        saved["state"].pop(pid, None)
        if "param_names" in group:
            group["param_names"].pop()
    params, target = trained_target(case)
    error = refused_load(case, target, params, saved)
    assert not names or message_names(error, names), (names, str(error))


OTHER_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                torch.int32, torch.uint8)


@examples(200)
@given(case=cases(max_steps=3), data=st.data(), how=st.sampled_from(["shape", "dtype", "param"]))
def test_state_of_wrong_shape_or_dtype_is_refused(case, data, how):
    """A state tensor of another shape or dtype, or a state saved for a parameter of another
    shape, raises ValueError naming the key or the parameter; the target is unchanged."""
    _, opt = run(case)
    saved = round_trip(opt.state_dict())
    shapes = case.shapes
    if how == "param":
        stepped = [pid for pid, s in saved["state"].items() if s]
        assume(stepped)
        pid = data.draw(st.sampled_from(sorted(stepped)), label="param")
        order = [(gi, pi, i) for gi, (members, _) in enumerate(case.groups)
                 for pi, i in enumerate(members)]
        gi, pi, index = order[pid]
        assume(len(shapes[index]) >= 1)
        shapes = tuple((s[0] + 1,) + s[1:] if i == index else s for i, s in enumerate(shapes))
        label = f"'p{index}'" if case.named else f"param_groups[{gi}]['params'][{pi}]"
        names = tuple(saved["state"][pid]) + (label, str(tuple(shapes[index])),
                                              str(tuple(case.shapes[index])))
    else:
        keys = sorted((pid, k) for pid, s in saved["state"].items() for k, v in s.items()
                      if isinstance(v, torch.Tensor))
        assume(keys)
        pid, key = data.draw(st.sampled_from(keys), label="tensor")
        value = saved["state"][pid][key]
        if how == "shape":
            first = value.shape[0] - 1 if value.ndim and value.shape[0] > 1 else 2
            shape = (first,) + tuple(value.shape[1:])
            saved["state"][pid][key] = torch.zeros(shape, dtype=value.dtype)
        else:
            dtype = data.draw(st.sampled_from([d for d in OTHER_DTYPES if d != value.dtype]))
            saved["state"][pid][key] = value.to(dtype)
        names = (key,)
    params, target = trained_target(case, shapes)
    error = refused_load(case, target, params, saved)
    assert message_names(error, names), (names, str(error))
