"""The command line and recipes: compare end to end, exact resume, data, distributed train."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from memopt.recipes import cli                                    # noqa: E402
from memopt.recipes.data import batch_at, load_corpus             # noqa: E402
from memopt.recipes.train import Run, RunConfig                   # noqa: E402


def test_compare_end_to_end(tmp_path, capsys, micro):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--preset", "micro", "--steps", "20", "--out", str(out),
                     "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    names = [r["optimizer"] for r in result["runs"]]
    assert names == ["adamw", "galore", "dct", "fira", "muon", "polargrad"]
    for run in result["runs"]:
        assert run["steps"] == 20 and len(run["history"]) == 20
        first = run["history"][0]["loss"]
        assert 5.0 < first < 6.0                      # about ln(256) at the start
        assert run["train_loss"] < first - 0.5        # every optimizer learns something
        assert run["optimizer_state_mb"] > 0
        assert run["val_bits_per_byte"] == pytest.approx(run["val_loss"] / 0.6931471805599453)
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in names:
        assert name in printed
    # the low-rank optimizers keep less state than AdamW
    state = {r["optimizer"]: r["optimizer_state_mb"] for r in result["runs"]}
    assert state["galore"] < state["adamw"] and state["dct"] < state["galore"]


@pytest.mark.parametrize("optimizer", ["galore", "dct8bit", "muon", "peer-torch-muon"])
def test_resume_equals_an_uninterrupted_run(tmp_path, optimizer, micro):
    common = dict(optimizer=optimizer, preset="micro", steps=12, device="cpu", progress=False)
    whole = Run(RunConfig(**common, out=str(tmp_path / "whole")))
    whole.train()
    Run(RunConfig(**common, out=str(tmp_path / "split"))).train(stop_after=7)
    # the resumed part crosses a basis refresh (micro: every 10 steps)
    resumed = Run(RunConfig(**common, out=str(tmp_path / "split"), resume=True))
    assert resumed.step == 7
    resumed.train()
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    losses = [h["loss"] for h in whole.history]
    assert [h["loss"] for h in resumed.history] == losses
    saved = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 12


def test_train_command_writes_log_summary_and_checkpoint(tmp_path, capsys, micro):
    out = tmp_path / "run"
    assert cli.main(["train", "--optimizer", "galore8bit", "--preset", "micro", "--steps", "6",
                     "--out", str(out), "--no-progress", "--per-layer",
                     "--activation-checkpointing"]) == 0
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["step"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["config"]["per_layer"] is True
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6
    assert '"optimizer": "galore8bit"' in capsys.readouterr().out


def test_unknown_optimizer_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--optimizer", "sgd"])
    assert "unknown optimizer 'sgd'" in capsys.readouterr().err


def test_default_corpus_is_deterministic_and_split():
    a, b = load_corpus(None), load_corpus("stdlib")
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.numel() > 1_000_000 and a.val.numel() > 50_000
    x1, y1 = batch_at(a.train, 5, 4, 32, seed=0)
    x2, y2 = batch_at(a.train, 5, 4, 32, seed=0)
    assert torch.equal(x1, x2) and x1.shape == (4, 32)
    assert torch.equal(x1[:, 1:], y1[:, :-1])          # targets are the next bytes
    assert not torch.equal(batch_at(a.train, 6, 4, 32, seed=0)[0], x1)


def test_text_file_and_folder_data(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    corpus = load_corpus(str(text))
    assert corpus.train.numel() + corpus.val.numel() == len(text.read_bytes()) + 2
    (tmp_path / "more.md").write_text("# notes\n" * 100)
    assert load_corpus(str(tmp_path)).train.numel() > 0
    with pytest.raises(ValueError, match="--data"):
        load_corpus(str(tmp_path / "missing"))


@pytest.mark.parametrize("mode", ["--ddp", "--fsdp"])
def test_train_runs_under_torchrun(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "memopt.recipes", "train",
           "--optimizer", "dct", "--steps", "4", mode, "--device", "cpu", "--no-progress",
           "--out", str(tmp_path / "dist")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "dist" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_loss"] < 6.0


def test_bench_step_rows_and_product_floor(tmp_path):
    """bench.step on a small model: every selected row has a step time, the low-rank rows
    keep less state than AdamW, and the products-only row times the same products."""
    from memopt.recipes.bench import step
    out = tmp_path / "bench.json"
    assert step.main(["--device", "cpu", "--blocks", "1", "--hidden", "256",
                      "--intermediate", "341", "--rank", "32", "--steps", "2",
                      "--only", "memopt DCTAdamW", "--products", "--out", str(out)]) == 0
    rows = {r["optimizer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch AdamW (fused)", "memopt DCTAdamW",
                         "memopt DCTAdamW (check_finite=False)", "memopt DCTAdamW8bit",
                         "memopt DCTAdamW (projection_precision=medium)",
                         "products only (1 stream)"}
    assert all(r["step_ms"] > 0 and "error" not in r for r in rows.values())
    assert rows["memopt DCTAdamW"]["state_bytes_per_param"] < 8 / 2
    assert rows["products only (1 stream)"]["tflops"] > 0
