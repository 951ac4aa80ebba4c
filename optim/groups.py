"""Param groups: the usual split of a model's parameters, and the checks of a group's values.

Hidden matrices (attention and MLP weights, conv kernels) get the low-rank or orthogonalized
update; embeddings, the output head, norms and biases get plain AdamW. This follows GaLore's
recipes (projection only on attention and MLP weights) and Muon's advice (embeddings and the
head stay on AdamW; Jordan et al., 2024).
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


def check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def check_learning_rate(value: Any) -> None:
    """A finite number >= 0, or (as torch.optim allows) a one-element real tensor holding one."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or not value.is_floating_point():
            raise ValueError(f"Invalid learning rate: a tensor lr must hold one real "
                             f"floating-point value, got shape {tuple(value.shape)} {value.dtype}")
        value = float(value)
    check_nonnegative("learning rate", value)


def learning_rate(group: dict[str, Any]) -> float:
    """The group's lr as a float (torch.optim allows a one-element tensor, which LR schedulers
    then update in place)."""
    lr = group["lr"]
    return float(lr) if isinstance(lr, Tensor) else lr


def unknown_key_message(owner: str, key: str, known: Iterable[str], what: str) -> str:
    """"OWNER: unknown WHAT 'key' (did you mean 'closest'?); known: ..." for an error."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{owner}: unknown {what} {key!r}{hint}; known: {', '.join(known)}"


def check_known_keys(owner: str, keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise ValueError for the first param-group key not in ``known`` (a typo'd key would
    otherwise be kept and ignored: torch.optim stores any key)."""
    known = set(known)
    for key in keys:
        if key not in known:
            raise ValueError(unknown_key_message(owner, key, known, "param group key"))


def check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (must be a pair of numbers in [0, 1))")
    for i, beta in enumerate(betas):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i} of {name}: {beta!r} "
                             "(must be in [0, 1))")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose one of {choices})")


def check_above(name: str, value: Any, low: float, inclusive: bool = False) -> None:
    """A finite number > ``low`` (or >= with ``inclusive``), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value >= low if inclusive else value > low) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number "
                         f"{'>=' if inclusive else '>'} {low})")


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


#: Last name component of modules treated as the output head.
HEAD_NAMES = ("lm_head", "head", "classifier", "score", "output", "embed_out", "fc_out")


def warn_if_no_matrix_used(owner: str, groups: list[dict[str, Any]],
                           used: Callable[[dict[str, Any], Any], bool],
                           why_not: Callable[[dict[str, Any], Any], str], method: str) -> bool:
    """Warn (once, at construction) when the optimizer applies its method to none of the
    parameters it was given: every matrix went to AdamW, or no matrix was given. ``used``
    says whether a parameter gets the method; ``why_not`` says why a matrix does not."""
    matrices = [(g, p) for g in groups for p in g["params"] if p.ndim >= 2]
    if any(used(g, p) for g, p in matrices):
        return False
    if not matrices:
        reason = "none of its parameters is a matrix (ndim >= 2)"
    else:
        reasons = sorted({why_not(g, p) for g, p in matrices})
        reason = f"no matrix is {method} ({len(matrices)} given): " + "; ".join(reasons)
    warnings.warn(f"{owner}: {reason}; every parameter gets plain AdamW", stacklevel=4)
    return True


def warn_small_matrices(owner: str, groups: list[dict[str, Any]],
                        is_projected: Callable[[dict[str, Any], Any], bool]) -> None:
    """Warn once when matrices of groups with a rank stay on AdamW because their smaller
    side is not above it: galore-torch would project them (onto a full basis) and scale
    their update by ``scale``; memopt gives them AdamW at the group's lr."""
    small = [(i, tuple(p.shape)) for i, g in enumerate(groups)
             if g["rank"] is not None and not g["adamw"]
             for p in g["params"] if p.ndim >= 2 and not is_projected(g, p)]
    if small:
        shown = ", ".join(f"{shape} in group {i}" for i, shape in small[:4])
        more = f" and {len(small) - 4} more" if len(small) > 4 else ""
        are = "matrix is" if len(small) == 1 else "matrices are"
        warnings.warn(f"{owner}: {len(small)} {are} not larger than their group's rank and "
                      f"get plain AdamW at the group's lr, unscaled ({shown}{more}); "
                      "galore-torch would project them and scale their update by `scale`",
                      stacklevel=4)


def _transformers_module(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.get_output_embeddings()`` (or another getter) of a transformers model."""
    fn = getattr(model, getter, None)
    module = fn() if callable(fn) else None
    return module if isinstance(module, nn.Module) else None


def _special_modules(model: nn.Module, head_names: Iterable[str]) -> set[int]:
    """ids of the parameters of embeddings and output heads."""
    special: list[nn.Module] = []
    linears: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or (name and name.rsplit(".", 1)[-1] in head_names):
            special.append(module)
        if isinstance(module, nn.Linear):
            linears.append(module)
    output = _transformers_module(model, "get_output_embeddings")
    if output is None and linears:   # by type: the last nn.Linear registered is the output head
        output = linears[-1]
    special += [m for m in (output, _transformers_module(model, "get_input_embeddings"))
                if m is not None]
    return {id(p) for m in special for p in m.parameters(recurse=False)}


def param_groups(model: nn.Module, head_names: Iterable[str] = HEAD_NAMES,
                 **overrides: Any) -> list[dict[str, Any]]:
    """Two named param groups: hidden matrices (with ``overrides``) and the rest (``adamw=True``).

    A parameter is a hidden matrix when it has ndim >= 2 and does not belong to an
    ``nn.Embedding``, the output head, or a module whose last name is in ``head_names``.
    The output head is found by type: a transformers model's ``get_output_embeddings()``
    (and ``get_input_embeddings()``), otherwise the last ``nn.Linear`` registered in the
    model (an ``nn.Sequential``'s last layer). Norms and biases (ndim < 2) always go to the
    AdamW group. Shared (tied) parameters appear once. Empty groups are left out. Every
    memopt optimizer given a model (rather than parameters) uses this split.

    Example: ``GaLoreAdamW(param_groups(model, rank=256), lr=0.01)``.
    """
    special = _special_modules(model, tuple(head_names))
    hidden: list[tuple[str, torch.Tensor]] = []
    rest: list[tuple[str, torch.Tensor]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (hidden if p.ndim >= 2 and id(p) not in special else rest).append((name, p))
    groups = []
    if hidden:
        groups.append({"params": hidden, **overrides})
    if rest:
        groups.append({"params": rest, "adamw": True})
    return groups
