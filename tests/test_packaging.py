"""pyproject.toml's package list against the folders (and the package root). A regular install copies only the
packages listed there, while an editable one finds every subpackage on disk: one left out of
the list works in development and is missing once installed (`pip install .`)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")                 # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_every_folder_with_an_init_is_a_listed_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    # the package root is the repository's top folder: only its own __init__.py is the
    # root's; the folders under it are packages mapped on their own
    on_disk = {name for name, folder in dirs.items()
               if folder == "." and (ROOT / "__init__.py").is_file()}
    on_disk |= {".".join((name, *init.parent.relative_to(ROOT / folder).parts))
                for name, folder in dirs.items() if folder != "."
                for init in (ROOT / folder).rglob("__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(on_disk)
