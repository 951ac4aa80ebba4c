"""`memopt train` and `memopt compare` with --quantize-weights / --weight-rounding: the model
is quantized as it is built, learns, records the setting, resumes bit for bit, and every
combination that cannot update quantized weights is refused in one line naming the flag."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from test_cli import run_main                                         # noqa: E402

from memopt.optim.quantized_weights import QuantizedLinear            # noqa: E402
from memopt.recipes import sweep                                      # noqa: E402
from memopt.recipes.train import Run, RunConfig                       # noqa: E402


def train_argv(out, *flags, optimizer="galore8bit", preset="micro", steps=6):
    return ["train", "--optimizer", optimizer, "--preset", preset, "--steps", str(steps),
            "--device", "cpu", "--no-progress", "--out", str(out), *flags]


def assert_one_line_error(code, out, err, command, *parts):
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"memopt {command}: error: argument "), lines[0]
    for part in parts:
        assert part in lines[0], lines[0]


# ------------------------------------------------------------------ training
def test_int8_training_on_the_quick_preset_learns_and_records_the_setting(tmp_path, capsys):
    out = tmp_path / "int8"
    code, printed, err = run_main(train_argv(out, "--quantize-weights", "8", preset="quick",
                                             steps=25), capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5            # from ~ln(256) = 5.5
    assert summary["weights"] == "int8" and summary["weight_rounding"] == "stochastic"
    assert summary["config"]["quantize_weights"] == 8
    identity = json.loads((out / "config.json").read_text())["identity"]
    assert identity["quantize_weights"] == 8 and identity["weight_rounding"] == "stochastic"
    assert '"weights": "int8"' in printed


def test_the_checkpoint_holds_codes_not_full_precision_weights(micro, tmp_path, capsys):
    code, _, err = run_main(train_argv(tmp_path, "--quantize-weights", "8"), capsys)
    assert code == 0, err
    model = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    codes = [k for k in model if k.endswith(".weight_codes")]
    assert len(codes) == 7 * micro.layers                 # q, k, v, o, gate, up, down
    assert all(model[k].dtype == torch.int8 for k in codes)
    assert not any(k.removesuffix(".weight_codes") + ".weight" in model for k in codes)
    assert model["lm_head.weight"].dtype == torch.float32  # the head is not quantized


def test_every_linear_but_the_head_is_quantized_before_the_optimizer_is_built(micro):
    run = Run(RunConfig(optimizer="dct", preset="micro", device="cpu", progress=False,
                        quantize_weights=16, weight_rounding="nearest"))
    linears = {n: m for n, m in run.model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n for n, m in linears.items() if isinstance(m, QuantizedLinear)}
    assert quantized == set(linears) - {"lm_head"}
    assert all(linears[n].bits == 16 and linears[n].rounding == "nearest" for n in quantized)
    in_optimizer = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert all(id(linears[n].weight) in in_optimizer for n in quantized)


def test_int8_weights_take_a_fraction_of_full_precision_ones(micro, tmp_path, capsys):
    mb = {}
    for name, flags in (("full", []), ("int8", ["--quantize-weights", "8"]),
                        ("bf16", ["--quantize-weights", "16"])):
        code, _, err = run_main(train_argv(tmp_path / name, *flags, steps=2), capsys)
        assert code == 0, err
        mb[name] = json.loads((tmp_path / name / "summary.json").read_text())["weights_mb"]
    # micro (hidden 32, intermediate 64, 2 layers, 256 bytes): per layer q, k, v, o (32 x 32)
    # and gate, up (64 x 32), down (32 x 64): 10240 weights in 288 rows of one scale group
    linear, rows = 2 * 10240, 2 * 288
    kept = 2 * 256 * 32 + 5 * 32                          # embedding, head, norms: fp32
    assert mb["full"] * 2**20 == 4 * (linear + kept)
    assert mb["bf16"] * 2**20 == 2 * linear + 4 * kept
    assert mb["int8"] * 2**20 == linear + 4 * rows + 4 * kept


@pytest.mark.parametrize("optimizer", ["galore8bit", "trion", "adamw"])
def test_per_layer_with_activation_checkpointing_equals_the_plain_step(micro, optimizer):
    """Each quantized weight is rounded once per step whichever way it is updated, so
    updating it in the backward pass of a recomputed layer gives the same codes, bit for
    bit (adamw: a torch optimizer, which updates quantized weights only per layer)."""
    common = dict(optimizer=optimizer, preset="micro", steps=6, device="cpu", progress=False,
                  quantize_weights=8)
    plain = Run(RunConfig(**common, per_layer=optimizer == "adamw"))
    plain.train()
    per_layer = Run(RunConfig(**common, per_layer=True, activation_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in per_layer.model.modules())
    per_layer.train()
    assert [h["loss"] for h in per_layer.history] == [h["loss"] for h in plain.history]
    for (k, a), b in zip(plain.model.state_dict().items(), per_layer.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_activation_checkpointing_recomputes_the_quantized_layers(micro):
    run = Run(RunConfig(optimizer="galore8bit", preset="micro", steps=2, device="cpu",
                        progress=False, quantize_weights=8, per_layer=True,
                        activation_checkpointing=True))
    calls = []
    layer = run.model.model.layers[0].mlp.down_proj
    layer.register_forward_pre_hook(lambda m, i: calls.append(m.training))
    run.train()
    assert calls.count(True) == 2 * 2              # forward and recompute, in each step


# ------------------------------------------------------------------ resume
RESUMED = {
    "int8": ("galore8bit", ["--quantize-weights", "8"]),
    "bf16 nearest": ("dct", ["--quantize-weights", "16", "--weight-rounding", "nearest"]),
    "per-layer checkpointed": ("dct8bit", ["--quantize-weights", "8", "--per-layer",
                                           "--activation-checkpointing"]),
    "torch adamw per layer": ("adamw", ["--quantize-weights", "8", "--per-layer"]),
}


@pytest.mark.parametrize("optimizer,flags", list(RESUMED.values()), ids=list(RESUMED))
def test_resume_equals_an_uninterrupted_run(micro, tmp_path, capsys, optimizer, flags):
    """Across a basis refresh (micro: every 10 steps); the codes, scales and rounding counts
    of the checkpoint, and the loss of every step, are those of a run never stopped."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    argv = dict(optimizer=optimizer, steps=12)
    assert run_main(train_argv(whole, *flags, **argv), capsys)[0] == 0
    assert run_main(train_argv(split, *flags, "--stop-after", "7", **argv), capsys)[0] == 0
    code, _, err = run_main(train_argv(split, *flags, "--resume", **argv), capsys)
    assert code == 0, err
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert b["step"] == 12
    assert any(k.endswith("._extra_state") for k in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]


REFUSED_RESUMES = {
    "without": ([], "with --quantize-weights 8, not without it"),
    "other bits": (["--quantize-weights", "16"], "with --quantize-weights 8, not 16"),
    "other rounding": (["--quantize-weights", "8", "--weight-rounding", "nearest"],
                       "with --weight-rounding stochastic, not nearest"),
}


@pytest.mark.parametrize("flags,said", list(REFUSED_RESUMES.values()), ids=list(REFUSED_RESUMES))
def test_resume_with_other_weights_is_refused(micro, tmp_path, capsys, flags, said):
    assert run_main(train_argv(tmp_path, "--quantize-weights", "8", "--stop-after", "2"),
                    capsys)[0] == 0
    checkpoint = (tmp_path / "checkpoint.pt").read_bytes()
    code, out, err = run_main(train_argv(tmp_path, *flags, "--resume"), capsys)
    assert_one_line_error(code, out, err, "train", "--resume", said)
    assert (tmp_path / "checkpoint.pt").read_bytes() == checkpoint


@pytest.mark.parametrize("recorded_before_the_flag", [False, True])
def test_resume_of_a_full_precision_run_with_quantized_weights_is_refused(
        micro, tmp_path, capsys, recorded_before_the_flag):
    """A full-precision checkpoint would load into quantized layers (they quantize a
    ``weight`` they are given), so the flag is compared even with folders written before
    it existed."""
    assert run_main(train_argv(tmp_path, "--stop-after", "2"), capsys)[0] == 0
    if recorded_before_the_flag:
        record = json.loads((tmp_path / "config.json").read_text())
        for key in ("quantize_weights", "weight_rounding"):
            del record["identity"][key]
        (tmp_path / "config.json").write_text(json.dumps(record))
    code, out, err = run_main(train_argv(tmp_path, "--quantize-weights", "8", "--resume"),
                              capsys)
    assert_one_line_error(code, out, err, "train", "--resume",
                          "without --quantize-weights, not with --quantize-weights 8")


# ------------------------------------------------------------------ refusals
REFUSED = {
    "rounding without weights": (["--weight-rounding", "nearest"], "adamw",
                                 "--weight-rounding", "--quantize-weights"),
    "torch adamw without --per-layer": (["--quantize-weights", "8"], "adamw",
                                        "--quantize-weights", "--per-layer"),
    "bitsandbytes without --per-layer": (["--quantize-weights", "16"], "adamw8bit",
                                         "--quantize-weights", "--per-layer"),
    "a peer": (["--quantize-weights", "8"], "peer-torch-muon", "--quantize-weights",
               "peer-torch-muon"),
    "a peer per layer": (["--quantize-weights", "8", "--per-layer"], "peer-torch-muon",
                         "--quantize-weights", "memopt optimizer"),
    "ddp": (["--quantize-weights", "8", "--ddp"], "dct", "--quantize-weights", "--ddp"),
    "fsdp": (["--quantize-weights", "8", "--fsdp"], "dct", "--quantize-weights", "--fsdp"),
}


@pytest.mark.parametrize("flags,optimizer,flag,part", list(REFUSED.values()), ids=list(REFUSED))
def test_train_refuses_what_cannot_update_quantized_weights(
        micro, tmp_path, capsys, monkeypatch, flags, optimizer, flag, part):
    monkeypatch.setenv("RANK", "0")               # as under torchrun, for --ddp / --fsdp
    out = tmp_path / "out"
    code, printed, err = run_main(train_argv(out, *flags, optimizer=optimizer), capsys)
    assert_one_line_error(code, printed, err, "train", flag, part)
    assert not out.exists()


def test_compare_refuses_quantized_weights_if_one_optimizer_cannot_update_them(
        micro, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, printed, err = run_main(["compare", "--optimizers", "galore,adamw", "--preset",
                                   "micro", "--steps", "2", "--device", "cpu", "--out",
                                   str(out), "--no-progress", "--quantize-weights", "8"], capsys)
    assert_one_line_error(code, printed, err, "compare", "--quantize-weights", "adamw")
    assert not out.exists()


def test_run_refuses_what_the_command_line_refuses(micro):
    with pytest.raises(ValueError, match="--weight-rounding"):
        Run(RunConfig(optimizer="dct", preset="micro", device="cpu", weight_rounding="nearest"))
    with pytest.raises(ValueError, match="--per-layer"):
        Run(RunConfig(optimizer="adamw", preset="micro", device="cpu", quantize_weights=8))
    with pytest.raises(ValueError, match="--quantize-weights"):
        Run(RunConfig(optimizer="dct", preset="micro", device="cpu", quantize_weights=4))


# ------------------------------------------------------------------ compare and sweep
def compare_argv(out, *flags):
    return ["compare", "--optimizers", "galore,adamw", "--preset", "micro", "--steps", "3",
            "--device", "cpu", "--no-progress", "--out", str(out), "--per-layer", *flags]


def test_compare_trains_every_optimizer_with_quantized_weights(micro, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, printed, err = run_main(compare_argv(out, "--quantize-weights", "8"), capsys)
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    assert "int8 weights, stochastic rounding" in result["setting"] in printed
    for run in result["runs"]:
        assert run["weights"] == "int8" and run["config"]["quantize_weights"] == 8
    # the per-layer copies of torch's AdamW hold its state: it is counted
    assert all(run["optimizer_state_mb"] > 0 for run in result["runs"])


def test_compare_resume_keeps_only_runs_with_the_same_weights(
        micro, tmp_path, capsys, monkeypatch):
    from memopt.recipes import compare as compare_module
    out = tmp_path / "cmp"
    assert run_main(compare_argv(out, "--quantize-weights", "8"), capsys)[0] == 0
    trained = []
    real_train = compare_module.train
    monkeypatch.setattr(compare_module, "train", lambda cfg, corpus, label=None: (
        trained.append((cfg.optimizer, cfg.quantize_weights)),
        real_train(cfg, corpus, label=label))[1])
    assert run_main(compare_argv(out, "--quantize-weights", "8", "--resume"), capsys)[0] == 0
    assert trained == []
    assert run_main(compare_argv(out, "--quantize-weights", "16", "--resume"), capsys)[0] == 0
    assert trained == [("galore", 16), ("adamw", 16)]


def test_a_sweep_passes_the_weights_to_every_run(micro, tmp_path):
    base = RunConfig(preset="micro", device="cpu", quantize_weights=16,
                     weight_rounding="nearest", per_layer=True)
    run = sweep.SweepRun("adamw", 1e-3, 0)
    cmd = sweep.train_command(base, run, tmp_path)
    assert cmd[cmd.index("--quantize-weights") + 1] == "16"
    assert cmd[cmd.index("--weight-rounding") + 1] == "nearest"
    plain = RunConfig(preset="micro", device="cpu", per_layer=True)
    assert "--quantize-weights" not in sweep.train_command(plain, run, tmp_path)
    assert sweep.run_arguments(base, run) != sweep.run_arguments(plain, run)   # not reused


def test_a_sweep_run_trains_with_the_weights_it_was_given(tmp_path, capsys):
    """One run in its own `memopt train` process (--lrs makes a sweep)."""
    out = tmp_path / "sweep"
    code, _, err = run_main(["compare", "--optimizers", "dct", "--preset", "quick", "--steps",
                             "2", "--device", "cpu", "--no-progress", "--out", str(out),
                             "--lrs", "x1", "--quantize-weights", "8", "--weight-rounding",
                             "nearest"], capsys)
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in result["runs"]] == ["ok"], result["runs"]
    assert result["runs"][0]["weights"] == "int8"
    assert result["runs"][0]["weight_rounding"] == "nearest"
