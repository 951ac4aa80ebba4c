"""The orthogonalized rule: the update along the polar factor U V^T of the momentum
(Muon: Jordan et al., 2024; PolarGrad: Lau, Long, Su, 2025), here and in ``muon.py``.

Muon and PolarGrad (``muon.py``) apply it to whole matrices; in a subspace (Trion: Modoranu
et al., 2025, "FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of
Large Language Models", arXiv 2505.17967; GaLore x orthogonalized) it runs on the coordinates
R (r x n or m x r) of each gradient:

    buf <- mu buf + (1 - mu) R;   u = (1 - mu) R + mu buf (Nesterov) or buf
    U = -adj(m, n) s polar(u)     (adj: Muon's shape factor of the full m x n matrix;
                                   s = 1, or PolarGrad's nuclear-norm scale of u)

The lifted update P polar(u) (left basis P, m x r) has the r singular values of polar(u),
all 1: it is orthogonal on the subspace, as Muon's is on the whole space. The momentum lives
in the subspace (r x n numbers, not m x n); at a basis refresh it is rotated into the new
basis (``basis_change="linear"``). The math below is the one every path runs: ``reference``
through :func:`orthogonalized_direction`, ``batched`` through the batched polar executor
(``executors_polar.py``) on the same sub-steps (momentum, polar factor, nuclear scale).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...projections import orthogonalize
from ...projections.polar import work_dtype

from .. import executors_polar as polar_batch
from ..distributed import all_reduce_sum, sharded_polar
from ..groups import (check_betas, check_choice, check_learning_rate, check_nonnegative,
                      check_positive_int, learning_rate)
from ..states import NUCLEAR_AVERAGE, MomentStore, StateDecl, StateSpec, nuclear_average
from .base import Coordinates, Rule

ORTHOGONALIZERS = ("newton_schulz", "polar_express", "svd")
ADJUST_LR = ("original", "match_rms_adamw", "none")
SCALINGS = ("none", "nuclear_norm", "relative_nuclear_norm")
RELATIVE = "relative_nuclear_norm"
VARIANTS = ("momentum_first", "polar_first")
NS_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: "relative_nuclear_norm": its average spans ~1000 steps, Adam's usual beta2 (ours, untuned).
NUCLEAR_AVERAGE_BETA = 0.999


def lr_adjustment(shape: tuple[int, int], adjust_lr: str) -> float:
    """Muon's per-shape factor for an (A x B) matrix: "original" max(1, A / B)^0.5 (Jordan
    et al.); "match_rms_adamw" 0.2 max(A, B)^0.5, AdamW's RMS (Liu et al., 2025)."""
    A, B = shape
    if adjust_lr == "original":
        return math.sqrt(max(1.0, A / B))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return 1.0


def momentum_direction(g: Tensor, buf: Tensor, mu: float, nesterov: bool) -> Tensor:
    """buf <- mu buf + (1 - mu) g (in place); return (1 - mu) g + mu buf (Nesterov) or buf."""
    buf.lerp_(g, 1 - mu)
    return g.lerp(buf, mu) if nesterov else buf


def nuclear_norm(M: Tensor, U: Tensor) -> Tensor:
    """||M||_* = tr(H) = <M, U> for the polar decomposition M = U H (no SVD), in fp32 or wider."""
    dtype = torch.promote_types(torch.promote_types(M.dtype, U.dtype), torch.float32)
    return torch.sum(M.to(dtype) * U.to(dtype))


def relative_nuclear_factor(nu: Tensor, average: Tensor, weight: float | Tensor) -> Tensor:
    """nu_t / abar_t, advancing ``average`` (abar, fp32) in place. a_t = beta a_{t-1} +
    (1 - beta) nu_t, abar_t = a_t / (1 - beta^t) is kept as abar_t = lerp(abar_{t-1}, nu_t,
    weight = (1 - beta) / (1 - beta^t)): abar_1 = nu_1, the first factor is exactly 1; the
    factor is 0 where abar is 0 (zero gradients so far)."""
    nu = nu.to(average.dtype)
    average.lerp_(nu, weight)
    return torch.where(average > 0, nu / average, 0.0)


def relative_factors(nu: Tensor, averages: tuple[Tensor, ...],
                     weights: tuple[float, ...]) -> Tensor:
    """:func:`relative_nuclear_factor` for a batch: nu (b,) against each matrix's fp32
    average, all advanced in place (one stacked update)."""
    stacked = torch.stack(averages)
    same = len(set(weights)) == 1            # the usual case: no host-to-device copy
    weight = weights[0] if same else torch.tensor(weights, dtype=stacked.dtype,
                                                  device=stacked.device)
    factors = relative_nuclear_factor(nu, stacked, weight)
    torch._foreach_copy_(list(averages), list(stacked.unbind()))
    return factors


def orthogonalized_direction(G: Tensor, buf: Tensor, polar: Callable[[Tensor], Tensor], *,
                             mu: float, nesterov: bool, variant: str, scaling: str,
                             total: Callable[[Tensor], Tensor] = lambda x: x,
                             average: Tensor | None = None, weight: float = 1.0) -> Tensor:
    """The direction D of one matrix (buf advanced in place); W <- W (1 - lr wd) - lr adj D.

        momentum-first (Muon, PolarGrad):  u = momentum(G);  U = polar(u);  D = U
        polar-first (PolarGrad):           U = polar(G);     D = momentum(U)
        scaling "nuclear_norm":            D <- nu D, nu = <x, U>, x the matrix U came from
        "relative_nuclear_norm" (ours):    D <- (nu / abar) D, abar its running average

    ``total`` sums nu over the row shards of a sharded matrix; ``average`` and ``weight``:
    see :func:`relative_nuclear_factor`."""
    if variant == "momentum_first":
        source = momentum_direction(G.to(buf.dtype), buf, mu, nesterov)
        U = D = polar(source)
    else:
        source, U = G, polar(G)
        D = momentum_direction(U.to(buf.dtype), buf, mu, nesterov)
    if scaling == RELATIVE:
        average = G.new_zeros((), dtype=torch.float32) if average is None else average
        return D * relative_nuclear_factor(total(nuclear_norm(source, U)), average, weight)
    return D * total(nuclear_norm(source, U)) if scaling == "nuclear_norm" else D


def check_momentum(mu: Any) -> None:
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu < 1:
        raise ValueError(f"Invalid momentum value: {mu!r} (must be in [0, 1))")


def adamw_rate(group: dict[str, Any]) -> float:
    """The AdamW rate of a group's other parameters: ``adamw_lr`` times lr / the lr the
    group had when it was added (``lr_at_start``), so they follow every change of the
    group's lr (an LR scheduler, a manual change; lr 0 freezes the whole group). A group
    added at lr 0 keeps ``adamw_lr`` once its lr is raised."""
    start = group.get("lr_at_start", group.get("initial_lr"))
    start = float(start) if isinstance(start, Tensor) else start
    if not start:
        return 0.0 if learning_rate(group) == 0 else group["adamw_lr"]
    return group["adamw_lr"] * learning_rate(group) / start


@dataclass(frozen=True)
class OrthogonalizedOptions:
    """The orthogonalized rule's options in a subspace (Muon's names and meanings;
    defaults: the Trion authors' momentum 0.95 without Nesterov, Muon's 5 Newton-Schulz
    steps and shape factor). ``adamw_*``: AdamW for the group's unprojected parameters,
    whose rate follows the group's lr (:func:`adamw_rate`)."""
    momentum: float = 0.95
    nesterov: bool = False
    ns_steps: int = 5
    orthogonalizer: str = "newton_schulz"
    adjust_lr: str = "original"
    scaling: str = "none"
    ns_dtype: str = "auto"
    adamw_lr: float = 3e-4
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8

    def __post_init__(self) -> None:
        check_momentum(self.momentum)
        check_positive_int("ns_steps", self.ns_steps)
        for key in ("adamw_lr", "adamw_eps"):
            check_nonnegative(key, getattr(self, key))
        check_betas("adamw_betas", self.adamw_betas)
        for key, choices in (("orthogonalizer", ORTHOGONALIZERS), ("adjust_lr", ADJUST_LR),
                             ("scaling", SCALINGS), ("ns_dtype", tuple(NS_DTYPES)),
                             ("nesterov", (True, False))):
            check_choice(key, getattr(self, key), choices)


@dataclass(frozen=True, kw_only=True)
class WholeMatrixOptions(OrthogonalizedOptions):
    """A Muon / PolarGrad group's options: the rule's, and what the whole-matrix optimizer
    adds (``muon.py``). Every field is given by the group (the constructors hold the
    defaults), so nothing here defaults silently."""
    lr: Any
    weight_decay: float
    variant: str
    state_bits: int
    redundant: bool
    adamw: bool
    check_finite: bool
    impl: str

    def __post_init__(self) -> None:
        super().__post_init__()
        check_learning_rate(self.lr)
        check_nonnegative("weight_decay value", self.weight_decay)
        for key, choices in (("variant", VARIANTS), ("state_bits", (8, 32)),
                             ("redundant", (True, False)), ("adamw", (True, False)),
                             ("check_finite", (True, False)), ("impl", ("fast", "reference"))):
            check_choice(key, getattr(self, key), choices)


class OrthogonalizedRule(Rule):
    """The polar factor of the subspace momentum (Trion, GaLore x orthogonalized)."""

    name = "orthogonalized"
    STATE = (StateDecl("momentum_buffer", "coordinates", quantizable=True, signed=True,
                       basis_change="linear"),
             StateDecl(NUCLEAR_AVERAGE, "scalar", dtype="float32"))
    Options = OrthogonalizedOptions
    lr_family = "muon"

    def state_specs(self, coordinates: tuple[int, ...], matrix: tuple[int, ...],
                    moment: torch.dtype, options: Any) -> list[StateSpec]:
        """The momentum; the nuclear norm's average only with "relative_nuclear_norm"."""
        return [d.spec(coordinates, matrix, moment) for d in self.STATE
                if d.key != NUCLEAR_AVERAGE or options.scaling == RELATIVE]

    def optional_state(self) -> frozenset[str]:
        return frozenset({NUCLEAR_AVERAGE})       # made on first use

    def adamw_settings(self, group: dict[str, Any], lr: float
                       ) -> tuple[float, tuple[float, float], float]:
        return adamw_rate(group), group["adamw_betas"], group["adamw_eps"]

    def reference(self, items: list[Coordinates], store: MomentStore,
                  options: OrthogonalizedOptions, keep_input: bool) -> list[Tensor]:
        """Matrix by matrix through :func:`orthogonalized_direction`."""
        o, out = options, []
        dtype = NS_DTYPES[o.ns_dtype]
        for item in items:
            U = torch.empty_like(item.R)
            factor = -lr_adjustment(item.shape, o.adjust_lr)
            for i, (R, state, Ui) in enumerate(zip(item.R.unbind(0), item.states, U.unbind(0))):
                average, weight = nuclear_average(state, R.device, NUCLEAR_AVERAGE_BETA) \
                    if o.scaling == RELATIVE else (None, 1.0)
                if item.sharded is None:
                    polar, total = (lambda M: orthogonalize(M, o.orthogonalizer, o.ns_steps,
                                                            dtype, check_finite=False)), None
                else:        # this rank's rows: the polar factor of the whole coordinates
                    p = item.sharded[i]
                    polar = (lambda M, p=p, i=i: sharded_polar(M, p, i, o.orthogonalizer,
                                                               o.ns_steps, dtype, False))
                    total = (lambda x, p=p: all_reduce_sum(x, p, "nuclear_norm"))
                buf = store.read(state, "momentum_buffer")
                D = orthogonalized_direction(R, buf, polar, mu=o.momentum, nesterov=o.nesterov,
                                             variant="momentum_first", scaling=o.scaling,
                                             total=total or (lambda x: x), average=average,
                                             weight=weight)
                store.write(state, "momentum_buffer", buf)
                Ui.copy_(D).mul_(factor)
            out.append(U)
        return out

    def batched(self, items: list[Coordinates], store: MomentStore,
                options: OrthogonalizedOptions, keep_input: bool) -> list[Tensor]:
        """Each same-shape batch: the momentum directions written into one buffer, the
        momenta advanced in one kernel, one batched polar iteration, the scales."""
        o, out = options, []
        for item in items:
            if item.sharded is not None:          # FSDP2 rows: gathered per matrix
                out += self.reference([item], store, options, keep_input)
                continue
            Rs = list(item.R.unbind(0))
            momenta = store.read_all(item.states, "momentum_buffer")
            filled = polar_batch.fill(Rs, momenta, momentum=o.momentum, nesterov=o.nesterov,
                                      polar_first=False, pad=o.orthogonalizer != "svd",
                                      dtype=work_dtype(o.orthogonalizer, item.R,
                                                       NS_DTYPES[o.ns_dtype]))
            polar_batch.advance_momenta(momenta, Rs, o.momentum)
            store.write_all(item.states, "momentum_buffer", momenta)
            filled = polar_batch.orthogonalize(filled, o.orthogonalizer, o.ns_steps, False)
            factor = torch.full((len(Rs),), -lr_adjustment(item.shape, o.adjust_lr),
                                dtype=torch.float32, device=item.R.device)
            if o.scaling != "none":
                nu = polar_batch.nuclear_norms(filled).float()
                if o.scaling == RELATIVE:
                    nu = relative_factors(nu, *zip(*(
                        nuclear_average(s, nu.device, NUCLEAR_AVERAGE_BETA)
                        for s in item.states)))
                factor = factor * nu
            U = torch.empty_like(item.R) if keep_input else item.R
            U.copy_(filled.X[..., :item.R.shape[-1]]).mul_(factor.to(U.dtype)[:, None, None])
            out.append(U)
        return out
