"""Recorded steps (optim/graphs.py): a low-rank step that refreshes no basis replays a graph.

On the CPU the CUDA graph is emulated (``helpers.EmulatedGraph``): the step's ATen
operations are recorded and replayed on the same tensors with the same Python numbers, as a
CUDA graph replays its kernels. A step that baked in something that changes from step to
step (the learning rate, a step count, a state tensor it rebinds) then drifts away from the
same steps run eagerly. Where a GPU is present, the same tests run with real CUDA graphs.
"""

import pytest
import torch

from helpers import LOWRANK, EmulatedGraph, SmallNet, emulated_capture, round_trip, small_batch
from memopt import optim as mo
from memopt.optim import graphs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GAP = 5          # refreshes at steps 0, 5, 10; warm-up at 1, 6; recorded at 2, 7


@pytest.fixture(autouse=True)
def record_on_the_cpu(monkeypatch):
    monkeypatch.setitem(graphs.CAPTURES, "cpu", emulated_capture)


def build(name, device, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = SmallNet(dtype).to(device)
    kw.setdefault("cuda_graph", True)
    opt = LOWRANK[name](model.parameters(), update_proj_gap=GAP, **kw)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + 0.3 * t))
    return model, opt, schedule


def train(model, opt, schedule, steps, start=0, set_to_none=False):
    """Steps with a learning rate that changes every step; gradients accumulate into the
    same tensors unless ``set_to_none``."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=set_to_none)
        x, y = small_batch(t, dtype)
        ((model(x.to(device)) - y.to(device)) ** 2).mean().backward()
        opt.step()
        schedule.step()


def replays(opt):
    """Steps replayed after the step that recorded them. A CUDA graph runs nothing while it
    records, so on CUDA the recording step replays too; the emulation runs it while it
    records (``Capture``'s second value), so those replays are not counted here."""
    recorders = opt._recorders.values()
    cuda = any(p.is_cuda for g in opt.param_groups for p in g["params"])
    return sum(r.replays - (r.recordings if cuda else 0) for r in recorders)


def assert_same_bits(model_a, opt_a, model_b, opt_b):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        for key, value in opt_a.state[pa].items():
            other = opt_b.state[pb][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) \
                else value == other, key


CASES = [("galore", {}), ("galore", {"projector": "polar"}), ("dct", {}), ("fira", {}),
         ("galore", {"weight_decay": 0.1}), ("fira", {"weight_decay": 0.1, "projector": "dct"}),
         ("galore", {"moments_on_refresh": "reset"}),
         ("galore", {"projection_precision": "medium"}),
         ("fira", {"projection_precision": "medium", "weight_decay": 0.1})]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,kw", CASES)
def test_replayed_steps_equal_the_same_steps_run_eagerly(device, dtype, name, kw, monkeypatch):
    model, opt, schedule = build(name, device, dtype, **kw)
    train(model, opt, schedule, 12)
    assert replays(opt) == 4                       # steps 3, 4, 8, 9
    with monkeypatch.context() as m:               # every recorded step runs its work eagerly
        m.setattr(graphs.StepGraph, "run", lambda self, key, work: work())
        model2, opt2, schedule2 = build(name, device, dtype, **kw)
        train(model2, opt2, schedule2, 12)
    assert replays(opt2) == 0
    assert_same_bits(model, opt, model2, opt2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kw", CASES)
def test_recorded_steps_agree_with_eager_steps(device, name, kw):
    """The recorded form reads lr from the device and multiplies the low-rank update by it
    before the product (eager steps fold lr into the product): the same steps to rounding."""
    results = []
    for cuda_graph in (True, False):
        model, opt, schedule = build(name, device, cuda_graph=cuda_graph,
                                     **{**kw, "projection_precision": "highest"})
        train(model, opt, schedule, 12)
        assert (replays(opt) > 0) == cuda_graph
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOWRANK))
def test_resume_is_bit_exact_with_recorded_steps(device, name):
    model, opt, schedule = build(name, device)
    train(model, opt, schedule, 8)
    saved_model, saved_opt = round_trip(model.state_dict()), round_trip(opt.state_dict())
    saved_schedule = schedule.state_dict()
    train(model, opt, schedule, 6, start=8)       # crosses the refresh at 10
    assert replays(opt) == 5                      # 3, 4, 8, 9, 13
    model2, opt2, schedule2 = build(name, device)
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    schedule2.load_state_dict(saved_schedule)
    train(model2, opt2, schedule2, 6, start=8)    # warm-up at 8, recorded at 9
    assert replays(opt2) == 1                     # 13
    assert_same_bits(model, opt, model2, opt2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOWRANK))
def test_new_gradient_tensors_every_step(device, name, monkeypatch):
    """zero_grad(set_to_none=True): each step's gradients may lie elsewhere; a recorded
    step follows them (the addresses are in its key)."""
    model, opt, schedule = build(name, device)
    train(model, opt, schedule, 12, set_to_none=True)
    with monkeypatch.context() as m:
        m.setattr(graphs.StepGraph, "run", lambda self, key, work: work())
        model2, opt2, schedule2 = build(name, device)
        train(model2, opt2, schedule2, 12, set_to_none=True)
    assert_same_bits(model, opt, model2, opt2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LOWRANK))
def test_non_finite_gradient_in_a_recorded_step_changes_nothing(device, name):
    model, opt, schedule = build(name, device)
    train(model, opt, schedule, 9)
    assert replays(opt) > 0
    params = [p.detach().clone() for p in model.parameters()]
    state = round_trip(opt.state_dict())
    opt.zero_grad(set_to_none=False)
    x, y = small_batch(9)
    ((model(x.to(device)) - y.to(device)) ** 2).mean().backward()
    model.fc2.weight.grad[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match="fc2|param_groups"):
        opt.step()
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b)
    after = opt.state_dict()["state"]
    for index, values in state["state"].items():
        for key, value in values.items():
            other = after[index][key]
            assert torch.equal(value.cpu(), other.cpu()) if isinstance(value, torch.Tensor) \
                else value == other, key


def test_a_state_saved_without_the_option_loads():
    model, opt, schedule = build("galore", "cpu")
    train(model, opt, schedule, 3)
    saved = round_trip(opt.state_dict())
    for group in saved["param_groups"]:
        del group["cuda_graph"]
    model2, opt2, schedule2 = build("galore", "cpu")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["cuda_graph"] is False     # such states stepped eagerly
    train(model2, opt2, schedule2, 3)


def test_recording_is_opt_in():
    model = SmallNet()
    opt = LOWRANK["dct"](model.parameters(), update_proj_gap=GAP)
    assert opt.param_groups[0]["cuda_graph"] is False


def test_per_parameter_steps_run_eagerly():
    model, opt, _ = build("galore", "cpu")
    handle = mo.step_in_backward(model, opt)
    try:
        for t in range(8):
            x, y = small_batch(t)
            ((model(x) - y) ** 2).mean().backward()
    finally:
        handle.remove()
    assert opt._recorders == {}


def test_a_group_that_cannot_be_recorded_falls_back_to_eager_steps(monkeypatch):
    def refuse(work):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setitem(graphs.CAPTURES, "cpu", refuse)
    model, opt, schedule = build("fira", "cpu")
    with pytest.warns(UserWarning, match="could not record"):
        train(model, opt, schedule, 12)
    assert opt._unrecordable == {id(opt.param_groups[0])} and opt._recorders == {}
    model2, opt2, schedule2 = build("fira", "cpu", cuda_graph=False)
    train(model2, opt2, schedule2, 12)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_cuda_graph_false_never_records():
    model, opt, schedule = build("dct", "cpu", cuda_graph=False)
    train(model, opt, schedule, 12)
    assert opt._recorders == {}


def test_eight_bit_states_run_eagerly():
    model, opt, schedule = build("galore", "cpu", state_bits=8)
    train(model, opt, schedule, 12)
    assert opt._recorders == {}


def test_emulated_graph_replays_the_numbers_it_recorded():
    """The emulation bakes Python numbers in and reads tensors anew, as a CUDA graph does
    (so the tests above would catch a learning rate passed as a number)."""
    x, y, t = torch.zeros(3), torch.ones(3), torch.tensor(2.0)
    lr = 1.0
    graph = EmulatedGraph()
    with graph:
        x.add_(y, alpha=lr)
        x.add_(y * t)
    assert torch.equal(x, torch.full((3,), 3.0))
    lr = 5.0            # noqa: F841  (not seen by the replay)
    t.fill_(10.0)
    graph.replay()
    assert torch.equal(x, torch.full((3,), 3.0 + 1.0 + 10.0))


def test_emulated_graph_refuses_a_host_sync():
    with pytest.raises(RuntimeError, match="not recordable"):
        with EmulatedGraph():
            float(torch.ones(2).sum())
