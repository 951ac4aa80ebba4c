"""Fixtures shared by the recipe tests."""

import pytest


@pytest.fixture
def micro(monkeypatch):
    """A test-only preset: a 2-layer LLaMA of hidden 32 that trains a step in milliseconds."""
    presets = pytest.importorskip("memopt.recipes.presets")
    preset = presets.Preset("micro", hidden=32, intermediate=64, heads=2, layers=2, seq_len=32,
                            batch_size=4, steps=20, rank=8, update_proj_gap=10,
                            lr=dict(presets._TINY_LR), eval_every=50, eval_batches=2)
    monkeypatch.setitem(presets.PRESETS, "micro", preset)
    return preset
