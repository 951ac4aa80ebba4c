"""What every fast executor shares: buckets, the padding rule, the precision policy, the
orientation rule and the matrix products that follow them.

Functions over tensors and numbers only (no optimizer object), like torch's
``_multi_tensor_adamw``: the reference functions (``galore.py``, ``fira.py``, ``muon.py``)
say what a step computes; the executors compute the same on lists of same-shape matrices,
batched, padded to aligned rows and, where asked, from bf16 factors.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from ..projections import Projector
from ..projections.base import float32_matmul_precision

T = TypeVar("T")

#: Bytes of projected gradients, their updates and generated bases alive at once in a step.
CHUNK_BYTES = 256 * 2**20
#: Largest input buffer of one batched Newton-Schulz iteration (working set about 4x this).
MAX_BATCH_BYTES = 512 * 2**20
#: Row length, in bytes, that GPU matrix products want: a matrix whose rows are not a
#: multiple of 16 bytes long (LLaMA's 5461 columns) gets the slower unaligned kernels.
ALIGN_BYTES = 16


def buckets(items: Sequence[T], key: Callable[[T], Hashable], item_bytes: Callable[[T], int],
            cap: int | None) -> list[list[T]]:
    """Items grouped by ``key`` (order kept), each group cut into runs of at most ``cap``
    bytes (one item at least; ``cap=None``: uncut). The one bucketing rule of every
    executor: same-shape matrices go through one batched product, bounded in memory."""
    same: dict[Hashable, list[T]] = {}
    for item in items:
        same.setdefault(key(item), []).append(item)
    out = []
    for members in same.values():
        per = len(members) if cap is None else max(1, cap // max(1, item_bytes(members[0])))
        out += [members[k:k + per] for k in range(0, len(members), per)]
    return out


def slices(count: int, item_bytes: int) -> list[slice]:
    """Consecutive slices of ``count`` items of at most ``CHUNK_BYTES`` (one item at least)."""
    per = max(1, CHUNK_BYTES // max(1, item_bytes))
    return [slice(k, min(count, k + per)) for k in range(0, count, per)]


# ---------------------------------------------------------------------------- padding
def aligned_width(n: int, like: Tensor) -> int:
    """The one padding rule: ``n`` rounded up so that rows of ``n`` elements of ``like``'s
    dtype are 16-byte aligned on CUDA (on the CPU rows are never padded)."""
    if not like.is_cuda:
        return n
    per = max(1, ALIGN_BYTES // like.element_size())
    return -(-n // per) * per


def padded(count: int, rows: int, n: int, width: int, dtype: torch.dtype,
           device: torch.device) -> Tensor:
    """An uninitialized (count, rows, width) buffer whose columns n..width are zero."""
    out = torch.empty((count, rows, width), dtype=dtype, device=device)
    if width > n:
        out[..., n:].zero_()
    return out


# -------------------------------------------------------------------------- precision
#: Precision of the fp32 products of a low-rank step. "auto" is TF32 ("high") for CUDA
#: tensors (~8x faster on tensor cores, 10 mantissa bits: far below the gradient noise the
#: projection drops) and full fp32 elsewhere; "medium" rounds both factors to bf16 and sums
#: in fp32 into fp32 results (twice TF32's rate). Bases and moments stay fp32 either way.
PROJECTION_PRECISIONS = ("auto", "highest", "high", "medium")


def precision(level: str, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The one precision policy: the fp32 product precision for ``level`` on ``device``."""
    if level in ("auto", "medium"):          # "medium" makes its own bf16 factors
        level = "high" if device.type == "cuda" else "highest"
    return float32_matmul_precision(level)


@functools.lru_cache(maxsize=None)
def products_cast_into_fp32(device_type: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether products of ``dtype`` factors on this device can write fp32 results
    (``out_dtype``; CUDA in recent torch), in place into an fp32 matrix too. A probe:
    where torch lacks the kernel it raises, and this returns False."""
    try:
        C = torch.zeros(2, 2, device=device_type)
        A = torch.ones(2, 2, dtype=dtype, device=device_type)
        torch.addmm(C, A, A, out_dtype=torch.float32, out=C)
        return bool(C[0, 0] == 2)
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def bf16_product(A: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """A @ B in fp32 from bf16 factors (2-D or batched): products summed in fp32, as tensor
    cores do; elsewhere the same factors widened to fp32, which differs only in the order
    of the sums."""
    if products_cast_into_fp32(A.device.type):
        product = torch.mm if A.ndim == 2 else torch.bmm
        return product(A, B, out_dtype=torch.float32, out=out)
    with float32_matmul_precision("highest"):
        return torch.matmul(A.float(), B.float(), out=out)


def product(A: Tensor, B: Tensor, out: Tensor | None = None) -> Tensor:
    """A @ B (2-D or batched), through :func:`bf16_product` for bf16 factors."""
    if A.dtype == torch.bfloat16 and B.dtype == torch.bfloat16:
        return bf16_product(A, B, out)
    return torch.matmul(A, B, out=out)


# ------------------------------------------------------------------------ orientation
def projection_factors(G: Tensor, B: Tensor, side: str) -> tuple[Tensor, Tensor]:
    """The one orientation rule, for the projection: (G, B) for a right basis (G B),
    (B^T, G) for a left one (B^T G); 2-D or batched."""
    return (G, B) if side == "right" else (B.mT, G)


def lift_factors(L: Tensor, B: Tensor, side: str) -> tuple[Tensor, Tensor]:
    """The same rule for the lift: (L, B^T) right (L B^T), (B, L) left (B L)."""
    return (L, B.mT) if side == "right" else (B, L)


def basis_dim(shape: tuple[int, int], side: str) -> int:
    """Length of the basis vectors of an (m, n) matrix: n on the right, m on the left."""
    return shape[1] if side == "right" else shape[0]


def projected_shape(shape: tuple[int, int], side: str, r: int) -> tuple[int, int]:
    """Shape of the coordinates: (m, r) on the right, (r, n) on the left."""
    return (shape[0], r) if side == "right" else (r, shape[1])


def norm_dim(side: str) -> int:
    """The dimension of an (m, n) matrix that a Fira scale is per: columns on the left
    (a norm over dim 0), rows on the right (over dim 1)."""
    return 0 if side == "left" else 1


def bases(projectors: Sequence[Projector]) -> list[Tensor]:
    """``basis()`` of each projector; projectors of one class that generate their bases
    share the work (DCT: one generated matrix per size)."""
    out: list[Tensor | None] = [None] * len(projectors)
    by_class: dict[type, list[int]] = {}
    for i, proj in enumerate(projectors):
        by_class.setdefault(type(proj), []).append(i)
    for cls, indices in by_class.items():
        for i, B in zip(indices, cls.basis_many([projectors[i] for i in indices])):
            out[i] = B
    return out


def as_matrix(t: Tensor) -> Tensor:
    """A k-D weight as the matrix it acts as: (out, in * k * k) for a conv kernel."""
    return t if t.ndim == 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))


def scale_(tensors: list[Tensor], factor: float) -> None:
    """t <- factor t for each tensor (weight decay). The factor goes in as an fp32 tensor:
    torch's CPU foreach kernels round a Python scalar to the tensors' dtype, which turns a
    decay of 0.998 into bf16's 0.996, twice the decay asked for."""
    if tensors:
        torch._foreach_mul_(tensors, torch.tensor(factor, dtype=torch.float32)
                            if tensors[0].device.type == "cpu" else factor)


def add_to_matrix_(W: Tensor, T: Tensor, alpha: float, factor: Tensor | None = None) -> None:
    """W <- W + alpha T (times ``factor``, broadcast), T being W's matrix form; one pass over
    W when W can be viewed as that matrix."""
    if W.ndim == 2 or W.is_contiguous():
        Wm = as_matrix(W)
        if factor is None:
            Wm.add_(T, alpha=alpha)
        else:
            Wm.addcmul_(T, factor, value=alpha)
    else:
        W.add_((T if factor is None else T * factor).reshape(W.shape), alpha=alpha)


def addmm_into_(W: Tensor, first: Tensor, second: Tensor, alpha: float, beta: float) -> bool:
    """W <- beta W + alpha first @ second as one product written into W, when W is a
    contiguous matrix of the factors' dtype, or fp32 with bf16/fp16 factors on a device whose
    products write fp32 (the last product of a step goes straight into the weights).
    Returns False, changing nothing, where it cannot."""
    if not W.is_contiguous():
        return False
    Wm = as_matrix(W)
    if W.dtype == first.dtype:
        Wm.addmm_(first, second, beta=beta, alpha=alpha)
        return True
    if W.dtype == torch.float32 and first.dtype in (torch.bfloat16, torch.float16) \
            and products_cast_into_fp32(W.device.type, first.dtype):
        torch.addmm(Wm, first, second, beta=beta, alpha=alpha, out_dtype=torch.float32, out=Wm)
        return True
    return False
