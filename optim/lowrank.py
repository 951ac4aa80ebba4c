"""The low-rank family as one composition: projector x update rule x residual x precision.

For a matrix W with gradient G (conv kernels as (out, in*k*k)), every ``update_proj_gap``
steps the projector fits a basis P (r columns on one side) to G; each step

    R = project(G)                     (the coordinates: P^T G, r x n, or G P, m x r)
    U = rule(R)                        (Adam, orthogonalized, ...: ``rules/``)
    W <- W (1 - lr wd) + lr (scale lift(U) - S)    (lift(U) = P U or U P^T)

with S Fira's limited residual (``fira.py``) or 0, and error feedback (``error_feedback.py``)
optionally carrying what the projection discards into the next G. State is kept in 32 or 8
bits. The pieces are registered in ``registry.py`` with the state they keep; this class owns
the param groups, projectors and state and runs each group's matrices through the rule's
reference step (one matrix at a time) or its batched step (the executors in
``executors_lowrank.py`` project and lift whole batches). The named optimizers are presets:

    GaLoreAdamW  = svd x adam                       (Zhao et al., 2024)
    DCTAdamW     = dct x adam, refresh every 50 steps, moments "rotate_fill"
                                                     (Modoranu et al., 2025)
    FiraAdamW    = svd x adam + Fira's residual       (Chen et al., 2024)
    Trion        = dct x orthogonalized, refresh every step (Modoranu et al., 2025b)
    GaLoreMuon   = svd x orthogonalized

and any other combination is ``LowRankOptimizer(params, projector=..., rule=..., ...)`` or
``create_optimizer("PROJECTOR+RULE[+RESIDUAL][+8bit]", model)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..projections import Projector, lift, make_projector, project_onto
from ..projections.base import compute_dtype, resolve_side

from . import executors_lowrank as fast
from .basis_change import fill_outside, rotate
from .compat import bitsandbytes_arguments, lowrank_group, names_a_rank
from .distributed import all_reduce_sum, is_sharded, local, update_from_shards
from .engine import PREPARE_BYTES, MemoptOptimizer, Prepared, advance_steps
from .error_feedback import corrected_gradients
from .executors import (CHUNK_BYTES, add_to_matrix_, as_matrix, bases, basis_dim, buckets,
                        precision, projected_shape)
from .fira import fira_residual
from .groups import (check_choice, learning_rate, unknown_key_message, warn_if_no_matrix_used,
                     warn_small_matrices)
from .lowrank_options import COMMON_DEFAULTS, COMMON_OPTIONS, LowRankOptions
from .registry import COMPOSITION, RESIDUALS, RULES
from .rules.base import Coordinates, Rule
from .states import PROJ_PREFIX, MomentStore, StateSpec


@dataclass
class _Plan:
    """A group's parameters with gradients: AdamW ones, projected ones and (every basis
    fitted) their same-shape batches, whole and cut to ``CHUNK_BYTES``; their work bytes."""
    key: tuple[Any, ...]
    dense: list[Tensor]
    projected: list[Tensor]
    batches: list[list[Tensor]] | None = None
    chunks: list[list[Tensor]] | None = None
    work_bytes: int = 0


@dataclass
class _Ready:
    """Projections made before the finiteness check; a batch projected after its launch."""
    batches: list[tuple[list[Tensor], fast.Batch]] = field(default_factory=list)
    deferred: list[Tensor] = field(default_factory=list)


class LowRankOptimizer(MemoptOptimizer):
    r"""A rule in a low-rank subspace of each matrix gradient; AdamW for everything else.

    .. code-block:: text

        input: lr eta, weight decay lambda, rank r, gap T, scale alpha, projector, rule,
               residual ("none" | "fira"), limiter gamma, error feedback
        for t = 1, 2, ...:
            G = grad of W (conv kernels as (out, in*k*k));  G <- G + E (error feedback)
            if (t - 1) % T == 0: P <- projector.update(G); carry the rule's state into P
            R = project(G);  U = rule(R)                  (U: the update at lr 1)
            S = fira_residual(G, R, U) if residual == "fira" else 0
            W <- W (1 - eta lambda) + eta (alpha lift(U) - S)

    Args:
        params: a model (split by :func:`~memopt.optim.param_groups`), or parameters or
            param groups (named allowed; every matrix in them is projected). When a group
            names an integer ``rank``, groups that name none are AdamW (galore-torch's
            convention); ``rank=None`` opts its own group out. Unknown group keys raise.
        lr: a float, or a one-element tensor as torch.optim allows (default 1e-3).
        weight_decay: decoupled weight decay (default 0).
        rank: subspace rank r; ``None`` turns projection off for the group (default 128).
            A parameter is projected when it has ndim >= 2 and its smaller side exceeds r.
        update_proj_gap: steps between basis refreshes T (default 200).
        scale: :math:`\alpha`, the factor on the lifted update (default 0.25).
        projector: "svd", "dct", "polar", or a callable ``rank -> Projector`` (default "svd").
        projector_options: keyword arguments for the named projector (e.g.
            ``{"method": "randomized"}`` for SVD); ``None`` for its defaults.
        rule: the update rule in the subspace, a name of ``registry.RULES``: "adam" (default;
            options ``betas``, ``eps``, ``eps_before_bias_correction``: ``rules/adam.py``) or
            "orthogonalized" (options ``momentum``, ``nesterov``, ``ns_steps``,
            ``orthogonalizer``, ``adjust_lr``, ``scaling``, ``ns_dtype`` and ``adamw_lr``,
            ``adamw_betas``, ``adamw_eps`` for the unprojected parameters:
            ``rules/orthogonalized.py``). The rule's options are keyword arguments here.
        state_bits: 32 (fp32 state) or 8 (bitsandbytes blockwise 8-bit state).
        residual: "none" or "fira" (add Fira's scaled, norm-limited residual).
        limiter_gamma: Fira's norm-growth limit :math:`\gamma` (default 1.01).
        moments_on_refresh: "keep", "reset", "rotate" or "rotate_fill" (``basis_change.py``).
        error_feedback: "none" (default), "fp32" or "8bit": carry what the projection discards
            into the next gradient, in a buffer of the matrix's size (``error_feedback.py``).
        projection_precision: "auto" (TF32 on CUDA, full fp32 elsewhere), "highest", "high"
            (TF32) or "medium" (bf16 factors, fp32 sums and results) for the step's
            projections and lifts; bases are always built and kept in full fp32.
        adamw: True makes the whole group plain AdamW (default False).
        check_finite: raise FloatingPointError on a non-finite gradient before changing
            anything (default True; one device sync per step). With False nothing is
            checked: a non-finite gradient goes into the weights and state, as in
            torch.optim, on every step (a basis refresh then builds its basis from G with
            its non-finite entries zeroed).
        impl: "fast" (the rule's batched step, the default) or "reference" (its reference
            step, one matrix at a time; FSDP2 shards always run fast).
        cuda_graph: must be False (recorded steps were removed; kept for saved states).

    The defaults are :class:`LowRankOptions`' and the rule's ``Options``; a preset
    (:attr:`PRESET`) overrides some.
    """

    #: Options this class sets other than the defaults (the presets below).
    PRESET: ClassVar[dict[str, Any]] = {}
    #: What a loaded state must agree on (``MemoptOptimizer.load_state_dict``).
    STRUCTURE = ("rank", "projector", "projector_options", "rule", "residual", "error_feedback",
                 "state_bits", "adamw")
    INTERNAL_GROUP_KEYS = frozenset({"lr_at_start"})

    def __init__(self, params: Iterable[Any], lr: float | None = None, **options: Any) -> None:
        options = bitsandbytes_arguments(options)              # optim_bits -> state_bits
        if lr is not None:
            options["lr"] = lr
        preset = {**self.PRESET, **options}
        rule_name = preset.get("rule", "adam")
        check_choice("rule", rule_name, tuple(RULES))
        rule = RULES[rule_name]
        known = COMMON_OPTIONS + rule.option_names()
        unknown = [k for k in options if k not in known]
        if unknown:
            raise TypeError(self._unknown_message(unknown[0], known, rule_name))
        defaults = {**COMMON_DEFAULTS, **{f.name: f.default for f in fields(rule.Options)},
                    **preset}
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        self._projectors: dict[Tensor, Projector] = {}
        self._plans: dict[int, _Plan] = {}
        # galore-torch's convention: when some group names a rank, the others are plain AdamW
        self._ranks_named = False
        if not isinstance(params, (torch.nn.Module, Tensor)):   # torch refuses a Tensor
            params = list(params)
            self._ranks_named = any(map(names_a_rank, params))
        super().__init__(params, defaults)
        if not warn_if_no_matrix_used(type(self).__name__, self.param_groups, self.is_projected,
                                      self._why_not_projected, "projected"):
            warn_small_matrices(type(self).__name__, self.param_groups, self.is_projected)

    def _unknown_message(self, key: str, known: tuple[str, ...], rule_name: str) -> str:
        owners = [name for name, r in RULES.items() if key in r.option_names()]
        if owners:
            return (f"{type(self).__name__}: unknown keyword argument {key!r}: it is an option "
                    f"of rule {owners[0]!r}, and this optimizer's rule is {rule_name!r}")
        return unknown_key_message(type(self).__name__, key, known, "keyword argument")

    @classmethod
    def option_names(cls) -> set[str]:
        """Every option a low-rank composition can take (any registered rule's)."""
        return set(COMMON_OPTIONS).union(*(r.option_names() for r in RULES.values()))

    @classmethod
    def lr_family(cls) -> str:
        return RULES[cls.PRESET.get("rule", "adam")].lr_family

    # ------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; galore-torch / fira keys are translated (:mod:`.compat`): a group
        that names no ``rank`` is plain AdamW when the constructor's groups named ranks."""
        super().add_param_group(lowrank_group(param_group, self._ranks_named))

    def options(self, group: dict[str, Any]) -> tuple[LowRankOptions, Any, Rule]:
        """The group's options as typed, validated objects: (common, the rule's, the rule).
        Rebuilt (and so re-validated) when a value of the group changes."""
        rule = RULES.get(group.get("rule")) if isinstance(group.get("rule"), str) else None
        keys = COMMON_OPTIONS + (rule.option_names() if rule is not None else ())

        def build() -> tuple[LowRankOptions, Any]:
            common = LowRankOptions(**{k: group[k] for k in COMMON_OPTIONS if k in group})
            own_rule = RULES[common.rule]
            return common, own_rule.Options(**{k: group[k] for k in own_rule.option_names()
                                               if k in group})
        common, own = self._typed(group, keys, build)
        return common, own, RULES[common.rule]

    def _check_group(self, group: dict[str, Any]) -> None:
        common, _, _ = self.options(group)
        group.setdefault("lr_at_start", learning_rate(group))
        self._store(8 if common.error_feedback == "8bit" else common.state_bits)

    @staticmethod
    def _why_not_projected(group: dict[str, Any], p: Tensor) -> str:
        if group["adamw"]:
            return "a group has adamw=True"
        if group["rank"] is None:
            return "a group has rank=None"
        return f"rank {group['rank']} is not below the smaller side of a {tuple(p.shape)} matrix"

    @staticmethod
    def is_projected(group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` gets the low-rank update under ``group``'s settings."""
        return (not group["adamw"] and group["rank"] is not None and p.ndim >= 2
                and min(as_matrix(p).shape) > group["rank"])

    def applies_method(self, group: dict[str, Any], p: Tensor) -> bool:
        return self.is_projected(group, p)

    def projector(self, p: Tensor, group: dict[str, Any] | None = None) -> Projector:
        """The projector of parameter ``p`` (made on first use, from its saved state if
        any). An FSDP2 parameter (rows sharded) gets a basis on the column side whatever
        "auto" would pick, so that projecting its rows is local."""
        proj = self._projectors.get(p)
        if proj is None:
            group = group or next(g for g in self.param_groups if any(q is p for q in g["params"]))
            spec, rank = group["projector"], group["rank"]
            options = dict(group["projector_options"] or {})
            if is_sharded(p):
                options.setdefault("side", "right")
            proj = spec(rank) if callable(spec) else make_projector(spec, rank, **options)
            saved = {k[len(PROJ_PREFIX):]: v for k, v in self.state.get(p, {}).items()
                     if k.startswith(PROJ_PREFIX)}
            if saved:
                proj.load_state_dict(saved)
            self._projectors[p] = proj
        return proj

    #: What a loaded state must agree on (``MemoptOptimizer.load_state_dict``).
    STRUCTURE = ("rank", "projector", "projector_options", "residual", "error_feedback",
                 "state_bits", "adamw")

    def is_plain_state(self, key: str) -> bool:
        return key.startswith(PROJ_PREFIX)       # the projector's side, shape, counters

    def saved_state_problem(self, group: dict[str, Any], p: Tensor,
                            values: dict[str, Any]) -> str | None:
        """A saved basis must have been fitted to a matrix of p's shape."""
        saved = tuple(values.get(PROJ_PREFIX + k) for k in ("rows", "cols"))
        if None in saved or tuple(map(int, saved)) == tuple(as_matrix(p).shape):
            return None
        return (f"its basis was fitted to a {tuple(map(int, saved))} matrix, not "
                f"{tuple(as_matrix(p).shape)}: a state of another model")

    def state_specs(self, group: dict[str, Any], p: Tensor) -> list[StateSpec]:
        """The state of projected matrix ``p`` (its global shape), from the declarations:
        the rule's (on the coordinates' shape), the residual's, error feedback's buffer and
        the projector's tensors (basis or indices, under ``PROJ_PREFIX``)."""
        proj, shape, side, d, r, dtype = self._geometry(group, p)
        common, own, rule = self.options(group)
        coordinates = projected_shape(shape, side, r)
        specs = rule.state_specs(coordinates, shape, dtype, own)
        if common.residual != "none":
            specs += RESIDUALS[common.residual].state_specs(coordinates, shape, dtype, group)
        if common.error_feedback != "none":
            specs += RESIDUALS["error_feedback"].state_specs(coordinates, shape, dtype, group)
        return specs + [StateSpec(PROJ_PREFIX + key, size, dt)
                        for key, (size, dt) in proj.state_shapes(d, r, dtype).items()]

    def optional_state(self, group: dict[str, Any]) -> frozenset[str]:
        return RULES[group["rule"]].optional_state()

    def estimated_shared_table(self, group: dict[str, Any], p: Tensor,
                               device: torch.device) -> tuple[Any, int] | None:
        """(key, bytes) of the state p's projector will share with others on ``device``."""
        if not self.applies_method(group, p):
            return None
        proj, _, _, d, _, dtype = self._geometry(group, p)
        return proj.shared_table(d, device, dtype)

    def _geometry(self, group: dict[str, Any], p: Tensor) -> tuple[Any, ...]:
        """(projector, matrix shape, side, basis length d, rank, compute dtype) of p,
        before any basis is built."""
        proj = self.projector(p, group)
        shape = tuple(as_matrix(p).shape)
        side = resolve_side(proj.requested_side, shape)
        d = basis_dim(shape, side)
        return proj, shape, side, d, min(proj.rank, d), compute_dtype(p.dtype)

    def shared_state_bytes(self) -> int:
        """State shared between matrices (DCT tables, one per size, dtype and device)."""
        tables = dict(filter(None, (proj.shared_table() for proj in self._projectors.values()
                                    if proj.shape is not None)))
        return sum(tables.values())

    def _after_load(self) -> None:
        self._projectors.clear()
        self._plans.clear()

    # ---------------------------------------------------------------------- step
    def _plan(self, group: dict[str, Any], params: list[Tensor]) -> _Plan:
        """Which of ``params`` are projected, and their batches once every basis is fitted."""
        key = (group["rank"], group["adamw"], tuple(map(id, params)))
        plan = self._plans.get(id(group))
        if plan is not None and plan.key == key and plan.batches is not None:
            return plan
        plan = _Plan(key, [], [])
        for p in params:
            (plan.projected if self.is_projected(group, p) else plan.dense).append(p)
        plan.work_bytes = sum(self._work_bytes(group, p) for p in plan.projected)
        if all(self.projector(p, group).shape is not None for p in plan.projected):
            plan.batches = self._batches(group, plan.projected, None)
            plan.chunks = self._batches(group, plan.projected, CHUNK_BYTES)
        self._plans[id(group)] = plan
        return plan

    @staticmethod
    def _work_bytes(group: dict[str, Any], p: Tensor) -> int:
        """Bytes of p's coordinates, Adam's update and a generated basis (an upper bound)."""
        m, n = as_matrix(local(p)).shape
        return 3 * min(group["rank"], m, n) * max(m, n) * (8 if p.dtype == torch.float64 else 4)

    def _batches(self, group: dict[str, Any], params: list[Tensor],
                 cap: int | None) -> list[list[Tensor]]:
        """Matrices with fitted bases by shape, side, rank, dtype, device and sharding."""
        def key(p: Tensor) -> tuple[Any, ...]:
            proj = self.projector(p, group)
            return (tuple(as_matrix(local(p)).shape), p.ndim, proj.side, proj.effective_rank,
                    p.dtype, p.device, is_sharded(p))
        return buckets(params, key, lambda p: self._work_bytes(group, p), cap)

    def _prepare_group(self, group: dict[str, Any], params: list[Tensor]) -> Prepared:
        """Project, before the finiteness check, the gradients of the matrices that keep
        their basis this step, so that the check reads the projections instead of the
        gradients (a non-finite entry of G makes its whole column of P^T G non-finite, and
        a finite G whose projection overflows is caught too). A matrix due for a refresh
        offers ||G||_F instead (summed in fp64, then rounded to the fp32 the step computes
        in): finite iff G is and no coordinate, nor partial sum, of G in an orthonormal basis
        can overflow (each is at most ||G||_F). Only on the fast path, and projections only when they fit in
        ``PREPARE_BYTES``."""
        if not group["check_finite"] or group["impl"] != "fast" or \
                group["error_feedback"] != "none":          # the step projects G + E, not G
            return Prepared()
        plan = self._plan(group, params)
        gap, state = group["update_proj_gap"], self.state
        kept = [[p for p in b if state[p].get("step", 0) % gap] for b in plan.batches or []]
        kept = [b for b in kept if b] if plan.work_bytes <= PREPARE_BYTES else []
        staying = {id(p) for b in kept for p in b}
        witnesses = {p: torch.linalg.vector_norm(local(p.grad), dtype=torch.float64).to(
            compute_dtype(p.dtype)) for p in plan.projected if id(p) not in staying}
        if not kept:
            return Prepared(witnesses)
        # the last batch is projected while the host waits for the check, which then reads
        # that batch's gradients: the device has work across the wait
        ready = _Ready(deferred=kept.pop() if len(kept) > 1 else [])
        with precision(group["projection_precision"], kept[0][0].device):
            ready.batches = [(b, self._project(group, b)) for b in kept]
        witnesses.update({p: R for ps, b in ready.batches for p, R in zip(ps, b.R)})
        return Prepared(witnesses, ready)

    def _launch_ahead(self, group: dict[str, Any], prepared: Prepared) -> None:
        """While the host waits for the check: the deferred projection, Fira's G norms."""
        ready = prepared.data
        if ready is None:
            return
        if ready.deferred:
            with precision(group["projection_precision"], ready.deferred[0].device):
                ready.batches.append((ready.deferred, self._project(group, ready.deferred)))
            ready.deferred = []
        if group["residual"] == "fira":
            for _, batch in ready.batches:
                batch.gradient_sq_norms()

    def _project(self, group: dict[str, Any], params: list[Tensor]) -> fast.Batch:
        projectors = [self.projector(p, group) for p in params]
        shards = is_sharded(params[0])            # a batch is all shards or none
        return fast.project([local(p) if shards else p for p in params],
                            [local(p.grad) if shards else p.grad for p in params],
                            bases(projectors), projectors[0].side, group["projection_precision"]
                            == "medium", group["residual"] == "fira",
                            orthonormal=all(proj.orthonormal for proj in projectors))

    def adamw_settings(self, group: dict[str, Any]) -> tuple[float, tuple[float, float], float]:
        return RULES[group["rule"]].adamw_settings(group, learning_rate(group))

    def _step_matrices(self, group: dict[str, Any], plan: _Plan, prepared: Prepared,
                       store: MomentStore) -> None:
        if not plan.projected:
            return
        ready = prepared.data or _Ready()
        done = {id(p) for params_, _ in ready.batches for p in params_}
        rest = [p for p in plan.projected if id(p) not in done]
        with precision(group["projection_precision"], plan.projected[0].device), \
                corrected_gradients(self, group, plan.projected, store):
            for p in rest:
                self._refresh_if_due(group, p, store)
            if group["impl"] == "reference":       # FSDP2 shards always run fast
                self._reference_step(group, [p for p in rest if not is_sharded(p)], store)
                rest = [p for p in rest if is_sharded(p)]
            if ready.batches:
                self._fast_step(group, ready.batches, store)
            chunks = plan.chunks if plan.chunks is not None and len(rest) == len(plan.projected) \
                else self._batches(group, rest, CHUNK_BYTES)
            for chunk in chunks:      # one chunk's temporaries alive at a time
                self._fast_step(group, [(chunk, self._project(group, chunk))], store)

    def _fast_step(self, group: dict[str, Any], batches: list[tuple[list[Tensor], fast.Batch]],
                   store: MomentStore) -> None:
        """The rule's batched step on the coordinates of all ``batches``, then each lift."""
        common, own, rule = self.options(group)
        states = [[self.state[p] for p in params] for params, _ in batches]
        advance_steps([s for ss in states for s in ss])
        fira = common.residual == "fira"
        items = [Coordinates(batch.R, ss, tuple(as_matrix(params[0]).shape),
                             params if is_sharded(params[0]) else None)
                 for (params, batch), ss in zip(batches, states)]
        updates = rule.batched(items, store, own, keep_input=fira)
        for (params, batch), U, ss in zip(batches, updates, states):
            first = params[0]
            fast.apply(batch, U, ss, lr=learning_rate(group), scale=common.scale,
                       weight_decay=common.weight_decay,
                       fira_gamma=common.limiter_gamma if fira else None,
                       sum_over_shards=(lambda t, p=first: all_reduce_sum(t, p, "fira_limiter"))
                       if is_sharded(first) else None)

    def _reference_step(self, group: dict[str, Any], params: list[Tensor],
                        store: MomentStore) -> None:
        """Matrix by matrix: project, the rule's reference step, Fira's residual, lift.
        W <- W (1 - lr wd) + lr (scale lift(U) - S)."""
        common, own, rule = self.options(group)
        lr = learning_rate(group)
        for p in params:
            proj, state = self.projector(p, group), self.state[p]
            G, P = as_matrix(p.grad), proj.basis()
            R = project_onto(G, P, proj.side)
            advance_steps([state])
            (U,) = rule.reference([Coordinates(R[None], [state], tuple(G.shape))], store, own,
                                  keep_input=True)
            D = lift(U[0], P, proj.side).mul_(common.scale)
            if common.residual == "fira":
                S, state["residual_norm"] = fira_residual(
                    G, R, U[0], lift(R, P, proj.side), proj.side, state.get("residual_norm"),
                    common.limiter_gamma)
                D = D - S
            p.mul_(1 - lr * common.weight_decay)
            add_to_matrix_(p, D, lr)

    def _refresh_if_due(self, group: dict[str, Any], p: Tensor, store: MomentStore) -> None:
        """A new basis from G every ``update_proj_gap`` steps (the first step included);
        then the state is made (first time) or the rule's state kept, reset or rotated."""
        state = self.state[p]
        if state.setdefault("step", 0) % group["update_proj_gap"]:
            return
        common, _, rule = self.options(group)
        proj, mode = self.projector(p, group), common.moments_on_refresh
        fresh = not any(k in state for k in (d.key for d in rule.STATE))
        old = proj.basis() if not fresh and mode.startswith("rotate") else None
        G = as_matrix(local(p.grad))
        fit = (lambda M: update_from_shards(proj, M, p)) if is_sharded(p) else proj.update
        try:
            fit(G)
        except FloatingPointError:
            if group["check_finite"]:
                raise
            G = G.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)     # see check_finite
            fit(G)
        for key, value in proj.state_dict().items():
            state[PROJ_PREFIX + key] = value
        if fresh:
            self.make_state(group, p, store)
        elif mode != "keep":
            self._carry_state(group, rule, state, store, mode, proj, old, G)

    def _carry_state(self, group: dict[str, Any], rule: Rule, state: dict[str, Any],
                     store: MomentStore, mode: str, proj: Projector, old: Tensor | None,
                     G: Tensor) -> None:
        """The rule's declared state after a refresh (``basis_change.py``)."""
        changing = [d for d in rule.STATE if d.basis_change is not None and d.key in state]
        if mode == "reset":
            for d in changing:
                store.write(state, d.key, store.read(state, d.key).zero_())
            state["step"] = 0
            return
        P = proj.basis()
        C = P.mT @ old.to(P.dtype)
        R = project_onto(G, P, proj.side) if mode == "rotate_fill" else None
        for d in changing:
            X = rotate(store.read(state, d.key), C, proj.side, d.basis_change)
            if R is not None and d.basis_change == "quadratic":
                X = fill_outside(X, C, proj.side, R, 1 - group["betas"][1] ** state["step"])
            store.write(state, d.key, X)


COMPOSITION.append(LowRankOptimizer)      # what create_optimizer("PROJECTOR+RULE") builds

__all__ = ["LowRankOptimizer"]
