"""Muon and PolarGrad: updates along the polar factor U V^T of the (momentum) gradient.

Muon (Jordan et al., 2024): buf <- mu buf + (1 - mu) G; u = (1 - mu) G + mu buf (Nesterov) or
buf; W <- W (1 - lr wd) - lr adj(shape) polar(u). PolarGrad (Lau, Long, Su, 2025) scales the
polar factor by the nuclear norm of the matrix it came from, ||M||_* = <M, polar(M)>, so its
step grows with the gradient where Muon's does not. Matrices (conv kernels as
(out, in*k*k)) of the same shape are orthogonalized in one batched call; every other
parameter, and any group with ``adamw=True``, gets AdamW with the ``adamw_*`` settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memopt.projections.base import aligned_width, products_cast_into_fp32
from memopt.projections.polar import (MAX_BATCH_BYTES, PolarParts, factor_dtype,
                                     frobenius_norms, iterate_polar_, orthogonalize_many,
                                     polar_buffer, uses_gram_form, work_dtype)

from .compat import muon_arguments
from .base import (PREPARE_BYTES, MemoptOptimizer, Prepared, add_to_matrix_, as_matrix,
                   check_betas, check_choice, check_nonnegative, check_positive_int,
                   moment_dtype)
from .distributed import (all_gather_rows, all_reduce_sum, gather_rows, is_sharded, local,
                          local_rows, scatter_rows, world_size)
from .states import MomentStore

ORTHOGONALIZERS = ("newton_schulz", "polar_express", "svd")
ADJUST_LR = ("original", "match_rms_adamw", "none")
SCALINGS = ("none", "nuclear_norm")
VARIANTS = ("momentum_first", "polar_first")
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def matrix_shape(p: Tensor) -> tuple[int, int]:
    """The (out, in * k * k) shape a weight acts as (global shape for an FSDP2 DTensor)."""
    return int(p.shape[0]), int(p.numel() // p.shape[0]) if p.shape[0] else 0


def lr_adjustment(shape: tuple[int, int], adjust_lr: str) -> float:
    """Muon's per-shape factor for an (A x B) matrix.

    "original": max(1, A / B)^0.5 (Jordan et al.); "match_rms_adamw": 0.2 max(A, B)^0.5, which
    gives the update AdamW's RMS (Liu et al., 2025, "Muon is Scalable for LLM Training").
    """
    A, B = shape
    if adjust_lr == "original":
        return math.sqrt(max(1.0, A / B))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return 1.0


def momentum_direction(grad: Tensor, buf: Tensor, momentum: float, nesterov: bool) -> Tensor:
    """buf <- mu buf + (1 - mu) g (in place); return (1 - mu) g + mu buf (Nesterov) or buf."""
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


@dataclass
class _Route:
    """A param group's parameters with gradients: AdamW ones, same-shape batches of local
    matrices, FSDP2-sharded matrices; bytes of the batches' orthogonalizer inputs."""
    key: tuple[Any, ...]
    dense: list[Tensor]
    batches: list[list[Tensor]]
    sharded: list[Tensor]
    work_bytes: int


@dataclass
class _Filled:
    """One batch of same-shape matrices with their orthogonalizer inputs (unscaled, in a
    zero-padded (count, m, cols) buffer) and the inputs' Frobenius norms."""
    params: list[Tensor]
    buffer: Tensor | None
    norms: Tensor
    polar: PolarParts | None = None    # OrthogonalizedOptimizer._orthogonalize's result


def nuclear_norm(M: Tensor, U: Tensor) -> Tensor:
    """||M||_* = tr(H) = <M, U> for the polar decomposition M = U H (no SVD), in fp32 or wider."""
    dtype = torch.promote_types(torch.promote_types(M.dtype, U.dtype), torch.float32)
    return torch.sum(M.to(dtype) * U.to(dtype))


class OrthogonalizedOptimizer(MemoptOptimizer):
    r"""The engine of :class:`Muon` and :class:`PolarGrad`; they only change its defaults.

    Args:
        params: a model (split by :func:`~memopt.optim.param_groups`: embeddings, output
            head, norms and biases get AdamW), or parameters or param groups (named
            parameters allowed; every matrix in them is orthogonalized).
        lr: learning rate for matrices.
        momentum: :math:`\mu` of the EMA momentum buffer.
        nesterov: use (1 - mu) g + mu buf instead of buf.
        weight_decay: decoupled weight decay (matrices and AdamW parameters).
        ns_steps: iterations of the orthogonalizer (ignored by "svd").
        orthogonalizer: "newton_schulz", "polar_express" or "svd".
        adjust_lr: "original", "match_rms_adamw" or "none" (see :func:`lr_adjustment`).
        scaling: "none" (Muon) or "nuclear_norm" (PolarGrad).
        variant: "momentum_first" (orthogonalize the momentum) or "polar_first"
            (orthogonalize the gradient, then average the polar factors).
        adamw_lr, adamw_betas, adamw_eps: AdamW for the other parameters. They follow the
            group's lr: their rate is ``adamw_lr`` times lr / the group's lr when it was
            added, so an LR scheduler scales both alike and lr 0 freezes the whole group.
        state_bits: 32, or 8 for bitsandbytes blockwise 8-bit momentum and AdamW moments.
        ns_dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16" or "float32".
        redundant: FSDP2 only: all-gather each matrix and orthogonalize it on every rank
            instead of on one owner rank (gather + scatter); for small models.
        adamw: True sends the whole group to AdamW.
        check_finite: raise FloatingPointError on a non-finite gradient before any change.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float, nesterov: bool,
                 weight_decay: float, ns_steps: int, orthogonalizer: str, adjust_lr: str,
                 scaling: str, variant: str, adamw_lr: float,
                 adamw_betas: tuple[float, float], adamw_eps: float, state_bits: int,
                 ns_dtype: str = "auto", redundant: bool = False, adamw: bool = False,
                 check_finite: bool = True) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, orthogonalizer=orthogonalizer, adjust_lr=adjust_lr,
                        scaling=scaling, variant=variant, adamw_lr=adamw_lr,
                        adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        state_bits=state_bits, ns_dtype=ns_dtype, redundant=redundant,
                        adamw=adamw, check_finite=check_finite)
        self._stores: dict[int, MomentStore] = {}
        self._routes: dict[int, _Route] = {}
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("learning rate", group["lr"])
        mu = group["momentum"]
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < 1:
            raise ValueError(f"Invalid momentum value: {mu!r} (must be in [0, 1))")
        check_choice("nesterov", group["nesterov"], (True, False))
        check_nonnegative("weight_decay value", group["weight_decay"])
        check_positive_int("ns_steps", group["ns_steps"])
        check_choice("orthogonalizer", group["orthogonalizer"], ORTHOGONALIZERS)
        check_choice("adjust_lr", group["adjust_lr"], ADJUST_LR)
        check_choice("scaling", group["scaling"], SCALINGS)
        check_choice("variant", group["variant"], VARIANTS)
        check_nonnegative("adamw_lr", group["adamw_lr"])
        check_betas("adamw_betas", group["adamw_betas"])
        check_nonnegative("adamw_eps", group["adamw_eps"])
        check_choice("state_bits", group["state_bits"], (8, 32))
        check_choice("ns_dtype", group["ns_dtype"], NS_DTYPES)
        check_choice("adamw", group["adamw"], (True, False))
        check_choice("redundant", group["redundant"], (True, False))
        group.setdefault("lr_at_start", group["lr"])
        self._store(group["state_bits"])

    def _store(self, bits: int) -> MomentStore:
        if bits not in self._stores:
            self._stores[bits] = MomentStore(
                bits, {"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False})
        return self._stores[bits]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(muon_arguments(param_group))

    @staticmethod
    def adamw_lr(group: dict[str, Any]) -> float:
        """The AdamW rate of ``group``'s other parameters: ``adamw_lr`` times lr / the lr the
        group had when it was added, so they follow every change of the group's lr (an LR
        scheduler, a manual change; lr 0 freezes the whole group). A group added at lr 0
        keeps ``adamw_lr`` once its lr is raised."""
        start = group.get("lr_at_start", group.get("initial_lr"))
        if not start:
            return 0.0 if group["lr"] == 0 else group["adamw_lr"]
        return group["adamw_lr"] * group["lr"] / start

    @staticmethod
    def is_orthogonalized(group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` gets the orthogonalized update under ``group``'s settings."""
        return not group["adamw"] and p.ndim >= 2

    # ---------------------------------------------------------------------- step
    def _prepare_group(self, group: dict[str, Any], params: list[Tensor]) -> Prepared:
        """Write every local matrix's orthogonalizer input (the momentum direction, or G for
        polar-first) into its batch before the finiteness check, which then reads the
        inputs' norms instead of the gradients: with finite momentum an input is
        non-finite iff its gradient is. Only when all inputs fit in ``PREPARE_BYTES``."""
        if not group["check_finite"]:
            return Prepared()
        route = self._route(group, params)
        if not route.batches or route.work_bytes > PREPARE_BYTES:
            return Prepared()
        store = self._store(group["state_bits"])
        filled = []
        for batch in route.batches:
            if filled:       # orthogonalizing changes nothing: the device runs it meanwhile
                self._orthogonalize(group, filled[-1])
            filled.append(self._fill(group, batch, store))
        witnesses = {p: norm for f in filled for p, norm in zip(f.params, f.norms.split(1))}
        return Prepared(witnesses, filled)

    def _route(self, group: dict[str, Any], params: list[Tensor]) -> _Route:
        """AdamW parameters, batches of local matrices and FSDP2-sharded matrices of the
        group; cached while its parameters with gradients and settings stay the same."""
        key = (group["adamw"], group["orthogonalizer"], group["ns_dtype"], tuple(map(id, params)))
        route = self._routes.get(id(group))
        if route is None or route.key != key:
            dense, local_, sharded = [], [], []
            for p in params:
                if not self.is_orthogonalized(group, p):
                    dense.append(p)
                else:
                    (sharded if is_sharded(p) else local_).append(p)
            batches = self._batches(group, local_)
            route = _Route(key, dense, batches, sharded,     # inputs and polar factors
                           2 * sum(self._batch_bytes(group, b) for b in batches))
            self._routes[id(group)] = route
        return route

    def _launch_ahead(self, group: dict[str, Any], prepared: Prepared) -> None:
        """Orthogonalize the last prepared batch while the host waits for the check."""
        if prepared.data:
            self._orthogonalize(group, prepared.data[-1])

    def _orthogonalize(self, group: dict[str, Any], filled: _Filled) -> PolarParts:
        """The batch's :class:`PolarParts`: with the last product left out where it goes
        straight into the weights (:meth:`_last_product_into_weights`)."""
        if filled.polar is None:
            filled.polar = iterate_polar_(
                filled.buffer, group["orthogonalizer"], group["ns_steps"], filled.norms,
                last_factor=self._last_product_into_weights(group, filled))
            filled.buffer = None        # the scaled input, if needed, is in the parts
        return filled.polar

    @staticmethod
    def _last_product_into_weights(group: dict[str, Any], filled: _Filled) -> bool:
        """Muon's last Newton-Schulz product can add itself to each weight (W <- beta W +
        alpha M X in one matrix product, no polar factor written and read back) when the
        step is not rescaled by a norm of the result, the momentum comes first, W's rows are
        aligned, and W has the factors' dtype or is an fp32 target the GPU product can write
        into."""
        method = group["orthogonalizer"]
        if group["scaling"] != "none" or group["variant"] != "momentum_first" or \
                method == "svd":
            return False
        W = local(filled.params[0])
        n = as_matrix(W).shape[1]
        if not W.is_contiguous() or aligned_width(n, W) != n:
            return False          # products into unaligned rows are slow: add the factor instead
        dtype = factor_dtype(filled.buffer.dtype, uses_gram_form(
            tuple(filled.buffer.shape), method, group["ns_steps"]))
        return W.dtype == dtype or (W.dtype == torch.float32 and W.is_cuda
                                    and products_cast_into_fp32(W.device.type, dtype))

    def _step_group(self, group: dict[str, Any], params: list[Tensor],
                    prepared: Prepared) -> None:
        store = self._store(group["state_bits"])
        route = self._route(group, params)
        if route.dense:
            self._adamw(route.dense, store, lr=self.adamw_lr(group),
                        betas=group["adamw_betas"], eps=group["adamw_eps"],
                        weight_decay=group["weight_decay"])
        if prepared.data is not None:
            for filled in prepared.data:
                self._finish(group, filled, store)
        else:
            for batch in route.batches:
                self._finish(group, self._fill(group, batch, store), store)
        if route.sharded:
            self._sharded_step(group, route.sharded, store)

    @staticmethod
    def _work_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
        return work_dtype(group["orthogonalizer"], p, NS_DTYPES[group["ns_dtype"]])

    def _batch_bytes(self, group: dict[str, Any], batch: list[Tensor]) -> int:
        size = torch.empty((), dtype=self._work_dtype(group, batch[0])).element_size()
        return sum(p.numel() for p in batch) * size

    def _batches(self, group: dict[str, Any], params: list[Tensor]) -> list[list[Tensor]]:
        """Same-shape matrices (same dtype and device) in batches of at most
        ``MAX_BATCH_BYTES`` of orthogonalizer input (one matrix at least)."""
        by_shape: dict[tuple[Any, ...], list[Tensor]] = {}
        for p in params:
            by_shape.setdefault((matrix_shape(p), p.dtype, p.device), []).append(p)
        out = []
        for same in by_shape.values():
            per = max(1, MAX_BATCH_BYTES // max(1, self._batch_bytes(group, same[:1])))
            out += [same[k:k + per] for k in range(0, len(same), per)]
        return out

    def _fill(self, group: dict[str, Any], params: list[Tensor], store: MomentStore) -> _Filled:
        """The batch's inputs, unscaled, in the orthogonalizer's dtype, and their norms;
        changes nothing. The Nesterov direction (1 - mu) G + mu buf_new, with buf_new =
        mu buf + (1 - mu) G, is lerp(buf, G, 1 - mu^2), read before buf is advanced."""
        G0 = as_matrix(local(params[0].grad))
        method, n = group["orthogonalizer"], G0.shape[1]
        buffer = polar_buffer(len(params), tuple(G0.shape), self._work_dtype(group, params[0]),
                              G0.device, 1 if method == "svd" else None)
        mu = group["momentum"]
        weight = 1 - mu * mu if group["nesterov"] else 1 - mu
        polar_first = group["variant"] == "polar_first"
        for slot, p in zip(buffer[..., :n].unbind(0), params):
            G, state = as_matrix(local(p.grad)), self.state[p]
            if polar_first:
                slot.copy_(G)
            elif "momentum_buffer" in state:
                buf = store.read(state, "momentum_buffer")
                torch.lerp(buf, G if G.dtype == buf.dtype else G.to(buf.dtype), weight, out=slot)
            else:                                   # momentum starts at zero
                torch.mul(G, weight, out=slot)
        return _Filled(params, buffer, frobenius_norms(buffer))

    def _finish(self, group: dict[str, Any], filled: _Filled, store: MomentStore) -> None:
        """Advance the momentum, orthogonalize the batch and update its matrices."""
        params, mu = filled.params, group["momentum"]
        grads = [as_matrix(local(p.grad)) for p in params]
        for p, G in zip(params, grads):
            state = self.state[p]
            if not state:
                state["step"] = 0
                store.init(state, "momentum_buffer", G.shape, p.device, moment_dtype(p),
                           full_numel=p.numel())
            state["step"] += 1
        polar_first = group["variant"] == "polar_first"
        if not polar_first:
            self._advance_momentum(params, grads, store, mu)
        scaled, X, M, scales = self._orthogonalize(group, filled)
        lr, wd = group["lr"], group["weight_decay"]
        step_size = lr * lr_adjustment(matrix_shape(params[0]), group["adjust_lr"])
        weights = [local(p) for p in params]
        n = grads[0].shape[1]
        if M is not None:                        # W <- (1 - lr wd) W - lr adj (M X or X M)
            tall = X.shape[-2] > X.shape[-1]
            for W, Xi, Mi in zip(weights, X, M):
                left, right = (Xi[:, :n], Mi[:n, :n]) if tall else (Mi, Xi[:, :n])
                Wm = as_matrix(W)
                if Wm.dtype == Xi.dtype:
                    Wm.addmm_(left, right, beta=1 - lr * wd, alpha=-step_size)
                else:
                    torch.addmm(Wm, left, right, beta=1 - lr * wd, alpha=-step_size,
                                out_dtype=Wm.dtype, out=Wm)
            return
        U = X[..., :n]
        nuclear = None
        if group["scaling"] == "nuclear_norm":      # <M, polar(M)>, the buffer holding M scaled
            nuclear = (scaled * X).sum(dim=(1, 2), dtype=scales.dtype) / scales
        if wd != 0:
            torch._foreach_mul_(weights, 1 - lr * wd)
        for i, (p, W) in enumerate(zip(params, weights)):
            direction = U[i]
            if polar_first:
                state = self.state[p]
                buf = store.read(state, "momentum_buffer")
                direction = momentum_direction(direction.to(buf.dtype), buf, mu,
                                               group["nesterov"])
                store.write(state, "momentum_buffer", buf)
            add_to_matrix_(W, direction, -step_size,
                           None if nuclear is None else nuclear[i].to(W.dtype))

    def _advance_momentum(self, params: list[Tensor], grads: list[Tensor],
                          store: MomentStore, mu: float) -> None:
        """buf <- mu buf + (1 - mu) G for each matrix (one kernel for all fp32 buffers)."""
        bufs, gs = [], []
        for p, G in zip(params, grads):
            state = self.state[p]
            if state["momentum_buffer"].dtype == torch.uint8:
                buf = store.read(state, "momentum_buffer")
                store.write(state, "momentum_buffer", buf.lerp_(G.to(buf.dtype), 1 - mu))
            else:
                bufs.append(state["momentum_buffer"])
                gs.append(G.to(bufs[-1].dtype))
        if bufs:
            torch._foreach_lerp_(bufs, gs, 1 - mu)

    def _sharded_step(self, group: dict[str, Any], params: list[Tensor],
                      store: MomentStore) -> None:
        """FSDP2 row shards: momentum on the local rows, the polar factor of each whole
        matrix (gathered on an owner rank, or everywhere with ``redundant``), then the local
        rows' update."""
        mu, nesterov = group["momentum"], group["nesterov"]
        polar_first = group["variant"] == "polar_first"
        inputs: list[Tensor] = []
        for p in params:
            state = self.state[p]
            G = as_matrix(local(p.grad))
            if not state:
                state["step"] = 0
                store.init(state, "momentum_buffer", G.shape, p.device, moment_dtype(p),
                           full_numel=p.numel())
            state["step"] += 1
            if polar_first:
                inputs.append(G)
            else:
                buf = store.read(state, "momentum_buffer")
                inputs.append(momentum_direction(G.to(buf.dtype), buf, mu, nesterov))
                store.write(state, "momentum_buffer", buf)

        polars = self._polar_factors(inputs, params, group)
        norms = self._nuclear_norms(inputs, polars, params) \
            if group["scaling"] == "nuclear_norm" else None

        lr, wd = group["lr"], group["weight_decay"]
        for i, (p, U) in enumerate(zip(params, polars)):
            state, W = self.state[p], local(p)
            direction = U
            if polar_first:
                buf = store.read(state, "momentum_buffer")
                direction = momentum_direction(U.to(buf.dtype), buf, mu, nesterov)
                store.write(state, "momentum_buffer", buf)
            if norms is not None:
                direction = direction * norms[i]
            step_size = lr * lr_adjustment(matrix_shape(p), group["adjust_lr"])
            if wd != 0:
                W.mul_(1 - lr * wd)
            add_to_matrix_(W, direction, -step_size)

    @staticmethod
    def _polar_factors(inputs: list[Tensor], params: list[Tensor],
                       group: dict[str, Any]) -> list[Tensor]:
        """polar(M) of the whole matrix of each row shard, returned as the local rows:
        gathered on an owner rank (round-robin), orthogonalized in one batched call per shape
        there and scattered back, or all-gathered everywhere (redundant)."""
        method, steps = group["orthogonalizer"], group["ns_steps"]
        dtype = NS_DTYPES[group["ns_dtype"]]
        if group["redundant"]:
            full = [all_gather_rows(M, p, "polar_gather") for M, p in zip(inputs, params)]
            return [local_rows(U, p) for U, p in
                    zip(orthogonalize_many(full, method, steps, dtype), params)]
        owned: dict[int, Tensor] = {}
        for i, (M, p) in enumerate(zip(inputs, params)):
            full = gather_rows(M, p, i % world_size(p), "polar_gather")
            if full is not None:
                owned[i] = full
        results = dict(zip(owned, orthogonalize_many(list(owned.values()), method, steps,
                                                     dtype)))
        out = []
        for i, (M, p) in enumerate(zip(inputs, params)):
            wire = work_dtype(method, M, dtype)
            like = M.to(wire) if wire != M.dtype else M
            sent = results[i].to(wire) if i in results else None
            out.append(scatter_rows(sent, like, p, i % world_size(p), "polar_scatter"))
        return out

    @staticmethod
    def _nuclear_norms(inputs: list[Tensor], polars: list[Tensor],
                       params: list[Tensor]) -> list[Tensor]:
        """||M||_* = <M, polar(M)> per whole matrix: one all-reduce adds the row shards' parts."""
        parts = torch.stack([nuclear_norm(M, U) for M, U in zip(inputs, polars)])
        all_reduce_sum(parts, params[0], "nuclear_norm")
        return list(parts.unbind(0))


class Muon(OrthogonalizedOptimizer):
    """Muon for every matrix of a model, AdamW for everything else, in one optimizer.

    For a matrix it makes the update of ``torch.optim.Muon`` with equal settings; unlike it,
    it accepts ``model.parameters()`` and batches same-shape matrices.
    See :class:`OrthogonalizedOptimizer` for the arguments.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 5,
                 orthogonalizer: str = "newton_schulz", adjust_lr: str = "original",
                 adamw_lr: float = 3e-4, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, state_bits: int = 32, **kwargs: Any) -> None:
        kwargs = muon_arguments(kwargs)
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, ns_steps=ns_steps,
                         orthogonalizer=orthogonalizer,
                         adjust_lr=kwargs.pop("adjust_lr", adjust_lr),
                         scaling=kwargs.pop("scaling", "none"),
                         variant=kwargs.pop("variant", "momentum_first"), adamw_lr=adamw_lr,
                         adamw_betas=adamw_betas, adamw_eps=adamw_eps, state_bits=state_bits,
                         **kwargs)


class PolarGrad(OrthogonalizedOptimizer):
    """PolarGrad (Lau, Long, Su, 2025): W <- (1 - lr wd) W - lr ||M||_* polar(M).

    ``variant="momentum_first"`` (default) orthogonalizes the momentum M; "polar_first"
    orthogonalizes G and averages the polar factors, scaled by ||G||_*. The nuclear norm is
    <M, polar(M)>, exact with ``orthogonalizer="svd"`` and close with Polar Express (the
    default here, as the authors use it). The step grows with ||M||_*, so the learning rate
    depends on the gradients' scale: 0.1 was best of {0.01, 0.03, 0.1, 0.3} on our tiny
    LLaMA recipe; tune it for yours. See :class:`OrthogonalizedOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = False, weight_decay: float = 0.0, ns_steps: int = 5,
                 orthogonalizer: str = "polar_express", adjust_lr: str = "none",
                 variant: str = "momentum_first", adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 state_bits: int = 32, **kwargs: Any) -> None:
        kwargs = muon_arguments(kwargs)
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, ns_steps=ns_steps,
                         orthogonalizer=orthogonalizer,
                         adjust_lr=kwargs.pop("adjust_lr", adjust_lr),
                         scaling=kwargs.pop("scaling", "nuclear_norm"), variant=variant,
                         adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         state_bits=state_bits, **kwargs)


class Muon8bit(Muon):
    """:class:`Muon` with 8-bit blockwise momentum and AdamW moments (``state_bits=8``)."""

    def __init__(self, params: Iterable[Any], *args: Any, state_bits: int = 8, **kwargs: Any):
        super().__init__(params, *args, state_bits=state_bits, **kwargs)


class PolarGrad8bit(PolarGrad):
    """:class:`PolarGrad` with 8-bit blockwise momentum and AdamW moments (``state_bits=8``)."""

    def __init__(self, params: Iterable[Any], *args: Any, state_bits: int = 8, **kwargs: Any):
        super().__init__(params, *args, state_bits=state_bits, **kwargs)
