"""The projector contract: orthonormal bases, consistent projections, exact references."""

import io
import itertools
import math

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch
from torch import Tensor

from memopt.projections import (DCTProjector, PolarProjector, Projector, SVDProjector,
                                make_projector, orthogonalize)
from memopt.projections.base import orthonormality_error
from memopt.projections.dct import dct_energy, dct_matrix

CONFIGS = {
    "svd-exact": lambda r, **kw: SVDProjector(r, **kw),
    "svd-randomized": lambda r, **kw: SVDProjector(r, method="randomized", **kw),
    "dct-matmul": lambda r, **kw: DCTProjector(r, method="matmul", **kw),
    "dct-fft": lambda r, **kw: DCTProjector(r, method="fft", **kw),
    "polar": lambda r, **kw: PolarProjector(r, **kw),
}
SHAPES = {"tall": (64, 40), "wide": (40, 64), "square": (48, 48), "odd": (257, 96)}
RANKS = {"r1": 1, "r8": 8, "r32": 32, "full": 10_000}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

def dct_select(G: Tensor, side: str, r: int, norm: str = "l2") -> tuple[Tensor, Tensor]:
    """The reference DCT selection (Modoranu et al., 2025), brute force: T = the DCT-II
    matrix of size d (row k = vector d_k); C = G T^T (right) or (T G)^T (left); score e_k =
    ||C_k||_2^2 ("l2") or ||C_k||_1 ("l1"); the r largest, strongest first; P = T[idx]^T."""
    d = G.shape[1] if side == "right" else G.shape[0]
    T = dct_matrix(d, G.device, G.dtype)
    C = (G @ T.mT) if side == "right" else (T @ G).mT
    energy = (C.abs() if norm == "l1" else C.square()).sum(dim=0)
    idx = torch.topk(energy, r, sorted=True).indices
    return T[idx].mT, idx



def gradient(shape, dtype=torch.float32, seed=0, decay=0.0):
    """A random matrix; decay > 0 gives singular values exp(-decay * i) (a gradient-like spectrum)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(shape, generator=gen, dtype=torch.float64)
    if decay:
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        S = torch.exp(-decay * torch.arange(U.shape[1], dtype=torch.float64))
        G = (U * S) @ Vh
    return G.to(dtype)


def basis_tolerance(B):
    return 64 * math.sqrt(B.shape[1]) * torch.finfo(B.dtype).eps


def expected_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


all_cases = pytest.mark.parametrize(
    "config,shape,rank,dtype",
    [pytest.param(c, SHAPES[s], RANKS[r], DTYPES[d], id=f"{c}-{s}-{r}-{d}")
     for c, s, r, d in itertools.product(CONFIGS, SHAPES, RANKS, DTYPES)])


@all_cases
@pytest.mark.parametrize("device", DEVICES)
def test_basis_is_orthonormal(config, shape, rank, dtype, device):
    proj = CONFIGS[config](rank).update(gradient(shape, dtype).to(device))
    B = proj.basis()
    assert B.dtype == expected_dtype(dtype) and B.device.type == device
    assert orthonormality_error(B) <= basis_tolerance(B)


@all_cases
def test_shapes_and_side_follow_the_smaller_dimension(config, shape, rank, dtype):
    m, n = shape
    proj = CONFIGS[config](rank).update(gradient(shape, dtype))
    side, d = ("right", n) if m >= n else ("left", m)
    r = min(rank, d)
    assert proj.side == side and proj.dim == d and proj.effective_rank == r
    assert proj.basis().shape == (d, r)
    R = proj.project(gradient(shape, dtype, seed=1))
    assert R.shape == ((m, r) if side == "right" else (r, n))
    assert proj.project_back(R).shape == (m, n)


@all_cases
def test_project_and_project_back_agree_with_basis(config, shape, rank, dtype):
    proj = CONFIGS[config](rank).update(gradient(shape, dtype))
    B = proj.basis().double()
    X = gradient(shape, dtype, seed=2)
    ref = X.double() @ B if proj.side == "right" else B.T @ X.double()
    R = proj.project(X)
    scale = ref.abs().max()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (R.double() - ref).abs().max() <= tol * scale * math.sqrt(max(shape))
    back_ref = R.double() @ B.T if proj.side == "right" else B @ R.double()
    assert (proj.project_back(R).double() - back_ref).abs().max() <= tol * scale * max(shape)


@all_cases
def test_projecting_twice_changes_nothing(config, shape, rank, dtype):
    proj = CONFIGS[config](rank).update(gradient(shape, dtype))
    once = proj.project_back(proj.project(gradient(shape, dtype, seed=3)))
    twice = proj.project_back(proj.project(once))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (twice - once).abs().max() <= tol * once.abs().max().clamp(min=1) * math.sqrt(max(shape))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("rank", [1, 8, 32])
def test_svd_captures_the_optimal_energy(shape, rank):
    G = gradient(shape, decay=0.05)
    s = np.linalg.svd(G.double().numpy(), compute_uv=False)
    best = float((s[:rank] ** 2).sum())
    captured = float(SVDProjector(rank).update(G).project(G).double().square().sum())
    assert captured == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("config", ["svd-randomized", "polar"])
def test_sketched_bases_come_close_to_the_optimal_energy(config):
    G = gradient((257, 96), decay=0.1)
    s = np.linalg.svd(G.double().numpy(), compute_uv=False)
    best = float((s[:16] ** 2).sum())
    proj = CONFIGS[config](16).update(G)
    first = float(proj.project(G).double().square().sum())
    assert first >= 0.99 * best
    second = float(proj.update(G).project(G).double().square().sum())   # warm start
    assert second >= first * (1 - 1e-6)


@pytest.mark.parametrize("d", [1, 2, 7, 64, 96, 257])
def test_dct_vectors_are_rows_of_scipy_dct(d):
    table = scipy.fft.dct(np.eye(d), norm="ortho", axis=0)
    assert np.abs(dct_matrix(d, dtype=torch.float64).numpy() - table).max() < 1e-13
    proj = DCTProjector(min(5, d), side="right").update(gradient((8, d), seed=d))
    B = proj.basis().double().numpy()
    for j, k in enumerate(proj.indices.tolist()):
        assert np.abs(B[:, j] - table[k]).max() < 1e-6


@pytest.mark.parametrize("side", ["left", "right"])
def test_dct_selection_is_the_brute_force_best(side):
    G = gradient((9, 10), decay=0.0, seed=4)
    d = 10 if side == "right" else 9
    table = torch.from_numpy(scipy.fft.dct(np.eye(d), norm="ortho", axis=0))

    def captured(idx):
        B = table[list(idx)].T
        R = G.double() @ B if side == "right" else B.T @ G.double()
        return float(R.square().sum())

    best = max(captured(c) for c in itertools.combinations(range(d), 3))
    proj = DCTProjector(3, side=side).update(G)
    assert captured(proj.indices.tolist()) == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(33, 64), (64, 33), (20, 257)])
def test_dct_fft_energies_equal_the_dense_product(side, shape):
    G = gradient(shape, dtype=torch.float64)
    a, b = dct_energy(G, side, "fft"), dct_energy(G, side, "matmul")
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["fft", "matmul"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 1100)])
def test_dct_l1_ranking_equals_a_float64_reference(shape, side, method):
    """norm="l1" ranks DCT vectors by the L1 norm of G's coefficients on them (the authors'
    ell_norm=1): the float32 projector picks the float64 reference's r best, strongest first."""
    G = gradient(shape, seed=11)
    d = shape[1] if side == "right" else shape[0]
    table = torch.from_numpy(scipy.fft.dct(np.eye(d), norm="ortho", axis=0))   # row k = d_k
    C = G.double() @ table.T if side == "right" else (table @ G.double()).T      # col k: coefs
    reference = C.abs().sum(dim=0)
    r = 6
    proj = DCTProjector(r, side=side, method=method, norm="l1").update(G)
    chosen = proj.indices.tolist()
    assert chosen == torch.topk(reference, r).indices.tolist()
    P, idx = dct_select(G.double(), side, r, norm="l1")                  # the reference math
    assert idx.tolist() == chosen
    assert torch.allclose(P, table[chosen].T, atol=1e-12)


def test_dct_l1_and_l2_rankings_differ_where_they_should():
    """G's coefficients on d_0 are one entry of 6 (squared L2 norm 36, L1 norm 6), on d_1
    sixteen entries of 1.25 (squared L2 25, L1 20): "l2" picks d_0, "l1" picks d_1."""
    d = 8
    table = torch.from_numpy(scipy.fft.dct(np.eye(d), norm="ortho", axis=0))
    C = torch.zeros(16, d, dtype=torch.float64)     # coefficients: rows of G, columns d_k
    C[0, 0] = 6.0                                   # d_0: L2^2 36, L1 6
    C[:, 1] = 1.25                                  # d_1: L2^2 25, L1 20
    G = C @ table                                   # G d_k = C[:, k] (table orthonormal)
    l2 = DCTProjector(1, side="right", norm="l2").update(G.float()).indices.tolist()
    l1 = DCTProjector(1, side="right", norm="l1").update(G.float()).indices.tolist()
    assert (l2, l1) == ([0], [1])
    with pytest.raises(ValueError, match="norm"):
        DCTProjector(1, norm="l3")


def test_dct_projector_stores_only_indices():
    proj = DCTProjector(8).update(gradient((64, 40)))
    state = proj.state_dict()
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 1 and tensors[0].shape == (8,) and not tensors[0].is_floating_point()


def well_conditioned(m, n, cond=10.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    k = min(m, n)
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    return (U[:, :k] * s) @ V[:, :k].T


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (96, 96)])
def test_svd_polar_equals_scipy_polar(shape):
    A = well_conditioned(*shape)
    u, _ = scipy.linalg.polar(A.numpy())
    assert np.abs(orthogonalize(A, "svd").numpy() - u).max() < 1e-12
    assert np.abs(orthogonalize(A.float(), "svd").double().numpy() - u).max() < 1e-5


@pytest.mark.parametrize("method,low,high", [("newton_schulz", 0.6, 1.25),
                                             ("polar_express", 0.85, 1.15)])
@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (128, 128)])
@pytest.mark.parametrize("device", DEVICES)
def test_iterative_polar_singular_values_on_condition_number_10(method, low, high, shape, device):
    A = well_conditioned(*shape, cond=10.0).float().to(device)     # bf16 iterations on CUDA
    s = torch.linalg.svdvals(orthogonalize(A, method).double())
    assert low <= float(s.min()) and float(s.max()) <= high


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express", "svd"])
def test_iterative_polar_keeps_singular_vectors(method):
    A = well_conditioned(40, 30, cond=5.0).float()
    U, _, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    O = orthogonalize(A, method).double()
    core = U.T @ O @ Vh.T                   # diagonal iff O = U f(S) V^T
    assert (core - torch.diag(torch.diag(core))).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express", "svd"])
def test_batched_orthogonalize_equals_one_by_one(method):
    batch = torch.stack([well_conditioned(32, 48, seed=i).float() for i in range(4)])
    together = orthogonalize(batch.view(2, 2, 32, 48), method).view(4, 32, 48)
    for i in range(4):
        alone = orthogonalize(batch[i], method)
        assert torch.allclose(together[i], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
@pytest.mark.parametrize("shape", [(37, 61), (61, 37), (3, 37, 61)])
def test_zero_padding_does_not_change_the_polar_factor(method, shape):
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(shape, generator=gen)
    padded = orthogonalize(G, method, pad_to=64)
    assert padded.shape == G.shape
    assert torch.allclose(padded, orthogonalize(G, method, pad_to=1), atol=1e-5)


@pytest.mark.parametrize("method", ["newton_schulz", "polar_express"])
def test_orthogonalize_many_in_small_batches_equals_one_batch(method):
    from memopt.projections import orthogonalize_many
    gen = torch.Generator().manual_seed(5)
    mats = [torch.randn(s, generator=gen) for s in [(16, 24)] * 5 + [(24, 16)] * 3]
    whole = orthogonalize_many(mats, method)
    pieces = orthogonalize_many(mats, method, max_batch_bytes=2 * 16 * 24 * 4)   # 2 per batch
    for a, b, m in zip(whole, pieces, mats):
        assert a.shape == m.shape and torch.allclose(a, b, atol=1e-6)


def test_orthogonalize_returns_the_input_dtype():
    G = well_conditioned(16, 24).to(torch.bfloat16)
    for method in ("newton_schulz", "polar_express", "svd"):
        assert orthogonalize(G, method).dtype == torch.bfloat16


def test_orthogonalize_of_zero_is_zero():
    for method in ("newton_schulz", "polar_express", "svd"):
        assert orthogonalize(torch.zeros(8, 12), method).abs().max() == 0


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", [(64, 40), (40, 64)])
def test_state_dict_round_trip_under_weights_only(config, shape):
    G1, G2, X = gradient(shape, seed=5), gradient(shape, seed=6), gradient(shape, seed=7)
    proj = CONFIGS[config](8).update(G1)
    buffer = io.BytesIO()
    torch.save(proj.state_dict(), buffer)
    buffer.seek(0)
    restored = CONFIGS[config](8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.project(X), proj.project(X))
    assert torch.equal(restored.basis(), proj.basis())
    # the next refresh (warm start / next seeded draw) is the same as never stopping
    assert torch.equal(restored.update(G2).basis(), proj.update(G2).basis())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_holds_only_tensors_and_numbers(config):
    state = CONFIGS[config](4).update(gradient((20, 12))).state_dict()
    assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())


@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "8", None])
@pytest.mark.parametrize("name", ["svd", "dct", "polar"])
def test_bad_rank_is_a_value_error(name, rank):
    with pytest.raises(ValueError, match="rank"):
        make_projector(name, rank)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("bad", [torch.randn(8), torch.randn(2, 3, 4), torch.tensor(1.0)])
def test_non_matrix_is_a_value_error_and_changes_nothing(config, bad):
    proj = CONFIGS[config](4).update(gradient((20, 12)))
    before = proj.basis().clone()
    with pytest.raises(ValueError, match="2-D"):
        proj.update(bad)
    assert torch.equal(proj.basis(), before)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_is_a_floating_point_error_and_changes_nothing(config, value):
    proj = CONFIGS[config](4).update(gradient((20, 12)))
    before = proj.state_dict()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in before.items()}
    G = gradient((20, 12), seed=9)
    G[3, 4] = value
    with pytest.raises(FloatingPointError):
        proj.update(G)
    after = proj.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v


def test_orthogonalize_errors():
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.randn(5))
    with pytest.raises(ValueError, match="method"):
        orthogonalize(torch.randn(5, 5), method="qr")
    with pytest.raises(FloatingPointError):
        orthogonalize(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))


def test_unknown_projector_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("pca", 4)


def test_projecting_before_update_is_a_clear_error():
    with pytest.raises(RuntimeError, match="update"):
        SVDProjector(4).project(torch.randn(8, 8))


def test_wrong_operand_shape_is_a_value_error():
    proj = SVDProjector(4).update(gradient((20, 12)))
    with pytest.raises(ValueError, match="shape"):
        proj.project(torch.randn(12, 20))
    with pytest.raises(ValueError, match="shape"):
        proj.project_back(torch.randn(20, 5))


@pytest.mark.parametrize("config", ["svd-exact", "svd-randomized", "dct-matmul", "polar"])
def test_rank_deficient_gradient_still_gives_an_orthonormal_basis(config):
    u, v = gradient((30, 1), seed=1), gradient((1, 20), seed=2)
    for G in (u @ v, torch.zeros(30, 20)):
        B = CONFIGS[config](8).update(G).basis()
        assert B.shape == (20, 8)
        assert orthonormality_error(B) <= basis_tolerance(B)


@pytest.mark.parametrize("side", ["left", "right"])
def test_forced_side_on_the_longer_dimension(side):
    G = gradient((12, 30))
    for config in CONFIGS.values():
        proj = config(20, side=side).update(G)
        d = 12 if side == "left" else 30
        assert proj.basis().shape == (d, min(20, d))
        assert orthonormality_error(proj.basis()) <= basis_tolerance(proj.basis())


def test_every_projector_is_a_projector():
    for config in CONFIGS.values():
        assert isinstance(config(3), Projector)


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_svd_basis_has_a_fixed_sign_convention(method):
    G = gradient((64, 40), decay=0.05)
    B1 = SVDProjector(6, method=method).update(G).basis()
    B2 = SVDProjector(6, method=method).update(-G).basis()      # flips every singular pair
    peak = B1.gather(0, B1.abs().argmax(dim=0, keepdim=True))
    assert (peak > 0).all()
    assert torch.allclose(B1, B2, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("side", ["left", "right"])
def test_unaligned_gpu_products_match_float64(side):
    from memopt.optim.executors import aligned_width
    from memopt.projections.base import lift, project_onto
    gen = torch.Generator().manual_seed(0)
    m, n, r = (256, 341, 32) if side == "left" else (341, 203, 32)
    G = torch.randn(m, n, generator=gen, dtype=torch.float64)
    d = m if side == "left" else n
    B = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0]
    L = torch.randn((r, n) if side == "left" else (m, r), generator=gen, dtype=torch.float64)
    Gc, Bc, Lc = (t.float().cuda() for t in (G, B, L))
    assert aligned_width(n, Gc) != n                       # rows are unaligned
    R, full = project_onto(Gc, Bc, side).double().cpu(), lift(Lc, Bc, side).double().cpu()
    for got, ref in ((R, project_onto(G, B, side)), (full, lift(L, B, side))):
        assert (got - ref).norm() / ref.norm() < 1e-5      # fp32 (and TF32 at most 1e-3)


def test_dct_bases_of_many_projectors_equal_each_basis():
    from memopt.projections import DCTProjector
    from memopt.optim.executors import bases
    gen = torch.Generator().manual_seed(0)
    projectors = []
    for shape, rank in [((40, 24), 5), ((24, 40), 7), ((40, 24), 3), ((64, 64), 30),
                        ((64, 64), 40)]:
        projectors.append(DCTProjector(rank).update(torch.randn(shape, generator=gen)))
    for proj, B in zip(projectors, bases(projectors)):
        assert torch.equal(B, proj.basis())


@pytest.mark.parametrize("shape", [(16, 40), (40, 16)])
@pytest.mark.parametrize("method,steps", [("newton_schulz", 5), ("polar_express", 5),
                                          ("polar_express", 8), ("newton_schulz", 3)])
@pytest.mark.parametrize("last_factor", [False, True])
def test_gram_form_computes_the_same_map_as_the_plain_iteration(shape, method, steps,
                                                                last_factor):
    from memopt.projections.polar import (GRAM_RESTART, apply_factor, gram_factor,
                                          gram_polynomial_iteration, polynomial_iteration,
                                          schedule)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    X /= torch.linalg.matrix_norm(X).view(-1, 1, 1)
    coefficients = schedule(method, steps)
    plain = polynomial_iteration(X, coefficients)
    if last_factor:        # the last phase's factor kept apart, as Muon's step does
        Y = gram_polynomial_iteration(X, coefficients[:GRAM_RESTART])
        Q = gram_factor(Y, coefficients[GRAM_RESTART:])
        assert Q.shape == (3, min(shape), min(shape))
        gram = apply_factor(Q, Y)
    else:
        gram = gram_polynomial_iteration(X, coefficients)
    assert (gram - plain).abs().max() < 1e-10


def test_rectangular_batches_take_the_gram_form():
    from memopt.projections.polar import uses_gram_form
    assert uses_gram_form((5461, 2048), "newton_schulz", 5)
    assert uses_gram_form((2048, 5504), "polar_express", None)
    assert not uses_gram_form((2048, 2048), "newton_schulz", 5)     # square: no saving
    assert not uses_gram_form((2048, 5461), "newton_schulz", 2)     # too few steps
    assert not uses_gram_form((2048, 5461), "svd", None)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_bf16_basis_sums_bf16_products_in_fp32(side):
    """projection_precision="medium": both factors rounded to bf16, the products summed in
    fp32 into an fp32 result (on CUDA by tensor cores, elsewhere emulated)."""
    from memopt.optim.executors import bf16_product, projection_factors
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    m, n, r = (96, 160, 24) if side == "left" else (160, 96, 24)
    G = torch.randn(m, n, generator=gen)
    d = m if side == "left" else n
    B = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64))[0].float()
    R = bf16_product(*projection_factors(G.to(device).bfloat16(), B.bfloat16().to(device),
                                         side)).cpu()
    assert R.dtype == torch.float32
    G16, B16 = G.bfloat16().double(), B.bfloat16().double()
    rounded = G16 @ B16 if side == "right" else B16.T @ G16
    exact = G.double() @ B.double() if side == "right" else B.double().T @ G.double()
    assert (R.double() - rounded).norm() / rounded.norm() < 1e-6       # fp32 sums
    assert 1e-4 < (R.double() - exact).norm() / exact.norm() < 1e-2     # bf16 factors


@pytest.mark.parametrize("method", ["fft", "matmul"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_dct_energy_in_row_chunks_equals_the_whole(monkeypatch, method, side, norm):
    """dct_energy sums over G's rows in chunks of ENERGY_CHUNK elements (bounding the FFT's
    temporaries at any size): the same energies as one transform, and the same selection."""
    from memopt.projections import dct as dct_module
    G = torch.randn(96, 80, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    whole = dct_module.dct_energy(G, side, method, norm)
    monkeypatch.setattr(dct_module, "ENERGY_CHUNK", 200)          # 2-3 rows a chunk
    chunked = dct_module.dct_energy(G, side, method, norm)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    assert torch.equal(dct_module.select_dct_indices(G, side, 16, method, norm=norm),
                       torch.topk(whole, 16, sorted=True).indices)
