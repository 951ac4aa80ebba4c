"""``quantize_weights``: a model's linear layers replaced, in place, by
:class:`~memopt.optim.quantized_weights.QuantizedLinear` (which modules, which cannot be,
and the one warning that names them). The layer, its parameter and how optimizers update
it are in ``quantized_weights.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .quantized_weights import BITS, QuantizedLinear, refuse_other_optimizers
from .stochastic_rounding import ROUNDINGS


def quantize_weights(model: nn.Module, bits: int = 8, *, group_size: int = 128,
                     rounding: str = "stochastic",
                     modules: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
                     seed: int = 0) -> nn.Module:
    """Keep the weights of ``model``'s linear layers in INT8 (or bf16) from now on; in place.

    Args:
        model: any module, e.g. a transformers causal LM.
        bits: 8 (INT8 codes, one fp32 scale per ``group_size`` input columns: 1.03 bytes per
            weight at 128) or 16 (bf16 with stochastic rounding).
        group_size: input columns per INT8 scale (Q-GaLore's 128 by default).
        rounding: how updated weights are rounded back: "stochastic" (unbiased; the point of
            this) or "nearest" (updates below half a step are lost; for comparison).
        modules: which modules to quantize: qualified names, or a predicate
            ``(name, module) -> bool``; default every ``nn.Linear`` but the output head
            (``get_output_embeddings()`` of a transformers model). Embeddings and norms
            are never quantized.
        seed: seed of the rounding noise (each layer draws its own stream from it).

    Returns ``model``. A selected module that cannot be quantized (not a plain
    ``nn.Linear``; its weight shared with another module; not floating point; already
    quantized) is left as it is, and all such modules are named in one warning.
    """
    _check_arguments(model, bits, group_size, rounding)
    named = dict(model.named_modules())
    chosen = _chosen(model, named, modules)
    refuse_other_optimizers()
    owners = _owners(named)
    left: list[str] = []
    done = 0
    for index, name in enumerate(chosen):
        module = named[name]
        why = _cannot(name, module, owners)
        if why:
            left.append(f"{name or '<model>'} ({why})")
            continue
        parent, _, attr = name.rpartition(".")
        setattr(named[parent] if parent else model, attr,
                QuantizedLinear(module, bits, group_size=group_size, rounding=rounding,
                                seed=hash((seed, index)) & 0x7FFF_FFFF))
        done += 1
    if not done:
        raise ValueError("quantize_weights: no module could be quantized"
                         + (": " + "; ".join(left) if left else " (none was selected)"))
    if left:
        warnings.warn(f"quantize_weights: {len(left)} module(s) left as they were: "
                      + "; ".join(left), stacklevel=2)
    return model


def _check_arguments(model: Any, bits: Any, group_size: Any, rounding: Any) -> None:
    """ValueError (TypeError for the model) naming the first bad argument."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"quantize_weights: bits={bits!r} is not supported; bits must be one "
                         "of " + ", ".join(f"{b} ({what})" for b, what in BITS.items()))
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"quantize_weights: group_size must be an integer >= 1, got "
                         f"{group_size!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"quantize_weights: rounding must be one of {ROUNDINGS}, got "
                         f"{rounding!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_weights: model must be an nn.Module, got "
                        f"{type(model).__name__}")


def _owners(named: dict[str, nn.Module]) -> dict[int, list[str]]:
    """The names of the modules holding each parameter (by id): more than one, tied."""
    owners: dict[int, list[str]] = {}
    for name, module in named.items():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return owners


def _chosen(model: nn.Module, named: dict[str, nn.Module],
            modules: Iterable[str] | Callable[[str, nn.Module], bool] | None) -> list[str]:
    if modules is None:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        return [n for n, m in named.items() if isinstance(m, nn.Linear) and m is not head]
    if callable(modules):
        return [n for n, m in named.items() if modules(n, m)]
    if isinstance(modules, str):
        raise TypeError("quantize_weights: modules must be a list of names or a predicate, "
                        f"not the string {modules!r}")
    names = list(modules)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(f"quantize_weights: modules names {unknown[0]!r}, which the model "
                         "does not have")
    return names


def _cannot(name: str, module: nn.Module, owners: dict[int, list[str]]) -> str | None:
    """Why ``module`` cannot be quantized, or None."""
    if isinstance(module, QuantizedLinear):
        return "already quantized"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__}, not an nn.Linear"
    if type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has its own forward"
    weight = module.weight
    if not weight.is_floating_point() or weight.is_meta:
        return f"weight is {'on the meta device' if weight.is_meta else weight.dtype}"
    shared = [n or "<model>" for n in owners.get(id(weight), []) if n != name]
    if shared:
        return "its weight is shared with " + ", ".join(shared)
    return None
