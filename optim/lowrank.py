"""GaLoreAdamW, DCTAdamW and FiraAdamW: one low-rank optimizer, configured three ways.

The methods differ by configuration, not by copies (optax's composition): a projector
(SVD: GaLore, DCT: Modoranu et al. 2025, polar) around Adam, plus Fira's residual. Their
math is in ``galore.py``, ``fira.py`` and ``dct.py``; this class owns the param groups,
projectors and state, and runs each group through the reference functions or the fast
executor (``executors_lowrank.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from memopt.projections import PROJECTORS, Projector, make_projector
from memopt.projections.base import compute_dtype, resolve_side

from . import executors_lowrank as fast
from .distributed import all_gather_rows, all_reduce_sum, is_sharded, local
from .engine import (PREPARE_BYTES, MemoptOptimizer, Prepared, check_betas, check_choice,
                     check_nonnegative, check_positive_int, eight_bit, moment_dtype)
from .executors import (CHUNK_BYTES, PROJECTION_PRECISIONS, add_to_matrix_, as_matrix, bases,
                        basis_dim, buckets, precision, projected_shape)
from .fira import fira_residual
from .galore import galore_adam, project_back
from .states import MomentStore, StateSpec, adam_specs

ProjectorSpec = Union[str, Callable[[int], Projector]]

#: What happens to the subspace moments when the basis is refreshed: "keep" leaves them
#: (galore-torch), "reset" zeros them and restarts Adam's bias correction, "rotate" carries
#: them into the new basis (m <- C m, v <- (C o C) v with C = B_new^T B_old).
REFRESH_MODES = ("keep", "reset", "rotate")
RESIDUALS = ("none", "fira")
PROJ_PREFIX = "proj_"


@dataclass
class _Plan:
    """A group's parameters with gradients: AdamW ones, projected ones, and (once every
    basis is fitted) the projected ones in same-shape batches, whole and cut to
    ``CHUNK_BYTES``; bytes of their work. Cached while the parameters stay the same."""
    key: tuple[Any, ...]
    dense: list[Tensor]
    projected: list[Tensor]
    batches: list[list[Tensor]] | None = None
    chunks: list[list[Tensor]] | None = None
    work_bytes: int = 0


@dataclass
class _Ready:
    """A step's projections made before the finiteness check, and one batch whose
    projection waits for the check's launch (its gradients are checked instead)."""
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
        params: parameters or param groups (named parameters allowed).
        lr: learning rate :math:`\eta` (default 1e-3).
        betas: Adam's (beta1, beta2) (default (0.9, 0.999)).
        eps: Adam's epsilon (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
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
        moments_on_refresh: "keep", "reset" or "rotate" (see ``REFRESH_MODES``).
        projection_precision: "auto" (TF32 on CUDA, full fp32 elsewhere), "highest", "high"
            (TF32) or "medium" (bf16 factors, fp32 sums and results) for the step's
            projections and lifts; bases are always built and kept in full fp32.
        adamw: True makes the whole group plain AdamW (default False).
        check_finite: raise FloatingPointError on a non-finite gradient before changing
            anything (default True; one device sync per step).
        impl: "fast" (batched executors, the default) or "reference" (the reference
            functions, one matrix at a time; FSDP2 shards always run fast).
        cuda_graph: accepted for old code and saved states; must be False (recorded steps
            were removed: they were slower than the eager step on an H200).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, projector: ProjectorSpec = "svd",
                 projector_options: dict[str, Any] | None = None, state_bits: int = 32,
                 residual: str = "none", limiter_gamma: float = 1.01,
                 moments_on_refresh: str = "keep", projection_precision: str = "auto",
                 adamw: bool = False, check_finite: bool = True, impl: str = "fast",
                 cuda_graph: bool = False) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
                        scale=scale, projector=projector, projector_options=projector_options,
                        state_bits=state_bits, residual=residual, limiter_gamma=limiter_gamma,
                        moments_on_refresh=moments_on_refresh,
                        projection_precision=projection_precision, adamw=adamw,
                        check_finite=check_finite, impl=impl, cuda_graph=cuda_graph)
        self._projectors: dict[Tensor, Projector] = {}
        self._plans: dict[int, _Plan] = {}
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            matrices = [p for p in group["params"] if p.ndim >= 2]
            if group["rank"] is not None and not group["adamw"] and matrices and \
                    not any(self.is_projected(group, p) for p in matrices):
                warnings.warn(f"{type(self).__name__}: no matrix of param group {i} is "
                              f"projected (rank {group['rank']} >= each one's smaller side), "
                              "so it trains as plain AdamW; lower the rank", stacklevel=2)

    # ------------------------------------------------------------ configuration
    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("learning rate", group["lr"])
        check_betas("betas", group["betas"])
        check_nonnegative("epsilon value", group["eps"])
        check_nonnegative("weight_decay value", group["weight_decay"])
        if group["rank"] is not None:
            check_positive_int("rank", group["rank"])
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        scale, gamma = group["scale"], group["limiter_gamma"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"Invalid scale: {scale!r} (must be > 0)")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 1:
            raise ValueError(f"Invalid limiter_gamma: {gamma!r} (must be >= 1)")
        spec, options = group["projector"], group["projector_options"]
        if not callable(spec):
            check_choice("projector", spec, PROJECTORS)
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"Invalid projector_options: {options!r} (must be a dict or None)")
        check_choice("state_bits", group["state_bits"], (8, 32))
        check_choice("residual", group["residual"], RESIDUALS)
        check_choice("moments_on_refresh", group["moments_on_refresh"], REFRESH_MODES)
        check_choice("projection_precision", group["projection_precision"],
                     PROJECTION_PRECISIONS)
        check_choice("adamw", group["adamw"], (True, False))
        if group.get("cuda_graph", False) is not False:
            raise ValueError(f"Invalid cuda_graph: {group['cuda_graph']!r}: recorded CUDA-graph "
                             "steps were removed (slower than the eager step); use False")
        if group["rank"] is not None and not callable(spec):
            make_projector(spec, group["rank"], **(options or {}))   # options are valid
        self._store(group["state_bits"])                              # bitsandbytes present

    @staticmethod
    def is_projected(group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` gets the low-rank update under ``group``'s settings."""
        return (not group["adamw"] and group["rank"] is not None and p.ndim >= 2
                and min(as_matrix(p).shape) > group["rank"])

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
            saved = {k[len(PROJ_PREFIX):]: v for k, v in self.state[p].items()
                     if k.startswith(PROJ_PREFIX)}
            if saved:
                proj.load_state_dict(saved)
            self._projectors[p] = proj
        return proj

    def state_specs(self, group: dict[str, Any], p: Tensor) -> list[StateSpec]:
        """The state of projected matrix ``p`` (its global shape): Adam's moments on the
        projected shape, Fira's residual norm, and the projector's tensors (basis or
        indices), each with the keys it has in ``state``."""
        proj = self.projector(p, group)
        shape = tuple(as_matrix(p).shape)
        side = resolve_side(proj.requested_side, shape)
        r = min(proj.rank, basis_dim(shape, side))
        dtype = compute_dtype(p.dtype)
        return self._moment_specs(group, projected_shape(shape, side, r), dtype) + [
            StateSpec(PROJ_PREFIX + k, size, dt)
            for k, (size, dt) in proj.state_shapes(basis_dim(shape, side), r, dtype).items()]

    @staticmethod
    def _moment_specs(group: dict[str, Any], shape: tuple[int, int],
                      dtype: torch.dtype) -> list[StateSpec]:
        """Adam's moments of the coordinates (``shape``) and Fira's residual norm (inf
        before the first step: no limit yet)."""
        specs = adam_specs(shape, dtype)
        if group["residual"] == "fira":
            specs.append(StateSpec("residual_norm", (), dtype, fill=math.inf))
        return specs

    def shared_state_bytes(self) -> int:
        """State shared between matrices: the O(d) tables DCT projectors generate their
        columns from, one per size, dtype and device."""
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
        """Bytes of p's projected gradient, its Adam update and a generated basis (upper
        bound: the rank on the larger side)."""
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
        if not group["check_finite"] or group["impl"] != "fast":
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
        """While the host waits for the check: project the deferred batch and (Fira) take
        the gradients' column (row) norms; neither changes anything."""
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
        return fast.project([local(p) for p in params], [local(p.grad) for p in params],
                            bases(projectors), projectors[0].side,
                            group["projection_precision"] == "medium",
                            group["residual"] == "fira")

    def _step_group(self, group: dict[str, Any], params: list[Tensor],
                    prepared: Prepared) -> None:
        store = self._store(group["state_bits"])
        plan = self._plan(group, params)
        if plan.dense:
            self._adamw(plan.dense, store, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"])
        if not plan.projected:
            return
        ready = prepared.data or _Ready()
        done = {id(p) for params_, _ in ready.batches for p in params_}
        rest = [p for p in plan.projected if id(p) not in done]
        with precision(group["projection_precision"], plan.projected[0].device):
            for p in rest:
                self._refresh_if_due(group, p, store)
            if group["impl"] == "reference":
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
                            beta1=beta1, beta2=beta2, eps=group["eps"], fira=fira)
        for (params, batch), U, ss in zip(batches, updates, states):
            first = params[0]
            fast.apply(batch, U, ss, lr=group["lr"], scale=group["scale"],
                       weight_decay=group["weight_decay"],
                       fira_gamma=group["limiter_gamma"] if fira else None,
                       sum_over_shards=(lambda t, p=first: all_reduce_sum(t, p, "fira_limiter"))
                       if is_sharded(first) else None)

    def _reference_step(self, group: dict[str, Any], params: list[Tensor],
                        store: MomentStore) -> None:
        """The update of ``galore.galore_adam`` (+ ``fira.fira_residual``), matrix by matrix."""
        beta1, beta2 = group["betas"]
        lr, fira = group["lr"], group["residual"] == "fira"
        for p in params:
            state, proj = self.state[p], self.projector(p, group)
            P, side, W, G = proj.basis(), proj.side, local(p), as_matrix(local(p.grad))
            m, v = store.read(state, "exp_avg"), store.read(state, "exp_avg_sq")
            state["step"] += 1
            R, N, D = galore_adam(G, P, side, m, v, state["step"], beta1=beta1, beta2=beta2,
                                  eps=group["eps"], scale=group["scale"])
            store.write(state, "exp_avg", m)
            store.write(state, "exp_avg_sq", v)
            if fira:
                S, state["residual_norm"] = fira_residual(
                    G, R, N, project_back(R, P, side), side, state.get("residual_norm"),
                    group["limiter_gamma"])
                D = D + S
            W.mul_(1 - lr * group["weight_decay"])
            add_to_matrix_(W, D, -lr)

    def _refresh_if_due(self, group: dict[str, Any], p: Tensor, store: MomentStore) -> None:
        """A new basis from G every ``update_proj_gap`` steps (the first step included);
        then the state is made (first time) or the moments kept, reset or rotated."""
        state = self.state[p]
        if not state:
            state["step"] = 0
        if state["step"] % group["update_proj_gap"]:
            return
        proj, mode = self.projector(p, group), group["moments_on_refresh"]
        old = proj.basis() if "exp_avg" in state and mode == "rotate" else None
        G = as_matrix(local(p.grad))
        if not is_sharded(p):
            proj.update(G)
        elif proj.supports_row_sharding and proj.requested_side == "right":
            proj.update(G, row_reduce=lambda t: all_reduce_sum(t, p, "basis_refresh"))
        else:
            proj.update(all_gather_rows(G, p, "basis_refresh"))
        for key, value in proj.state_dict().items():
            state[PROJ_PREFIX + key] = value
        if "exp_avg" not in state:
            shape = projected_shape(tuple(G.shape), proj.side, proj.effective_rank)
            store.make(state, self._moment_specs(group, shape, compute_dtype(p.dtype)),
                       G.device, (p.shape[0], local(p).shape[0]))
        elif mode == "reset":
            for key in ("exp_avg", "exp_avg_sq"):
                store.write(state, key, store.read(state, key).zero_())
            state["step"] = 0
        elif mode == "rotate":
            C = proj.basis().mT @ old.to(proj.basis().dtype)      # r x r
            for key, mix in (("exp_avg", C), ("exp_avg_sq", C.square())):
                moment = store.read(state, key)
                store.write(state, key, mix @ moment if proj.side == "left" else moment @ mix.mT)


class GaLoreAdamW(LowRankAdamW):
    """GaLore-Adam (Zhao et al., 2024): :class:`LowRankAdamW` with ``projector="svd"``.

    ``GaLoreAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, rank=128,
    update_proj_gap=200, scale=0.25, projector="svd", state_bits=32)``; every argument of
    :class:`LowRankAdamW` is accepted (its docstring has the algorithm).
    """


class DCTAdamW(GaLoreAdamW):
    """SVD-free GaLore (Modoranu et al., 2025): the basis is the r DCT-II vectors best aligned
    with G (``dct.dct_select``); only their indices are state. ``projector="dct"``."""

    def __init__(self, params: Any, *args: Any, projector: Any = "dct", **kwargs: Any) -> None:
        super().__init__(params, *args, projector=projector, **kwargs)


class FiraAdamW(GaLoreAdamW):
    """Fira (Chen et al., 2024): GaLore plus the limited residual S = phi (G - P R)
    (``fira.fira_residual``); ``residual="fira"``, ``limiter_gamma=1.01``."""

    def __init__(self, params: Any, *args: Any, limiter_gamma: float = 1.01,
                 residual: str = "fira", **kwargs: Any) -> None:
        super().__init__(params, *args, limiter_gamma=limiter_gamma, residual=residual, **kwargs)


GaLoreAdamW8bit = eight_bit(GaLoreAdamW)
DCTAdamW8bit = eight_bit(DCTAdamW)
FiraAdamW8bit = eight_bit(FiraAdamW)

__all__ = ["DCTAdamW", "DCTAdamW8bit", "FiraAdamW", "FiraAdamW8bit", "GaLoreAdamW",
           "GaLoreAdamW8bit", "LowRankAdamW", "REFRESH_MODES"]
