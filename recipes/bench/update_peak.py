"""Temporaries of one per-layer update of a quantized weight, counted on any device.

    python -m memopt.recipes.bench.update_peak [--shape 2752,1024] [--rank 256]
        [--optimizers dct8bit,trion8bit,...] [--scale-chunks 16]

For each optimizer, one INT8 (m, n) weight (``memopt.quantize_weights``) is updated three
times by ``step_param`` with a basis refresh every step (``update_proj_gap=1``: the first
step of a run refreshes every basis, so a step's peak includes one). A dispatch mode
follows every storage an operator returns until it is freed; the peak of those bytes,
beyond the gradient, the codes and the optimizer's state, is the update's temporaries,
printed in fp32 copies of the weight: the unit of ``memopt.optim.memory.UPDATE_FP32_COPIES``.

The temporaries that work in bounded chunks (stochastic rounding, the DCT energy) take the
same share of a small weight as of a 7B one when their chunk is scaled down with it:
``--scale-chunks k`` divides both chunk sizes by k (16: a 2752 x 1024 weight then stands for
LLaMA-7B's 11008 x 4096 at rank 1024). What this leaves out: the CUDA allocator's rounding
and the solvers' workspaces (SVD), which only the GPU's ``bench.memory`` sees.
"""

from __future__ import annotations

import argparse
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..arguments import positive_int


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes of storages made by operators inside and not yet freed
    (storages whose ``_cdata`` is in ``exclude`` are not counted)."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude: set[int] = exclude
        self.live: dict[int, int] = {}
        self.refs: dict[int, Any] = {}
        self.now = self.peak = 0

    def _follow(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.exclude:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()

        def freed(_: Any, key: int = key) -> None:
            self.now -= self.live.pop(key)
        self.refs[key] = weakref.ref(storage, freed)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._follow(t)
        self.peak = max(self.peak, self.now)
        return out


def update_peak(optimizer: str, shape: tuple[int, int], rank: int, steps: int = 3,
                **kwargs: Any) -> int:
    """Peak bytes of temporaries over ``steps`` per-layer updates of one INT8 weight."""
    from ... import quantize_weights
    from ...optim import create_optimizer
    m, n = shape
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False).to(torch.bfloat16))
    quantize_weights(layer, modules=["0"])
    p = layer[0].weight
    opt = create_optimizer(optimizer, [p], lr=1e-3, rank=rank, update_proj_gap=1, **kwargs)
    peak = 0
    for _ in range(steps):
        p.grad = torch.randn(m, n) * 1e-3
        kept = [p.grad, layer[0].weight_codes, layer[0].weight_scales]
        kept += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        with LiveBytes({t.untyped_storage()._cdata for t in kept}) as mode:
            opt.step_param(p)
        p.grad = None
        peak = max(peak, mode.peak)
    return peak


def main(argv: list[str] | None = None) -> int:
    from ...optim import stochastic_rounding
    from ...projections import dct
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2752,1024", help="m,n of the weight (default 2752,1024)")
    p.add_argument("--rank", type=positive_int, default=256)
    p.add_argument("--optimizers", default="dct8bit,trion8bit,galore8bit,galoremuon8bit,fira8bit")
    p.add_argument("--scale-chunks", type=positive_int, default=16,
                   help="divide the rounding's and the DCT energy's chunk sizes by this")
    args = p.parse_args(argv)
    try:
        m, n = (int(v) for v in args.shape.split(","))
    except ValueError:
        p.error(f"argument --shape: expected M,N, got {args.shape!r}")
    stochastic_rounding.CHUNK //= args.scale_chunks
    dct.ENERGY_CHUNK //= args.scale_chunks
    print(f"one INT8 ({m}, {n}) weight, rank {args.rank}, a refresh every step, chunks / "
          f"{args.scale_chunks}; temporaries in fp32 copies of the weight ({4 * m * n / 1e6:.1f} MB)")
    for name in args.optimizers.split(","):
        extra = {"projector_options": {"bits": 4}} if name.endswith("@int4") else {}
        peak = update_peak(name.removesuffix("@int4"), (m, n), args.rank, **extra)
        print(f"{name:18s} {peak / 1e6:8.1f} MB  {peak / (4 * m * n):5.2f} copies", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
