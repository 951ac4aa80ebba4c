"""DCTProjector's ``refine``: subspace iteration warm-started from the chosen DCT columns.

What a wrong refinement breaks: orthonormality, the energy it keeps (never less than the DCT
columns it starts from, near the top-r singular subspace where G's spectrum has a gap), the
math (a float64 reference of the iteration), the state (a dense basis, round-tripped bit for
bit), row shards (the same basis from summed shard products), and the optimizer that uses it.
"""

import io
import itertools
import math
import os
import tempfile
import threading

import numpy as np
import pytest
import scipy.fft
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import SmallNet, round_trip, small_batch, small_loss, train

from memopt import optim as mo
from memopt.optim import state_bytes
from memopt.optim.executors import bases
from memopt.optim.memory import estimate_memory
from memopt.projections import DCTProjector, make_projector
from memopt.projections.base import orthonormality_error
from memopt.projections.dct import refine_basis

SHAPES = {"tall": (64, 40), "wide": (40, 64), "square": (48, 48), "odd": (257, 96)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def gradient(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def low_rank_plus_noise(shape, k, seed=0, gap=10.0, noise=1.0, dtype=torch.float32):
    """sum_{i<k} s_i u_i v_i^T + noise N / sqrt(max(shape)), s_i from gap down to gap / 2 times
    the noise's largest singular value (about 2 noise): singular values k and k+1 apart by
    about ``gap / 2``."""
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    s = 2 * noise * torch.linspace(gap, gap / 2, k, dtype=torch.float64)
    N = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(max(m, n))
    return ((U * s) @ V.T + noise * N).to(dtype)


def kept(proj, G):
    """||project(G)||_F^2 in float64."""
    return float(proj.project(G).double().square().sum())


def best_kept(G, r):
    """The top-r singular energy: the most any rank-r basis keeps, on either side."""
    s = torch.linalg.svdvals(G.double())
    return float(s[:r].square().sum())


def tolerance(B):
    return 64 * math.sqrt(B.shape[1]) * torch.finfo(B.dtype).eps


def dct_table(d):
    """Row k = the orthonormal DCT-II vector d_k, from scipy (independent of memopt)."""
    return torch.from_numpy(scipy.fft.dct(np.eye(d), norm="ortho", axis=0))


def reference_basis(G, side, r, steps, norm="l2"):
    """The iteration in float64 from scipy's DCT table: pick the r best-aligned columns,
    then Q <- qr(G^T G Q) (right) / qr(G G^T Q) (left), largest entry of each column > 0."""
    G = G.double()
    d = G.shape[1] if side == "right" else G.shape[0]
    T = dct_table(d)
    C = G @ T.T if side == "right" else (T @ G).T
    energy = (C.abs() if norm == "l1" else C.square()).sum(dim=0)
    Q = T[torch.topk(energy, r).indices].T
    A = G.T @ G if side == "right" else G @ G.T
    for _ in range(steps):
        Q = torch.from_numpy(np.linalg.qr((A @ Q).numpy())[0])
        peak = Q.gather(0, Q.abs().argmax(dim=0, keepdim=True))
        Q = Q * torch.sign(peak)
    return Q


# --------------------------------------------------------------------------- the basis
@pytest.mark.parametrize("refine", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("side", ["auto", "left", "right"])
@pytest.mark.parametrize("rank", [1, 8, 32, 10_000], ids=["r1", "r8", "r32", "full"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_refined_basis_is_orthonormal(shape, rank, side, dtype, refine):
    proj = DCTProjector(rank, side=side, refine=refine).update(gradient(shape, dtype))
    B = proj.basis()
    d = proj.dim
    assert B.shape == (d, min(rank, d))
    assert B.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert orthonormality_error(B) <= tolerance(B)


@pytest.mark.parametrize("refine", [1, 2])
def test_rank_deficient_and_zero_gradients_give_an_orthonormal_basis(refine):
    u, v = gradient((30, 1), seed=1), gradient((1, 20), seed=2)
    for side in ("left", "right"):
        for G in (u @ v, torch.zeros(30, 20), gradient((3, 20)) if side == "right"
                  else gradient((30, 3))):
            B = DCTProjector(8, side=side, refine=refine).update(G).basis()
            assert B.shape[1] == 8 and orthonormality_error(B) <= tolerance(B)


@pytest.mark.parametrize("side", ["left", "right"])
def test_full_rank_is_the_whole_space(side):
    G = gradient((24, 40), seed=3)
    proj = DCTProjector(10_000, side=side, refine=2).update(G)
    d = 24 if side == "left" else 40
    assert proj.basis().shape == (d, d)
    X = gradient((24, 40), seed=4)
    assert torch.allclose(proj.project_back(proj.project(X)), X, atol=1e-5)


def test_basis_depends_on_G_only_and_has_a_fixed_sign_convention():
    G = low_rank_plus_noise((96, 64), 6, seed=1)
    a = DCTProjector(8, refine=2).update(G).basis()
    b = DCTProjector(8, refine=2).update(gradient((96, 64), seed=9)).update(G).basis()
    assert torch.equal(a, b)                         # no memory of an earlier basis
    assert torch.equal(a, DCTProjector(8, refine=2).update(-G).basis())   # G^T G is even
    peak = a.gather(0, a.abs().argmax(dim=0, keepdim=True))
    assert (peak > 0).all()


# -------------------------------------------------------------------------- the energy
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (257, 96)])
@pytest.mark.parametrize("seed", range(4))
def test_refining_never_keeps_less_energy(shape, seed, norm):
    G = low_rank_plus_noise(shape, k=12, seed=seed, gap=3.0)
    energies = [kept(DCTProjector(8, norm=norm, refine=k).update(G), G) for k in range(4)]
    for before, after in itertools.pairwise(energies):
        assert after >= before * (1 - 1e-6)
    assert energies[1] > 1.2 * energies[0]       # and one step gains a lot here
    assert energies[3] <= best_kept(G, 8) * (1 + 1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_few_refines_reach_the_top_singular_energy_across_a_gap(side):
    r = 8
    G = low_rank_plus_noise((200, 120), k=r, seed=5, gap=10.0)
    best = best_kept(G, r)
    dct = kept(DCTProjector(r, side=side).update(G), G)
    refined = [kept(DCTProjector(r, side=side, refine=k).update(G), G) for k in (1, 2, 3)]
    assert dct < 0.5 * best                       # random singular vectors: DCT keeps little
    assert refined[0] >= 0.98 * best
    assert refined[2] >= 0.9999 * best


# ------------------------------------------------------------------ against a reference
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["matmul", "fft"])
def test_refined_basis_equals_a_float64_reference(method, side, steps, norm):
    G = low_rank_plus_noise((72, 56), k=10, seed=7, gap=4.0)
    r = 6
    ref = reference_basis(G, side, r, steps, norm)
    got = DCTProjector(r, side=side, method=method, norm=norm, refine=steps).update(G).basis()
    assert (got.double() - ref).abs().max() < 1e-4
    got64 = DCTProjector(r, side=side, method=method, norm=norm, refine=steps).update(
        G.double()).basis()
    assert got64.dtype == torch.float64 and (got64 - ref).abs().max() < 1e-10


def test_refine_basis_starts_from_the_selected_columns():
    G = low_rank_plus_noise((60, 44), k=5, seed=2)
    plain = DCTProjector(5, side="right").update(G)
    Q = refine_basis(G, "right", plain.basis().contiguous(), 1)
    assert torch.equal(DCTProjector(5, side="right", refine=1).update(G).basis(), Q)
    assert torch.equal(refine_basis(G, "right", plain.basis(), 0), plain.basis())


# -------------------------------------------------------------------------------- state
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("refine", [0, 1, 2])
@pytest.mark.parametrize("shape", [(64, 40), (40, 64)])
def test_state_dict_round_trip_is_bit_exact(shape, refine, dtype):
    G1, G2, X = (gradient(shape, dtype, seed=s) for s in (5, 6, 7))
    proj = DCTProjector(8, refine=refine).update(G1)
    buffer = io.BytesIO()
    torch.save(proj.state_dict(), buffer)
    buffer.seek(0)
    restored = DCTProjector(8, refine=refine)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.basis(), proj.basis())
    assert restored.basis().dtype == proj.basis().dtype
    assert torch.equal(restored.project(X), proj.project(X))
    assert torch.equal(restored.update(G2).basis(), proj.update(G2).basis())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("refine", [0, 1])
def test_state_shapes_describe_the_state_dict(refine, dtype):
    proj = DCTProjector(8, refine=refine).update(gradient((64, 40), dtype))
    state = proj.state_dict()
    tensors = {k: (tuple(v.shape), v.dtype) for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    assert tensors == proj.state_shapes(40, 8, dtype)
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    if refine:                                          # r d floats instead of r integers
        assert tensors == {"basis": ((40, 8), dtype)}
    else:
        assert tensors == {"indices": ((8,), torch.int64)}
    key, size = proj.shared_table()                     # the DCT tables stay shared
    assert (key, size) == proj.shared_table(40, torch.device("cpu"), dtype)


def test_a_state_of_the_other_mode_is_refused_before_anything_changes():
    G = gradient((64, 40))
    plain, refined = DCTProjector(8).update(G), DCTProjector(8, refine=1).update(G)
    target = DCTProjector(8, refine=1).update(gradient((64, 40), seed=3))
    before = target.basis().clone()
    with pytest.raises(ValueError, match="refine"):
        target.load_state_dict(plain.state_dict())
    assert torch.equal(target.basis(), before) and target.num_updates == 1
    with pytest.raises(ValueError, match="refine"):
        DCTProjector(8).load_state_dict(refined.state_dict())


def test_basis_many_mixes_refined_and_plain_projectors():
    gen = torch.Generator().manual_seed(0)
    projectors = [DCTProjector(rank, refine=refine).update(torch.randn(shape, generator=gen))
                  for shape, rank, refine in [((40, 24), 5, 0), ((40, 24), 5, 1),
                                              ((24, 40), 7, 2), ((40, 24), 3, 0),
                                              ((64, 64), 30, 1)]]
    for proj, B, B2 in zip(projectors, DCTProjector.basis_many(projectors), bases(projectors)):
        assert torch.equal(B, proj.basis()) and torch.equal(B2, proj.basis())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None])
def test_bad_refine_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="refine"):
        DCTProjector(4, refine=bad)
    with pytest.raises(ValueError, match="refine"):
        make_projector("dct", 4, refine=bad)
    p = torch.nn.Parameter(torch.randn(40, 24))
    with pytest.raises(ValueError, match="refine"):
        mo.DCTAdamW([p], rank=4, projector_options={"refine": bad})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gradient_changes_nothing(value):
    proj = DCTProjector(4, refine=1).update(gradient((20, 12)))
    before = proj.basis().clone()
    G = gradient((20, 12), seed=9)
    G[3, 4] = value
    with pytest.raises(FloatingPointError):
        proj.update(G)
    assert torch.equal(proj.basis(), before)


# --------------------------------------------------------------------------- row shards
def shard_updates(G, counts, **options):
    """One thread per row shard, each calling ``update(shard, row_reduce=...)``; row_reduce
    sums over the threads, as an all-reduce over data-parallel ranks does."""
    shards = G.split(counts)
    barrier = threading.Barrier(len(shards))
    slots = [None] * len(shards)
    projectors = [DCTProjector(6, side="right", **options) for _ in shards]
    errors = []

    def all_reduce(rank, t):
        slots[rank] = t
        barrier.wait()
        total = sum(slots[1:], slots[0].clone())
        barrier.wait()
        return total

    def run(rank):
        try:
            projectors[rank].update(shards[rank], row_reduce=lambda t: all_reduce(rank, t))
        except Exception as exc:                # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return projectors


@pytest.mark.parametrize("refine", [0, 1, 2])
@pytest.mark.parametrize("counts", [[30, 30], [23, 20, 17]])
def test_row_shards_give_every_rank_the_one_matrix_basis(counts, refine):
    G = low_rank_plus_noise((60, 48), k=8, seed=4, gap=4.0)
    whole = DCTProjector(6, side="right", refine=refine).update(G).basis()
    sharded = shard_updates(G, counts, refine=refine)
    for proj, rows in zip(sharded, counts):
        assert torch.equal(proj.basis(), sharded[0].basis())    # every rank: the same bits
        assert (proj.basis() - whole).abs().max() < 1e-5        # the whole matrix's basis
        assert proj.shape == (rows, 48)                          # each fitted to its rows


def test_row_shards_of_a_left_basis_are_refused():
    with pytest.raises(ValueError, match="row shards"):
        DCTProjector(4, side="left", refine=1).update(gradient((20, 12)), row_reduce=lambda t: t)


# ----------------------------------------------------------------------------- optimizer
def refined_optimizer(params, cls="dct", refine=1, **kw):
    settings = {"lr": 1e-2, "rank": 4, "update_proj_gap": 3,
                "projector_options": {"refine": refine}, **kw}
    if cls == "lowrank":
        return mo.LowRankAdamW(params, projector="dct", **settings)
    if cls == "trion":                     # DCT columns x the orthogonalized rule
        return mo.Trion(params, **settings)
    return mo.DCTAdamW(params, **settings)


@pytest.mark.parametrize("cls", ["dct", "lowrank", "trion"])
def test_optimizer_with_refine_trains_and_keeps_a_dense_basis(cls):
    torch.manual_seed(0)
    model = SmallNet()
    opt = refined_optimizer(model, cls)
    with torch.no_grad():
        first = float(small_loss(model, 0))
    train(model, opt, 30)
    with torch.no_grad():
        assert float(small_loss(model, 0)) < 0.7 * first
    state = opt.state[model.fc2.weight]                    # (80, 96): a left basis of length 80
    assert "proj_indices" not in state
    assert state["proj_basis"].shape == (80, 4) and state["proj_basis"].dtype == torch.float32
    assert orthonormality_error(state["proj_basis"]) < 1e-5


def test_refine_state_costs_the_basis_and_the_estimate_knows():
    sizes = {}
    for refine in (0, 1):
        torch.manual_seed(0)
        model = SmallNet()
        opt = refined_optimizer(model, refine=refine)
        train(model, opt, 1)
        sizes[refine] = state_bytes(opt)
        estimate = estimate_memory(model, "dct", rank=4, update_proj_gap=3,
                                   projector_options={"refine": refine})
        assert estimate["optimizer_state"] == sizes[refine]
    projected = [(128, 96), (80, 96), (8, 12)]           # fc1 (96, 128), fc2 (80, 96), conv
    basis = sum(4 * 4 * min(m, n) for m, n in projected)  # fp32 (d, 4) basis on the short side
    indices = sum(8 * 4 for _ in projected)                # int64 (4,) indices
    assert sizes[1] - sizes[0] == basis - indices


@pytest.mark.parametrize("cls", ["dct", "lowrank", "trion"])
def test_save_load_continue_is_bit_exact(cls):
    torch.manual_seed(0)
    model = SmallNet()
    opt = refined_optimizer(model, cls)
    train(model, opt, 4)                                    # refreshes at steps 0 and 3
    saved = round_trip(opt.state_dict())
    twin = SmallNet()
    twin.load_state_dict(model.state_dict())
    twin_opt = refined_optimizer(twin, cls)
    twin_opt.load_state_dict(saved)
    a, b = train(model, opt, 5, start=4), train(twin, twin_opt, 5, start=4)   # across step 6
    assert a == b
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_state_saved_without_refine_does_not_load_with_it():
    torch.manual_seed(0)
    model = SmallNet()
    opt = refined_optimizer(model, refine=0)
    train(model, opt, 2)
    other = refined_optimizer(model, refine=1)
    with pytest.raises(ValueError, match="refine"):
        other.load_state_dict(round_trip(opt.state_dict()))


# ------------------------------------------------------------------------- FSDP2 (gloo)
WORLD = 2
FSDP_STEPS = 5                                           # gap 3: crosses a refresh


def fsdp_worker(rank, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from memopt.optim.distributed import communication_bytes, reset_communication_bytes
    torch.manual_seed(0)
    model = SmallNet()
    mesh = init_device_mesh("cpu", (WORLD,))
    for module in (model.conv, model.fc1, model.fc2, model.norm, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = refined_optimizer(model)
    reset_communication_bytes()
    for t in range(FSDP_STEPS):
        x, y = small_batch(t)
        half = x.shape[0] // WORLD
        opt.zero_grad()
        part = slice(rank * half, (rank + 1) * half)
        ((model(x[part]) - y[part]) ** 2).mean().backward()
        opt.step()
    params = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    torch.save({"params": params, "bytes": communication_bytes()}, f"{out}.{rank}")
    dist.barrier()    # every rank done before teardown (gloo aborted at exit otherwise)
    dist.destroy_process_group()


def test_fsdp2_with_refine_equals_one_process():
    torch.manual_seed(0)
    model = SmallNet()
    opt = refined_optimizer(model, projector_options={"refine": 1, "side": "right"})
    for t in range(FSDP_STEPS):
        x, y = small_batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    reference = model.state_dict()
    folder = tempfile.mkdtemp()
    path, out = os.path.join(folder, "store"), os.path.join(folder, "result")
    mp.spawn(fsdp_worker, args=(path, out), nprocs=WORLD)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    for result in results:
        # per refresh (steps 0 and 3) and projected matrix (conv, fc1, fc2: n = 12, 128, 96):
        # the n energies and one (n, 4) product summed over the shards, no gathered rows
        assert result["bytes"]["basis_refresh"] == 2 * 4 * (1 + 4) * (12 + 128 + 96)
        for k, v in result["params"].items():
            assert torch.allclose(v, reference[k], atol=2e-5, rtol=1e-4), k
