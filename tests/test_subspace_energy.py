"""recipes/bench/subspace_energy.py: the fraction of each projected gradient's energy that
the SVD, DCT and refined-DCT bases keep, measured while training."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from memopt.recipes.bench import subspace_energy as energy               # noqa: E402
from memopt.recipes.train import Run, RunConfig                         # noqa: E402

TOL = 1e-9


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    """5 steps of the tiny preset with GaLoreAdamW, measured at steps 1, 2, 4 and 5, with
    DCT refreshes at 1, 3, 5 and SVD refreshes at 1, 4."""
    out = tmp_path_factory.mktemp("energy") / "energy.json"
    assert energy.main(["--preset", "tiny", "--steps", "5", "--every", "2", "--dct-gap", "2",
                        "--svd-gap", "3", "--device", "cpu", "--no-progress",
                        "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_fractions_are_in_0_1_and_the_svd_keeps_the_most(tiny_result):
    records = tiny_result["records"]
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    for record in records:
        assert len(record["matrices"]) == 4 * 7         # tiny: 4 layers of q k v o gate up down
        for row in record["matrices"]:
            for measure in energy.MEASURES:
                assert -TOL <= row[measure] <= 1 + TOL, (record["step"], row["name"], measure)
                assert row["svd"] >= row[measure] - TOL, (record["step"], row["name"], measure)
            assert row["rank"] == 32


def test_a_basis_made_this_step_is_the_fresh_one(tiny_result):
    """At a refresh step the stale bases are today's; between refreshes they are older."""
    rows = {r["step"]: r["matrices"] for r in tiny_result["records"]}
    for row in rows[1]:
        assert row["dct_age"] == row["svd_age"] == 0
        assert row["dct_stale"] == pytest.approx(row["dct_l2"], abs=TOL)
        assert row["svd_stale"] == pytest.approx(row["svd"], abs=TOL)
        assert row["svd_stale_dct_gap"] == pytest.approx(row["svd"], abs=TOL)
        assert row["dct_iter_stale"] == pytest.approx(row["dct_iter"], abs=TOL)
    assert {(r["dct_age"], r["svd_age"]) for r in rows[2]} == {(1, 1)}
    assert {(r["dct_age"], r["svd_age"]) for r in rows[4]} == {(1, 0)}
    assert {(r["dct_age"], r["svd_age"]) for r in rows[5]} == {(0, 1)}
    for row in rows[5]:
        assert row["dct_stale"] == pytest.approx(row["dct_l2"], abs=TOL)


def test_subspace_iteration_keeps_at_least_the_dct_columns_energy(tiny_result):
    """One step from B towards the top subspace keeps no less of G than B itself (the kept
    energy of power iteration does not decrease)."""
    for record in tiny_result["records"]:
        for row in record["matrices"]:
            assert row["dct_iter"] >= row["dct_l2"] - TOL, (record["step"], row["name"])


def test_summaries_and_tables(tiny_result):
    kinds = [row["kind"] for row in tiny_result["by_kind"]]
    assert kinds == ["q", "k", "v", "o", "gate", "up", "down", "all"]
    sides = {row["kind"]: row["side"] for row in tiny_result["by_kind"][:-1]}
    assert sides["gate"] == sides["up"] == "right" and sides["down"] == "left"
    assert [row["step"] for row in tiny_result["by_step"]] == [1, 2, 4, 5]
    assert all(row["loss"] > 0 for row in tiny_result["by_step"])
    assert "| down | 128x352 | left |" in tiny_result["tables"]["by_kind"]
    settings = tiny_result["settings"]
    assert (settings["optimizer"], settings["dct_gap"], settings["svd_gap"]) == ("galore", 2, 3)


def test_held_dct_columns_are_those_dct_adamw_holds(micro):
    """Trained with DCTAdamW, the probe's refreshes follow the optimizer's: after 7 steps at
    gap 3 (refreshes at 1, 4, 7) its columns are the optimizer's own indices."""
    run = Run(RunConfig(optimizer="dct", preset="micro", steps=7, device="cpu",
                        progress=False, optimizer_options={"update_proj_gap": 3}))
    probe = energy.EnergyProbe(run, every=3, dct_gap=3, svd_gap=10)
    run.train()
    names = {id(p): n for n, p in run.model.named_parameters()}
    checked = 0
    for p, state in run.optimizer.state.items():
        if "proj_indices" in state:
            assert torch.equal(probe.held[names[id(p)]].dct, state["proj_indices"])
            assert probe.held[names[id(p)]].dct_step == 7
            checked += 1
    assert checked == len(probe.matrices) == 2 * 7
    assert [r["step"] for r in probe.records] == [1, 3, 6, 7]


def test_kind_of_names_the_projection():
    assert energy.kind_of("model.layers.3.self_attn.q_proj.weight") == "q"
    assert energy.kind_of("model.layers.0.mlp.down_proj.weight") == "down"
