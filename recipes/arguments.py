"""Command-line value types shared by the `memopt` subcommands: each parses one flag's text
or raises argparse's error saying what is wrong, so that the parser prints one line naming
the flag (exit status 2)."""

from __future__ import annotations

import argparse
import ast
import math
from typing import NoReturn

from .peers import recipe_optimizers


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``memopt train: error: argument --lr: ...`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def whole_number(text: str, minimum: int) -> int:
    """``text`` as an int of at least ``minimum``, or argparse's error saying what is wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value}" if minimum == 1 else
            f"must be {minimum} or more, got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def optimizer_name(name: str) -> str:
    if name.lower() not in recipe_optimizers():
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {name!r}; choose one of {', '.join(recipe_optimizers())}")
    return name.lower()


def optimizer_list(value: str) -> list[str]:
    names = [optimizer_name(n.strip()) for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected at least one optimizer name")
    return names


class UsageError(Exception):
    """A command-line value that cannot work; the message names the flag."""
