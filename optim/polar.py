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
from typing import Any

import torch
from torch import Tensor

from memopt.projections.polar import iteration_dtype, orthogonalize_many

from .base import (MemoptOptimizer, as_matrix, check_betas, check_choice, check_nonnegative,
                   check_positive_int, moment_dtype)
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


def nuclear_norm(M: Tensor, U: Tensor) -> Tensor:
    """||M||_* = tr(H) = <M, U> for the polar decomposition M = U H (no SVD), in fp32 or wider."""
    dtype = torch.promote_types(torch.promote_types(M.dtype, U.dtype), torch.float32)
    return torch.sum(M.to(dtype) * U.to(dtype))


class OrthogonalizedOptimizer(MemoptOptimizer):
    r"""The engine of :class:`Muon` and :class:`PolarGrad`; they only change its defaults.

    Args:
        params: parameters or param groups (named parameters allowed).
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
        adamw_lr, adamw_betas, adamw_eps: AdamW for the other parameters (an LR scheduler
            scales ``adamw_lr`` by the same factor as ``lr``).
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
        self._store(group["state_bits"])

    def _store(self, bits: int) -> MomentStore:
        if bits not in self._stores:
            self._stores[bits] = MomentStore(
                bits, {"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False})
        return self._stores[bits]

    @staticmethod
    def schedule_factor(group: dict[str, Any]) -> float:
        """lr / initial_lr: what an LR scheduler has done to the group's lr so far, applied to
        ``adamw_lr`` too, so the AdamW parameters follow the same schedule."""
        initial = group.get("initial_lr")
        return group["lr"] / initial if initial else 1.0

    @staticmethod
    def is_orthogonalized(group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` gets the orthogonalized update under ``group``'s settings."""
        return not group["adamw"] and p.ndim >= 2

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        store = self._store(group["state_bits"])
        dense = [p for p in params if not self.is_orthogonalized(group, p)]
        matrices = [p for p in params if self.is_orthogonalized(group, p)]
        if dense:
            self._adamw(dense, store, lr=group["adamw_lr"] * self.schedule_factor(group),
                        betas=group["adamw_betas"], eps=group["adamw_eps"],
                        weight_decay=group["weight_decay"])
        if matrices:
            self._orthogonalized_step(group, matrices, store)

    def _orthogonalized_step(self, group: dict[str, Any], params: list[Tensor],
                             store: MomentStore) -> None:
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
            W.add_(direction.reshape_as(W), alpha=-step_size)

    @staticmethod
    def _polar_factors(inputs: list[Tensor], params: list[Tensor],
                       group: dict[str, Any]) -> list[Tensor]:
        """polar(M) of each input; for FSDP2 row shards, of the whole matrix, returned as the
        local rows: gathered on an owner rank (round-robin), orthogonalized in one batched
        call per shape there and scattered back, or all-gathered everywhere (redundant)."""
        method, steps = group["orthogonalizer"], group["ns_steps"]
        dtype = NS_DTYPES[group["ns_dtype"]]
        sharded = [i for i, p in enumerate(params) if is_sharded(p)]
        out = [None] * len(inputs)
        plain = [i for i in range(len(inputs)) if i not in set(sharded)]
        for i, U in zip(plain, orthogonalize_many([inputs[i] for i in plain], method, steps,
                                                  dtype)):
            out[i] = U
        if not sharded:
            return out
        if group["redundant"]:
            full = [all_gather_rows(inputs[i], params[i], "polar_gather") for i in sharded]
            for i, U in zip(sharded, orthogonalize_many(full, method, steps, dtype)):
                out[i] = local_rows(U, params[i])
            return out
        owned: dict[int, Tensor] = {}
        for k, i in enumerate(sharded):
            full = gather_rows(inputs[i], params[i], k % world_size(params[i]), "polar_gather")
            if full is not None:
                owned[i] = full
        results = dict(zip(owned, orthogonalize_many(list(owned.values()), method, steps,
                                                     dtype)))
        for k, i in enumerate(sharded):
            wire = inputs[i].dtype if method == "svd" else iteration_dtype(inputs[i], dtype)
            like = inputs[i].to(wire) if wire != inputs[i].dtype else inputs[i]
            sent = results[i].to(wire) if i in results else None
            out[i] = scatter_rows(sent, like, params[i], k % world_size(params[i]),
                                  "polar_scatter")
        return out

    @staticmethod
    def _nuclear_norms(inputs: list[Tensor], polars: list[Tensor],
                       params: list[Tensor]) -> list[Tensor]:
        """||M||_* = <M, polar(M)> per matrix; row shards add their parts in one all-reduce."""
        norms = [nuclear_norm(M, U) for M, U in zip(inputs, polars)]
        sharded = [i for i, p in enumerate(params) if is_sharded(p)]
        if sharded:
            parts = torch.stack([norms[i] for i in sharded])
            all_reduce_sum(parts, params[sharded[0]], "nuclear_norm")
            for i, value in zip(sharded, parts.unbind(0)):
                norms[i] = value
        return norms


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
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, ns_steps=ns_steps,
                         orthogonalizer=orthogonalizer, adjust_lr=adjust_lr,
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
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, ns_steps=ns_steps,
                         orthogonalizer=orthogonalizer, adjust_lr=adjust_lr,
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
