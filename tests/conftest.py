"""Fixtures shared by the recipe tests; hypothesis profiles of the fuzz tests."""

import os

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


# Hypothesis profiles of the property-based tests (tests/test_fuzz_*.py, marker "fuzz").
# "ci", the default: derandomized, fixed example counts (each test scales its own count by
# max_examples / 10), no shrinking, so the whole fuzz suite stays well under 90 s on a 2-core
# CPU even when it fails. "long": 25 times the examples, randomized, failures shrunk to a
# minimal case: MEMOPT_FUZZ=long python -m pytest -m fuzz (or --hypothesis-profile long).
try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:            # hypothesis is a test dependency; without it the fuzz tests skip
    pass
else:
    _SLOW = [HealthCheck.too_slow, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=10, derandomize=True, deadline=None,
                              database=None, print_blob=True, suppress_health_check=_SLOW,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.register_profile("long", max_examples=250, deadline=None, database=None,
                              print_blob=True, suppress_health_check=_SLOW)
    settings.load_profile(os.environ.get("MEMOPT_FUZZ", "ci"))
