"""`memopt compare` sweeps over learning rates and seeds: the --lrs grammar and its errors,
the commands of the runs, the table over seeds (means, spread, best rate), and real sweeps
of `memopt train` processes on the micro preset."""

import json
import random
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from test_cli import run_main                                         # noqa: E402

from memopt.recipes import cli, sweep                                 # noqa: E402
from memopt.recipes.arguments import option                           # noqa: E402
from memopt.recipes.compare import lr_rows, sweep_tables              # noqa: E402
from memopt.recipes.data import batch_at, load_corpus                 # noqa: E402
from memopt.recipes.train import RunConfig                            # noqa: E402


@pytest.fixture
def micro_runs(micro, monkeypatch):
    """The sweep's processes start through a launcher that knows the test-only micro preset
    (its definition taken from the fixture) and then runs the `memopt` command line."""
    launcher = ("import sys; from memopt.recipes.presets import PRESETS, Preset; "
                f"PRESETS['micro'] = {micro!r}; "
                "from memopt.recipes.cli import main; sys.exit(main(sys.argv[1:]))")
    monkeypatch.setattr(sweep, "TRAIN_COMMAND", [sys.executable, "-c", launcher, "train"])
    return micro


def compare_args(*argv):
    return cli.build_parser().parse_args(["compare", "--preset", "micro", *argv])


# ------------------------------------------------------------------ --lrs, --seeds, --jobs
def test_lrs_take_rates_factors_and_per_optimizer_overrides(micro):
    args = compare_args("--optimizers", "adamw,galore,polargrad", "--lrs", "x0.5,x2",
                        "--lrs", "galore=0.01,3e-4", "--lrs", "polargrad=x15,0.3,x1")
    rates = sweep.learning_rates(args.optimizers, args.lrs, micro)
    assert rates == {"adamw": [5e-4, 2e-3],              # factors of the preset's 1e-3
                     "galore": [0.01, 3e-4],             # its own list wins
                     "polargrad": [0.3, 0.02]}           # 15 x 0.02 is 0.3, listed once
    runs = sweep.plan_runs(rates, range(2, 4))
    assert len(runs) == 12 and [r.seed for r in runs[:6]] == [2] * 6
    assert runs[0] == sweep.SweepRun("adamw", 5e-4, 2)
    assert runs[0].folder == "runs/adamw/lr-0.0005/seed-2"
    # no --lrs: the preset's rate, or --lr
    plain = compare_args("--optimizers", "adamw,galore")
    assert sweep.learning_rates(plain.optimizers, [], micro) == {"adamw": [1e-3],
                                                                 "galore": [3e-2]}
    assert sweep.learning_rates(["adamw"], [], micro, lr=0.5) == {"adamw": [0.5]}


@pytest.mark.parametrize("argv,answer", [
    ([], False), (["--jobs", "1"], False), (["--seeds", "1"], False),
    (["--seeds", "2"], True), (["--lrs", "x1"], True), (["--jobs", "2"], True)])
def test_without_sweep_flags_compare_runs_in_process(micro, argv, answer):
    assert cli.is_sweep(compare_args(*argv)) is answer


BAD_SWEEPS = {
    "not a number": (["--lrs", "abc"], "--lrs"),
    "x alone": (["--lrs", "x"], "--lrs"),
    "x and text": (["--lrs", "xabc"], "--lrs"),
    "zero": (["--lrs", "0"], "--lrs"),
    "negative": (["--lrs", "0.01,-1"], "--lrs"),
    "negative factor": (["--lrs", "x-2"], "--lrs"),
    "nan": (["--lrs", "nan"], "--lrs"),
    "empty item": (["--lrs", "0.01,,0.02"], "--lrs"),
    "empty": (["--lrs", ""], "--lrs"),
    "no name": (["--lrs", "=0.1"], "--lrs"),
    "no rates": (["--lrs", "adamw="], "--lrs"),
    "unknown optimizer": (["--lrs", "sgd=0.1"], "--lrs"),
    "optimizer not compared": (["--lrs", "muon=0.1"], "--lrs"),
    "with --lr": (["--lr", "0.01", "--lrs", "x1,x2"], "--lrs"),
    "zero seeds": (["--seeds", "0"], "--seeds"),
    "zero jobs": (["--jobs", "0"], "--jobs"),
    "jobs not a number": (["--jobs", "many"], "--jobs"),
    "a sweep under torchrun": (["--seeds", "2", "--ddp"], "--ddp"),
}


@pytest.mark.parametrize("argv,flag", list(BAD_SWEEPS.values()), ids=list(BAD_SWEEPS))
def test_bad_sweep_flag_is_one_line_naming_it(micro, capsys, tmp_path, argv, flag):
    out = tmp_path / "cmp"
    code, printed, err = run_main(["compare", "--preset", "micro", "--optimizers", "adamw,galore",
                                   "--device", "cpu", "--out", str(out), *argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memopt compare: error: argument " + flag)
    assert "Traceback" not in err and printed == "" and not out.exists()


def test_the_seed_sets_initialisation_and_batch_order():
    data = load_corpus(None).train
    first = [batch_at(data, 0, 4, 32, seed)[0] for seed in (0, 1)]
    assert not (first[0] == first[1]).all()
    assert (batch_at(data, 0, 4, 32, 0)[0] == first[0]).all()


def test_run_command_carries_the_compare_options(micro):
    base = RunConfig(preset="micro", steps=6, rank=4, data="stdlib", device="cpu",
                     per_layer=True, optimizer_options={"update_proj_gap": 5,
                                                        "moments_on_refresh": "rotate"})
    run = sweep.SweepRun("galore", 0.1 * 3, 7)
    cmd = sweep.train_command(base, run, Path("out/x"))
    assert cmd[:len(sweep.TRAIN_COMMAND)] == sweep.TRAIN_COMMAND
    flags = dict(zip(cmd, cmd[1:]))
    assert float(flags["--lr"]) == run.lr and flags["--seed"] == "7"
    assert flags["--rank"] == "4" and flags["--steps"] == "6" and flags["--out"] == "out/x"
    assert "--per-layer" in cmd and "--no-progress" in cmd
    sets = [option(v) for k, v in zip(cmd, cmd[1:]) if k == "--set"]
    assert sets == [("update_proj_gap", 5), ("moments_on_refresh", "rotate")]
    adamw = sweep.train_command(base, sweep.SweepRun("adamw", 1e-3, 0), Path("y"))
    assert "--rank" not in adamw                          # train would refuse it for adamw


def test_outcome_of_a_run_that_failed_or_diverged(tmp_path):
    run = sweep.SweepRun("muon", 0.02, 1)
    (tmp_path / "stderr.txt").write_text("warning\nmemopt train: error: training diverged "
                                         "at step 3: the loss is nan; try a lower --lr\n")
    record, history = sweep.read_outcome(run, 1, tmp_path)
    assert record["status"] == "diverged" and record["steps"] == 3 and history == []
    assert "the loss is nan" in record["stderr_tail"]
    (tmp_path / "stderr.txt").write_text("".join(f"line {i}\n" for i in range(50)) + "boom\n")
    record, _ = sweep.read_outcome(run, -9, tmp_path)
    assert record["status"] == "failed" and record["returncode"] == -9
    assert record["stderr_tail"].splitlines() == [f"line {i}" for i in range(31, 50)] + ["boom"]
    assert (record["optimizer"], record["lr"], record["seed"]) == ("muon", 0.02, 1)
    assert sweep.outcome_line("x", record) == "x: failed (exit status -9): boom"


def test_time_left_counts_the_runs_going_and_waiting():
    # one at a time: the 3 waiting runs and the rest (60 s) of the one going
    assert sweep.time_left([100.0], 3, [40.0], jobs=1) == pytest.approx(360.0)
    # all at once, the others about to end: little is left (not 11 x 100 s)
    assert sweep.time_left([100.0], 0, [99.0] * 11, jobs=12) == pytest.approx(1.0)
    # 2 at a time: 4 waiting and 2 rests of 50 s make 500 s of work for 2 jobs
    assert sweep.time_left([80.0, 120.0], 4, [50.0, 50.0], jobs=2) == pytest.approx(250.0)
    assert sweep.time_left([100.0], 0, [], jobs=4) == 0.0


# ------------------------------------------------------------------ the table over seeds
def record(optimizer, lr, seed, val, ms=10.0, status="ok", gpu=None):
    if status != "ok":
        return {"optimizer": optimizer, "lr": lr, "seed": seed, "status": status}
    run = {"optimizer": optimizer, "lr": lr, "seed": seed, "status": status,
           "val_bits_per_byte": val, "train_bits_per_byte": val + 0.5, "ms_per_step": ms,
           "optimizer_state_mb": 2.0}
    return run if gpu is None else {**run, "peak_gpu_mb": gpu}


def shuffled(runs):
    runs = list(runs)
    random.Random(0).shuffle(runs)
    return runs


def test_rows_average_the_seeds_of_one_rate_only():
    runs = [record("adamw", 1e-3, 0, 1.0, ms=10.0), record("adamw", 1e-3, 1, 1.3, ms=12.0),
            record("adamw", 1e-3, 2, 1.1, ms=50.0),
            record("adamw", 3e-3, 0, 2.0), record("adamw", 3e-3, 1, 2.2),
            record("adamw", 3e-3, 2, 2.4)]
    rows = lr_rows(shuffled(runs))
    assert [(r["optimizer"], r["lr"]) for r in rows] == [("adamw", 1e-3), ("adamw", 3e-3)]
    low, high = rows
    assert low["seeds"] == [0, 1, 2] and low["by_seed"] == [1.0, 1.3, 1.1]
    assert low["val_mean"] == pytest.approx(3.4 / 3)
    assert low["val_half_range"] == pytest.approx(0.15)
    assert low["train_mean"] == pytest.approx(3.4 / 3 + 0.5)
    assert low["ms_per_step"] == 12.0                      # the median, not the mean (24)
    assert high["by_seed"] == [2.0, 2.2, 2.4] and high["val_mean"] == pytest.approx(2.2)
    table, best = sweep_tables(rows)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "| 1.133 ± 0.150 | 1.000 / 1.300 / 1.100 | 1.633 | 12.0 |" in lines[2]
    assert "peak GPU" not in lines[0]


def test_best_rate_is_the_lowest_mean_among_rates_without_failures():
    runs = [record("muon", 0.01, 0, 0.9), record("muon", 0.01, 1, 1.5),      # mean 1.2
            record("muon", 0.02, 0, 1.1), record("muon", 0.02, 1, 1.1),      # mean 1.1: best
            record("muon", 0.05, 0, 0.8), record("muon", 0.05, 1, 1.6),      # seed 0 lowest
            record("muon", 0.1, 0, 1.0), record("muon", 0.1, 1, 0, status="diverged"),
            record("galore", 0.03, 0, 0, status="failed"),
            record("galore", 0.03, 1, 0, status="diverged"),
            record("dct", 0.03, 0, 1.4, gpu=100.0), record("dct", 0.03, 1, 1.2, gpu=120.0)]
    rows = lr_rows(shuffled(runs))
    best = {(r["optimizer"], r["lr"]) for r in rows if r["best"]}
    assert best == {("muon", 0.02), ("dct", 0.03)}         # galore: no finished run
    assert [r["lr"] for r in rows if r["optimizer"] == "muon"] == [0.01, 0.02, 0.05, 0.1]
    table, best_table = sweep_tables(rows)
    assert sum("| best |" in line for line in table.splitlines()) == 2
    assert "| 1.000 | 1.000 / diverged |" in table          # the finished seed's mean
    assert "| failed / diverged | failed / diverged |" in table
    assert "peak GPU MB" in table.splitlines()[0] and "| 120 |" in table
    best_rows = [line.split("|")[1:3] for line in best_table.splitlines()[2:]]
    assert sorted((name.strip(), float(lr)) for name, lr in best_rows) == sorted(best)


def test_one_seed_shows_no_spread():
    table, _ = sweep_tables(lr_rows([record("adamw", 1e-3, 0, 1.25)]))
    header, _, row = table.splitlines()
    assert "| 1.250 |" in row and "±" not in row and "by seed" not in header


# ------------------------------------------------------------------ real sweeps
def test_sweep_end_to_end(micro_runs, capsys, tmp_path):
    out = tmp_path / "sweep"
    code, printed, err = run_main(["compare", "--preset", "micro", "--steps", "6",
                                   "--optimizers", "adamw,galore", "--lrs", "x0.5,x1",
                                   "--seeds", "2", "--jobs", "2", "--device", "cpu",
                                   "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    runs = result["runs"]
    assert len(runs) == 8 and result["complete"] is True
    assert all(r["status"] == "ok" and r["steps"] == 6 for r in runs)
    lrs = {"adamw": (5e-4, 1e-3), "galore": (0.015, 0.03)}
    planned = {(n, lr, s) for n in lrs for lr, s in product(lrs[n], (0, 1))}
    assert {(r["optimizer"], r["lr"], r["seed"]) for r in runs} == planned
    for run in runs:                                       # the child got the lr and seed
        assert run["config"]["seed"] == run["seed"] and run["config"]["lr"] == run["lr"]
        assert "history" not in run
    for name, lr in product(["adamw"], lrs["adamw"]):
        first = [json.loads((out / sweep.SweepRun(name, lr, s).folder / "summary.json")
                            .read_text())["history"][0]["loss"] for s in (0, 1)]
        assert first[0] != first[1]                        # another seed, another start
    table = result["table"].splitlines()
    assert len(table) == 2 + 4
    assert sum("| best |" in line for line in table) == 2
    assert len(result["best_table"].splitlines()) == 2 + 2
    assert set(result["best_lr"]) == {"adamw", "galore"}
    assert printed.count("runs left") + printed.count("run left") == 8
    assert "[8/8]" in printed and "0 runs left" in printed and "| best |" in printed
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_records_a_diverged_run_and_goes_on(micro_runs, capsys, tmp_path):
    out = tmp_path / "sweep"
    code, printed, _ = run_main(["compare", "--preset", "micro", "--steps", "4",
                                 "--optimizers", "adamw", "--lrs", "1e30,x1", "--jobs", "2",
                                 "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    status = {r["lr"]: r["status"] for r in result["runs"]}
    assert status == {1e30: "diverged", 1e-3: "ok"}
    diverged = next(r for r in result["runs"] if r["status"] == "diverged")
    assert "diverged at step" in diverged["stderr_tail"] and diverged["steps"] >= 1
    assert result["best_lr"] == {"adamw": 1e-3} and "diverged at step" in printed


def test_sweep_interrupted_stops_its_processes_and_keeps_what_finished(
        micro_runs, capsys, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    started = []

    class RecordedPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def report_then_interrupt(self, run, record):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep.subprocess, "Popen", RecordedPopen)
    monkeypatch.setattr(sweep.Sweep, "report", report_then_interrupt)
    code, _, err = run_main(["compare", "--preset", "micro", "--steps", "4", "--optimizers",
                             "adamw", "--seeds", "3", "--jobs", "2", "--device", "cpu",
                             "--out", str(out)], capsys)
    assert code == 130
    result = json.loads((out / "results.json").read_text())
    assert len(result["runs"]) == 1 and result["complete"] is False
    assert len(result["interrupted_during"]) == 1 and len(started) == 2
    assert all(proc.poll() is not None for proc in started)     # none left running
    assert "interrupted with 1 run going" in err and "Traceback" not in err


def test_resume_keeps_finished_runs_with_the_same_arguments(
        micro_runs, capsys, tmp_path, monkeypatch):
    """A second sweep with --resume trains only what the first did not finish: a new seed, or
    a run whose arguments changed (another --set); the table covers every run."""
    out = tmp_path / "sweep"
    common = ["compare", "--preset", "micro", "--steps", "3", "--optimizers", "adamw",
              "--jobs", "2", "--device", "cpu", "--out", str(out)]
    code, _, err = run_main([*common, "--seeds", "2"], capsys)
    assert code == 0, err
    first = json.loads((out / sweep.SweepRun("adamw", 1e-3, 0).folder / "summary.json")
                       .read_text())
    launched = []
    real_launch = sweep.Sweep.launch
    monkeypatch.setattr(sweep.Sweep, "launch",
                        lambda self, run: (launched.append(run), real_launch(self, run)))
    code, printed, err = run_main([*common, "--seeds", "3", "--resume"], capsys)
    assert code == 0, err
    assert launched == [sweep.SweepRun("adamw", 1e-3, 2)]
    assert "2 finished runs kept, 1 run to train" in printed
    result = json.loads((out / "results.json").read_text())
    assert sorted(r["seed"] for r in result["runs"]) == [0, 1, 2]
    assert sum(bool(r.get("reused")) for r in result["runs"]) == 2
    kept = next(r for r in result["runs"] if r["seed"] == 0)
    assert kept["val_loss"] == first["val_loss"]
    assert "0.001 | best | " in result["table"] and " / " in result["table"]
    launched.clear()                                 # other arguments: trained again
    code, printed, err = run_main([*common, "--seeds", "1", "--resume", "--set",
                                   "weight_decay=0.1"], capsys)
    assert code == 0, err
    assert launched == [sweep.SweepRun("adamw", 1e-3, 0)]
    assert "0 finished runs kept" in printed


def test_resume_without_an_earlier_comparison_trains_every_run(micro, capsys, tmp_path):
    code, printed, err = run_main(["compare", "--preset", "micro", "--steps", "2",
                                   "--optimizers", "adamw", "--device", "cpu", "--no-progress",
                                   "--resume", "--out", str(tmp_path / "x")], capsys)
    assert code == 0, err
    assert "0 finished runs kept, 1 run to train" in printed


def test_sweep_respects_the_users_omp_num_threads(micro, monkeypatch, tmp_path):
    """OMP_NUM_THREADS set by the user reaches every run and is what the result reports."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert sweep.threads_per_run("cpu", 2) == 3
    runs = [sweep.SweepRun("adamw", 1e-3, 0)]
    base = RunConfig(preset="micro", device="cpu")
    result = {"sweep": {"threads_per_run": sweep.threads_per_run("cpu", 2)}}
    assert sweep.Sweep(runs, base, tmp_path, 2, result).env["OMP_NUM_THREADS"] == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert sweep.threads_per_run("cpu", 2) == max(1, sweep.available_cores() // 2)
