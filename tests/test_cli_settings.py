"""`--set`: a key given twice or also through its own flag is refused; NAME.KEY=VALUE sets
one optimizer of a comparison, and an unqualified setting one of them does not take is
refused naming it, in one line."""

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from test_cli import run_main                                         # noqa: E402

from memopt.recipes import sweep, train as train_module               # noqa: E402
from memopt.recipes.arguments import option                           # noqa: E402
from memopt.recipes.train import RunConfig                            # noqa: E402

TRAIN = ["train", "--optimizer", "galore", "--preset", "micro", "--steps", "2", "--device",
         "cpu", "--no-progress"]
COMPARE = ["compare", "--optimizers", "adamw,dct", "--preset", "micro", "--steps", "2",
           "--device", "cpu", "--no-progress"]

REFUSED = {
    "rank twice": (TRAIN + ["--set", "rank=8", "--rank", "16"], "--set rank", "--rank 16"),
    "lr twice": (TRAIN + ["--set", "lr=0.1", "--lr", "0.01"], "--set lr", "--lr 0.01"),
    "one optimizer's rank twice": (COMPARE + ["--set", "dct.rank=4", "--rank", "8"],
                                   "--set dct.rank", "--rank 8"),
    "a key given twice": (TRAIN + ["--set", "update_proj_gap=5", "--set", "update_proj_gap=6"],
                          "--set update_proj_gap", "twice"),
    "another optimizer's setting": (TRAIN + ["--set", "dct.moments_on_refresh=reset"],
                                    "--set dct.moments_on_refresh", "--optimizer galore"),
    "an optimizer not compared": (COMPARE + ["--set", "galore.update_proj_gap=5"],
                                  "--set galore.update_proj_gap", "--optimizers adamw,dct"),
    "an unknown optimizer": (TRAIN + ["--set", "sgd.momentum=0.9"], "--set", "'sgd'"),
    "a setting one optimizer does not take": (
        COMPARE + ["--set", "moments_on_refresh=reset"], "--set moments_on_refresh",
        "adamw has no argument", "--set dct.moments_on_refresh=reset"),
    "a sweep's rate in --set": (COMPARE + ["--seeds", "2", "--set", "dct.lr=0.01"],
                                "--set dct.lr", "--lrs"),
}


@pytest.mark.parametrize("argv,parts", [(v[0], v[1:]) for v in REFUSED.values()],
                         ids=list(REFUSED))
def test_conflicting_or_misdirected_setting_is_one_line(micro, capsys, tmp_path, argv, parts):
    out = tmp_path / "out"
    code, printed, err = run_main(argv + ["--out", str(out)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"memopt {argv[0]}: error: argument ")
    for part in parts:
        assert part in lines[0], lines[0]
    assert "Traceback" not in err and not out.exists()


def test_qualified_setting_reaches_its_optimizer_only(micro, capsys, tmp_path, monkeypatch):
    built = {}
    real_build = train_module.build_optimizer

    def record(name, model, **kwargs):
        built[name] = kwargs
        return real_build(name, model, **kwargs)

    monkeypatch.setattr(train_module, "build_optimizer", record)
    code, _, err = run_main(COMPARE + ["--set", "dct.moments_on_refresh=reset", "--set",
                                       "weight_decay=0.05", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert built["dct"]["moments_on_refresh"] == "reset"
    assert "moments_on_refresh" not in built["adamw"]
    assert built["dct"]["weight_decay"] == built["adamw"]["weight_decay"] == 0.05


def test_the_summary_gives_the_rate_set_through_set(micro, capsys, tmp_path):
    code, _, err = run_main(TRAIN + ["--set", "lr=0.005", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["lr"] == 0.005


def test_sweep_run_gets_its_own_settings_unqualified(micro):
    base = RunConfig(preset="micro", device="cpu",
                     optimizer_options={"update_proj_gap": 5, "dct.update_proj_gap": 7,
                                        "dct.moments_on_refresh": "reset"})

    def sets(name):
        cmd = sweep.train_command(base, sweep.SweepRun(name, 0.01, 0), Path("x"))
        return [option(v) for k, v in zip(cmd, cmd[1:]) if k == "--set"]
    assert sets("galore") == [("update_proj_gap", 5)]
    assert sorted(sets("dct")) == [("moments_on_refresh", "reset"), ("update_proj_gap", 7)]


def test_estimate_refuses_rank_twice(capsys):
    code, printed, err = run_main(["estimate", "--model", "tiny", "--optimizers", "galore",
                                   "--rank", "8", "--set", "rank=4"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--set rank" in lines[0] and "--rank 8" in lines[0]


def test_estimate_takes_a_setting_for_one_optimizer(capsys):
    code, printed, err = run_main(["estimate", "--model", "tiny", "--optimizers",
                                   "adamw,galore", "--set", "galore.rank=4"], capsys)
    assert code == 0, err
    rows = [line.split("|") for line in printed.splitlines() if line.startswith("| galore")]
    assert rows and rows[0][2].strip() == "4"
