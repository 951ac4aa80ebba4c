"""What ``load_state_dict`` accepts: checks of a saved optimizer state, run before anything
changes, each raising a ValueError that names what differs.

A state is refused when it is another optimizer's (its groups hold options of another memopt
class or of torch.optim's), when it was saved with other values of the options that decide
what the state holds (the optimizer's ``STRUCTURE``: method, projector, rank, bit width), or
when a parameter's state is not the layout the optimizer keeps for it (``expected_state``:
keys, the step, shapes and dtypes; 8-bit codes and absmax exactly where ``MomentStore``
quantizes). Hyperparameters outside ``STRUCTURE`` follow torch: the loaded groups win.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from .distributed import is_sharded
from .states import ABSMAX_SUFFIX, BLOCKSIZE, MIN_8BIT_NUMEL, StateSpec

#: Group keys that torch.optim and its LR schedulers add to a group (kept, never refused).
ADDED_GROUP_KEYS = frozenset({"params", "param_names", "initial_lr"})


def option_names(cls: type) -> set[str]:
    """The options of an optimizer class: its ``option_names()`` where it has one (the
    low-rank compositions, whose options come from dataclasses), else the keyword
    arguments of ``cls.__init__``."""
    own = getattr(cls, "option_names", None)
    if callable(own):
        return set(own())
    return {name for name, arg in inspect.signature(cls.__init__).parameters.items()
            if arg.kind is arg.KEYWORD_ONLY or arg.kind is arg.POSITIONAL_OR_KEYWORD} \
        - {"self", "params"}


#: Options of torch.optim's own optimizers: a saved group holding one not among an
#: optimizer's own options came from another optimizer.
TORCH_OPTIONS = set().union(*(option_names(c) for c in (
    torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, getattr(torch.optim, "Muon", None))
    if c is not None))


def _normalized(key: str, value: Any) -> Any:
    """A structural option's value for comparison: projector options without the default
    side; sequences as tuples."""
    if key == "projector_options":
        options = dict(value or {})
        if options.get("side") == "auto":
            del options["side"]
        return options
    return tuple(value) if isinstance(value, list) else value


def check_loadable(optimizer: Any, state_dict: Any) -> None:
    """Raise ValueError, naming what differs, unless ``state_dict`` is a state of
    ``optimizer``'s method and layout for its parameters (a ``MemoptOptimizer``)."""
    owner = f"{type(optimizer).__name__}.load_state_dict"
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"{owner}: expected an optimizer state_dict, a dict with 'state' "
                         f"(a dict) and 'param_groups' (a list), got {got}")
    saved_groups, groups = state_dict["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"{owner}: the state has {len(saved_groups)} param groups, this "
                         f"optimizer {len(groups)}")
    _check_groups(optimizer, owner, saved_groups)
    where = {index: (gi, pi, group, p)
             for gi, (saved, group) in enumerate(zip(saved_groups, groups))
             for pi, (index, p) in enumerate(zip(saved["params"], group["params"]))}
    for index, values in state_dict["state"].items():
        if index not in where:
            raise ValueError(f"{owner}: the state has an entry for parameter index "
                             f"{index!r}, which no param group of the state lists")
        gi, pi, group, p = where[index]
        _check_param_state(optimizer, f"{owner}: parameter {optimizer._label(gi, pi)}",
                           group, p, values)


def _check_groups(optimizer: Any, owner: str, saved_groups: list[Any]) -> None:
    """Same number of parameters per group, no other optimizer's options, and the
    ``STRUCTURE`` options saved with this optimizer's values."""
    foreign = (type(optimizer).all_options() | TORCH_OPTIONS) - set(optimizer.defaults) \
        - ADDED_GROUP_KEYS - optimizer.INTERNAL_GROUP_KEYS - {"differentiable"}
    differences = []
    for i, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"{owner}: param group {i} of the state is not a dict with a "
                             "'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{owner}: param group {i} of the state has "
                             f"{len(saved['params'])} parameters, this optimizer's "
                             f"{len(group['params'])}")
        alien = sorted(set(saved) & foreign)
        if alien:
            raise ValueError(f"{owner}: the state is another optimizer's: its param group {i} "
                             f"has options {', '.join(alien)}, which "
                             f"{type(optimizer).__name__} does not take")
        differences += [f"{key}={saved[key]!r} in param group {i} (this optimizer: "
                        f"{group[key]!r})" for key in optimizer.STRUCTURE
                        if key in saved and not callable(group[key])
                        and _normalized(key, saved[key]) != _normalized(key, group[key])]
    if differences:
        raise ValueError(f"{owner}: the state was saved with {'; '.join(differences)}; these "
                         "decide what the state holds, so build the optimizer with the saved "
                         "values to continue that run")


def _check_param_state(optimizer: Any, where: str, group: dict[str, Any], p: Tensor,
                       values: Any) -> None:
    """One parameter's saved state against ``optimizer.expected_state(group, p)``: known
    keys, the step, nothing missing, each tensor's layout, then the subclass's own check."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: its state is not a dict")
    if not values or is_sharded(p):    # never stepped; FSDP2 DTensor state: distributed.py
        return
    specs = {s.key: s for s in optimizer.expected_state(group, p)}
    for key, value in values.items():
        base = key.removesuffix(ABSMAX_SUFFIX)
        if key == "step":
            if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
                raise ValueError(f"{where}: its step is {value!r}")
        elif key not in specs and not (key != base and base in specs) and \
                not (optimizer.is_plain_state(key) and not isinstance(value, Tensor)):
            raise ValueError(f"{where}: its state holds {key!r}, which "
                             f"{type(optimizer).__name__} does not keep for it (it keeps "
                             f"{', '.join(sorted(specs))}): a state of another method or model")
    missing = sorted(set(specs) - set(values) - optimizer.optional_state(group)) + \
        ([] if "step" in values else ["step"])
    if missing:
        raise ValueError(f"{where}: its state lacks {', '.join(missing)} (truncated, or "
                         "another method's)")
    for key, spec in specs.items():
        if key in values:
            _check_tensor(where, key, spec, values, spec.bits or group["state_bits"])
    problem = optimizer.saved_state_problem(group, p, values)
    if problem:
        raise ValueError(f"{where}: {problem}")


def _check_tensor(where: str, key: str, spec: StateSpec, values: dict[str, Any],
                  bits: int) -> None:
    """``values[key]`` has the spec's shape and dtype, or is 8-bit codes (uint8, with one
    fp32 absmax per block) exactly where ``MomentStore.init`` quantizes at ``bits``."""
    value = values[key]
    if not isinstance(value, Tensor):
        raise ValueError(f"{where}: its {key!r} is not a tensor")
    numel = math.prod(spec.shape)
    coded = spec.quantizable and bits == 8 and numel >= MIN_8BIT_NUMEL
    dtype = torch.uint8 if coded else spec.dtype
    if tuple(value.shape) != tuple(spec.shape) or value.dtype != dtype:
        raise ValueError(f"{where}: its {key!r} is {tuple(value.shape)} {value.dtype}, "
                         f"expected {tuple(spec.shape)} {dtype}: saved for another model, "
                         "rank or precision")
    absmax = values.get(key + ABSMAX_SUFFIX)
    blocks = (-(-numel // BLOCKSIZE),)
    if coded and (not isinstance(absmax, Tensor) or tuple(absmax.shape) != blocks
                  or absmax.dtype != torch.float32):
        raise ValueError(f"{where}: its 8-bit {key!r} needs {key + ABSMAX_SUFFIX!r}, "
                         f"{blocks} float32 (one scale per block of {BLOCKSIZE})")
    if not coded and absmax is not None:
        raise ValueError(f"{where}: its {key!r} is not 8-bit but the state holds "
                         f"{key + ABSMAX_SUFFIX!r}")
