"""A basis kept in INT8 or INT4 codes with group-wise scales, as Q-GaLore keeps its projection
matrices (Zhang et al., 2024, "Q-GaLore: Quantized GaLore with INT4 Projection and
Layer-Adaptive Low-Rank Gradients", arXiv 2407.08296).

Symmetric absmax quantization along each column of a (d x r) basis B, in groups of
``GROUP_SIZE`` consecutive rows: with L = 127 (INT8) or 7 (INT4) levels on each side of 0,

    s_gj = max_{i in group g} |B_ij| / L,     q_ij = round(B_ij / s_gj) in [-L, L],
    B^_ij = q_ij s_gj,                        |B_ij - B^_ij| <= s_gj / 2 = absmax / (2 L).

INT4 codes are stored two to a byte (:func:`pack_int4`). Q-GaLore quantizes asymmetrically
(a zero point per group, 2^n - 1 steps); a basis column has entries of both signs and mean
near 0, so the symmetric form loses one step of 15 and needs no zero points.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: The widths a basis may be kept in: 32 (the fp32 / fp64 basis itself), 8 or 4 bits.
BITS = (32, 8, 4)
#: Rows of a column that share one scale: Q-GaLore's ``--proj_group_size`` default
#: (``run_pretrain.py``, VITA-Group/Q-GaLore), with its ``--proj_bits`` default of 4.
GROUP_SIZE = 256
#: Codes on each side of 0: a symmetric code uses -L..L and leaves -2^(n-1) unused.
LEVELS = {8: 127, 4: 7}
#: The dtype the codes of each width are kept in (INT4: two codes per byte).
CODE_DTYPES = {8: torch.int8, 4: torch.uint8}


def check_bits(bits: Any) -> int:
    """Return ``bits`` if it is one of :data:`BITS`, else raise ValueError naming it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be one of {BITS} (32: the fp32 basis itself; 8 or 4: "
                         f"INT8 / INT4 codes with group-wise scales), got {bits!r}")
    return int(bits)


def num_groups(dim: int, group_size: int = GROUP_SIZE) -> int:
    """Scales per column: ceil(dim / group_size)."""
    return -(-dim // group_size)


def code_shapes(dim: int, r: int, bits: int
                ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of the codes and scales of a (dim x r) basis at ``bits`` (8 or 4)."""
    rows = dim if bits == 8 else -(-dim // 2)
    return {"codes": ((rows, r), CODE_DTYPES[bits]),
            "scales": ((num_groups(dim), r), torch.float32)}


def pack_int4(codes: Tensor) -> Tensor:
    """Pack int8 codes in [-8, 7] of shape (d, r) two to a byte: (ceil(d / 2), r) uint8,
    row 2k in the low nibble and row 2k + 1 in the high one, each as code + 8 (an odd d
    pads one zero code)."""
    if codes.shape[0] % 2:
        codes = torch.cat([codes, codes.new_zeros((1, *codes.shape[1:]))])
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 codes of shape (dim, r)."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=1).reshape(-1, *packed.shape[1:])[:dim]


def _grouped(X: Tensor, group_size: int) -> Tensor:
    """X (d x r) zero-padded to whole groups and viewed as (groups, group_size, r)."""
    d, r = X.shape
    pad = num_groups(d, group_size) * group_size - d
    if pad:
        X = torch.cat([X, X.new_zeros((pad, r))])
    return X.reshape(-1, group_size, r)


def quantize_columns(B: Tensor, bits: int, group_size: int = GROUP_SIZE
                     ) -> tuple[Tensor, Tensor]:
    """(codes, scales) of the basis B (d x r): symmetric absmax scales per ``group_size``
    rows of each column (fp32, (ceil(d / group_size), r)) and round-to-nearest codes
    (int8 (d, r) for 8 bits; packed uint8 (ceil(d / 2), r) for 4).

    Round to nearest, not stochastic rounding: the basis is refit from G at each refresh,
    never accumulated, so its rounding errors do not add up over steps and need no
    zero-mean rounding. The codes are computed with the fp32 scales that are kept, so
    :func:`dequantize_columns` gives exactly the values rounded to.
    """
    levels = LEVELS[bits]
    d = B.shape[0]
    grouped = _grouped(B, group_size)
    # times the reciprocal, not a division: CUDA divides a tensor by a scalar through its
    # reciprocal (on an H100 the division gave scales 1 ulp from the CPU's), so every device
    # type multiplies by the same fp32 1/L (not yet rerun on a GPU)
    scales = (grouped.abs().amax(dim=1).to(torch.float32) * (1.0 / levels))   # (groups, r)
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).to(B.dtype)
    codes = torch.round(grouped / divisor[:, None, :]).clamp_(-levels, levels)
    codes = codes.reshape(-1, B.shape[1])[:d].to(torch.int8)
    return (codes if bits == 8 else pack_int4(codes)), scales


def dequantize_columns(codes: Tensor, scales: Tensor, bits: int, dim: int,
                       dtype: torch.dtype = torch.float32,
                       group_size: int = GROUP_SIZE) -> Tensor:
    """The (dim x r) basis B^_ij = q_ij s_gj in ``dtype`` from :func:`quantize_columns`'
    codes and scales."""
    q = codes if bits == 8 else unpack_int4(codes, dim)
    grouped = _grouped(q.to(dtype), group_size) * scales.to(dtype)[:, None, :]
    return grouped.reshape(-1, q.shape[1])[:dim].contiguous()
