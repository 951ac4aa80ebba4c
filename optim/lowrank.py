"""GaLoreAdamW, DCTAdamW and FiraAdamW: one low-rank optimizer, configured three ways.

The methods differ by configuration, not by copies (optax's composition): a projector
(SVD: GaLore, DCT: Modoranu et al. 2025, polar) around Adam, plus Fira's residual. Their
math is in ``galore.py``, ``fira.py`` and ``dct.py``; this class owns the param groups,
projectors and state, and runs each group through the reference functions or the fast
executor (``executors_lowrank.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from memopt.projections import PROJECTORS, Projector, make_projector
from memopt.projections.base import compute_dtype, resolve_side

from . import executors_lowrank as fast
from .compat import bitsandbytes_arguments, lowrank_group, names_a_rank
from .distributed import all_reduce_sum, is_sharded, local, update_from_shards
from .engine import (PREPARE_BYTES, MemoptOptimizer, Prepared, arguments, eight_bit,
                     refuse_unknown_arguments)
from .error_feedback import ERROR_FEEDBACK, check_error_feedback, corrected_gradients
from .executors import (CHUNK_BYTES, PROJECTION_PRECISIONS, as_matrix, bases, basis_dim,
                        buckets, precision, projected_shape)
from .galore import carry_moments, project
from .groups import (check_above, check_betas, check_choice, check_learning_rate,
                     check_nonnegative, check_positive_int, learning_rate,
                     warn_if_no_matrix_used, warn_small_matrices)
from .states import PROJ_PREFIX, MomentStore, StateSpec, lowrank_specs

ProjectorSpec = Union[str, Callable[[int], Projector]]

#: What happens to the subspace moments at a refresh (``galore.carry_moments``).
REFRESH_MODES = ("keep", "reset", "rotate", "rotate_fill")
RESIDUALS = ("none", "fira")


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


class LowRankAdamW(MemoptOptimizer):
    r"""AdamW in a low-rank subspace of each matrix gradient; plain AdamW for everything else.

    .. code-block:: text

        input: lr eta, betas, eps, weight decay lambda, rank r, gap T, scale alpha,
               projector, residual ("none" | "fira"), limiter gamma
        for t = 1, 2, ...:
            G = grad of W (conv kernels as (out, in*k*k))
            if (t - 1) % T == 0: P <- projector.update(G)             (refresh the basis)
            R, N, D = galore_adam(G, P, m, v, t)     (R = P^T G, N = Adam(R), D = alpha P N)
            if residual == "fira": D <- D + fira_residual(G, R, N, P R)   (S, limited)
            W <- W (1 - eta lambda) - eta D

    Args:
        params: a model (split by :func:`~memopt.optim.param_groups`), or parameters or
            param groups (named allowed; every matrix in them is projected). When a group
            names an integer ``rank``, groups that name none are AdamW (galore-torch's
            convention); ``rank=None`` opts its own group out. Unknown group keys raise.
        lr, betas, eps, weight_decay: AdamW's (defaults 1e-3, (0.9, 0.999), 1e-8, 0).
        lr: a float, or a one-element tensor as torch.optim allows.
        rank: subspace rank r; ``None`` turns projection off for the group (default 128).
            A parameter is projected when it has ndim >= 2 and its smaller side exceeds r.
        update_proj_gap: steps between basis refreshes T (default 200).
        scale: :math:`\alpha`, the factor on the projected-back update (default 0.25).
        projector: "svd", "dct", "polar", or a callable ``rank -> Projector`` (default "svd").
        projector_options: keyword arguments for the named projector (e.g.
            ``{"method": "randomized"}`` for SVD); ``None`` for its defaults.
        state_bits: 32 (fp32 moments) or 8 (bitsandbytes blockwise 8-bit moments).
        residual: "none" (GaLore) or "fira" (add Fira's scaled, norm-limited residual).
        limiter_gamma: Fira's norm-growth limit :math:`\gamma` (default 1.01).
        moments_on_refresh: "keep", "reset", "rotate" or "rotate_fill" (``galore.carry_moments``).
        error_feedback: "none" (default), "fp32" or "8bit": carry what the projection discards
            into the next gradient, in a buffer of the matrix's size (``error_feedback.py``).
        eps_before_bias_correction: False (torch's Adam: eps added to sqrt(v_hat)) or True
            (galore-torch's AdamW: eps added to sqrt(v) before the bias correction, i.e.
            eps / sqrt(1 - b2^t) on sqrt(v_hat); with its eps=1e-6 it reproduces its steps).
        projection_precision: "auto" (TF32 on CUDA, full fp32 elsewhere), "highest", "high"
            (TF32) or "medium" (bf16 factors, fp32 sums and results) for the step's
            projections and lifts; bases are always built and kept in full fp32.
        adamw: True makes the whole group plain AdamW (default False).
        check_finite: raise FloatingPointError on a non-finite gradient before changing
            anything (default True; one device sync per step). With False nothing is
            checked: a non-finite gradient goes into the weights and state, as in
            torch.optim, on every step (a basis refresh then builds its basis from G with
            its non-finite entries zeroed).
        impl: "fast" (batched executors, the default) or "reference" (the reference
            functions, one matrix at a time; FSDP2 shards always run fast).
        cuda_graph: must be False (recorded steps were removed; kept for saved states).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, projector: ProjectorSpec = "svd",
                 projector_options: dict[str, Any] | None = None, state_bits: int = 32,
                 residual: str = "none", limiter_gamma: float = 1.01,
                 moments_on_refresh: str = "keep", projection_precision: str = "auto",
                 error_feedback: str = "none", eps_before_bias_correction: bool = False,
                 adamw: bool = False, check_finite: bool = True,
                 impl: str = "fast", cuda_graph: bool = False, **unknown: Any) -> None:
        unknown = bitsandbytes_arguments(unknown)              # optim_bits -> state_bits
        state_bits = unknown.pop("state_bits", state_bits)
        refuse_unknown_arguments(type(self).__name__, unknown, arguments(locals()))
        defaults = {**arguments(locals()),
                    "betas": tuple(betas) if isinstance(betas, list) else betas}
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

    # ------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; galore-torch / fira keys are translated (:mod:`.compat`): a group
        that names no ``rank`` is plain AdamW when the constructor's groups named ranks."""
        super().add_param_group(lowrank_group(param_group, self._ranks_named))

    def _check_group(self, group: dict[str, Any]) -> None:
        check_learning_rate(group["lr"])
        check_betas("betas", group["betas"])
        check_nonnegative("epsilon value", group["eps"])
        check_nonnegative("weight_decay value", group["weight_decay"])
        if group["rank"] is not None:
            check_positive_int("rank", group["rank"])
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        check_above("scale", group["scale"], 0)
        check_above("limiter_gamma", group["limiter_gamma"], 1, inclusive=True)
        spec, options = group["projector"], group["projector_options"]
        if not callable(spec):
            check_choice("projector", spec, PROJECTORS)
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"Invalid projector_options: {options!r} (must be a dict or None)")
        for key, choices in (("state_bits", (8, 32)), ("residual", RESIDUALS),
                             ("moments_on_refresh", REFRESH_MODES), ("adamw", (True, False)),
                             ("eps_before_bias_correction", (True, False)),
                             ("projection_precision", PROJECTION_PRECISIONS)):
            check_choice(key, group[key], choices)
        check_error_feedback(group)
        if group.get("cuda_graph", False) is not False:
            raise ValueError(f"Invalid cuda_graph: {group['cuda_graph']!r}: recorded CUDA-graph "
                             "steps were removed (slower than the eager step); use False")
        if not callable(spec):          # the options are valid (whether or not a rank uses them)
            try:
                make_projector(spec, group["rank"] or 1, **(options or {}))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"Invalid projector_options {options!r} for projector "
                                 f"{spec!r}: {exc}") from exc
        self._store(8 if group["error_feedback"] == "8bit" else group["state_bits"])

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
        """The state of projected matrix ``p`` (its global shape): Adam's moments on the
        projected shape, Fira's residual norm, and the projector's tensors (basis or
        indices), each with the keys it has in ``state``."""
        proj, shape, side, d, r, dtype = self._geometry(group, p)
        bits = ERROR_FEEDBACK[group["error_feedback"]]
        return lowrank_specs(projected_shape(shape, side, r), dtype, group["residual"] == "fira",
                             proj.state_shapes(d, r, dtype), bits and (shape, bits))

    def estimated_shared_table(self, group: dict[str, Any], p: Tensor,
                               device: torch.device) -> tuple[Any, int] | None:
        """(key, bytes) of the state p's projector will share with others on ``device``."""
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
        gradients (a non-finite entry of G makes its whole column of P^T G non-finite).
        Only on the fast path and when they fit in ``PREPARE_BYTES``."""
        if not group["check_finite"] or group["impl"] != "fast" or \
                group["error_feedback"] != "none":          # the step projects G + E, not G
            return Prepared()
        plan = self._plan(group, params)
        if plan.batches is None or plan.work_bytes > PREPARE_BYTES:
            return Prepared()
        gap, state = group["update_proj_gap"], self.state
        kept = [[p for p in b if "exp_avg" in state[p] and state[p]["step"] % gap]
                for b in plan.batches]
        kept = [b for b in kept if b]
        if not kept:
            return Prepared()
        # the last batch is projected while the host waits for the check, which then reads
        # that batch's gradients: the device has work across the wait
        ready = _Ready(deferred=kept.pop() if len(kept) > 1 else [])
        with precision(group["projection_precision"], kept[0][0].device):
            ready.batches = [(b, self._project(group, b)) for b in kept]
        witnesses = {p: R for ps, b in ready.batches for p, R in zip(ps, b.R)}
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
                            == "medium", group["residual"] == "fira")

    def adamw_settings(self, group: dict[str, Any]) -> tuple[float, tuple[float, float], float]:
        return learning_rate(group), group["betas"], group["eps"]

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
        """Adam on the coordinates of all ``batches`` (one fused call), then each update."""
        states = [[self.state[p] for p in params] for params, _ in batches]
        beta1, beta2 = group["betas"]
        fira = group["residual"] == "fira"
        updates = fast.adam([b for _, b in batches], [s for ss in states for s in ss], store,
                            beta1=beta1, beta2=beta2, eps=group["eps"], fira=fira,
                            eps_before_bias_correction=group["eps_before_bias_correction"])
        for (params, batch), U, ss in zip(batches, updates, states):
            first = params[0]
            fast.apply(batch, U, ss, lr=learning_rate(group), scale=group["scale"],
                       weight_decay=group["weight_decay"],
                       fira_gamma=group["limiter_gamma"] if fira else None,
                       sum_over_shards=(lambda t, p=first: all_reduce_sum(t, p, "fira_limiter"))
                       if is_sharded(first) else None)

    def _reference_step(self, group: dict[str, Any], params: list[Tensor],
                        store: MomentStore) -> None:
        projectors = [self.projector(p, group) for p in params]
        fast.reference([local(p) for p in params], [local(p.grad) for p in params],
                       [q.basis() for q in projectors], [q.side for q in projectors],
                       [self.state[p] for p in params], store, lr=learning_rate(group),
                       betas=group["betas"], eps=group["eps"], scale=group["scale"],
                       weight_decay=group["weight_decay"],
                       fira_gamma=group["limiter_gamma"] if group["residual"] == "fira" else None,
                       eps_before_bias_correction=group["eps_before_bias_correction"])

    def _refresh_if_due(self, group: dict[str, Any], p: Tensor, store: MomentStore) -> None:
        """A new basis from G every ``update_proj_gap`` steps (the first step included);
        then the state is made (first time) or the moments kept, reset or rotated."""
        state = self.state[p]
        if state.setdefault("step", 0) % group["update_proj_gap"]:
            return
        proj, mode = self.projector(p, group), group["moments_on_refresh"]
        old = proj.basis() if "exp_avg" in state and mode.startswith("rotate") else None
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
        if "exp_avg" not in state:
            shape = projected_shape(tuple(G.shape), proj.side, proj.effective_rank)
            store.make(state, lowrank_specs(shape, compute_dtype(p.dtype),
                                            group["residual"] == "fira"),
                       G.device, (p.shape[0], local(p).shape[0]))
        elif mode != "keep":
            m, v = store.read(state, "exp_avg"), store.read(state, "exp_avg_sq")
            P, bias2 = proj.basis(), 1 - group["betas"][1] ** state["step"]
            R = project(G.to(P.dtype), P, proj.side) if mode == "rotate_fill" else None
            m, v = carry_moments(m, v, mode, P, old, proj.side, R, bias2)
            for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
                store.write(state, key, value)
            if mode == "reset":
                state["step"] = 0


class GaLoreAdamW(LowRankAdamW):
    """GaLore-Adam (Zhao et al., 2024): :class:`LowRankAdamW` (its docstring has the
    algorithm and the arguments) with the SVD projector."""


class DCTAdamW(GaLoreAdamW):
    """SVD-free GaLore (Modoranu et al., 2025): the r DCT-II vectors best aligned with G
    (``dct.dct_select``), only their indices kept. Its refresh is cheap: every 50 steps, moments
    carried by "rotate_fill" (0.04 bits/byte better than GaLore's 200 and "keep", BENCHMARKS.md)."""

    def __init__(self, params: Any, *args: Any, projector: Any = "dct", update_proj_gap: int = 50,
                 moments_on_refresh: str = "rotate_fill", **kwargs: Any) -> None:
        super().__init__(params, *args, projector=projector, update_proj_gap=update_proj_gap,
                         moments_on_refresh=moments_on_refresh, **kwargs)


class FiraAdamW(GaLoreAdamW):
    """Fira (Chen et al., 2024): GaLore plus the limited residual S = phi (G - P R)
    (``fira.fira_residual``); ``residual="fira"``, ``limiter_gamma=1.01``."""

    def __init__(self, params: Any, *args: Any, limiter_gamma: float = 1.01,
                 residual: str = "fira", **kwargs: Any) -> None:
        super().__init__(params, *args, limiter_gamma=limiter_gamma, residual=residual, **kwargs)


GaLoreAdamW8bit, DCTAdamW8bit, FiraAdamW8bit = map(eight_bit, (GaLoreAdamW, DCTAdamW, FiraAdamW))

__all__ = ["DCTAdamW", "DCTAdamW8bit", "FiraAdamW", "FiraAdamW8bit", "GaLoreAdamW",
           "GaLoreAdamW8bit", "LowRankAdamW", "REFRESH_MODES"]
