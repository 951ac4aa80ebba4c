"""Muon and PolarGrad: updates along the polar factor U V^T of the (momentum) gradient.

Muon (Jordan et al., 2024): buf <- mu buf + (1 - mu) G; u = (1 - mu) G + mu buf (Nesterov) or
buf; W <- W (1 - lr wd) - lr adj(shape) polar(u). PolarGrad (Lau, Long, Su, 2025) scales the
polar factor by the nuclear norm of the matrix it came from, ||M||_* = <M, polar(M)>, so its
step grows with the gradient where Muon's does not; "relative_nuclear_norm" (ours) scales it
by ||M||_* over its running average instead. The reference math is on this screen;
the fast executor (``executors_polar.py``) orthogonalizes same-shape matrices in one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..projections import orthogonalize
from ..projections.polar import work_dtype

from . import executors_polar as fast
from .compat import muon_arguments
from .distributed import all_reduce_sum, is_sharded, local, sharded_polar
from .engine import (PREPARE_BYTES, MemoptOptimizer, Prepared, advance_steps, arguments,
                     eight_bit, moment_dtype, refuse_unknown_arguments)
from .executors import MAX_BATCH_BYTES, add_to_matrix_, as_matrix, buckets, scale_
from .groups import learning_rate, warn_if_no_matrix_used
from .registry import register_optimizer
from .rules.orthogonalized import (NS_DTYPES, NUCLEAR_AVERAGE_BETA, RELATIVE, OrthogonalizedRule,
                                   WholeMatrixOptions, adamw_rate, lr_adjustment,
                                   momentum_direction, nuclear_norm, orthogonalized_direction,
                                   relative_factors, relative_nuclear_factor)
from .states import NUCLEAR_AVERAGE, MomentStore, StateSpec, nuclear_average

OPTION_NAMES = tuple(f.name for f in fields(WholeMatrixOptions))


@dataclass
class _Plan:
    """A group's parameters with gradients: AdamW ones, same-shape batches of local
    matrices, FSDP2-sharded matrices; bytes of the batches' inputs and factors."""
    key: tuple[Any, ...]
    dense: list[Tensor]
    batches: list[list[Tensor]]
    sharded: list[Tensor]
    work_bytes: int


class OrthogonalizedOptimizer(MemoptOptimizer):
    r"""The optimizer behind :class:`Muon` and :class:`PolarGrad`; they change its defaults.

    .. code-block:: text

        input: lr eta, momentum mu, nesterov, weight decay lambda, orthogonalizer, variant,
               scaling; AdamW (adamw_lr, adamw_betas, adamw_eps) for non-matrices
        for t = 1, 2, ...:
            G = grad of W (conv kernels as (out, in*k*k)); buf starts at 0
            D = orthogonalized_direction(G, buf)        (momentum, polar factor, scaling)
            W <- W (1 - eta lambda) - eta adj(shape) D

    Args:
        params: a model (split by :func:`~memopt.optim.param_groups`: embeddings, output
            head, norms and biases get AdamW), or parameters or param groups (named
            parameters allowed; every matrix in them is orthogonalized).
        lr: learning rate for matrices. momentum: :math:`\mu`. nesterov: (1 - mu) g + mu buf.
        weight_decay: decoupled weight decay (matrices and AdamW parameters).
        ns_steps: iterations of the orthogonalizer (ignored by "svd").
        orthogonalizer: "newton_schulz", "polar_express" or "svd".
        adjust_lr: "original", "match_rms_adamw" or "none" (see :func:`lr_adjustment`).
        scaling: "none" (Muon), "nuclear_norm" (PolarGrad: D = ||x||_* U) or "relative_nuclear_norm"
            (ours: D = (nu_t / abar_t) U, abar_t nu's bias-corrected average; 1 at step 1).
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
        impl: "fast" (batched executors, the default) or "reference" (one matrix at a time).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float, nesterov: bool,
                 weight_decay: float, ns_steps: int, orthogonalizer: str, adjust_lr: str,
                 scaling: str, variant: str, adamw_lr: float,
                 adamw_betas: tuple[float, float], adamw_eps: float, state_bits: int,
                 ns_dtype: str = "auto", redundant: bool = False, adamw: bool = False,
                 check_finite: bool = True, impl: str = "fast", **unknown: Any) -> None:
        refuse_unknown_arguments(type(self).__name__, unknown, arguments(locals()))
        defaults = {**arguments(locals()), "adamw_betas": tuple(adamw_betas)}
        self._plans: dict[int, _Plan] = {}
        super().__init__(params, defaults)
        warn_if_no_matrix_used(type(self).__name__, self.param_groups, self.is_orthogonalized,
                               lambda group, p: "a group has adamw=True", "orthogonalized")

    #: What a loaded state must agree on (``MemoptOptimizer.load_state_dict``).
    STRUCTURE = ("scaling", "variant", "state_bits", "adamw")
    INTERNAL_GROUP_KEYS = frozenset({"lr_at_start"})

    def optional_state(self, group: dict[str, Any]) -> frozenset[str]:
        return frozenset({NUCLEAR_AVERAGE})      # made on first use


    def options(self, group: dict[str, Any]) -> WholeMatrixOptions:
        """The group's options as one typed, validated object (ValueError naming a bad one),
        rebuilt when one of the group's values changes."""
        return self._typed(group, OPTION_NAMES, lambda: WholeMatrixOptions(
            **{name: group[name] for name in OPTION_NAMES}))

    def _check_group(self, group: dict[str, Any]) -> None:
        options = self.options(group)
        group.setdefault("lr_at_start", learning_rate(group))
        self._store(options.state_bits)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(muon_arguments(param_group))

    @classmethod
    def lr_family(cls) -> str:
        """Which learning rate of a recipe preset suits this optimizer."""
        return "polargrad" if issubclass(cls, PolarGrad) else "muon"

    @staticmethod
    def adamw_lr(group: dict[str, Any]) -> float:
        """The AdamW rate of ``group``'s other parameters (``rules.orthogonalized.adamw_rate``)."""
        return adamw_rate(group)

    def is_orthogonalized(self, group: dict[str, Any], p: Tensor) -> bool:
        """Whether ``p`` gets the orthogonalized update under ``group``'s settings."""
        o = self.options(group)
        return not o.adamw and p.ndim >= 2

    def applies_method(self, group: dict[str, Any], p: Tensor) -> bool:
        return self.is_orthogonalized(group, p)

    def state_specs(self, group: dict[str, Any], p: Tensor) -> list[StateSpec]:
        """The state of an orthogonalized matrix, as the orthogonalized rule declares it: its
        momentum buffer (matrix shape), and the fp32 average of its nuclear norm with
        ``scaling="relative_nuclear_norm"``."""
        o = self.options(group)
        shape = tuple(as_matrix(p).shape)
        return [d.spec(shape, shape, moment_dtype(p)) for d in OrthogonalizedRule.STATE
                if d.key != NUCLEAR_AVERAGE or o.scaling == RELATIVE]

    # ---------------------------------------------------------------------- step
    def _plan(self, group: dict[str, Any], params: list[Tensor]) -> _Plan:
        """AdamW parameters, batches of local matrices and FSDP2-sharded matrices."""
        o = self.options(group)
        key = (o.adamw, o.orthogonalizer, o.ns_dtype, tuple(map(id, params)))
        plan = self._plans.get(id(group))
        if plan is None or plan.key != key:
            dense, matrices, sharded = [], [], []
            for p in params:
                if not self.is_orthogonalized(group, p):
                    dense.append(p)
                else:
                    (sharded if is_sharded(p) else matrices).append(p)
            work = self._work_dtype(group, matrices[0]).itemsize if matrices else 0
            batches = buckets(matrices, lambda p: (tuple(as_matrix(p).shape), p.dtype, p.device),
                              lambda p: p.numel() * work, MAX_BATCH_BYTES)
            plan = self._plans[id(group)] = _Plan(key, dense, batches, sharded, 2 * work * sum(
                p.numel() for p in matrices))
        return plan

    def _work_dtype(self, group: dict[str, Any], p: Tensor) -> torch.dtype:
        o = self.options(group)
        return work_dtype(o.orthogonalizer, p, NS_DTYPES[o.ns_dtype])

    def _prepare_group(self, group: dict[str, Any], params: list[Tensor]) -> Prepared:
        """Fill every batch's orthogonalizer inputs before the finiteness check, which then
        reads their norms instead of the gradients (with finite momentum an input is
        non-finite iff its gradient is); each batch is orthogonalized while the next one is
        filled. Only on the fast path and when all inputs fit in ``PREPARE_BYTES``."""
        o = self.options(group)
        plan = self._plan(group, params)
        if not o.check_finite or o.impl != "fast" or not plan.batches \
                or plan.work_bytes > PREPARE_BYTES:
            return Prepared()
        filled: list[tuple[list[Tensor], fast.Filled]] = []
        for batch in plan.batches:
            if filled:       # orthogonalizing changes nothing: the device runs it meanwhile
                self._orthogonalize(group, *filled[-1])
            filled.append((batch, self._fill(group, batch)))
        witnesses = {p: norm for ps, f in filled for p, norm in zip(ps, f.norms.split(1))}
        return Prepared(witnesses, filled)

    def _launch_ahead(self, group: dict[str, Any], prepared: Prepared) -> None:
        """Orthogonalize the last prepared batch while the host waits for the check."""
        if prepared.data:
            self._orthogonalize(group, *prepared.data[-1])

    def _fill(self, group: dict[str, Any], params: list[Tensor]) -> fast.Filled:
        o = self.options(group)
        store = self._store(o.state_bits)
        states = [self.state.get(p, {}) for p in params]     # (no entry made before the check)
        momenta = store.read_all(states, "momentum_buffer") if all(states) else \
            [store.read(s, "momentum_buffer") if s else None for s in states]
        return fast.fill([p.grad for p in params], momenta, momentum=o.momentum,
                         nesterov=o.nesterov, polar_first=o.variant == "polar_first",
                         dtype=self._work_dtype(group, params[0]),
                         pad=o.orthogonalizer != "svd")

    def _orthogonalize(self, group: dict[str, Any], params: list[Tensor],
                       filled: fast.Filled) -> fast.Filled:
        """The batch's polar factors; Muon's last product is left to go into the weights."""
        o = self.options(group)
        last = o.scaling == "none" and o.variant == "momentum_first" and \
            filled.buffer is not None and fast.last_product_into_weights(
                params[0], tuple(filled.buffer.shape), filled.buffer.dtype,
                o.orthogonalizer, o.ns_steps)
        return fast.orthogonalize(filled, o.orthogonalizer, o.ns_steps, last)

    def adamw_settings(self, group: dict[str, Any]) -> tuple[float, tuple[float, float], float]:
        return self.adamw_lr(group), group["adamw_betas"], group["adamw_eps"]

    def _step_matrices(self, group: dict[str, Any], plan: _Plan, prepared: Prepared,
                       store: MomentStore) -> None:
        o = self.options(group)
        for batch in plan.batches:
            for p in batch:
                if not self.state[p]:
                    self.make_state(group, p, store)
        if o.impl == "reference":
            self._matrix_steps(group, [p for b in plan.batches for p in b], store)
        else:
            for batch, filled in prepared.data or [(b, self._fill(group, b)) for b in plan.batches]:
                self._fast_step(group, batch, filled, store)
        if plan.sharded:
            self._matrix_steps(group, plan.sharded, store)

    def _fast_step(self, group: dict[str, Any], params: list[Tensor], filled: fast.Filled,
                   store: MomentStore) -> None:
        """Advance the momentum, orthogonalize the batch and update its matrices."""
        o = self.options(group)
        grads = [as_matrix(p.grad) for p in params]          # batches hold no FSDP2 shards
        states = [self.state[p] for p in params]
        advance_steps(states)
        polar_first = o.variant == "polar_first"
        momenta = store.read_all(states, "momentum_buffer")
        if not polar_first:
            fast.advance_momenta(momenta, grads, o.momentum)
        filled = self._orthogonalize(group, params, filled)
        lr, n = learning_rate(group), grads[0].shape[1]
        step_size = lr * lr_adjustment(tuple(grads[0].shape), o.adjust_lr)
        if o.scaling == "none" and not polar_first:
            fast.write(params, filled, n, step_size=step_size, decay=1 - lr * o.weight_decay)
        else:
            nuclear = None if o.scaling == "none" else fast.nuclear_norms(filled)
            if o.scaling == RELATIVE:
                nuclear = relative_factors(nuclear, *zip(*(
                    nuclear_average(s, nuclear.device, NUCLEAR_AVERAGE_BETA) for s in states)))
            if o.weight_decay != 0:
                scale_(params, 1 - lr * o.weight_decay)
            for i, (W, U) in enumerate(zip(params, filled.X[..., :n])):
                D = momentum_direction(U.to(momenta[i].dtype), momenta[i], o.momentum,
                                       o.nesterov) if polar_first else U
                add_to_matrix_(W, D, -step_size, None if nuclear is None else nuclear[i].to(W.dtype))
        store.write_all(states, "momentum_buffer", momenta)

    def _matrix_steps(self, group: dict[str, Any], params: list[Tensor],
                      store: MomentStore) -> None:
        """:func:`orthogonalized_direction` matrix by matrix: the reference path, and the
        FSDP2 path (momentum on local rows, the polar factor of each whole matrix gathered
        on an owner rank or everywhere with ``redundant``, nuclear norms summed over ranks)."""
        o = self.options(group)
        lr, mu, wd = learning_rate(group), o.momentum, o.weight_decay
        for i, p in enumerate(params):
            state = self.state[p]
            if not state:
                self.make_state(group, p, store)
            advance_steps([state])
            average, weight = nuclear_average(state, p.device, NUCLEAR_AVERAGE_BETA) \
                if o.scaling == RELATIVE else (None, 1.0)
            buf = store.read(state, "momentum_buffer")
            D = orthogonalized_direction(
                as_matrix(local(p.grad)), buf, self._polar_of(group, p, i), mu=mu,
                nesterov=o.nesterov, variant=o.variant, scaling=o.scaling,
                total=(lambda x, p=p: all_reduce_sum(x, p, "nuclear_norm"))
                if is_sharded(p) else (lambda x: x), average=average, weight=weight)
            store.write(state, "momentum_buffer", buf)
            W = local(p)
            W.mul_(1 - lr * wd)
            add_to_matrix_(W, D.to(torch.promote_types(D.dtype, W.dtype)),
                           -lr * lr_adjustment((p.shape[0], p.numel() // p.shape[0]),
                                               o.adjust_lr))

    def _polar_of(self, group: dict[str, Any], p: Tensor, index: int
                  ) -> Callable[[Tensor], Tensor]:
        """M -> polar(M) for p's matrix (or the local rows of it, orthogonalized whole on
        rank ``index % world`` or, ``redundant``, everywhere)."""
        o = self.options(group)
        method, steps = o.orthogonalizer, o.ns_steps
        dtype = NS_DTYPES[o.ns_dtype]
        if not is_sharded(p):
            return lambda M: orthogonalize(M, method, steps, dtype, check_finite=False)
        return lambda M: sharded_polar(M, p, index, method, steps, dtype, o.redundant)


class Muon(OrthogonalizedOptimizer):
    """Muon for every matrix of a model, AdamW for everything else, in one optimizer.

    For a matrix it makes the update of ``torch.optim.Muon`` with equal settings; unlike it,
    it accepts ``model.parameters()`` and batches same-shape matrices. Weight decay 0.1 is
    torch.optim.Muon's default too (measured on our small LLaMA recipe: 0.034 bits/byte
    better than none, recipes/BENCHMARKS.md). See :class:`OrthogonalizedOptimizer` for the
    algorithm and the arguments.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.1, ns_steps: int = 5,
                 orthogonalizer: str = "newton_schulz", adjust_lr: str = "original",
                 adamw_lr: float = 3e-4, adamw_betas: tuple[float, float] = (0.9, 0.95),
                 adamw_eps: float = 1e-8, state_bits: int = 32, **kwargs: Any) -> None:
        kwargs = {"scaling": "none", "variant": "momentum_first", **muon_arguments(kwargs)}
        super().__init__(params, **arguments(locals()))


class PolarGrad(OrthogonalizedOptimizer):
    """PolarGrad (Lau, Long, Su, 2025): W <- (1 - lr wd) W - lr s(M) polar(M).

    The paper's scale s = ||M||_* = <M, polar(M)> (``scaling="nuclear_norm"``) follows the
    gradient's absolute size, so its best rate moves with model and data (0.3 on our small
    LLaMA recipe, 0.1 on the tiny one; at best 0.15 bits/byte behind Muon). The default is
    ours, "relative_nuclear_norm": s = ||M||_* / its bias-corrected running average, Muon's
    step times the gradient's relative size, with Muon's lr 0.02 and weight decay 0.1
    (recipes/BENCHMARKS.md; where gradients grow early, as in recipes/finetune_hf.py, a
    quarter of that rate was best: sweep it). ``variant``: "momentum_first" (default) or
    "polar_first" (average the polar factors of G, scaled by s(G)). Polar Express is the
    default orthogonalizer, as the authors use it. See :class:`OrthogonalizedOptimizer`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02,
                 momentum: float = 0.95, nesterov: bool = False, weight_decay: float = 0.1,
                 ns_steps: int = 5, orthogonalizer: str = "polar_express",
                 adjust_lr: str = "none", variant: str = "momentum_first",
                 scaling: str = RELATIVE, adamw_lr: float = 3e-4,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 state_bits: int = 32, **kwargs: Any) -> None:
        kwargs = muon_arguments(kwargs)
        super().__init__(params, **arguments(locals()))


Muon8bit, PolarGrad8bit = map(eight_bit, (Muon, PolarGrad))
Muon.EIGHT_BIT, PolarGrad.EIGHT_BIT = Muon8bit, PolarGrad8bit
register_optimizer("muon", Muon)
register_optimizer("polargrad", PolarGrad)

__all__ = ["NUCLEAR_AVERAGE_BETA", "Muon", "Muon8bit", "OrthogonalizedOptimizer", "PolarGrad",
           "PolarGrad8bit", "lr_adjustment", "momentum_direction", "nuclear_norm",
           "orthogonalized_direction", "relative_nuclear_factor"]
