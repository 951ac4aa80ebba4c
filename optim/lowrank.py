"""The one low-rank engine behind GaLoreAdamW, DCTAdamW and FiraAdamW.

For a matrix W with gradient G and an orthonormal basis B on one side (a projector):
refresh B (first step, then every ``update_proj_gap`` steps) -> R = project(G) -> Adam on R
(moments have R's shape: r x n or m x r instead of m x n) -> W <- W (1 - lr wd)
- lr (scale project_back(psi) + S). S is 0 for GaLore (Zhao et al., 2024) and Fira's scaled
residual (Chen et al., 2024) for Fira. The projector decides the method: SVD (GaLore), DCT
(Modoranu et al., 2025), polar.

On CUDA a step that refreshes no basis replays a recorded CUDA graph (``graphs.py``): the
same products, Adam and updates, launched with one call, the learning rate and step count
read from the device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from memopt.projections import PROJECTORS, Projector, lift, make_projector, project_onto
from memopt.projections.base import (aligned_width, bases, bf16_product,
                                     float32_matmul_precision, products_cast_into_fp32)
from memopt.projections.dct import dct_table_bytes

from . import graphs
from .compat import lowrank_group
from .base import (PREPARE_BYTES, MemoptOptimizer, Prepared, add_to_matrix_, as_matrix,
                   check_betas, check_choice, check_nonnegative, check_positive_int,
                   moment_dtype)
from .distributed import all_gather_rows, all_reduce_sum, is_sharded, local
from .graphs import DeviceScalars, RecordingFailed, StepGraph, fan_out, side_streams
from .states import MomentStore

ProjectorSpec = Union[str, Callable[[int], Projector]]

#: What happens to the subspace moments when the basis is refreshed:
#: "keep" leaves them as they are (galore-torch), "reset" zeros them and restarts Adam's bias
#: correction, "rotate" carries them into the new basis (m <- C m, v <- (C o C) v with
#: C = B_new^T B_old; for DCT bases C is the 0/1 matrix of indices that stayed).
REFRESH_MODES = ("keep", "reset", "rotate")
RESIDUALS = ("none", "fira")
#: Precision of the fp32 products G B and psi B^T of every step. "auto" is TF32 ("high") for
#: CUDA tensors, whose tensor cores make it ~8x faster, and full fp32 elsewhere; TF32 keeps
#: 10 mantissa bits, an error far below the gradient noise the projection already drops.
#: "medium" (torch's name for bf16 inside fp32 products) rounds both factors to bf16 (8
#: bits) and sums the products in fp32 into fp32 results, the weights included: on CUDA
#: tensor cores twice TF32's rate. Bases and moments stay fp32 either way.
PROJECTION_PRECISIONS = ("auto", "highest", "high", "medium")
PROJ_PREFIX = "proj_"
#: Bytes of projected gradients, their updates and generated bases alive at once in a step.
CHUNK_BYTES = 256 * 2**20
FIRA_EPS = 1e-8   # added to ||R_col|| in phi, as in Fira's released code


def fira_scales(R: Tensor, U: Tensor, sq_norms: Tensor, side: str,
                previous_norms: Tensor, gamma: float,
                sum_over_shards: Callable[[Tensor], Tensor] | None = None
                ) -> tuple[Tensor, Tensor]:
    """Fira's residual scale per column of G (left basis) or row (right basis), limited
    (Chen et al., 2024), for a batch of same-shape matrices.

    phi_j = ||u_j|| / (||R_j|| + eps), u being Adam's update for R = project(G): the norm
    gain Adam gives the low-rank part, lent to the residual S = phi (G - P R). Since P has
    orthonormal columns, ||G_j - P R_j||^2 = ||G_j||^2 - ||R_j||^2 (``sq_norms`` holds the
    ||G_j||^2), so ||S|| needs no pass over S. Limiter: if ||S|| > gamma ||S_prev||, S is
    scaled by gamma ||S_prev|| / ||S|| (``previous_norms`` is inf where there is none).
    R and U are (b, r, n) (left) or (b, m, r) (right). Returns (phi times that factor, (b, n)
    or (b, m); ||S|| after it, (b,)), without a host sync; ``sum_over_shards`` adds up the
    squared norms of row shards.
    """
    dim = 1 if side == "left" else 2
    R_norms = torch.linalg.vector_norm(R, dim=dim)
    phi = torch.linalg.vector_norm(U, dim=dim).div_(R_norms + FIRA_EPS)
    residual_sq = sq_norms.sub_(R_norms.square_()).clamp_(min=0)
    squared = (phi.square() * residual_sq).sum(dim=1)
    if sum_over_shards is not None:
        squared = sum_over_shards(squared)
    norms = squared.sqrt_()
    ratio = torch.clamp(norms / (previous_norms + 1e-30), min=gamma).div_(gamma)
    return phi.div_(ratio.unsqueeze(1)), norms.div_(ratio)


def add_lifted_(W: Tensor, L: Tensor, B: Tensor, side: str, alpha: float,
                beta: float = 1.0) -> None:
    """W <- beta W + alpha project_back(L): one matrix product that writes into W when W is
    contiguous and has B's dtype, or is fp32 with bf16 factors on a device whose products
    write fp32 (weight decay rides on beta for free); else the product is formed apart (in
    fp32 for bf16 factors) and added."""
    bf16 = B.dtype == torch.bfloat16 and W.dtype != torch.bfloat16
    if bf16 and L.dtype != torch.bfloat16:
        L = L.to(torch.bfloat16)
    first, second = (L, B.mT) if side == "right" else (B, L)
    if W.is_contiguous() and (W.dtype == B.dtype or bf16 and W.dtype == torch.float32
                              and products_cast_into_fp32(W.device.type)):
        Wm = as_matrix(W)
        if W.dtype == B.dtype:
            Wm.addmm_(first, second, beta=beta, alpha=alpha)
        else:
            torch.addmm(Wm, first, second, beta=beta, alpha=alpha, out_dtype=torch.float32,
                        out=Wm)
        return
    if beta != 1:
        W.mul_(beta)
    add_to_matrix_(W, bf16_product(first, second) if bf16 else lift(L, B, side), alpha)


_PLAIN = (Tensor, torch.nn.Parameter)
#: Plain matrices whose projection takes fewer flops than this are projected and lifted
#: with batched products over stacked copies (slices of at most ``CHUNK_BYTES``): such small
#: products cannot fill the GPU, and one call per matrix costs more host time than the
#: product takes (``python -m memopt.recipes.bench_step``). So are GPU matrices with
#: unaligned rows (LLaMA's 5461), through zero-padded copies: the aligned products run about
#: twice as fast. Others go one by one, straight from the gradients and into the weights.
BATCHED_PRODUCT_FLOPS = 6e9


def _slices(count: int, item_bytes: int) -> list[slice]:
    """Consecutive slices of ``count`` items of at most ``CHUNK_BYTES`` (one item at least)."""
    per = max(1, CHUNK_BYTES // max(1, item_bytes))
    return [slice(k, min(count, k + per)) for k in range(0, count, per)]


def _plain_matrices(params: list[Tensor], dtype: torch.dtype) -> bool:
    """Whether every parameter and gradient is a plain contiguous 2-D ``dtype`` tensor (no
    DTensor, no conv kernel), so products can read and write them directly."""
    first = params[0]              # a batch shares shape, ndim, dtype and sharding
    return (type(first) in _PLAIN and first.ndim == 2 and first.dtype == dtype
            and all(p.is_contiguous() and p.grad.dtype == dtype for p in params))


@dataclass
class _Scalars:
    """The per-step numbers of a group's update: Python numbers in an eager step; 0-dim
    float32 device tensors, rewritten before each replay, in a recorded one."""
    lr: float | Tensor
    alpha: float | Tensor                # lr * scale, on the projected-back update
    beta: float | Tensor | None          # 1 - lr * weight_decay (None: no decay)
    step: int | Tensor | None = None     # the moments' step count (None: each state's own)


@dataclass
class _Route:
    """A param group's parameters with gradients: plain AdamW ones, projected ones, and
    those in same-shape batches, whole and cut to ``CHUNK_BYTES`` (None until every basis
    is fitted); bytes of their work."""
    key: tuple[Any, ...]
    dense: list[Tensor]
    projected: list[Tensor]
    batches: list[list[Tensor]] | None
    chunks: list[list[Tensor]] | None
    work_bytes: int


@dataclass
class _Ready:
    """What a step prepared before its check: projected batches, and one batch whose
    projection waits for the check's launch (its gradients are checked instead)."""
    batches: list[_Projected]
    deferred: list[Tensor]


@dataclass
class _Projected:
    """A batch of same-shape projected matrices: their bases and the projected gradients
    (one (b, r, n) or (b, m, r) buffer)."""
    params: list[Tensor]
    bases: list[Tensor]
    side: str
    R: Tensor
    Rs: tuple[Tensor, ...]            # R's matrices, as views
    sq_norms: Tensor | None = None    # Fira: ||G_j||^2 per column (left) or row (right)
    U: Tensor | None = None           # Adam's updates (R itself, overwritten, for GaLore)
    Us: tuple[Tensor, ...] = ()       # U's matrices, as views
    stacked_bases: Tensor | None = None   # (b, d, r) when products are batched

    def norms_buffer(self) -> Tensor:
        """An empty (b, n) (left) or (b, m) (right) buffer for the gradients' norms."""
        G0 = as_matrix(local(self.params[0].grad))
        length = G0.shape[1] if self.side == "left" else G0.shape[0]
        return torch.empty(len(self.params), length, dtype=self.R.dtype, device=self.R.device)

    def gradient_sq_norms(self) -> Tensor:
        """(b, n) or (b, m) squared column (left) or row (right) norms of the gradients."""
        if self.sq_norms is None:
            out = self.norms_buffer()
            for p, row in zip(self.params, out):
                gradient_norms_(as_matrix(local(p.grad)), self.side, row)
            self.sq_norms = out.square_()
        return self.sq_norms


def gradient_norms_(G: Tensor, side: str, out: Tensor) -> None:
    """||G_j|| of each column (left basis) or row (right basis) of G, into ``out``."""
    torch.linalg.vector_norm(G, dim=0 if side == "left" else 1, dtype=out.dtype, out=out)


class LowRankAdamW(MemoptOptimizer):
    r"""AdamW in a low-rank subspace of each matrix gradient; plain AdamW for everything else.

    .. math::
        R_t = \mathrm{project}(G_t), \quad m_t, v_t = \mathrm{Adam}(R_t), \quad
        \psi_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon) \\
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,(\alpha\,\mathrm{project\_back}(\psi_t) + S_t)

    Args:
        params: a model (split by :func:`~memopt.optim.param_groups`: embeddings, output
            head, norms and biases get AdamW), or parameters or param groups (named
            parameters allowed; every matrix in them is projected). When some group names
            a ``rank``, groups that name none are plain AdamW (galore-torch's convention).
        lr: learning rate :math:`\eta` (default 1e-3).
        betas: Adam's (beta1, beta2) (default (0.9, 0.999)).
        eps: Adam's epsilon (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0).
        rank: subspace rank r; ``None`` turns projection off for the group (default 128).
            A parameter is projected when it has ndim >= 2 (conv kernels as (out, in*k*k))
            and its smaller dimension exceeds ``rank``; others get plain AdamW.
        update_proj_gap: steps between basis refreshes (default 200).
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
            projections and lifts (see ``PROJECTION_PRECISIONS``); bases are always built
            and kept in full fp32.
        adamw: True makes the whole group plain AdamW (default False).
        check_finite: raise FloatingPointError on a non-finite gradient before changing
            anything (default True; costs one device sync per step).
        cuda_graph: on CUDA, replay steps that refresh no basis from a recorded CUDA graph
            (default False). It saves the host's launch time, so it pays where the host,
            not the GPU, sets the pace; where the GPU does (bench_step on an H200), the
            eager step, whose batched products use the GPU better, is as fast or faster.
            The first such step after a refresh runs eagerly, the next one is recorded;
            the graph keeps the step's temporaries (projected gradients of at most
            ``CHUNK_BYTES`` of matrices at a time) allocated between steps. Per-parameter
            steps (:meth:`step_param`), 8-bit states and FSDP2 shards always run eagerly.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | None = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, projector: ProjectorSpec = "svd",
                 projector_options: dict[str, Any] | None = None, state_bits: int = 32,
                 residual: str = "none", limiter_gamma: float = 1.01,
                 moments_on_refresh: str = "keep", projection_precision: str = "auto",
                 adamw: bool = False, check_finite: bool = True, cuda_graph: bool = False) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, rank=rank, update_proj_gap=update_proj_gap,
                        scale=scale, projector=projector, projector_options=projector_options,
                        state_bits=state_bits, residual=residual, limiter_gamma=limiter_gamma,
                        moments_on_refresh=moments_on_refresh,
                        projection_precision=projection_precision, adamw=adamw,
                        check_finite=check_finite, cuda_graph=cuda_graph)
        self._projectors: dict[Tensor, Projector] = {}
        self._routes: dict[int, _Route] = {}
        self._stores: dict[int, MomentStore] = {}
        self._recorders: dict[int, StepGraph] = {}        # per param group
        self._scalar_buffers: dict[int, DeviceScalars] = {}   # per param group
        self._unrecordable: set[int] = set()              # groups whose recording failed
        self._eager_only = False
        # galore-torch's convention: when some group names a rank, the others are plain AdamW
        self._ranks_named = False
        if not isinstance(params, (torch.nn.Module, Tensor)):   # torch refuses a Tensor
            params = list(params)
            self._ranks_named = any(isinstance(g, dict) and "rank" in g for g in params)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            matrices = [p for p in group["params"] if p.ndim >= 2]
            if group["rank"] is not None and not group["adamw"] and matrices and \
                    not any(self.is_projected(group, p) for p in matrices):
                warnings.warn(f"{type(self).__name__}: no matrix of param group {i} is "
                              f"projected (rank {group['rank']} >= each one's smaller side), "
                              "so it trains as plain AdamW; lower the rank", stacklevel=2)

    # ------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; galore-torch / fira keys are translated (:mod:`.compat`): a group
        that names no ``rank`` is plain AdamW when the constructor's groups named ranks."""
        super().add_param_group(lowrank_group(param_group, self._ranks_named))

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("learning rate", group["lr"])
        check_betas("betas", group["betas"])
        check_nonnegative("epsilon value", group["eps"])
        check_nonnegative("weight_decay value", group["weight_decay"])
        if group["rank"] is not None:
            check_positive_int("rank", group["rank"])
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        scale = group["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"Invalid scale: {scale!r} (must be > 0)")
        spec = group["projector"]
        if not callable(spec):
            check_choice("projector", spec, PROJECTORS)
        options = group["projector_options"]
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"Invalid projector_options: {options!r} (must be a dict or None)")
        check_choice("state_bits", group["state_bits"], (8, 32))
        check_choice("residual", group["residual"], RESIDUALS)
        gamma = group["limiter_gamma"]
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 1:
            raise ValueError(f"Invalid limiter_gamma: {gamma!r} (must be >= 1)")
        check_choice("moments_on_refresh", group["moments_on_refresh"], REFRESH_MODES)
        check_choice("projection_precision", group["projection_precision"],
                     PROJECTION_PRECISIONS)
        check_choice("adamw", group["adamw"], (True, False))
        check_choice("cuda_graph", group["cuda_graph"], (True, False))
        if group["rank"] is not None and not callable(spec):
            make_projector(spec, group["rank"], **(options or {}))   # options are valid
        self._store(group["state_bits"])                              # bitsandbytes present

    def _store(self, bits: int) -> MomentStore:
        if bits not in self._stores:
            self._stores[bits] = MomentStore(bits, {"exp_avg": True, "exp_avg_sq": False})
        return self._stores[bits]

    @staticmethod
    def is_projected(group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` gets the low-rank update under ``group``'s settings."""
        return (not group["adamw"] and group["rank"] is not None and p.ndim >= 2
                and min(as_matrix(p).shape) > group["rank"])

    def _projector(self, p: Tensor, group: dict[str, Any]) -> Projector:
        """The parameter's projector. An FSDP2 parameter (rows sharded) gets a basis on the
        column side whatever "auto" would pick, so that projecting its rows is local."""
        proj = self._projectors.get(p)
        if proj is None:
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:       # a state saved before the option existed
            group.setdefault("cuda_graph", False)

    def _after_load(self) -> None:
        self._projectors.clear()
        self._routes.clear()
        self._recorders.clear()

    @staticmethod
    def _sum_over_shards(p: Tensor) -> Callable[[Tensor], Tensor] | None:
        if not is_sharded(p):
            return None
        return lambda t: all_reduce_sum(t, p, "fira_limiter")

    # ---------------------------------------------------------------------- step
    @torch.no_grad()
    def step_param(self, param: Tensor) -> None:
        """Update one parameter now, as ``step()`` would (always eagerly: a recorded graph
        covers a whole param group)."""
        self._eager_only = True
        try:
            super().step_param(param)
        finally:
            self._eager_only = False

    def _prepare_group(self, group: dict[str, Any], params: list[Tensor]) -> Prepared:
        """A step that can be recorded prepares nothing (its gradients are checked, and its
        whole update is one graph). Otherwise: project the gradients of the matrices that
        keep their basis this step, before the finiteness check, so that the check reads the
        projections instead of the gradients: a non-finite entry of G makes its whole column
        of B^T G (row of G B) non-finite. Only when they fit in ``PREPARE_BYTES``; matrices
        whose basis is refreshed this step are checked on G."""
        recorded = self._recorded_route(group, params)
        if recorded is not None:
            return Prepared(data=recorded)
        if not group["check_finite"]:
            return Prepared()
        route = self._route(group, params)
        if route.batches is None or route.work_bytes > PREPARE_BYTES:
            return Prepared()
        gap, state = group["update_proj_gap"], self.state
        batches = [[p for p in b if "exp_avg" in state[p] and state[p]["step"] % gap]
                   for b in route.batches]
        batches = [b for b in batches if b]
        if not batches:
            return Prepared()
        # the last batch is projected while the host waits for the check, which then reads
        # that batch's gradients: the device has work across the wait
        deferred = batches.pop() if len(batches) > 1 else []
        with self._precision(group, batches[0][0]):
            projected = [self._project(group, batch) for batch in batches]
        witnesses = {p: R for b in projected for p, R in zip(b.params, b.Rs)}
        return Prepared(witnesses, _Ready(projected, deferred))

    def _route(self, group: dict[str, Any], params: list[Tensor]) -> _Route:
        """Which of ``params`` are projected, and their same-shape batches once every basis
        is fitted; cached while the group's parameters with gradients stay the same."""
        key = (group["rank"], group["adamw"], tuple(map(id, params)))
        route = self._routes.get(id(group))
        if route is not None and route.key == key and route.batches is not None:
            return route
        dense, projected = [], []
        for p in params:
            (projected if self.is_projected(group, p) else dense).append(p)
        fitted = all(self._projector(p, group).shape is not None for p in projected)
        route = _Route(key, dense, projected,
                       self._batches(group, projected, limit=None) if fitted else None,
                       self._batches(group, projected) if fitted else None,
                       sum(self._work_bytes(group, p) for p in projected))
        self._routes[id(group)] = route
        return route

    def _launch_ahead(self, group: dict[str, Any], prepared: Prepared) -> None:
        """While the host waits for the check: project the deferred batch and (Fira) take
        the gradients' column (row) norms; neither changes anything."""
        ready = prepared.data
        if not isinstance(ready, _Ready):
            return
        if ready.deferred:
            with self._precision(group, ready.deferred[0]):
                ready.batches.append(self._project(group, ready.deferred))
            ready.deferred = []
        if group["residual"] == "fira":
            for batch in ready.batches:
                batch.gradient_sq_norms()

    def _step_group(self, group: dict[str, Any], params: list[Tensor],
                    prepared: Prepared) -> None:
        if isinstance(prepared.data, _Route):
            self._recorded_step(group, prepared.data)
            return
        store = self._store(group["state_bits"])
        route = self._route(group, params)
        dense, lowrank = route.dense, route.projected
        if dense:
            self._adamw(dense, store, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                        weight_decay=group["weight_decay"])
        if lowrank:
            with self._precision(group, lowrank[0]):
                self._lowrank_step(group, lowrank, store,
                                   prepared.data.batches if prepared.data else [])

    # ------------------------------------------------------------- recorded steps
    def _recorded_route(self, group: dict[str, Any], params: list[Tensor]) -> _Route | None:
        """The group's route when this step can replay a recorded graph: a device that can
        record, 32-bit states, every parameter's state made and on one step count (one for
        the projected matrices, one for the rest), no basis refresh due, no FSDP2 shards."""
        if (not group["cuda_graph"] or self._eager_only or group["adamw"] or not params
                or group["state_bits"] != 32 or id(group) in self._unrecordable):
            return None
        device = params[0].device
        if device.type not in graphs.CAPTURES:
            return None
        route = self._route(group, params)
        if route.chunks is None or not route.projected:
            return None
        for p in params:
            if p.device != device or p.grad.device != device or is_sharded(p) \
                    or "exp_avg" not in self.state[p]:
                return None
        dense_steps = {self.state[p]["step"] for p in route.dense}
        lowrank_steps = {self.state[p]["step"] for p in route.projected}
        if len(dense_steps) > 1 or len(lowrank_steps) > 1:
            return None
        if next(iter(lowrank_steps)) % group["update_proj_gap"] == 0:
            return None                       # a refresh is due: SVDs do not record
        return route

    def _recorded_step(self, group: dict[str, Any], route: _Route) -> None:
        """The group's step through its :class:`StepGraph`: the host advances the step
        counts and writes lr, lr scale, 1 - lr wd and the step counts into a device
        buffer; the recorded work reads them there."""
        store = self._store(32)
        dense = [self.state[p] for p in route.dense]
        projected = [self.state[p] for p in route.projected]
        for state in dense + projected:
            state["step"] += 1
        device = route.projected[0].device
        lr, wd = group["lr"], group["weight_decay"]
        buffer = self._scalar_buffers.get(id(group))
        if buffer is None or buffer.values.device != device:
            buffer = self._scalar_buffers[id(group)] = DeviceScalars(5, device)
        values = buffer.write([lr, lr * group["scale"], 1 - lr * wd, projected[0]["step"],
                               dense[0]["step"] if dense else 0])
        scalars = _Scalars(values[0], values[1], values[2] if wd != 0 else None, values[3])
        beta1, beta2 = group["betas"]
        streams = side_streams(device)

        def work() -> None:
            with self._precision(group, route.projected[0]):
                if route.dense:
                    store.adamw_steps(dense, [local(p) for p in route.dense],
                                      [local(p.grad) for p in route.dense], lr=values[0],
                                      beta1=beta1, beta2=beta2, eps=group["eps"],
                                      weight_decay=wd, step=values[4])
                for chunk in route.chunks:     # one chunk's temporaries alive at a time
                    self._adam_and_apply(group, [self._project(group, chunk, direct=True,
                                                               streams=streams)],
                                         store, scalars, streams)

        recorder = self._recorders.get(id(group))
        if recorder is None:
            recorder = self._recorders[id(group)] = StepGraph(graphs.CAPTURES[device.type])
        try:
            recorder.run(self._recording_key(group, route), work)
        except RecordingFailed as exc:     # nothing ran: run it eagerly, and from now on
            self._unrecordable.add(id(group))
            self._recorders.pop(id(group), None)
            warnings.warn(f"{type(self).__name__}: could not record the step of a param "
                          f"group as a graph ({exc}); its steps run eagerly", stacklevel=4)
            work()

    def _recording_key(self, group: dict[str, Any], route: _Route) -> tuple[Any, ...]:
        """What a recorded step bakes in: the addresses of every parameter, gradient and
        state tensor it reads, and the hyperparameters it passes as numbers."""
        addresses = []
        for p in route.dense + route.projected:
            addresses += (local(p).data_ptr(), local(p.grad).data_ptr())
            addresses += [v.data_ptr() for v in self.state[p].values() if isinstance(v, Tensor)]
        numbers = tuple(group[k] for k in ("betas", "eps", "weight_decay", "scale",
                                           "limiter_gamma", "residual", "projection_precision"))
        return (route.key, tuple(map(len, route.chunks)), numbers, graphs.SIDE_STREAMS,
                tuple(addresses))

    @staticmethod
    def _precision(group: dict[str, Any], p: Tensor) -> Any:
        level = group["projection_precision"]
        if level in ("auto", "medium"):      # "medium" makes its own bf16 factors
            level = "high" if p.is_cuda else "highest"
        return float32_matmul_precision(level)

    def _work_bytes(self, group: dict[str, Any], p: Tensor) -> int:
        """Bytes of p's projected gradient, its Adam update and a generated basis (upper
        bound: the rank on the larger side)."""
        m, n = as_matrix(local(p)).shape
        r = min(group["rank"], m, n)
        return 3 * r * max(m, n) * (8 if p.dtype == torch.float64 else 4)

    def _batches(self, group: dict[str, Any], params: list[Tensor],
                 limit: int | None = CHUNK_BYTES) -> list[list[Tensor]]:
        """Matrices with fitted bases, grouped by shape, side, rank, dtype and device, each
        group cut into batches of at most ``limit`` work bytes (one matrix at least)."""
        same: dict[tuple[Any, ...], list[Tensor]] = {}
        for p in params:
            proj = self._projector(p, group)
            key = (tuple(as_matrix(local(p)).shape), p.ndim, proj.side, proj.effective_rank,
                   p.dtype, p.device, is_sharded(p))
            same.setdefault(key, []).append(p)
        out = []
        for members in same.values():
            per = len(members) if limit is None else \
                max(1, limit // max(1, self._work_bytes(group, members[0])))
            out += [members[k:k + per] for k in range(0, len(members), per)]
        return out

    def _project(self, group: dict[str, Any], params: list[Tensor], direct: bool = False,
                 streams: list[Any] | None = None) -> _Projected:
        """Bases (generated together; in bf16 for "medium") and projected gradients of one
        batch; ``direct`` projects each gradient where it lies (no stacked or padded
        copies), spread over ``streams``."""
        projectors = [self._projector(p, group) for p in params]
        Bs = bases(projectors)
        side = projectors[0].side
        G0 = as_matrix(local(params[0].grad))
        r = projectors[0].effective_rank
        shape = (r, G0.shape[1]) if side == "left" else (G0.shape[0], r)
        R = torch.empty((len(params), *shape), dtype=Bs[0].dtype, device=G0.device)
        Rs = R.unbind(0)
        plain = _plain_matrices(params, Bs[0].dtype)
        bf16_bases = None
        if group["projection_precision"] == "medium" and Bs[0].dtype == torch.float32:
            bf16_bases = torch.stack(Bs).to(torch.bfloat16)   # products from bf16 factors
            Bs = list(bf16_bases.unbind(0))
        batch = _Projected(params, Bs, side, R, Rs)
        low = Bs[0].dtype                      # the products' factors: fp32, or bf16 ("medium")
        n, width = G0.shape[1], aligned_width(G0.shape[1], Bs[0])
        if plain and not direct and (width != n or len(params) > 1
                                     and 2 * G0.numel() * r < BATCHED_PRODUCT_FLOPS):
            Bst = torch.stack(Bs) if bf16_bases is None else bf16_bases     # (b, d, r)
            if side == "right" and width != n:                 # zero rows meet G's zero columns
                Bst = torch.nn.functional.pad(Bst, (0, 0, 0, width - n))
            batch.stacked_bases = Bst
            for rows in _slices(len(params), G0.shape[0] * width * G0.element_size()):
                grads = [p.grad for p in params[rows]]
                if width == n and low == G0.dtype:
                    G = torch.stack(grads)
                else:                    # copies in the factors' dtype, rows padded to align
                    G = G0.new_empty((len(grads), G0.shape[0], width), dtype=low)
                    G[..., n:].zero_()
                    for Gi, grad in zip(G.unbind(0), grads):
                        Gi[:, :n].copy_(grad)
                product = bf16_product if low == torch.bfloat16 else torch.bmm
                if side == "right":
                    product(G, Bst[rows], out=R[rows])
                elif width == n:
                    product(Bst[rows].mT, G, out=R[rows])
                else:
                    R[rows].copy_(product(Bst[rows].mT, G)[..., :n])
        else:        # Fira: each gradient's norms right after its projection (its G is hot)
            norms = batch.norms_buffer() if group["residual"] == "fira" else None

            def project(i: int) -> None:
                G = as_matrix(local(params[i].grad))
                project_onto(G, Bs[i], side, out=Rs[i])
                if norms is not None:
                    gradient_norms_(G, side, norms[i])
            fan_out(project, range(len(params)), streams or [])
            if norms is not None:
                batch.sq_norms = norms.square_()
        return batch

    def _refresh(self, p: Tensor, G: Tensor, group: dict[str, Any], store: MomentStore) -> None:
        """New basis from G; then keep, reset or rotate the subspace moments."""
        state, proj = self.state[p], self._projector(p, group)
        mode = group["moments_on_refresh"]
        has_moments = "exp_avg" in state
        old_basis = proj.basis() if has_moments and mode == "rotate" else None
        if not is_sharded(p):
            proj.update(G)
        elif proj.supports_row_sharding and proj.requested_side == "right":
            proj.update(G, row_reduce=lambda t: all_reduce_sum(t, p, "basis_refresh"))
        else:
            proj.update(all_gather_rows(G, p, "basis_refresh"))
        for key, value in proj.state_dict().items():
            state[PROJ_PREFIX + key] = value
        if not has_moments:
            return
        if mode == "reset":
            for key in ("exp_avg", "exp_avg_sq"):
                moment = store.read(state, key)
                store.write(state, key, moment.zero_())
            state["step"] = 0
        elif mode == "rotate":
            C = proj.basis().mT @ old_basis.to(proj.basis().dtype)      # r x r
            for key, mix in (("exp_avg", C), ("exp_avg_sq", C.square())):
                moment = store.read(state, key)
                store.write(state, key, mix @ moment if proj.side == "left" else moment @ mix.mT)

    def _lowrank_step(self, group: dict[str, Any], params: list[Tensor], store: MomentStore,
                      prepared: list[_Projected]) -> None:
        """Refresh the bases that are due, then project (unless prepared), Adam and apply in
        batches of same-shape matrices: at most ``CHUNK_BYTES`` of projected gradients,
        their updates and generated bases are alive at once (one matrix at least), so memory
        stays bounded for any model, while each batch's Adam is one fused kernel and its
        small reductions (Fira's) one kernel each."""
        done = {id(p) for batch in prepared for p in batch.params}
        rest = [p for p in params if id(p) not in done]
        for p in rest:
            state = self.state[p]
            if not state:
                state["step"] = 0
            if state["step"] % group["update_proj_gap"] == 0:
                self._refresh(p, as_matrix(local(p.grad)), group, store)
        if prepared:
            self._adam_and_apply(group, prepared, store)
        route = self._routes.get(id(group))
        chunks = route.chunks if route is not None and route.chunks is not None and \
            len(rest) == len(route.projected) else self._batches(group, rest)
        for params_of_batch in chunks:
            self._adam_and_apply(group, [self._project(group, params_of_batch)], store)

    def _adam_and_apply(self, group: dict[str, Any], batches: list[_Projected],
                        store: MomentStore, scalars: _Scalars | None = None,
                        streams: list[Any] | None = None) -> None:
        """Adam on the projected gradients of all ``batches`` (one fused call per step
        count), then each batch's update. Eagerly (``scalars`` None) this also makes missing
        moments and advances the step counts; a recorded step has done that on the host."""
        beta1, beta2 = group["betas"]
        fira = group["residual"] == "fira"
        states, grads, outs = [], [], []
        for batch in batches:
            batch.U = torch.empty_like(batch.R) if fira else batch.R   # GaLore: u replaces R
            batch.Us = batch.U.unbind(0) if fira else batch.Rs
            for p, R, U in zip(batch.params, batch.Rs, batch.Us):
                state = self.state[p]
                if scalars is None:
                    if "exp_avg" not in state:
                        for key in ("exp_avg", "exp_avg_sq"):
                            store.init(state, key, R.shape, R.device, moment_dtype(p),
                                       full_numel=R.numel() * p.shape[0]
                                       // max(1, local(p).shape[0]))
                    state["step"] += 1
                states.append(state)
                grads.append(R)
                outs.append(U)
        steps: dict[int | Tensor, list[int]] = {}
        for i, state in enumerate(states):
            steps.setdefault(state["step"] if scalars is None else scalars.step, []).append(i)
        for step, indices in steps.items():
            store.adam_updates([states[i] for i in indices], [grads[i] for i in indices],
                               beta1=beta1, beta2=beta2, eps=group["eps"], step=step,
                               in_place=not fira, out=[outs[i] for i in indices] if fira else None)
        if scalars is None:
            lr = group["lr"]
            scalars = _Scalars(lr, lr * group["scale"], 1 - lr * group["weight_decay"])
        for batch in batches:
            self._apply(group, batch, scalars, streams or [])

    def _apply(self, group: dict[str, Any], batch: _Projected, scalars: _Scalars,
               streams: list[Any]) -> None:
        """W <- W (1 - lr wd) + lr scale P u for each matrix of the batch, plus Fira's
        -lr S with S = phi (G - P R), applied as -lr phi G and +lr phi P R (folded into u).
        With device scalars (a recorded step), u is multiplied by lr scale and the decay is
        a pass of its own, since a matrix product takes its factors only as numbers."""
        scale = group["scale"]
        fira = group["residual"] == "fira"
        if fira:
            dim = 0 if batch.side == "left" else 1
            states = [self.state[p] for p in batch.params]
            previous = torch.stack([s["residual_norm"] if "residual_norm" in s else
                                    torch.full((), math.inf, device=batch.U.device)
                                    for s in states])
            phi, norms = fira_scales(batch.R, batch.U, batch.gradient_sq_norms(), batch.side,
                                     previous, group["limiter_gamma"],
                                     self._sum_over_shards(batch.params[0]))
            batch.U.addcmul_(batch.R, phi.unsqueeze(dim + 1), value=1 / scale)
            kept = [state.get("residual_norm") for state in states]
            if all(t is not None for t in kept):     # in place: a recorded step reads them
                torch._foreach_copy_(kept, list(norms.unbind(0)))
            else:
                for state, norm in zip(states, norms.unbind(0)):
                    state["residual_norm"] = norm.clone()
            if isinstance(scalars.lr, Tensor):          # the residual's factor, -lr phi
                phi, coefficient = phi.mul(scalars.lr).neg_(), 1.0
            else:
                coefficient = -scalars.lr
            factors = phi.unsqueeze(dim + 1).unbind(0)
        alpha, beta = scalars.alpha, scalars.beta
        if isinstance(alpha, Tensor):
            batch.U.mul_(alpha)
            if beta is not None:
                torch._foreach_mul_([local(p) for p in batch.params], beta)
            alpha, beta = 1.0, 1.0
        stacked = batch.stacked_bases is not None
        U, Us = batch.U, batch.Us
        if batch.bases[0].dtype == torch.bfloat16 and U.dtype != torch.bfloat16:
            U = U.to(torch.bfloat16)                     # "medium": one cast for the batch
            Us = U.unbind(0)
        if stacked:                                      # W <- beta W + alpha P u, batched
            self._add_lifted_batched(batch, U, alpha, beta)

        def update(i: int) -> None:     # one matrix: the lift, then Fira's W <- W - lr phi G
            W = local(batch.params[i])
            if not stacked:
                add_lifted_(W, Us[i], batch.bases[i], batch.side, alpha=alpha, beta=beta)
            if fira:
                add_to_matrix_(W, as_matrix(local(batch.params[i].grad)), alpha=coefficient,
                               factor=factors[i])
        if fira or not stacked:
            fan_out(update, range(len(batch.params)), streams)

    @staticmethod
    def _add_lifted_batched(batch: _Projected, U: Tensor, alpha: float, beta: float) -> None:
        """W <- beta W + alpha project_back(u) for a stacked batch (``U``: the updates, in
        the bases' dtype): one batched product per slice of the batch (on rows padded to
        ``aligned_width``; fp32 results from bf16 factors), then one multi-tensor add into
        the weights (one add per weight for padded rows)."""
        W0 = batch.params[0]
        n, width = W0.shape[1], aligned_width(W0.shape[1], batch.stacked_bases)
        product = bf16_product if U.dtype == torch.bfloat16 else torch.bmm
        if beta != 1:
            torch._foreach_mul_(batch.params, beta)
        for rows in _slices(len(batch.params), W0.shape[0] * width * W0.element_size()):
            Bst, Ur = batch.stacked_bases[rows], U[rows]
            if batch.side == "right":
                T = product(Ur, Bst.mT)
            else:
                T = product(Bst, Ur if width == n else torch.nn.functional.pad(Ur, (0, width - n)))
            if width == n:
                torch._foreach_add_(batch.params[rows], T.unbind(0), alpha=alpha)
            else:
                for W, Ti in zip(batch.params[rows], T.unbind(0)):
                    W.add_(Ti[:, :n], alpha=alpha)

    # --------------------------------------------------------------------- bytes
    def _shared_state_bytes(self) -> int:
        """The O(d) tables (one per size and device) that DCT projectors generate columns from."""
        sizes = set()
        for state in self.state.values():
            if PROJ_PREFIX + "indices" in state:
                side = state[PROJ_PREFIX + "side"]
                d = state[PROJ_PREFIX + ("cols" if side == 1 else "rows")]
                dtype = torch.float64 if state[PROJ_PREFIX + "float64"] else torch.float32
                sizes.add((d, state[PROJ_PREFIX + "indices"].device, dtype))
        return sum(dct_table_bytes(d, device, dtype) for d, device, dtype in sizes)


__all__ = ["LowRankAdamW", "REFRESH_MODES", "add_lifted_", "fira_scales"]
