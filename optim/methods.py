"""The named low-rank methods: presets of :class:`~memopt.optim.lowrank.LowRankOptimizer`.

Each is a projector x rule x residual choice with its authors' (or our measured) defaults,
registered under its name (and an 8-bit variant) in ``registry.py``:

    GaLoreAdamW  = svd x adam                  DCTAdamW   = dct x adam
    FiraAdamW    = svd x adam + Fira           Trion      = dct x orthogonalized
    GaLoreMuon   = svd x orthogonalized
"""

from __future__ import annotations

from .engine import eight_bit
from .lowrank import LowRankOptimizer
from .registry import register_optimizer


class LowRankAdamW(LowRankOptimizer):
    """:class:`LowRankOptimizer` with the Adam rule (its name before the rules existed)."""


class GaLoreAdamW(LowRankAdamW):
    """GaLore-Adam (Zhao et al., 2024): svd x adam. :class:`LowRankOptimizer` has the
    algorithm and the arguments; paper defaults for LLaMA pretraining: rank 128-512, gap
    200, scale 0.25, lr 0.01."""


class DCTAdamW(GaLoreAdamW):
    """SVD-free GaLore (Modoranu et al., 2025): dct x adam, the r DCT-II vectors best aligned
    with G (``projections/dct.py``), only their indices kept. Its refresh is cheap: every 50
    steps, moments carried by "rotate_fill" (0.04 bits/byte better than GaLore's 200 and
    "keep", recipes/bench/BENCHMARKS.md). Its r columns keep less of G than GaLore's (0.40 of
    ||G||^2 against 0.95 on our small recipe), which shows on prose (0.047 nats behind GaLore);
    ``projector_options={"refine": 1}`` (one subspace iteration from the chosen columns) closes
    that gap at GaLore's state: a dense basis instead of r indices."""

    PRESET = {"projector": "dct", "update_proj_gap": 50, "moments_on_refresh": "rotate_fill"}


class FiraAdamW(GaLoreAdamW):
    """Fira (Chen et al., 2024): svd x adam + the limited residual S = phi (G - P R)
    (``fira.fira_residual``); ``residual="fira"``, ``limiter_gamma=1.01``."""

    PRESET = {"residual": "fira"}


class Trion(LowRankOptimizer):
    """Trion (Modoranu et al., 2025b, "FFT-based Dynamic Subspace Selection for Low-Rank
    Adaptive Optimization of Large Language Models", arXiv 2505.17967): dct x orthogonalized.

    Every step the r DCT-II columns best aligned with G are chosen (the authors' L1 score),
    the momentum, kept in the r-dimensional coordinates (r x n numbers, not m x n), is
    rotated into them (new columns start at 0), orthogonalized there by Newton-Schulz and
    lifted back with Muon's shape factor: W <- W (1 - lr wd) - lr adj(m, n) P polar(m).
    State per matrix: r indices and the r x n momentum. Defaults follow the authors' code
    (ISTA-DASLab-Optimizers, ``fft_low_rank/trion.py``): lr 0.02, momentum 0.95 without
    Nesterov, 5 Newton-Schulz steps, selection every step, scale 1. Unlike that code, whose
    momentum is a full m x n buffer with Dion's error feedback (the in-subspace part decays
    by mu, the rest is kept whole), ours keeps only the subspace momentum; that buffer is
    ``error_feedback="fp32"`` here, at the matrix's size. Options: :class:`LowRankOptimizer`
    and ``rules/orthogonalized.py``.
    """

    PRESET = {"projector": "dct", "projector_options": {"norm": "l1"}, "rule": "orthogonalized",
              "update_proj_gap": 1, "moments_on_refresh": "rotate", "scale": 1.0, "lr": 0.02}


class GaLoreMuon(LowRankOptimizer):
    """GaLore x orthogonalized: the SVD basis of GaLore (refreshed every 200 steps), the
    momentum kept in its coordinates (rotated into a new basis at a refresh) and updated
    along its polar factor, as Muon does on the whole matrix: W <- W (1 - lr wd) - lr
    adj(m, n) P polar(m). State per matrix: the basis (d x r) and the momentum (r x n).
    Defaults: Muon's lr 0.02, momentum 0.95 with Nesterov, scale 1."""

    PRESET = {"rule": "orthogonalized", "moments_on_refresh": "rotate", "scale": 1.0,
              "lr": 0.02, "nesterov": True}


for _name, _cls in (("galore", GaLoreAdamW), ("dct", DCTAdamW), ("fira", FiraAdamW),
                    ("trion", Trion), ("galoremuon", GaLoreMuon)):
    _cls.EIGHT_BIT = eight_bit(_cls)
    register_optimizer(_name, _cls)

GaLoreAdamW8bit, DCTAdamW8bit, FiraAdamW8bit, Trion8bit, GaLoreMuon8bit = (
    c.EIGHT_BIT for c in (GaLoreAdamW, DCTAdamW, FiraAdamW, Trion, GaLoreMuon))

__all__ = ["DCTAdamW", "DCTAdamW8bit", "FiraAdamW", "FiraAdamW8bit", "GaLoreAdamW",
           "GaLoreAdamW8bit", "GaLoreMuon", "GaLoreMuon8bit", "LowRankAdamW", "Trion",
           "Trion8bit"]
