"""The projector contract shared by every basis (SVD, DCT, polar).

A projector holds an orthonormal basis B (d x r) on one side of a gradient G (m x n):
right side (d = n): ``project(G) = G B`` and ``project_back(L) = L B^T``;
left side (d = m):  ``project(G) = B^T G`` and ``project_back(L) = B L``.
GaLore (Zhao et al., 2024) calls the default side choice, the smaller dimension, "std".
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

SIDES = ("left", "right")


def check_rank(rank: Any) -> int:
    """Return ``rank`` as an int, or raise ValueError for anything that is not an integer >= 1."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank


def check_one_of(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_count(name: str, value: Any) -> int:
    """Raise ValueError unless ``value`` is an integer >= 0 (iteration counts, oversampling)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_matrix(G: Tensor, name: str = "G") -> Tensor:
    """Raise if ``G`` is not a finite, real, dense 2-D floating-point tensor."""
    if not isinstance(G, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(G.shape)}")
    if G.is_sparse or G.is_complex() or not G.is_floating_point():
        raise ValueError(f"{name} must be a dense real floating-point matrix, got {G.dtype}"
                         f"{' (sparse)' if G.is_sparse else ''}")
    if not bool(torch.isfinite(G).all()):
        raise FloatingPointError(f"{name} has non-finite entries (inf or nan)")
    return G


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Bases are built and stored in fp32, or fp64 for fp64 input (bf16 / fp16 are too coarse)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_side(requested: str, shape: tuple[int, int]) -> str:
    """"auto" picks the smaller dimension of (m, n): m >= n -> "right", m < n -> "left"."""
    if requested != "auto":
        return requested
    m, n = shape
    return "right" if m >= n else "left"


@contextlib.contextmanager
def float32_matmul_precision(level: str) -> Iterator[None]:
    """Run fp32 matrix products at ``level`` ("highest" = full fp32, "high" = TF32 on
    CUDA tensor cores) inside the block, then restore the previous setting."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def full_fp32_matmul() -> contextlib.AbstractContextManager[None]:
    """Full fp32 matrix products (no TF32) inside the block: bases must be orthonormal to
    fp32 precision whatever the caller's global setting."""
    return float32_matmul_precision("highest")


def project_onto(G: Tensor, B: Tensor, side: str, out: Tensor | None = None) -> Tensor:
    """Low-rank coordinates of G in basis B: G B (right, m x r) or B^T G (left, r x n), in
    B's dtype (written into ``out`` if given)."""
    if G.dtype != B.dtype:
        G = G.to(B.dtype)
    return torch.mm(G, B, out=out) if side == "right" else torch.mm(B.mT, G, out=out)


def lift(L: Tensor, B: Tensor, side: str) -> Tensor:
    """Back to full size: L B^T (right) or B L (left); the adjoint of :func:`project_onto`."""
    if L.dtype != B.dtype:
        L = L.to(B.dtype)
    return torch.mm(L, B.mT) if side == "right" else torch.mm(B, L)


class Projector(ABC):
    """Base class: an orthonormal rank-r basis on one side of a 2-D gradient.

    Subclasses implement ``_fit(G, side, dim, r)`` (build the new basis from a validated
    G in the compute dtype; must not touch ``self`` until the result is ready) and
    ``basis()``. ``rank >= dim`` means the full space; ``rank < 1`` is a ValueError.

    Args:
        rank: number of basis vectors r (>= 1).
        side: "auto" (the smaller dimension), "left" or "right".
    """

    #: registry name ("svd", "dct", "polar"), set by subclasses
    name = "base"
    #: whether ``update`` accepts ``row_reduce`` (its statistics are sums over G's rows)
    supports_row_sharding = False

    def __init__(self, rank: int, side: str = "auto") -> None:
        self.rank = check_rank(rank)
        if side not in ("auto",) + SIDES:
            raise ValueError(f"side must be 'auto', 'left' or 'right', got {side!r}")
        self.requested_side = side
        self.side: str | None = None if side == "auto" else side
        self.shape: tuple[int, int] | None = None
        self.num_updates = 0

    # ----------------------------------------------------------------- public API
    def update(self, G: Tensor, row_reduce: Callable[[Tensor], Tensor] | None = None
               ) -> "Projector":
        """Build a new basis from G (m x n). Validates G before anything changes.

        ``row_reduce``: G holds some rows of a larger matrix (data-parallel shards of dim 0)
        and this function sums a tensor over the ranks; only projectors with
        ``supports_row_sharding`` accept it, for a right basis (whose statistics are sums
        over rows), and every rank then builds the same basis.
        """
        check_matrix(G)
        side = resolve_side(self.requested_side, tuple(G.shape))
        if row_reduce is not None and not (self.supports_row_sharding and side == "right"):
            raise ValueError(f"{type(self).__name__} cannot build a {side} basis from row "
                             "shards; gather the matrix first")
        dim = G.shape[1] if side == "right" else G.shape[0]
        with torch.no_grad():
            G = G.detach().to(compute_dtype(G.dtype))
            if row_reduce is None:
                self._fit(G, side, dim, min(self.rank, dim))
            else:
                self._fit(G, side, dim, min(self.rank, dim), row_reduce=row_reduce)
        self.side, self.shape = side, (int(G.shape[0]), int(G.shape[1]))
        self.num_updates += 1
        return self

    def project(self, G: Tensor) -> Tensor:
        """G B (right) or B^T G (left), in the basis dtype."""
        return project_onto(self._check_operand(G, "G", full=True), self.basis(), self.side)

    def project_back(self, L: Tensor) -> Tensor:
        """L B^T (right) or B L (left), in the basis dtype. No scale: that is the optimizer's."""
        self._check_operand(L, "L", full=False)
        return lift(L, self.basis(), self.side)

    @property
    def dim(self) -> int:
        """Length d of the basis vectors (n for a right basis, m for a left one)."""
        self._check_fitted()
        return self.shape[1] if self.side == "right" else self.shape[0]

    @property
    def effective_rank(self) -> int:
        """min(rank, d): the number of columns of ``basis()``."""
        return min(self.rank, self.dim)

    @property
    def orthonormal(self) -> bool:
        """Whether ``basis()`` is orthonormal to working precision, so that identities such
        as ||G - B B^T G||^2 = ||G||^2 - ||B^T G||^2 hold (False for a basis kept in INT8 /
        INT4 codes, which is only approximately orthonormal)."""
        return True

    @abstractmethod
    def basis(self) -> Tensor:
        """The orthonormal basis as a dense (d x r) tensor (approximately orthonormal where
        :attr:`orthonormal` is False)."""

    @abstractmethod
    def state_shapes(self, dim: int, r: int, dtype: torch.dtype
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each tensor of :meth:`state_dict` for a basis of ``r``
        vectors of length ``dim`` built in ``dtype`` (without building it)."""

    def shared_table(self, dim: int | None = None, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> tuple[Any, int] | None:
        """(key, bytes) of state this projector shares with others of the same key (DCT:
        the O(d) tables of its size), or None; for its own basis, or for one of length
        ``dim`` on ``device`` in ``dtype`` (an estimate before any update)."""
        return None

    @classmethod
    def basis_many(cls, projectors: Sequence["Projector"]) -> list[Tensor]:
        """``basis()`` of each projector of this class (overridden where they share work)."""
        return [proj.basis() for proj in projectors]

    def state_dict(self) -> dict[str, Any]:
        """Flat dict of tensors and plain numbers; loads with ``torch.load(weights_only=True)``."""
        self._check_fitted()
        return {"side": SIDES.index(self.side), "rows": self.shape[0], "cols": self.shape[1],
                "num_updates": self.num_updates, **self._basis_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors are moved to their saved device)."""
        side = SIDES[int(state["side"])]
        if self.requested_side != "auto" and side != self.requested_side:
            raise ValueError(f"state was saved for side={side!r} but this projector has "
                             f"side={self.requested_side!r}")
        self._load_basis_state(state)
        self.side, self.shape = side, (int(state["rows"]), int(state["cols"]))
        self.num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        where = f", side={self.side!r}, shape={self.shape}" if self.shape else ""
        return f"{type(self).__name__}(rank={self.rank}{where})"

    # ------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _fit(self, G: Tensor, side: str, dim: int, r: int) -> None:
        """Build the basis of ``r`` vectors of length ``dim`` from G (compute dtype)."""

    @abstractmethod
    def _basis_state(self) -> dict[str, Any]:
        """The subclass's part of :meth:`state_dict` (tensors and numbers)."""

    @abstractmethod
    def _load_basis_state(self, state: dict[str, Any]) -> None:
        """Restore the subclass's part of the state."""

    # ------------------------------------------------------------------- helpers
    def _check_fitted(self) -> None:
        if self.shape is None:
            raise RuntimeError(f"{type(self).__name__} has no basis yet: call update(G) first")

    def _check_operand(self, X: Tensor, name: str, full: bool) -> Tensor:
        self._check_fitted()
        if X.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(X.shape)}")
        m, n = self.shape
        r = self.effective_rank
        if full:
            expected = (m, n)
        else:
            expected = (m, r) if self.side == "right" else (r, n)
        if tuple(X.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(X.shape)}, expected {expected} for a "
                             f"{self.side} basis of rank {r} on a {m} x {n} matrix")
        return X


class StoredBasisProjector(Projector):
    """A projector that keeps its (d x r) basis, with the seed and draw count of its sketches
    (SVD and polar; DCT keeps only indices)."""

    def __init__(self, rank: int, side: str = "auto", seed: int = 0) -> None:
        super().__init__(rank, side)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.draws = 0
        self._basis: Tensor | None = None

    def basis(self) -> Tensor:
        self._check_fitted()
        return self._basis

    def state_shapes(self, dim: int, r: int, dtype: torch.dtype
                     ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"basis": ((dim, r), dtype)}

    def _basis_state(self) -> dict[str, Any]:
        return {"basis": self._basis, "seed": self.seed, "draws": self.draws}

    def _load_basis_state(self, state: dict[str, Any]) -> None:
        self._basis = state["basis"]
        self.seed, self.draws = int(state["seed"]), int(state["draws"])


def orthonormality_error(B: Tensor) -> float:
    """max |B^T B - I|, in float64: how far the columns of B are from orthonormal."""
    B64 = B.detach().to(torch.float64)
    eye = torch.eye(B64.shape[-1], dtype=torch.float64, device=B64.device)
    return float((B64.mT @ B64 - eye).abs().max())


def seeded_gaussian(shape: tuple[int, ...], seed: int, draw: int, device: torch.device,
                    dtype: torch.dtype) -> Tensor:
    """A standard Gaussian test matrix that depends only on (seed, draw) and the device type.

    Drawn on the target device, so every data-parallel rank gets the same numbers; a CPU and
    a GPU draw differ, which only matters for a cold start (a resumed run starts warm from
    its saved basis).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + int(draw) * 7_919) % (2**63 - 1))
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


def accurate_svd(A: Tensor, full_matrices: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd with cuSOLVER's QR-based gesvd on CUDA.

    PyTorch's default CUDA driver (Jacobi, gesvdj) returned singular vectors only
    orthonormal to 1e-3 for a 2048 x 2048 fp32 matrix on an H100 (gesvd: 2e-5, at about the
    same speed above 2048); a basis must be orthonormal to working precision.
    """
    driver = "gesvd" if A.is_cuda else None
    return torch.linalg.svd(A, full_matrices=full_matrices, driver=driver)


def canonical_signs(B: Tensor) -> Tensor:
    """Flip each column of B so that its largest-magnitude entry is positive.

    Singular vectors are defined up to sign, and LAPACK and cuSOLVER pick differently; a
    fixed convention makes a basis the same on every device and keeps Adam moments that
    outlive a refresh aligned with the vectors they were measured on.
    """
    idx = B.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(B, 0, idx))
    signs[signs == 0] = 1
    return B * signs
