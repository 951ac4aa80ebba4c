"""Low-precision weight codes: INT8 with per-group scales, and bf16; round to nearest or
stochastically.

Stochastic rounding (SR) rounds x up with probability frac(x) and down otherwise, so
E[SR(x)] = x: an update far smaller than one quantization step still moves the weight on
average, where round-to-nearest would drop it every time. Q-GaLore (Zhang et al., 2024,
arXiv 2407.08296) trains LLaMA with INT8 weights this way; its group size, 128 consecutive
input columns per scale, is our default.

INT8 (symmetric, per group): s = max|w| / 127 over the group, q = round(w / s) in [-127, 127],
w ~ q s. SR: q = floor(w / s + u), u ~ U[0, 1).
bf16: the fp32 bit pattern with its low 16 bits cleared (truncation) after adding a uniform
integer in [0, 2^16) (SR), or the nearest bf16 value.

The noise comes from a generator seeded from (seed, count) for each rounding, so a weight's
rounding is reproducible from two integers: resume is bit-exact on the same device type.
Work is done in row chunks of at most ``CHUNK`` elements, so the temporaries of rounding one
weight stay bounded whatever its size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Elements rounded at once (fp32 temporaries of 16 MiB each: a 7B MLP weight, 45M elements,
#: takes 11 chunks; the rounding adds about 50 MB to the peak of its update).
CHUNK = 1 << 22
#: Largest INT8 code magnitude (symmetric: -127..127, as bitsandbytes and torchao).
INT8_LEVELS = 127
ROUNDINGS = ("stochastic", "nearest")

_generators: dict[torch.device, torch.Generator] = {}


def generator(device: torch.device, seed: int, count: int) -> torch.Generator:
    """The device's rounding generator, seeded for the ``count``-th rounding of ``seed``."""
    device = torch.device(device)
    if device not in _generators:
        _generators[device] = torch.Generator(device=device)
    g = _generators[device]
    g.manual_seed(hash((seed, count)) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def groups_of(columns: int, group_size: int) -> int:
    """Number of scale groups of a row of ``columns`` (a ragged last group counts)."""
    return math.ceil(columns / group_size)


def int8_dequantize(codes: Tensor, scales: Tensor, group_size: int,
                    dtype: torch.dtype) -> Tensor:
    """w = q s, in ``dtype``: (out, in) from INT8 codes (out, in) and scales (out, groups)."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    if cols == groups * group_size:                      # (one full-size tensor made)
        w = codes.view(rows, groups, group_size).to(dtype)
        return w.mul_(scales.to(dtype).unsqueeze(-1)).view(rows, cols)
    per_column = scales.to(dtype).repeat_interleave(group_size, dim=1)[:, :cols]
    return codes.to(dtype).mul_(per_column)


def int8_quantize_(w: Tensor, codes: Tensor, scales: Tensor, group_size: int,
                   rounding: str, g: torch.Generator | None) -> None:
    """codes, scales <- the INT8 form of ``w`` (out, in), in place, by ``rounding``."""
    rows, cols = w.shape
    groups = scales.shape[1]
    padded = groups * group_size
    step = max(1, CHUNK // padded)
    for start in range(0, rows, step):
        block = w[start:start + step].float()
        if padded != cols:
            block = torch.nn.functional.pad(block, (0, padded - cols))
        block = block.view(block.shape[0], groups, group_size)
        scale = block.abs().amax(dim=-1) / INT8_LEVELS
        x = block / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)
        if rounding == "stochastic":
            x.add_(torch.rand(x.shape, generator=g, device=x.device)).floor_()
        else:
            x.round_()
        x.clamp_(-INT8_LEVELS, INT8_LEVELS)
        codes[start:start + step] = x.view(x.shape[0], padded)[:, :cols].to(torch.int8)
        scales[start:start + step] = scale


def bf16_round_(w: Tensor, out: Tensor, rounding: str, g: torch.Generator | None) -> None:
    """out (bf16) <- ``w`` (fp32) rounded to bf16 by ``rounding``, in place."""
    flat_w, flat_out = w.reshape(-1), out.view(-1)
    for start in range(0, flat_w.numel(), CHUNK):
        part = flat_w[start:start + CHUNK].float()
        if rounding == "stochastic":
            bits = part.view(torch.int32) + torch.randint(
                0, 1 << 16, part.shape, generator=g, device=part.device, dtype=torch.int32)
            part = (bits & -(1 << 16)).view(torch.float32)     # exact in bf16 now
        flat_out[start:start + CHUNK] = part.to(torch.bfloat16)
