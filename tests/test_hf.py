"""memopt in a Hugging Face Trainer: the optimizer factory, its schedule, Trainer runs, the recipe."""

import importlib.util
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memopt import optim as mo  # noqa: E402
from memopt.recipes import finetune_hf  # noqa: E402
from memopt.recipes.hf import (create_trainer_optimizer,  # noqa: E402
                               create_trainer_optimizer_and_scheduler, warmup_decay_factor)

#: Trainer needs accelerate; the tests that build one skip without it.
needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="transformers.Trainer needs accelerate")

CLASSES = {"adamw": torch.optim.AdamW, "galore": mo.GaLoreAdamW, "dct8bit": mo.DCTAdamW,
           "fira": mo.FiraAdamW, "muon": mo.Muon, "polargrad": mo.PolarGrad}
MEMOPT_NAMES = [n for n in CLASSES if n != "adamw"]
TRAINER_NAMES = ["galore", "dct8bit", "muon"]
TRAINER_STEPS = 6
RANK = 8   # below the hidden size 64: every hidden matrix is projected


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread; more thrash on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama classifier; its 128 x 64 embedding is large enough for 8-bit moments."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
        pad_token_id=0, num_labels=2)
    return transformers.LlamaForSequenceClassification(config)


def options(name: str) -> dict:
    return {"rank": RANK} if name in ("galore", "dct8bit", "fira") else {}


def is_adamw_param(name: str) -> bool:
    """Embeddings, the classification head and norms: what memopt leaves to AdamW."""
    return "embed_tokens" in name or name.startswith("score") or "norm" in name


# ------------------------------------------------------------------ the factory
@pytest.mark.parametrize("name", list(CLASSES))
def test_create_trainer_optimizer_builds_the_named_class(name):
    opt = create_trainer_optimizer(tiny_model(), name, **options(name))
    assert isinstance(opt, CLASSES[name])


def test_8bit_suffix_keeps_8bit_state():
    opt = create_trainer_optimizer(tiny_model(), "dct8bit", rank=RANK)
    assert all(g["state_bits"] == 8 for g in opt.param_groups)


@pytest.mark.parametrize("name", MEMOPT_NAMES)
def test_embeddings_head_and_norms_go_to_the_adamw_group(name):
    model = tiny_model()
    opt = create_trainer_optimizer(model, name, **options(name))
    routed = {n: g.get("adamw", False) for g in opt.param_groups for n in g["param_names"]}
    assert set(routed) == {n for n, _ in model.named_parameters()}
    assert routed == {n: is_adamw_param(n) for n in routed}
    assert any(routed.values()) and not all(routed.values())


@pytest.mark.parametrize("name", list(CLASSES))
def test_lr_is_the_class_default_unless_given(name):
    model = tiny_model()
    default = create_trainer_optimizer(model, name, **options(name))
    expected = CLASSES[name]([torch.nn.Parameter(torch.zeros(2))]).defaults["lr"]
    assert [g["lr"] for g in default.param_groups] == [expected] * len(default.param_groups)
    given = create_trainer_optimizer(model, name, lr=0.0123, **options(name))
    assert all(g["lr"] == 0.0123 for g in given.param_groups)


@pytest.mark.parametrize("name", ["adamw", "galore", "muon"])
def test_weight_decay_reaches_every_group(name):
    opt = create_trainer_optimizer(tiny_model(), name, weight_decay=0.05, **options(name))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05] * len(opt.param_groups)


def test_unknown_optimizer_name_is_a_value_error_naming_it(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="nadam"):
        create_trainer_optimizer(model, "nadam")
    with pytest.raises(ValueError, match="nadam"):
        create_trainer_optimizer_and_scheduler(model, "nadam", 10)
    with pytest.raises(ValueError, match="nadam"):
        finetune_hf.run("nadam", steps=1, out=tmp_path, device="cpu")


# ----------------------------------------------------------------- the schedule
def test_warmup_rises_linearly_to_one():
    factors = [warmup_decay_factor(s, 100, warmup_steps=4) for s in range(5)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize("schedule,middle", [("cosine", 0.5), ("linear", 0.5)])
def test_decay_halves_at_the_middle_and_ends_at_zero(schedule, middle):
    f = [warmup_decay_factor(s, 110, warmup_steps=10, schedule=schedule) for s in range(111)]
    assert f[60] == pytest.approx(middle)
    assert f[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))        # never rises after warmup


def test_cosine_and_linear_differ_between_the_ends():
    cos = warmup_decay_factor(25, 100, schedule="cosine")
    lin = warmup_decay_factor(25, 100, schedule="linear")
    assert cos == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lin == pytest.approx(0.75)


def test_scheduler_scales_each_group_lr_by_the_factor():
    opt, sched = create_trainer_optimizer_and_scheduler(tiny_model(), "galore", 20,
                                                        warmup_steps=5, lr=0.01, rank=RANK)
    for step in range(8):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(
            [0.01 * warmup_decay_factor(step, 20, 5)] * len(opt.param_groups))
        opt.step()
        sched.step()


@pytest.mark.parametrize("kwargs,word", [
    ({"num_training_steps": 0}, "num_training_steps"),
    ({"num_training_steps": 10, "warmup_steps": 11}, "warmup_steps"),
    ({"num_training_steps": 10, "warmup_steps": -1}, "warmup_steps"),
    ({"num_training_steps": 10, "schedule": "step"}, "schedule"),
])
def test_bad_schedule_arguments_are_value_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        create_trainer_optimizer_and_scheduler(tiny_model(), "muon", **kwargs)


# ----------------------------------------------------------- inside a Trainer
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (parameters before, model, optimizer, scheduler, log) after a short Trainer run,
    computed once per name for the whole module."""
    runs = {}

    def get(name):
        if name not in runs:
            model = tiny_model()
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt, sched = create_trainer_optimizer_and_scheduler(
                model, name, TRAINER_STEPS, warmup_steps=2, **options(name))
            args = transformers.TrainingArguments(
                output_dir=str(tmp_path_factory.mktemp(name)), max_steps=TRAINER_STEPS,
                per_device_train_batch_size=8, logging_steps=1, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
            trainer = transformers.Trainer(
                model=model, args=args, optimizers=(opt, sched),
                train_dataset=finetune_hf.HalvesDataset(64, seed=1))
            trainer.train()
            runs[name] = (before, model, opt, sched, trainer.state.log_history)
        return runs[name]

    return get


@needs_accelerate
@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_loss_is_finite_at_every_step(trained, name):
    *_, log = trained(name)
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == TRAINER_STEPS
    assert all(math.isfinite(x) for x in losses)


@needs_accelerate
@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_changes_every_parameter(trained, name):
    before, model, *_ = trained(name)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unchanged == []


@needs_accelerate
@pytest.mark.parametrize("name", TRAINER_NAMES)
def test_trainer_steps_our_optimizer_and_scheduler(trained, name):
    _, model, opt, sched, _ = trained(name)
    assert sched.last_epoch == TRAINER_STEPS
    hidden = model.model.layers[0].mlp.up_proj.weight
    assert opt.state[hidden]["step"] == TRAINER_STEPS


@needs_accelerate
def test_trainer_keeps_dct8bit_moments_in_8_bits(trained):
    _, model, opt, *_ = trained("dct8bit")
    embedding_state = opt.state[model.model.embed_tokens.weight]
    assert embedding_state["exp_avg"].dtype == torch.uint8


# ----------------------------------------------------------------- the recipe
@needs_accelerate
def test_recipe_main_writes_results_json(tmp_path, capsys):
    assert finetune_hf.main(["--optimizer", "muon", "--steps", "5", "--out", str(tmp_path),
                             "--device", "cpu"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["optimizer"] == "muon" and results["steps"] == 5
    assert results["train_loss_end_step"] == 5
    assert math.isfinite(results["train_loss_start"]) and math.isfinite(results["eval_loss"])
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert "eval accuracy" in capsys.readouterr().out
    assert results["lr"] == mo.Muon([torch.nn.Parameter(torch.zeros(2))]).defaults["lr"]


@needs_accelerate
def test_recipe_lr_replaces_the_recipes_rate(tmp_path, capsys):
    assert finetune_hf.main(["--optimizer", "polargrad", "--steps", "2", "--lr", "0.0123",
                             "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["lr"] == 0.0123
    with pytest.raises(SystemExit):
        finetune_hf.main(["--lr", "-1", "--out", str(tmp_path / "bad")])
    assert "--lr must be a number > 0" in capsys.readouterr().err


@needs_accelerate
@pytest.mark.parametrize("name", ["galore", "muon"])
def test_recipe_learns_the_task(tmp_path, name):
    """With frozen matrices the model stays near 89%; the default run must beat that."""
    results = finetune_hf.run(name, steps=200, out=tmp_path, device="cpu")
    assert results["eval_accuracy"] >= 0.93
    assert results["train_loss_end"] < results["train_loss_start"] / 4
