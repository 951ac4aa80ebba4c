"""`--warmup FRACTION`: the warm-up of `memopt train` / `compare` (the preset's 10% by
default), reaching the schedule, the run's identity (a resume under another warm-up is
refused) and each process of a sweep."""

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from test_cli import TRAIN, run_main                                     # noqa: E402

from memopt.recipes import cli, sweep                                    # noqa: E402
from memopt.recipes.arguments import run_config                          # noqa: E402
from memopt.recipes.train import Run, RunConfig, lr_factor, run_identity  # noqa: E402


def test_warmup_sets_the_schedule(micro):
    """micro: 20 steps; 0.25 warms up over 5 steps, the preset's 0.1 over 2; both then decay
    by the cosine to 10% of the rate at the last step."""
    for warmup, steps_up in ((0.25, 5), (None, 2)):
        run = Run(RunConfig(optimizer="galore", preset="micro", warmup=warmup, device="cpu",
                            progress=False))
        factor = run.scheduler.lr_lambdas[0]
        assert [factor(k) for k in range(steps_up)] == [(k + 1) / steps_up
                                                         for k in range(steps_up)]
        assert factor(steps_up) == 1.0 and factor(20) == pytest.approx(0.1)
        assert factor(12) == lr_factor(12, 20, steps_up)


def test_warmup_zero_starts_at_the_full_rate(micro):
    run = Run(RunConfig(optimizer="galore", preset="micro", warmup=0.0, device="cpu",
                        progress=False))
    assert run.scheduler.lr_lambdas[0](0) == 1.0


def test_flag_reaches_the_run_config_and_its_identity(micro):
    args = cli.build_parser().parse_args(TRAIN + ["--warmup", "0.05"])
    config = run_config(args, args.optimizer, None)
    assert config.warmup == 0.05
    assert run_identity(config)["warmup"] == 0.05
    assert run_identity(RunConfig(optimizer="galore", preset="micro"))["warmup"] == 0.1
    # the preset's fraction given explicitly is the same run as leaving it to the preset
    assert run_identity(RunConfig(optimizer="galore", preset="micro", warmup=0.1)) == \
        run_identity(RunConfig(optimizer="galore", preset="micro"))


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan", "ten"])
def test_bad_warmup_is_one_line_naming_the_flag(micro, capsys, value):
    code, _, err = run_main(TRAIN + ["--warmup", value], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "argument --warmup:" in lines[0], err


def test_resume_under_another_warmup_is_refused(micro, capsys, tmp_path):
    out = str(tmp_path / "run")
    code, _, err = run_main(TRAIN + ["--steps", "4", "--stop-after", "2", "--out", out,
                                     "--warmup", "0.05"], capsys)
    assert code == 0, err
    assert json.loads(Path(out, "config.json").read_text())["identity"]["warmup"] == 0.05
    code, _, err = run_main(TRAIN + ["--steps", "4", "--out", out, "--resume"], capsys)
    assert code == 2
    assert "with --warmup 0.05, not 0.1" in err, err
    code, _, err = run_main(TRAIN + ["--steps", "4", "--out", out, "--resume",
                                     "--warmup", "0.05"], capsys)
    assert code == 0, err


def test_sweep_passes_the_warmup_to_each_process(micro):
    base = RunConfig(optimizer="galore", preset="micro", warmup=0.05)
    cmd = sweep.train_command(base, sweep.SweepRun("galore", 0.01, 0), Path("x"))
    assert cmd[cmd.index("--warmup") + 1] == "0.05"
    plain = sweep.train_command(RunConfig(optimizer="galore", preset="micro"),
                                sweep.SweepRun("galore", 0.01, 0), Path("x"))
    assert "--warmup" not in plain
