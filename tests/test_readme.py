"""The README tells a new user the truth first: short, with examples that train at a working
rate and defaults that are the code's (issue "Nothing silent", item 11)."""

from __future__ import annotations

import ast
import inspect
import os
import re

import pytest

from memopt import optim as mo

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _text() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", _text(), flags=re.S)


def test_readme_is_at_most_300_lines():
    """What a user needs first; the lab notebook lives in recipes/bench/BENCHMARKS.md and docs/."""
    assert len(_text().splitlines()) <= 300


def test_readme_examples_give_the_low_rank_optimizers_a_rate():
    """Their class default lr (1e-3) is AdamW's; they want about 10x that."""
    calls = [node for block in _python_blocks() for node in ast.walk(ast.parse(block))
             if isinstance(node, ast.Call) and getattr(node.func, "id", "") in
             ("GaLoreAdamW", "DCTAdamW", "FiraAdamW", "GaLoreAdamW8bit", "DCTAdamW8bit",
              "FiraAdamW8bit")]
    assert calls
    for call in calls:
        assert "lr" in {k.arg for k in call.keywords}, ast.unparse(call)


@pytest.mark.parametrize("cls", [mo.Muon, mo.PolarGrad], ids=lambda c: c.__name__)
def test_readme_states_the_code_s_defaults(cls):
    text = _text()
    defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
    match = re.search(rf"`{cls.__name__}` (?:Muon's but )?`([^`]*)`", text)
    assert match, f"the README's API section gives {cls.__name__}'s defaults"
    pairs = re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', match.group(1))
    assert pairs
    for key, value in pairs:
        assert ast.literal_eval(value) == defaults[key], f"{key}={value}"
    assert not re.search(r"weight_decay`?\W+defaults? to 0\b", text)
