"""bench.memory without a GPU: its rows (issue 29's INT8 7B rows beside the earlier ones),
its flags, the estimate's optional arguments, and one measurement of a tiny LLaMA on the
CPU, in this process and in a fresh one, where a failing row is a row with its error."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from memopt.recipes.bench import memory as bench                  # noqa: E402
from memopt.recipes.bench.memory import Row                       # noqa: E402

#: hidden, intermediate, heads, layers of a LLaMA small enough for the CPU
TINY = {"device": "cpu", "shape": (64, 128, 4, 2), "vocab": 256}
LOW_RANK_8BIT = ["galore8bit", "dct8bit", "fira8bit", "trion8bit", "galoremuon8bit"]


# ------------------------------------------------------------------ rows
def test_the_earlier_7b_rows_are_kept():
    bf16 = [r for r in bench.ROWS["7b"] if r.weights == "bf16"]
    assert bf16 == [Row("7b", "adamw", False), Row("7b", "adamw8bit", False),
                    Row("7b", "adamw8bit", True), Row("7b", "galore8bit", True, {"rank": 1024}),
                    Row("7b", "dct8bit", True, {"rank": 1024})]


def test_int8_rows_cover_every_8bit_low_rank_optimizer_at_both_ranks():
    int8 = [r for r in bench.ROWS["7b"] if r.weights == "int8"]
    assert all(r.per_layer for r in int8)
    for rank in (1024, 512):
        at_rank = [r for r in int8 if r.kwargs["rank"] == rank]
        plain = [r.optimizer for r in at_rank if set(r.kwargs) == {"rank"}]
        assert plain == LOW_RANK_8BIT
        four_bit = [r for r in at_rank if "projector_options" in r.kwargs]
        assert [(r.optimizer, r.kwargs["projector_options"]) for r in four_bit] == \
            [("galore8bit", {"bits": 4})]
    assert len(int8) == 2 * (len(LOW_RANK_8BIT) + 1)


def test_the_four_bit_basis_row_builds():
    """The row's option exists: galore8bit takes a 4-bit SVD basis."""
    from memopt.optim import create_optimizer
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    create_optimizer("galore8bit", model, lr=1e-3, rank=8, **bench.FOUR_BIT_BASIS)


def test_rows_are_selected_by_model_optimizer_and_weights():
    rows = bench.select_rows(["7b"], ["trion8bit", "adamw"], ["int8"])
    assert [(r.optimizer, r.kwargs["rank"]) for r in rows] == [("trion8bit", 1024),
                                                              ("trion8bit", 512)]
    assert bench.select_rows(["1b", "7b"])[0].model == "1b"
    assert {r.weights for r in bench.select_rows(["7b"], weights=["bf16"])} == {"bf16"}


@pytest.mark.parametrize("call,flag", [
    ((["13b"],), "--models"), ((["7b"], ["sgd"]), "--optimizers"),
    ((["7b"], None, ["int4"]), "--weights"), ((["1b"], ["muon"], ["int8"]), "select no row")])
def test_a_selection_of_nothing_names_its_flag(call, flag):
    with pytest.raises(ValueError, match=flag):
        bench.select_rows(*call)


# ------------------------------------------------------------------ flags
def test_flags_and_their_defaults():
    args = bench.parser().parse_args([])
    assert (args.seq_len, args.batch, args.models, args.weights) == \
        (256, 1, ["7b", "1b"], ["bf16", "int8"])
    args = bench.parser().parse_args(["--seq-len", "2048", "--batch", "2", "--models", "7b",
                                      "--weights", "int8", "--optimizers", "dct8bit,trion8bit"])
    assert (args.seq_len, args.batch, args.models, args.weights, args.optimizers) == \
        (2048, 2, ["7b"], ["int8"], ["dct8bit", "trion8bit"])


@pytest.mark.parametrize("argv,flag", [(["--seq-len", "0"], "--seq-len"),
                                       (["--batch", "x"], "--batch"),
                                       (["--models", "13b"], "--models")])
def test_a_bad_flag_is_refused_before_anything_runs(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "memopt.recipes.bench.memory", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--seq-len", "--batch", "--weights", "--optimizers", "--models"):
        assert flag in done.stdout


# ------------------------------------------------------------------ estimate arguments
def test_the_estimate_gets_only_the_arguments_it_declares():
    int8, bf16 = Row("7b", "dct8bit", True, {"rank": 8}, "int8"), Row("7b", "adamw", False)

    def extended(model, name, *, per_layer=False, weight_dtype=None, weights=None,
                 batch=1, seq_len=None, checkpointing=True, **optimizer_kwargs):
        pass

    def earlier(model, name, *, per_layer=False, weight_dtype=None, **optimizer_kwargs):
        pass

    assert bench.estimate_extras(extended, int8, 2048, 2) == {
        "weights": "int8", "seq_len": 2048, "batch": 2, "checkpointing": True}
    assert "weights" not in bench.estimate_extras(extended, bf16, 256, 1)
    assert bench.estimate_extras(earlier, int8, 2048, 2) == {}     # not into **optimizer_kwargs


# ------------------------------------------------------------------ measuring
@pytest.fixture(scope="module")
def measured():
    rows = {w: bench.measure("7b", "galore8bit", True, {"rank": 8}, weights=w, seq_len=16,
                             batch=2, steps=3, **TINY) for w in ("bf16", "int8")}
    return rows


def test_a_cpu_measurement_times_the_steps_after_the_first(measured):
    for row in measured.values():
        assert len(row["step_s"]) == 3 and all(t > 0 for t in row["step_s"])
        timed = sorted(row["step_s"][1:])
        assert row["tokens_per_s"] == pytest.approx(2 * 16 / ((timed[0] + timed[1]) / 2))
        assert row["loss"] == pytest.approx(5.55, abs=0.3)           # about ln(256)
        assert "peak_gb" not in row                                   # CUDA only
        assert row["estimate_gb"] > row["estimate_state_gb"] > 0


def test_int8_rows_keep_the_linear_weights_in_codes_and_scales(measured):
    # per layer q, k, v, o (64 x 64), gate, up (128 x 64), down (64 x 128): 40960 weights in
    # 576 rows of one scale group; embedding, head and norms stay bf16 in both rows
    linear, rows, kept = 2 * 40960, 2 * 576, 2 * 256 * 64 + 5 * 64
    assert measured["bf16"]["weights_gb"] * 1e9 == pytest.approx(2 * (linear + kept))
    assert measured["int8"]["weights_gb"] * 1e9 == pytest.approx(linear + 4 * rows + 2 * kept)


def test_out_of_memory_is_a_row_with_its_error(monkeypatch):
    def out_of_memory(**spec):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    monkeypatch.setattr(bench, "measure", out_of_memory)
    row = bench.child({"model": "7b", "optimizer": "dct8bit", "per_layer": True,
                       "kwargs": {"rank": 512}, "weights": "int8", "device": "cpu"})
    assert row["error"].startswith("out of memory: ") and "Tried to allocate" in row["error"]
    assert (row["optimizer"], row["weights"], row["kwargs"]) == ("dct8bit", "int8", {"rank": 512})


def test_each_row_runs_in_a_fresh_process_and_a_failure_is_reported():
    good = bench.run_row(Row("7b", "trion8bit", True, {"rank": 8}, "int8"), 16, 1, 2, **TINY)
    assert good.get("error") is None and good["tokens_per_s"] > 0
    assert good["weights"] == "int8" and good["seq_len"] == 16
    bad = bench.run_row(Row("7b", "dct8bit", True, {"rank": 0}, "int8"), 16, 1, 2, **TINY)
    assert "rank" in bad["error"] and bad["optimizer"] == "dct8bit"


def test_ranks_keep_rows_at_those_ranks_and_rows_without_one():
    rows = bench.select_rows(["7b"], None, None, [512])
    assert rows and all(r.kwargs.get("rank") in (None, 512) for r in rows)
    assert any(r.kwargs.get("rank") is None for r in rows)
    assert not any(r.kwargs.get("rank") == 1024 for r in rows)
    with pytest.raises(ValueError, match="--ranks"):
        bench.select_rows(["7b"], ["dct8bit"], ["int8"], [7])


def test_update_peak_counts_at_least_the_materialized_weight():
    """bench.update_peak: the temporaries of a quantized weight's update hold its fp32 copy
    (materialized) and the lifted update, and stay within a few copies."""
    from memopt.recipes.bench.update_peak import update_peak
    peak = update_peak("dct8bit", (96, 64), 16)
    assert 2 * 4 * 96 * 64 <= peak <= 12 * 4 * 96 * 64
