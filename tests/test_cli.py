"""The `memopt` command line: one-line errors naming the flag, compare's progress, files
written after each run, interruption, the plot and the table."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from memopt.recipes import cli, compare as compare_module                # noqa: E402
from memopt.recipes import presets                                       # noqa: E402
from memopt.recipes.compare import smoothed                              # noqa: E402
from memopt.recipes.machine import available_cores, describe_environment, environment  # noqa: E402


def run_main(argv, capsys):
    """``cli.main(argv)`` -> (exit status, stdout, stderr), whether it returns or exits."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TRAIN = ["train", "--optimizer", "galore", "--preset", "micro", "--device", "cpu",
         "--no-progress"]

BAD_ARGUMENTS = {
    "rank 0": (TRAIN + ["--rank", "0"], "--rank"),
    "negative steps": (TRAIN + ["--steps", "-5"], "--steps"),
    "zero steps": (TRAIN + ["--steps", "0"], "--steps"),
    "negative lr": (TRAIN + ["--lr", "-1"], "--lr"),
    "nan lr": (TRAIN + ["--lr", "nan"], "--lr"),
    "unknown option": (TRAIN + ["--set", "bogus=1"], "--set bogus"),
    "option the optimizer refuses": (TRAIN + ["--set", "rank=0"], "--set rank"),
    "missing data": (TRAIN + ["--data", "/nonexistent"], "--data"),
    "unknown optimizer": (["train", "--optimizer", "sgd"], "--optimizer"),
    "unknown optimizer in a list": (["compare", "--optimizers", "adamw,sgd"], "--optimizers"),
    "rank for an optimizer without one": (
        ["train", "--optimizer", "adamw", "--preset", "micro", "--rank", "8"], "--rank"),
    "option one optimizer of a comparison refuses": (
        ["compare", "--optimizers", "galore,muon", "--preset", "micro", "--set",
         "update_proj_gap=5", "--device", "cpu"], "--set update_proj_gap"),
    "resume without a checkpoint": (TRAIN + ["--resume"], "--resume"),
    "negative checkpoint interval": (TRAIN + ["--checkpoint-every", "-1"], "--checkpoint-every"),
    "unknown preset": (["train", "--optimizer", "galore", "--preset", "huge"], "--preset"),
    "estimate of an unknown model": (["estimate", "--model", "nonexistent"], "--model"),
    "estimate with a rank but no low-rank optimizer": (
        ["estimate", "--model", "tiny", "--optimizers", "adamw", "--rank", "4"], "--rank"),
}


@pytest.mark.parametrize("argv,flag", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_argument_is_one_line_naming_the_flag(micro, capsys, tmp_path, argv, flag):
    argv = [a if a != "/nonexistent" else str(tmp_path / "nonexistent") for a in argv]
    code, out, err = run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memopt") and "error:" in lines[0]
    assert flag in lines[0]
    assert "Traceback" not in err and out == ""


def test_unknown_option_error_names_the_key(micro, capsys):
    code, _, err = run_main(TRAIN + ["--set", "bogus=1"], capsys)
    assert code == 2 and "'bogus'" in err and "galore" in err


@pytest.mark.parametrize("argv,flag", [(["--steps", "-5"], "--steps"),
                                       (["--set", "rank=0"], "--set rank")])
def test_errors_end_the_process_without_a_traceback(tmp_path, argv, flag):
    cmd = [sys.executable, "-m", "memopt.recipes", "train", "--optimizer", "galore",
           "--device", "cpu", "--out", str(tmp_path / "run")] + argv
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert flag in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()               # refused before anything ran


def test_compare_writes_each_run_and_keeps_them_on_interrupt(micro, capsys, tmp_path,
                                                              monkeypatch):
    """Ctrl-C during the second run: the first run is in results.json and the plot, the
    message says where, and the exit status is 130."""
    out = tmp_path / "cmp"
    real_train = compare_module.train
    seen = []

    def train_then_interrupt(cfg, corpus, label=None):
        if seen:                                          # the second run
            on_disk = json.loads((out / "results.json").read_text())
            assert [r["optimizer"] for r in on_disk["runs"]] == ["adamw"]
            raise KeyboardInterrupt
        seen.append(cfg.optimizer)
        return real_train(cfg, corpus, label=label)

    monkeypatch.setattr(compare_module, "train", train_then_interrupt)
    code, _, err = run_main(["compare", "--preset", "micro", "--steps", "6", "--optimizers",
                             "adamw,galore,muon", "--device", "cpu", "--no-progress",
                             "--out", str(out)], capsys)
    assert code == 130
    result = json.loads((out / "results.json").read_text())
    assert [r["optimizer"] for r in result["runs"]] == ["adamw"]
    assert result["complete"] is False and result["interrupted_during"] == "galore"
    assert result["runs"][0]["steps"] == 6 and "| adamw |" in result["table"]
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "interrupted during galore" in err and str(out / "results.json") in err
    assert "Traceback" not in err


def test_compare_prints_progress_table_environment_and_wall_time(micro, capsys, tmp_path):
    out = tmp_path / "cmp"
    code, printed, err = run_main(["compare", "--preset", "micro", "--optimizers",
                                   "adamw,galore,fira", "--device", "cpu", "--out", str(out)],
                                  capsys)
    assert code == 0
    # a progress bar per run, numbered, with its step count
    for i, name in enumerate(["adamw", "galore", "fira"], 1):
        assert f"[{i}/3] {name}" in err and "20/20" in err
    # after each run: elapsed time, and an estimate of what is left while runs remain
    assert printed.count("elapsed") == 3 and printed.count("left]") == 2
    table = printed[printed.index("| optimizer"):]
    header = table.splitlines()[0]
    assert "val bits/byte" in header and "train bits/byte" in header
    assert "peak GPU" not in header                         # a CPU run measures no GPU memory
    assert "{" not in printed                               # no Python dict for the environment
    assert "torch " in printed and "threads" in printed and "date: " in printed
    assert "total wall time" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["complete"] is True and result["wall_s"] > 0
    row = table.splitlines()[2].split("|")
    bits = float(row[4])
    assert bits == pytest.approx(result["runs"][0]["val_bits_per_byte"], abs=6e-4)


def test_short_runs_validate_often_enough_to_draw_a_curve(micro):
    """eval_every=50 but a 20-step run: at least 10 validation points on whole steps."""
    assert micro.eval_interval() == 2
    assert presets.get_preset("quick").eval_interval() <= presets.get_preset("quick").steps // 10
    assert presets.get_preset("1b").eval_interval() == 5000


def test_diverged_training_is_one_line(micro, capsys):
    code, _, err = run_main(TRAIN + ["--lr", "1e30"], capsys)
    assert code == 1
    assert err.strip().count("\n") == 0 and "diverged at step" in err and "--lr" in err


def test_smoothed_curve_is_smooth_from_the_first_step():
    assert smoothed([2.0, 2.0, 2.0], span=5) == pytest.approx([2.0, 2.0, 2.0])
    noisy = [3.0 + (0.5 if i % 2 else -0.5) - 0.01 * i for i in range(40)]
    smooth = smoothed(noisy, span=5)
    jumps = lambda xs: sum(abs(a - b) for a, b in zip(xs, xs[1:]))
    assert jumps(smooth) < jumps(noisy) / 4
    assert smooth[0] == noisy[0]                           # bias-corrected: no pull to zero


def test_environment_is_readable_lines():
    import torch
    text = describe_environment(environment(torch.device("cpu")))
    lines = text.splitlines()
    assert lines[0].startswith(f"torch {torch.__version__}")
    assert f"{torch.get_num_threads()} threads" in lines[1] and lines[2].startswith("date: ")
    assert "{" not in text
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
    from memopt.recipes.machine import busy_cores
    assert 0 <= busy_cores(0.05) <= (os.cpu_count() or 1)


@pytest.mark.parametrize("quota,cores", [("max 100000", 4), ("150000 100000", 2),
                                          ("50000 100000", 1), ("800000 100000", 4)])
def test_available_cores_is_the_affinity_mask_cut_by_a_cgroup_quota(monkeypatch, quota, cores):
    from pathlib import Path

    from memopt.recipes import machine
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    real = Path.read_text

    def read_text(path, *args, **kwargs):
        if str(path) == "/sys/fs/cgroup/cpu.max":
            return quota + "\n"
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert machine.available_cores() == cores


def test_bench_projectors_prints_each_row_as_it_is_measured(capsys):
    from memopt.recipes.bench import projectors
    assert projectors.main(["--device", "cpu", "--sizes", "48x32", "--rank", "8",
                            "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| size"))
    rows = [line for line in lines[header + 2:] if line.startswith("| 48x32")]
    assert len(rows) == len(projectors.projector_cases(8)) + 3
    assert all(math.isfinite(float(r.split("|")[3])) for r in rows)


def test_threads_leave_busy_cores_alone(monkeypatch):
    import torch

    from memopt.recipes import machine
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(machine, "available_cores", lambda: 4)
    try:
        for busy, threads in ((0.2, 4), (1.1, 3), (3.9, 1), (9.0, 1)):
            monkeypatch.setattr(machine, "busy_cores", lambda busy=busy: busy)
            assert machine.use_available_cores() == threads
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert machine.use_available_cores() == 2            # the user's choice stands
    finally:
        torch.set_num_threads(before)
