"""Sharded (FSDP2) parameters and the collectives the optimizers issue, with byte counting.

Under DDP nothing here is used: every rank has the same gradients and the optimizers are
deterministic, so every rank computes the same update. Under FSDP2 (``fully_shard``) a
parameter is a DTensor sharded on dim 0; the optimizers work on the local rows and talk to
the other ranks only here, so :func:`communication_bytes` sees every byte they send:

- a finiteness flag per step (one float, all-reduced);
- low-rank: projection, Adam and the update are local (the basis is on the column side,
  which is not sharded); at a basis refresh the DCT selection all-reduces its length-n
  energy vector and the SVD and polar projectors all-gather the gradient once; Fira
  all-reduces one squared norm per matrix per step for its limiter;
- Muon / PolarGrad: each matrix's update is gathered on one owner rank (round-robin),
  orthogonalized there and scattered back (or all-gathered and orthogonalized on every rank
  with ``redundant=True``); PolarGrad all-reduces one partial nuclear norm per matrix.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..projections import orthogonalize_many
from ..projections.polar import work_dtype

from .states import ROW_SHARDED

_bytes: dict[str, int] = defaultdict(int)


def communication_bytes() -> dict[str, int]:
    """Bytes this process has sent into optimizer collectives, per kind, since the last reset
    (the payload of each call; what the transport moves depends on its algorithm)."""
    return dict(_bytes)


def reset_communication_bytes() -> None:
    _bytes.clear()


_PLAIN = (Tensor, torch.nn.Parameter)


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor sharded on some dimension (an FSDP2 parameter)."""
    return type(t) not in _PLAIN and any(p.is_shard() for p in getattr(t, "placements", ()))


def local(t: Tensor) -> Tensor:
    """The local part of a DTensor (the tensor itself otherwise)."""
    if type(t) in _PLAIN:
        return t
    return t.to_local() if hasattr(t, "to_local") else t


def _group(param: Tensor) -> Any:
    return param.device_mesh.get_group()


def world_size(param: Tensor) -> int:
    """Ranks that ``param``'s shards are spread over."""
    return param.device_mesh.size()


def all_reduce_sum(t: Tensor, param: Tensor, kind: str) -> Tensor:
    """Sum ``t`` over the ranks ``param`` is sharded across (in place; returns t)."""
    _bytes[kind] += t.numel() * t.element_size()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_group(param))
    return t


def _row_counts(param: Tensor) -> list[int]:
    """Rows of dim 0 held by each rank (torch.chunk semantics of Shard(0))."""
    world = param.device_mesh.size()
    rows = param.shape[0]
    per = -(-rows // world)
    return [max(0, min(per, rows - r * per)) for r in range(world)]


def local_rows(full: Tensor, param: Tensor) -> Tensor:
    """This rank's dim-0 shard of a full matrix laid out like ``param``."""
    return full.split(_row_counts(param))[dist.get_rank(_group(param))]


def _padded(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def all_gather_rows(t: Tensor, param: Tensor, kind: str) -> Tensor:
    """The full matrix whose dim-0 shards the ranks of ``param`` hold as ``t``."""
    counts = _row_counts(param)
    block = _padded(t, max(counts))
    parts = [torch.empty_like(block) for _ in counts]
    _bytes[kind] += block.numel() * block.element_size()
    dist.all_gather(parts, block, group=_group(param))
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def gather_rows(t: Tensor, param: Tensor, owner: int, kind: str) -> Tensor | None:
    """The full matrix on rank ``owner`` (None elsewhere), from dim-0 shards ``t``."""
    group = _group(param)
    counts = _row_counts(param)
    block = _padded(t, max(counts))
    parts = [torch.empty_like(block) for _ in counts] if dist.get_rank(group) == owner else None
    _bytes[kind] += block.numel() * block.element_size()
    dist.gather(block, parts, dst=dist.get_global_rank(group, owner), group=group)
    if parts is None:
        return None
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def scatter_rows(full: Tensor | None, like: Tensor, param: Tensor, owner: int,
                 kind: str) -> Tensor:
    """This rank's dim-0 shard of ``full`` (given on ``owner``), shaped like ``like``."""
    group = _group(param)
    counts = _row_counts(param)
    rows = max(counts)
    out = like.new_empty((rows, *like.shape[1:]))
    parts = None
    if full is not None:
        parts = [_padded(chunk, rows) for chunk in full.split(counts)]
        _bytes[kind] += sum(p.numel() * p.element_size() for p in parts)
    dist.scatter(out, parts, src=dist.get_global_rank(group, owner), group=group)
    return out[: like.shape[0]]


def update_from_shards(projector: Any, G: Tensor, param: Tensor) -> None:
    """``projector.update`` from this rank's rows ``G`` of a sharded matrix: statistics
    summed over the ranks where the projector can (a right DCT basis), else from the
    all-gathered matrix; every rank builds the same basis."""
    if projector.supports_row_sharding and projector.requested_side == "right":
        projector.update(G, row_reduce=lambda t: all_reduce_sum(t, param, "basis_refresh"))
    else:
        projector.update(all_gather_rows(G, param, "basis_refresh"))


def sharded_polar(M: Tensor, param: Tensor, index: int, method: str, steps: int | None,
                  dtype: torch.dtype | None, redundant: bool) -> Tensor:
    """polar() of the whole matrix whose local rows are ``M``, returned as the local rows:
    gathered on rank ``index % world``, orthogonalized there and scattered back, or
    all-gathered and orthogonalized on every rank (``redundant``)."""
    if redundant:
        full = all_gather_rows(M, param, "polar_gather")
        return local_rows(orthogonalize_many([full], method, steps, dtype)[0], param)
    owner = index % world_size(param)
    full = gather_rows(M, param, owner, "polar_gather")
    wire = work_dtype(method, M, dtype)
    sent = None if full is None else orthogonalize_many([full], method, steps, dtype)[0].to(wire)
    return scatter_rows(sent, M.to(wire), param, owner, "polar_scatter")


#: State keys whose dim 0 follows the parameter's rows (and so is sharded with it): every
#: declared non-scalar state (``states.declare``, filled by the registry).
ROW_SHARDED_STATE = ROW_SHARDED
ABSMAX = "_absmax"


def as_sharded_state(value: Any, key: str, param: Tensor) -> Any:
    """A state tensor of an FSDP2 parameter as the DTensor ``torch.distributed.checkpoint``
    expects. Row-sharded moments become Shard(0) of their full shape; the absmax of an
    8-bit moment (one value per 256 local values, so not a slice of a global vector) is
    padded to the largest rank's length and stacked as one row per rank."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(value, Tensor):
        return value
    mesh = param.device_mesh
    if key.endswith(ABSMAX) and key[: -len(ABSMAX)] in ROW_SHARDED_STATE:
        cols = param.numel() // param.shape[0] if param.shape[0] else 0
        longest = -(-max(_row_counts(param)) * cols // 256) if cols else 0
        row = value.new_zeros((1, max(longest, value.numel())))
        row[0, : value.numel()] = value
        return DTensor.from_local(row, mesh, [Shard(0)], run_check=False,
                                  shape=(mesh.size(), row.shape[1]), stride=(row.shape[1], 1))
    if key in ROW_SHARDED_STATE:
        shape = (int(param.shape[0]), *value.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(value.contiguous(), mesh, [Shard(0)], run_check=False,
                                  shape=shape, stride=stride)
    return value


def from_sharded_state(value: Tensor, key: str) -> Tensor:
    """Inverse of :func:`as_sharded_state` on this rank: the local tensor (an absmax row
    still carries its padding; :func:`trim_absmax` cuts it)."""
    if hasattr(value, "to_local"):
        value = value.to_local()
        if key.endswith(ABSMAX) and value.ndim == 2:
            value = value[0]
    return value


def trim_absmax(state: dict[str, Any]) -> None:
    """Cut padded absmax vectors back to one value per 256 values of their 8-bit codes."""
    for key in [k for k in state if k.endswith(ABSMAX)]:
        codes = state.get(key[: -len(ABSMAX)])
        if isinstance(codes, Tensor):
            state[key] = state[key][: -(-codes.numel() // 256)]
