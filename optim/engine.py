"""The engine every memopt optimizer runs on: gather -> check -> dispatch -> write.

A step gathers each group's parameters with gradients, lets each group prepare work that
changes nothing, checks every gradient once for inf / nan (one device sync for all groups),
then updates each group through its reference or fast executor (the group's ``impl``, like
torch's ``foreach`` / ``fused``), which writes parameters and state.

Per-parameter state is flat: tensors and plain numbers (``"step"`` is a Python int, so the
step counter costs no tensor operation).

A subclass validates its hyperparameters in ``_check_group`` and updates one param group in
``_step_group``; this class makes sure that a bad gradient (sparse, complex, inf / nan) is
reported, naming the parameter, before any parameter or state changes, and that a loaded
state keeps its dtypes (torch.optim would cast fp32 moments of a bf16 parameter to bf16, and
8-bit codes to floats). A step runs in three phases over all groups: ``_prepare_group``
(work that changes nothing, and may offer "witnesses": tensors computed from a gradient that
are non-finite whenever it is, so the check need not read the gradient again), one
finiteness check with one device sync, then ``_step_group``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .adam import eps_at
from .distributed import (as_sharded_state, from_sharded_state, is_sharded, local,
                          trim_absmax)
from .finite_check import FiniteCheck, PendingCheck
from .groups import check_choice, check_known_keys, param_groups, unknown_key_message
from .loading import ADDED_GROUP_KEYS, check_loadable, option_names
from .quantized_weights import materialized, materialize_in_turns
from .rules.adam import AdamRule
from .states import (MIN_8BIT_NUMEL, ROW_SHARDED, MomentStore, StateSpec, eight_bit_unused,
                     tensor_bytes)

#: How a group's step runs: "fast" (the executors: batched, fused; the default) or
#: "reference" (the methods' reference functions, one parameter at a time).
IMPLS = ("fast", "reference")


def moment_dtype(param: Tensor) -> torch.dtype:
    """Moments are fp32 (fp64 for fp64 parameters), whatever the parameter's dtype."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


#: Largest total of bytes a step may compute for all parameters before its finiteness check
#: (projections, momentum directions), so that the check reads them instead of the
#: gradients; above it the gradients are checked and the step streams in bounded pieces.
PREPARE_BYTES = 1024 * 2**20


@dataclass
class Prepared:
    """What a group's step computed before the finiteness check, having changed nothing.

    ``witnesses`` maps a parameter to a tensor that is non-finite whenever its gradient is
    (a projection or momentum direction computed from it), checked instead of the gradient
    so the step reads each gradient once; ``data`` is the subclass's, for ``_step_group``.
    """
    witnesses: dict[Tensor, Tensor] = field(default_factory=dict)
    data: Any = None


class MemoptOptimizer(Optimizer, ABC):
    """Base of memopt optimizers (a torch.optim.Optimizer; see the module docstring).

    ``load_state_dict`` follows torch.optim: the loaded param groups replace the current
    ones, so hyperparameters that are safe to change on resume (lr, betas, eps, weight
    decay, gaps, ...) take their saved values; set them after loading to change them. It
    refuses, before changing anything, a state from another optimizer, one saved with
    other values of the options in :attr:`STRUCTURE` (method, projector, rank, bit width:
    what the state's tensors mean), and state tensors whose keys, shapes or dtypes are not
    the ones this optimizer keeps for its parameters.
    """

    #: Options that decide the method and the layout of the state: a loaded state must have
    #: been saved with the same values (subclasses).
    STRUCTURE: tuple[str, ...] = ("state_bits", "adamw")
    #: Group keys an optimizer sets itself, beyond its options (subclasses).
    INTERNAL_GROUP_KEYS: frozenset[str] = frozenset()
    #: ``step()`` updates quantized weights (``quantized_weights.materialized``), so the
    #: step pre-hook that refuses other optimizers lets it through.
    MATERIALIZES_QUANTIZED_WEIGHTS = True
    @classmethod
    def all_options(cls) -> set[str]:
        """The options of every memopt optimizer class defined so far."""
        found, todo = set(), [MemoptOptimizer]
        while todo:
            c = todo.pop()
            todo += c.__subclasses__()
            if c is not MemoptOptimizer:
                found |= option_names(c)
        return found - {"args", "kwargs", "unknown"}

    #: the finiteness check (its pinned flag and CUDA event), made on first use
    _finite: FiniteCheck | None = None

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if isinstance(params, nn.Module):      # hidden matrices vs. the rest, by module type
            params = param_groups(params)
        self._stores: dict[int, MomentStore] = {}
        self._typed_options: dict[int, tuple[tuple[Any, ...], Any]] = {}
        self._eight_bit_unused_checked = False
        self._check_options(dict(defaults))    # as torch: even where every group overrides one
        super().__init__(params, defaults)

    def _typed(self, group: dict[str, Any], keys: tuple[str, ...],
               build: Callable[[], Any]) -> Any:
        """A group's typed options, built by ``build`` (which validates them) and kept until
        one of the group's ``keys`` changes value (an LR scheduler's lr, a user's edit)."""
        values = tuple(group.get(k) for k in keys)
        cached = self._typed_options.get(id(group))
        if cached is not None and len(cached[0]) == len(values) and all(
                a is b or (type(a) is type(b) and not isinstance(a, Tensor) and a == b)
                for a, b in zip(cached[0], values)):
            return cached[1]
        typed = build()
        self._typed_options[id(group)] = (values, typed)
        return typed

    def _store(self, bits: int) -> MomentStore:
        """The state store of ``bits`` (8: bitsandbytes, checked when a group is added)."""
        if bits not in self._stores:
            self._stores[bits] = MomentStore(bits)
        return self._stores[bits]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            check_known_keys(type(self).__name__, param_group,
                             set(self.defaults) | ADDED_GROUP_KEYS | self.INTERNAL_GROUP_KEYS)
        super().add_param_group(param_group)
        try:
            self._check_options(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    def _check_options(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming any invalid option of ``group`` (or of the defaults)."""
        check_choice("check_finite", group.get("check_finite", True), (True, False))
        check_choice("impl", group.get("impl", "fast"), IMPLS)
        self._check_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError naming any invalid hyperparameter of ``group``."""

    def _prepare_group(self, group: dict[str, Any], params: list[Tensor]) -> Prepared:
        """Work of ``group``'s step that changes nothing and may stand in for the gradient
        check (subclasses; default: none). Runs before the finiteness check."""
        return Prepared()

    def _step_group(self, group: dict[str, Any], params: list[Tensor],
                    prepared: Prepared) -> None:
        """Update the parameters of ``group`` that have gradients (already checked): the
        plain ones with AdamW (:meth:`adamw_settings`), the others through the subclass."""
        store = self._store(group["state_bits"])
        plan = self._plan(group, params)
        if plan.dense:
            lr, betas, eps = self.adamw_settings(group)
            self._adamw(plan.dense, store, lr=lr, betas=betas, eps=eps,
                        weight_decay=group["weight_decay"],
                        eps_before_bias_correction=group.get("eps_before_bias_correction", False))
        self._step_matrices(group, plan, prepared, store)

    @abstractmethod
    def _plan(self, group: dict[str, Any], params: list[Tensor]) -> Any:
        """The group's parameters with gradients, sorted for its step (``.dense``: AdamW)."""

    @abstractmethod
    def adamw_settings(self, group: dict[str, Any]) -> tuple[float, tuple[float, float], float]:
        """(lr, betas, eps) of the AdamW update of ``group``'s plain parameters."""

    @abstractmethod
    def _step_matrices(self, group: dict[str, Any], plan: Any, prepared: Prepared,
                       store: MomentStore) -> None:
        """Update the matrices of ``plan`` (the method's update)."""

    # ---------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run(self._collect())
        self._warn_if_8bit_unused()
        return loss

    @torch.no_grad()
    def step_param(self, param: Tensor) -> None:
        """Update one parameter from its gradient now, as ``step()`` would.

        Used for per-layer updates during the backward pass (:func:`step_in_backward`); the
        gradient is checked first, so a bad one raises before this parameter changes.
        """
        self._run([(g, ps) for g, ps in self._collect(only=param) if ps])
        self._warn_if_8bit_unused()

    def _warn_if_8bit_unused(self) -> None:
        """Warn once when ``state_bits=8`` was asked but every state tensor made so far is
        under ``MIN_8BIT_NUMEL`` elements and stays fp32 (as in bitsandbytes' own 8-bit
        optimizers): such a model trains exactly as with 32-bit state."""
        if self._eight_bit_unused_checked:
            return
        eight = [p for g in self.param_groups if g.get("state_bits") == 8 for p in g["params"]]
        unused = eight_bit_unused([self.state.get(p, {}) for p in eight])
        self._eight_bit_unused_checked = unused is not None or not eight
        if unused:
            warnings.warn(f"{type(self).__name__}: state_bits=8, but every state tensor has "
                          f"fewer than {MIN_8BIT_NUMEL} elements and stays fp32 (as in "
                          "bitsandbytes), so this model's state is not quantized", stacklevel=5)

    def _run(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
        """Prepare every group, check every gradient (or its witness), then update: a bad
        gradient anywhere raises before any parameter or state of any group changes. While
        the host waits for the check's flag, the device runs work that changes nothing
        (``_launch_ahead``), so the wait leaves no gap. Quantized weights
        (``quantized_weights.py``) are updated in turns of at most ``MATERIALIZE_BYTES``, on
        temporary fp32 copies rounded back into their codes, so no full-precision copy of
        the model ever exists."""
        work = materialize_in_turns(work)
        prepared = [self._prepare_group(group, params) for group, params in work]
        check = self._start_check(work, prepared)
        for (group, _), prep in zip(work, prepared):
            self._launch_ahead(group, prep)
        self._finish_check(check)
        for (group, params), prep in zip(work, prepared):
            with materialized(params):
                self._step_group(group, params, prep)

    def _launch_ahead(self, group: dict[str, Any], prepared: Prepared) -> None:
        """Start prepared work that changes no parameter or state (subclasses)."""

    def _collect(self, only: Tensor | None = None) -> list[tuple[dict[str, Any], list[Tensor]]]:
        """Parameters with gradients per group (or just ``only``); sparse or complex ones raise."""
        work = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None or (only is not None and p is not only) or p.numel() == 0:
                    continue                    # (a parameter with no elements has no update)
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(parameter {self._label(gi, pi)})")
                if grad.is_complex() or p.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex "
                                       f"parameters (parameter {self._label(gi, pi)})")
                params.append(p)
            work.append((group, params))
        return work

    def _start_check(self, work: list[tuple[dict[str, Any], list[Tensor]]],
                     prepared: list[Prepared]) -> PendingCheck | None:
        """Enqueue the finiteness check of every checked gradient, or of its witness
        (``finite_check.py``)."""
        checked = []
        for (group, params), prep in zip(work, prepared):
            if group.get("check_finite", True):
                witnesses = prep.witnesses
                checked += [(p, witnesses.get(p, p.grad)) for p in params]
        if self._finite is None:
            self._finite = FiniteCheck()
        return self._finite.start(checked)

    def _finish_check(self, check: PendingCheck | None) -> None:
        """Wait for the check; FloatingPointError naming the first bad parameter."""
        if check is not None:
            check.finish(self._name)

    def _name(self, param: Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    return self._label(gi, pi)
        return f"of shape {tuple(param.shape)}"

    def _label(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        p = group["params"][pi]
        names = group.get("param_names")
        where = f"'{names[pi]}'" if names else f"param_groups[{gi}]['params'][{pi}]"
        return f"{where} of shape {tuple(p.shape)}"

    def _adamw(self, params: list[Tensor], store: MomentStore, *, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float,
               eps_before_bias_correction: bool = False) -> None:
        """Plain AdamW for the parameters a method does not project or orthogonalize
        (on the local shard of an FSDP2 parameter: AdamW is elementwise); ``eps`` as
        :func:`adam.eps_at` places it."""
        buckets: dict[tuple[int, torch.device], list[Tensor]] = {}
        group = self._group_of(params[0]) if params else None
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                self.make_state(group, p, store)
            advance_steps([state])
            buckets.setdefault((state["step"], p.device), []).append(p)
        for (step, _), bucket in buckets.items():
            store.adamw_steps([self.state[p] for p in bucket], [local(p) for p in bucket],
                              [local(p.grad) for p in bucket], lr=lr, beta1=betas[0],
                              beta2=betas[1], weight_decay=weight_decay, step=step,
                              eps=eps_at(eps, betas[1], step, eps_before_bias_correction))

    # ---------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """Like torch.optim's, with group values that are not plain data replaced by a name.

        For FSDP2 parameters the row-sharded state (moments, momentum, their 8-bit codes and
        absmax) is returned as DTensors, so ``torch.distributed.checkpoint`` saves each shard
        once; the rest (bases, indices, norms) is the same on every rank."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            for key, value in list(group.items()):
                if callable(value):
                    group[key] = f"<callable {getattr(value, '__name__', type(value).__name__)}>"
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for index, values in sd["state"].items():
            if is_sharded(params[index]):
                sd["state"][index] = {k: as_sharded_state(v, k, params[index])
                                      for k, v in values.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state (see the class docstring for what is refused); tensors keep their
        saved dtype and move to their parameter's device."""
        check_loadable(self, state_dict)
        saved_state = state_dict["state"]
        callables = [{k: v for k, v in g.items() if callable(v)} for g in self.param_groups]
        defaults = dict(self.defaults)
        super().load_state_dict({**state_dict, "state": {}})
        self.defaults = defaults      # torch's load adds 'differentiable', which memopt has not
        for group, kept in zip(self.param_groups, callables):
            group.update(kept)   # a callable cannot be saved; the live one stays
            if "differentiable" not in defaults:
                group.pop("differentiable", None)
            for key, value in defaults.items():
                group.setdefault(key, value)     # options newer than the saved state
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_map = dict(zip(saved_ids, params))
        for key, values in saved_state.items():
            param = id_map[key]
            self.state[param] = {k: self._load_value(param, k, v) for k, v in values.items()}
            trim_absmax(self.state[param])
        self._after_load()

    # --------------------------------------------------------- what a state may be
    def _group_of(self, p: Tensor) -> dict[str, Any]:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    def make_state(self, group: dict[str, Any], p: Tensor, store: MomentStore) -> None:
        """Make ``p``'s state from its declaration (:meth:`expected_state`): the one place
        state tensors are created (zeros, or a declared fill; 8 bits where the store
        quantizes). Keys already present (a projector's fitted basis) are kept. An FSDP2
        shard's row-sharded tensors get its local rows, quantized as the whole would be."""
        state = self.state[p]
        rows = (p.shape[0], local(p).shape[0]) if p.ndim else (1, 1)
        specs = []
        for spec in self.expected_state(group, p):
            if spec.key in state:
                continue
            if is_sharded(p) and spec.key in ROW_SHARDED and spec.shape \
                    and spec.shape[0] == rows[0]:
                spec = replace(spec, shape=(rows[1], *spec.shape[1:]))
            specs.append(spec)
        store.make(state, specs, p.device, rows)
        state.setdefault("step", 0)

    def optional_state(self, group: dict[str, Any]) -> frozenset[str]:
        """Keys of state this optimizer may lack until first use (subclasses)."""
        return frozenset()

    def applies_method(self, group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` gets the method's update under ``group`` (else AdamW; subclasses)."""
        return False

    @abstractmethod
    def state_specs(self, group: dict[str, Any], p: Tensor) -> list[StateSpec]:
        """The state of a parameter the method updates, from its pieces' declarations."""

    def expected_state(self, group: dict[str, Any], p: Tensor) -> list[StateSpec]:
        """The state tensors this optimizer keeps for ``p`` under ``group``: the method's
        (:meth:`state_specs`) or AdamW's moments."""
        if self.applies_method(group, p):
            return self.state_specs(group, p)
        shape = tuple(local(p).shape)
        return [decl.spec(shape, shape, moment_dtype(p)) for decl in AdamRule.STATE]

    def is_plain_state(self, key: str) -> bool:
        """Whether state ``key`` may hold a plain number or string (subclasses)."""
        return False

    def saved_state_problem(self, group: dict[str, Any], p: Tensor,
                            values: dict[str, Any]) -> str | None:
        """What is wrong with ``p``'s saved state beyond its tensors' layout (subclasses)."""
        return None

    @staticmethod
    def _load_value(param: Tensor, key: str, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        return from_sharded_state(value, key).detach().to(device=param.device, copy=True)

    def _after_load(self) -> None:
        """Drop caches derived from state (subclasses)."""

    # --------------------------------------------------------------------- bytes
    def state_bytes(self) -> int:
        """Bytes of all optimizer state: moments, bases or indices, norms, steps."""
        own = sum(tensor_bytes(v) for s in self.state.values() for v in s.values())
        return own + self.shared_state_bytes()

    def estimated_shared_table(self, group: dict[str, Any], p: Tensor,
                               device: torch.device) -> tuple[Any, int] | None:
        """(key, bytes) of state p will share with other parameters on ``device`` (a DCT
        table), for ``estimate_memory``; subclasses."""
        return None

    def shared_state_bytes(self) -> int:
        """State shared between parameters (e.g. DCT tables, one per size); subclasses."""
        return 0


def refuse_unknown_arguments(owner: str, unknown: dict[str, Any], known: Any) -> None:
    """TypeError naming the class the user called and the closest known argument."""
    if unknown:
        key = next(iter(unknown))
        raise TypeError(unknown_key_message(owner, key, known, "keyword argument"))


def arguments(names: dict[str, Any]) -> dict[str, Any]:
    """A constructor's arguments from its ``locals()`` (``kwargs`` spread out), without
    ``self`` and ``params``: the defaults of its param groups, or a base constructor's."""
    extra = names.get("kwargs", {})
    return {**{k: v for k, v in names.items()
               if k not in ("self", "params", "kwargs", "unknown", "__class__")}, **extra}


def advance_steps(states: list[dict[str, Any]]) -> None:
    """t <- t + 1 in each parameter's state: the one place a step count advances."""
    for state in states:
        state["step"] = state.get("step", 0) + 1


def eight_bit(cls: type) -> type:
    """``cls`` with 8-bit blockwise states by default (``state_bits=8``), named cls + "8bit"."""
    name = cls.__name__ + "8bit"
    if hasattr(cls, "PRESET"):                  # the low-rank compositions: one more preset value
        body: dict[str, Any] = {"PRESET": {**cls.PRESET, "state_bits": 8}}
    else:
        def __init__(self: Any, params: Any, *args: Any, state_bits: int = 8,
                     **kwargs: Any) -> None:
            cls.__init__(self, params, *args, state_bits=state_bits, **kwargs)
        body = {"__init__": __init__}
    return type(name, (cls,), {**body, "__module__": cls.__module__,
                               "__qualname__": name, "__doc__": f":class:`{cls.__name__}` "
                               "with 8-bit blockwise states (``state_bits=8``)."})


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of all state of ``optimizer`` (any torch.optim.Optimizer), shared matrices included."""
    if isinstance(optimizer, MemoptOptimizer):
        return optimizer.state_bytes()
    return sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values())
