"""Refresh time of every projector and orthogonalizer, against exact SVD.

    python -m memopt.recipes.bench.projectors [--device cuda] [--rank 512] [--out FILE]

Per matrix size: milliseconds per refresh (median), speed-up over exact SVD, and the share of
the optimal rank-r energy each basis captures (exact SVD = 1). The test matrix is
gradient-like: a rank-64 part with a power-law spectrum plus 10% Gaussian noise. For the
orthogonalizers, the singular values of the output (exact polar = all 1). Each row is printed
as soon as it is measured; the CPU default (smaller sizes, rank 64, 3 repeats) takes about a
minute on two cores.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from ...projections import DCTProjector, PolarProjector, SVDProjector, orthogonalize
from ..machine import describe_environment, environment, resolve_device
from ..report import markdown_table, write_json
from .timing import median, time_ms, warm_up

GPU_SIZES = [(2048, 2048), (5461, 2048), (4096, 4096), (11008, 4096)]
CPU_SIZES = [(256, 256), (683, 256), (512, 512), (1376, 512)]
COLUMNS = ["size", "method", "ms", "speedup_vs_svd", "energy", "sv_min", "sv_max"]


def gradient_like(m: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Low-rank signal with decaying scales plus noise, like a real weight gradient."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = 64
    scales = (1.0 + torch.arange(k, dtype=torch.float32)) ** -1.0
    left = torch.randn(m, k, generator=gen) * scales
    right = torch.randn(k, n, generator=gen)
    signal = (left @ right) / n**0.5
    noise = torch.randn(m, n, generator=gen) * (0.1 * signal.norm() / (m * n) ** 0.5)
    return (signal + noise).to(device)


def projector_cases(rank: int) -> dict[str, Callable[[], Any]]:
    return {
        "svd exact": lambda: SVDProjector(rank),
        "svd randomized (cold)": lambda: SVDProjector(rank, method="randomized"),
        "svd randomized (warm)": lambda: SVDProjector(rank, method="randomized"),
        "dct (auto)": lambda: DCTProjector(rank),
        "dct matmul": lambda: DCTProjector(rank, method="matmul"),
        "dct fft": lambda: DCTProjector(rank, method="fft"),
        "polar (cold)": lambda: PolarProjector(rank),
        "polar (warm)": lambda: PolarProjector(rank),
    }


def bench_size(m: int, n: int, rank: int, device: torch.device, repeats: int,
               report: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """The rows of one matrix size; ``report`` sees each row as soon as it is measured."""
    G = gradient_like(m, n, device)
    G_prev = gradient_like(m, n, device, seed=1) * 0.5 + G * 0.5   # a drifted gradient
    rows = []
    best = svd_ms = 1.0               # "svd exact" comes first and sets both
    for name, make in projector_cases(rank).items():
        warm = name.endswith("(warm)")
        proj = make()
        if warm:
            proj.update(G_prev)

        def refresh(proj=proj, warm=warm, make=make):
            target = proj if warm else make()
            target.update(G)
            return target

        reps = max(2, repeats // 4) if name == "svd exact" else repeats
        ms = median(time_ms(refresh, device, repeats=reps, warmup=1))
        fitted = refresh()
        energy = float(fitted.project(G).double().square().sum())
        if name == "svd exact":
            best, svd_ms = energy, ms
        rows.append({"size": f"{m}x{n}", "method": name, "ms": ms, "energy": energy / best,
                     "speedup_vs_svd": svd_ms / ms})
        report(rows[-1])
    X = G.mT if m < n else G
    for method, steps in (("newton_schulz", 5), ("polar_express", 5), ("svd", None)):
        reps = max(2, repeats // 4) if method == "svd" else repeats
        ms = median(time_ms(lambda: orthogonalize(X, method, steps=steps, check_finite=False),
                            device, repeats=reps, warmup=1))
        s = torch.linalg.svdvals(orthogonalize(X, method, steps=steps).double())
        keep = s[s > 1e-6]
        rows.append({"size": f"{m}x{n}", "method": f"orthogonalize {method}"
                     + (f" ({steps})" if steps else ""), "ms": ms,
                     "sv_min": float(keep.min()), "sv_max": float(keep.max()),
                     "speedup_vs_svd": svd_ms / ms})
        report(rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--rank", type=int, default=None, help="512 on GPU, 64 on CPU")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated MxN list (default: LLaMA shapes on GPU, smaller on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="8 on GPU, 3 on CPU")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    warm_up(device)
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    else:
        sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    rank = args.rank or (512 if device.type == "cuda" else 64)
    repeats = args.repeats or (8 if device.type == "cuda" else 3)
    env = environment(device)
    print(f"Projector refresh, rank {rank}, median of {repeats} (exact SVD: of "
          f"{max(2, repeats // 4)})\n{describe_environment(env)}\n", flush=True)
    print("\n".join(markdown_table([], COLUMNS).splitlines()[:2]), flush=True)

    def report(row: dict) -> None:
        print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    rows = []
    for m, n in sizes:
        rows.extend(bench_size(m, n, rank, device, repeats, report))
    write_json(args.out, {"environment": env, "rank": rank, "repeats": repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
