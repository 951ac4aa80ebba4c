"""bench.train_step on a tiny LLaMA on the CPU: a row per optimizer with positive times, state
bytes as ``state_bytes`` counts them, and the low-rank row's bases rebuilt at the refresh step.

One run of the recipe (two rows, one repeat, each row in its own process) serves every test.
"""

import contextlib
import io
import json

import pytest
import torch

pytest.importorskip("transformers")

from memopt.optim import state_bytes                              # noqa: E402
from memopt.recipes.bench import train_step as bench              # noqa: E402

TINY = ["--device", "cpu", "--hidden", "64", "--layers", "2", "--intermediate", "128",
        "--vocab", "256", "--heads", "4", "--batch", "2", "--seq", "32", "--warmup", "2",
        "--steps", "2", "--repeats", "1", "--rank", "8"]
ROWS = ["adamw", "galore"]
MATRICES = 2 * 7                     # q, k, v, o, gate, up, down in each of the 2 layers


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_step") / "result.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.main(TINY + ["--only", ",".join(ROWS), "--out", str(out)]) == 0
    return json.loads(out.read_text()), printed.getvalue()


def test_a_row_per_optimizer_with_positive_times(run):
    result, _ = run
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    for row in rows.values():
        assert row["repeats_ok"] == 1 and row["errors"] is None
        assert row["ms_per_step_min"] <= row["ms_per_step_median"] <= row["ms_per_step_max"]
        assert row["ms_per_step_median"] > 0 and row["tokens_per_s"] > 0
    assert rows["adamw"]["vs_fused_adamw"] == 1.0
    runs = [r for r in result["runs"] if "error" not in r]
    assert len(runs) == len(ROWS)
    for r in runs:                                   # every timed step was measured
        assert len(r["step_ms"]) == 2 and all(t > 0 for t in r["step_ms"])
        assert r["loss_last"] == pytest.approx(5.55, abs=0.3)     # about ln(256): no divergence


@pytest.mark.parametrize("key", ROWS)
def test_state_bytes_are_what_state_bytes_counts(run, key):
    from transformers import LlamaForCausalLM
    result, _ = run
    reported = next(r for r in result["rows"] if r["key"] == key)
    args = bench.parser().parse_args(TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(bench.llama_config(args))
    row = next(r for r in bench.ROWS if r.key == key)
    (opt,) = row.build(model, {"rank": args.rank, "gap": args.warmup + args.steps})
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()                                       # every state tensor exists after a step
    n_params = sum(p.numel() for p in model.parameters())
    assert reported["state_bytes"] == state_bytes(opt)
    assert reported["state_bytes_per_param"] == pytest.approx(state_bytes(opt) / n_params)


def test_low_rank_state_is_smaller_than_adamw(run):
    rows = {r["key"]: r for r in run[0]["rows"]}
    assert rows["adamw"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert rows["galore"]["state_bytes_per_param"] < rows["adamw"]["state_bytes_per_param"]


def test_the_refresh_step_rebuilds_every_basis_and_is_measured_apart(run):
    result, _ = run
    rows = {r["key"]: r for r in result["rows"]}
    galore = next(r for r in result["runs"] if r["key"] == "galore")
    assert galore["refresh_step"] == result["settings"]["refresh_step"] == 4   # warmup + steps
    assert galore["update_proj_gap"] == 4
    assert galore["projected_matrices"] == MATRICES and galore["bases_rebuilt"] == MATRICES
    assert rows["galore"]["refresh_step_ms"] > 0
    assert rows["adamw"]["refresh_step_ms"] is None and rows["adamw"]["bases_rebuilt"] is None


def test_cpu_table_and_json_record_what_was_run(run):
    result, printed = run
    assert "| torch AdamW (fused) |" in printed and "| memopt GaLoreAdamW |" in printed
    assert "n/a" in printed                         # no peak memory on the CPU
    assert result["command"].startswith("python -m memopt.recipes.bench.train_step ")
    assert "--only adamw,galore" in result["command"]
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"]
    assert all(r["steady_peak_gb"] is None for r in result["rows"])


def test_a_missing_peer_is_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "galore_torch" else real(name, *a))
    out = tmp_path / "skipped.json"
    assert bench.main(TINY + ["--only", "galore-torch", "--out", str(out)]) == 0
    assert "skipping galore-torch GaLoreAdamW" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["rows"] == [] and result["skipped"][0]["key"] == "galore-torch"


def test_unknown_rows_are_refused():
    with pytest.raises(SystemExit, match="unknown sgd"):
        bench.main(TINY + ["--only", "adamw,sgd"])
