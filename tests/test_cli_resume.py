"""Continuing runs from the command line: `train --resume` refuses, in one line naming what
differs, a folder trained under other arguments; `compare --resume` keeps the finished runs
whose arguments match and trains the rest."""

import json

import pytest

pytest.importorskip("transformers")

from test_cli import run_main                                         # noqa: E402

from memopt.recipes import compare as compare_module                  # noqa: E402

FIRST = {"--optimizer": "dct", "--preset": "micro", "--steps": "4", "--seed": "0"}


def train_argv(out, **changed):
    flags = {**FIRST, **{f"--{k.replace('_', '-')}": v for k, v in changed.items()}}
    return ["train", *[x for item in flags.items() for x in item], "--device", "cpu",
            "--no-progress", "--out", str(out)]


@pytest.fixture
def stopped_run(micro, tmp_path, capsys):
    """A dct run of the micro preset stopped (checkpointed) after 2 of its 4 steps."""
    out = tmp_path / "run"
    code, _, err = run_main(train_argv(out) + ["--stop-after", "2"], capsys)
    assert code == 0, err
    return out


def assert_refused(code, out, err, *parts):
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("memopt train: error: argument --resume: ")
    for part in parts:
        assert part in lines[0], lines[0]


DIFFERENT = {
    "optimizer": ({"optimizer": "galore"}, "--optimizer dct, not galore"),
    "preset": ({"preset": "tiny"}, "--preset micro, not tiny"),
    "rank": ({"rank": "4"}, "--rank 8, not 4"),
    "steps": ({"steps": "6"}, "--steps 4, not 6"),
    "seed": ({"seed": "1"}, "--seed 0, not 1"),
    "lr": ({"lr": "0.01"}, "--lr 0.03, not 0.01"),
    "set": ({"set": "moments_on_refresh=reset"}, "--set none, not moments_on_refresh='reset'"),
}


@pytest.mark.parametrize("changed,said", list(DIFFERENT.values()), ids=list(DIFFERENT))
def test_resume_under_other_arguments_is_one_line_naming_what_differs(
        stopped_run, capsys, changed, said):
    checkpoint = (stopped_run / "checkpoint.pt").read_bytes()
    summary = (stopped_run / "summary.json").read_text()
    code, out, err = run_main(train_argv(stopped_run, **changed) + ["--resume"], capsys)
    assert_refused(code, out, err, str(stopped_run), said)
    assert (stopped_run / "checkpoint.pt").read_bytes() == checkpoint
    assert (stopped_run / "summary.json").read_text() == summary


def test_resume_with_the_same_arguments_continues(stopped_run, capsys):
    """Where the run is shown or computed (progress bar, device) may change."""
    argv = [a if a != "cpu" else "auto" for a in train_argv(stopped_run)]
    code, _, err = run_main(argv + ["--resume"], capsys)
    assert code == 0, err
    summary = json.loads((stopped_run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["optimizer"] == "dct"


def test_resume_of_a_run_without_config_reads_its_summary(stopped_run, capsys):
    """Folders written before config.json existed: summary.json's config is compared."""
    (stopped_run / "config.json").unlink(missing_ok=True)
    code, out, err = run_main(train_argv(stopped_run, optimizer="galore") + ["--resume"], capsys)
    assert_refused(code, out, err, "--optimizer dct, not galore")


def test_resume_of_a_checkpoint_that_does_not_fit_is_one_line(stopped_run, capsys):
    """Nothing recorded beside the checkpoint: loading it into another model is refused in
    one line, not a traceback."""
    for name in ("config.json", "summary.json"):
        (stopped_run / name).unlink(missing_ok=True)
    code, out, err = run_main(train_argv(stopped_run, preset="tiny") + ["--resume"], capsys)
    assert_refused(code, out, err, "checkpoint.pt", "does not fit")


# ------------------------------------------------------------------ compare --resume
def compare_argv(out, optimizers, *extra):
    return ["compare", "--preset", "micro", "--steps", "3", "--optimizers", optimizers,
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def test_compare_resume_keeps_finished_runs_with_the_same_arguments(
        micro, capsys, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    code, _, err = run_main(compare_argv(out, "adamw,galore"), capsys)
    assert code == 0, err
    first = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    trained = []
    real_train = compare_module.train
    monkeypatch.setattr(compare_module, "train", lambda cfg, corpus, label=None: (
        trained.append(cfg.optimizer), real_train(cfg, corpus, label=label))[1])
    code, printed, err = run_main(compare_argv(out, "adamw,galore,dct", "--resume"), capsys)
    assert code == 0, err
    assert trained == ["dct"]
    assert "2 finished runs kept, 1 run to train" in printed
    result = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in result["runs"]] == ["adamw", "galore", "dct"]
    assert result["complete"] is True
    kept = {r["optimizer"]: r for r in result["runs"] if r.get("reused")}
    assert set(kept) == {"adamw", "galore"}
    assert kept["galore"]["val_loss"] == first["galore"]["val_loss"]
    assert "| dct |" in result["table"] and "| adamw |" in result["table"]
    trained.clear()                                  # galore's arguments changed: trained again
    code, printed, err = run_main(compare_argv(out, "adamw,galore,dct", "--resume", "--set",
                                               "galore.update_proj_gap=5"), capsys)
    assert code == 0, err
    assert trained == ["galore"] and "2 finished runs kept, 1 run to train" in printed
