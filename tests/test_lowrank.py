"""GaLore, DCT and Fira: the math of the low-rank engine against references."""

import copy

import pytest
import torch

from memopt import optim as mo
from memopt.optim.basis_change import carry_moments
from memopt.projections.dct import dct_matrix


def matrix_param(shape=(48, 32), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))


def first_step(cls, shape, **kwargs):
    """One step of ``cls`` from a fixed matrix: (W before, G, the parameter after)."""
    p = matrix_param(shape)
    W0 = p.detach().double().clone()
    G = gradient(shape, 0)
    opt = cls([p], **kwargs)
    p.grad = G.clone()
    opt.step()
    return W0, G, p


def gradient(shape, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).float()


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_first_galore_step_is_minus_lr_scale_P_psi_of_PtG(shape):
    lr, scale, rank, eps = 0.01, 0.25, 6, 1e-8
    W0, G, p = first_step(mo.GaLoreAdamW, shape, lr=lr, scale=scale, rank=rank, eps=eps)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    if shape[0] >= shape[1]:               # right basis Q: R = G Q, update = psi Q^T
        Q = Vh[:rank].T
        R = G.double() @ Q
        psi = R / (R.abs() + eps)          # one Adam step: m_hat = R, v_hat = R^2
        expected = W0 - lr * scale * psi @ Q.T
    else:                                  # left basis P: R = P^T G, update = P psi
        P = U[:, :rank]
        R = P.T @ G.double()
        psi = R / (R.abs() + eps)
        expected = W0 - lr * scale * P @ psi
    assert torch.allclose(p.detach().double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_medium_precision_step_multiplies_bf16_factors(shape, dtype):
    """projection_precision="medium": R = P^T G and the lift P psi take bf16 factors (the
    fp32 basis, G and psi rounded), sum in fp32 and add into the weights in one rounding."""
    lr, scale, rank, eps = 0.01, 0.25, 6, 1e-8
    p = matrix_param(shape, dtype=dtype)
    W0 = p.detach().double().clone()
    G = gradient(shape, 0).to(dtype)
    opt = mo.GaLoreAdamW([p], lr=lr, scale=scale, rank=rank, eps=eps,
                         projection_precision="medium")
    p.grad = G.clone()
    opt.step()
    B = opt.projector(p).basis()
    assert B.dtype == torch.float32                       # kept in fp32
    B16, G16 = B.bfloat16().double(), G.bfloat16().double()
    right = shape[0] >= shape[1]
    R = (G16 @ B16 if right else B16.T @ G16).float().double()
    psi = (R / (R.abs() + eps)).bfloat16().double()       # one Adam step, then bf16
    expected = W0 - lr * scale * (psi @ B16.T if right else B16 @ psi)
    atol = 1e-6 if dtype == torch.float32 else 1e-2       # bf16 weights: their own rounding
    assert torch.allclose(p.detach().double(), expected, atol=atol, rtol=0)
    highest = first_step(mo.GaLoreAdamW, shape, lr=lr, scale=scale, rank=rank, eps=eps)[2]
    if dtype == torch.float32:                            # and it differs from full fp32
        assert not torch.allclose(p.detach(), highest.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["galore", "dct", "fira"])
def test_medium_precision_tracks_full_precision(name):
    """bf16 factors change the steps by far less than the steps themselves."""
    from helpers import make
    runs = []
    for precision in ("highest", "medium"):
        ps = [matrix_param(shape, seed=i) for i, shape in enumerate([(48, 32), (32, 48)])]
        start = [p.detach().clone() for p in ps]
        opt = make(name, ps, projection_precision=precision)
        for t in range(8):                   # gap 3: refreshes at 3 and 6
            for i, p in enumerate(ps):
                p.grad = gradient(p.shape, 10 * t + i)
            opt.step()
        runs.append([(p.detach() - s).double() for p, s in zip(ps, start)])
    for full, medium in zip(*runs):
        assert (medium - full).norm() / full.norm() < 0.03


@pytest.mark.parametrize("projector", ["svd", "dct", "polar"])
@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_updates_stay_in_the_subspace_between_refreshes(projector, shape):
    p = matrix_param(shape, dtype=torch.float64)     # fp64: no rounding in the difference
    opt = mo.GaLoreAdamW([p], lr=0.01, rank=5, update_proj_gap=4, projector=projector)
    for t in range(4):                      # refresh at step 0 only
        before = p.detach().clone()
        p.grad = gradient(shape, t).double()
        opt.step()
        B = opt.projector(p).basis()
        assert B.dtype == torch.float64
        delta = p.detach() - before
        if shape[0] >= shape[1]:
            outside = delta - delta @ B @ B.T
        else:
            outside = delta - B @ B.T @ delta
        assert outside.norm() <= 1e-10 * delta.norm()


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_fira_update_has_an_out_of_subspace_part(projector):
    shape = (48, 32)
    p = matrix_param(shape)
    opt = mo.FiraAdamW([p], lr=0.01, rank=5, update_proj_gap=100, projector=projector)
    p.grad = gradient(shape, 0)
    before = p.detach().clone()
    opt.step()
    B = opt.projector(p).basis().double()
    delta = (p.detach() - before).double()
    outside = delta - delta @ B @ B.T
    assert outside.norm() > 0.3 * delta.norm()


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_fira_step_matches_the_paper_formula(shape):
    lr, scale, rank, eps = 0.01, 0.25, 4, 1e-8
    W0, G, p = first_step(mo.FiraAdamW, shape, lr=lr, scale=scale, rank=rank, eps=eps)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    if shape[0] >= shape[1]:                # right basis Q: phi per row
        Q = Vh[:rank].T
        R = G.double() @ Q
        psi = R / (R.abs() + eps)
        phi = psi.norm(dim=1, keepdim=True) / (R.norm(dim=1, keepdim=True) + 1e-8)
        expected = W0 - lr * (scale * psi @ Q.T + phi * (G.double() - R @ Q.T))
    else:                                   # left basis P: phi per column
        P = U[:, :rank]
        R = P.T @ G.double()
        psi = R / (R.abs() + eps)
        phi = psi.norm(dim=0, keepdim=True) / (R.norm(dim=0, keepdim=True) + 1e-8)
        expected = W0 - lr * (scale * P @ psi + phi * (G.double() - P @ R))
    assert torch.allclose(p.detach().double(), expected, atol=1e-6, rtol=0)


def test_fira_limiter_caps_a_100x_gradient_spike():
    shape = (48, 32)
    p = matrix_param(shape)
    gamma = 1.01
    opt = mo.FiraAdamW([p], lr=0.01, rank=5, update_proj_gap=100, limiter_gamma=gamma)
    norms = []
    for t in range(6):
        G = gradient(shape, t) * (100.0 if t == 5 else 1.0)
        p.grad = G
        opt.step()
        norms.append(float(opt.state[p]["residual_norm"]))
    assert norms[5] <= gamma * norms[4] * (1 + 1e-6)
    # and the out-of-subspace part of the actual update obeys the same cap
    p2 = matrix_param(shape)
    opt2 = mo.FiraAdamW([p2], lr=0.01, rank=5, update_proj_gap=100, limiter_gamma=gamma)
    outside = []
    for t in range(6):
        before = p2.detach().clone()
        p2.grad = gradient(shape, t) * (100.0 if t == 5 else 1.0)
        opt2.step()
        B = opt2.projector(p2).basis().double()
        delta = (p2.detach() - before).double()
        outside.append(float((delta - delta @ B @ B.T).norm()))
    assert outside[5] <= gamma * outside[4] * (1 + 1e-4)


def test_without_the_limiter_the_spike_grows_the_residual():
    shape = (48, 32)
    p = matrix_param(shape)
    opt = mo.FiraAdamW([p], lr=0.01, rank=5, update_proj_gap=100, limiter_gamma=1e9)
    for t in range(6):
        p.grad = gradient(shape, t) * (100.0 if t == 5 else 1.0)
        opt.step()
        if t == 4:
            before = float(opt.state[p]["residual_norm"])
    assert float(opt.state[p]["residual_norm"]) > 1.05 * before     # so the cap above acted


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
def test_agrees_with_galore_torch(shape):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    p1 = matrix_param(shape)
    bias1 = torch.nn.Parameter(torch.randn(shape[0]))
    p2, bias2 = copy.deepcopy(p1), copy.deepcopy(bias1)
    # One refresh (step 0): at later refreshes galore-torch keeps moments in whatever sign
    # torch.linalg.svd gave the new singular vectors, while our bases follow a fixed sign
    # convention (projections.base.canonical_signs), so the two part ways there by design.
    kw = dict(rank=6, update_proj_gap=100, scale=0.25)
    eps = 1e-12       # galore-torch adds eps to sqrt(v) before bias correction, we after
    ours = mo.GaLoreAdamW([{"params": [p1], **kw}, {"params": [bias1], "rank": None}],
                          lr=0.01, eps=eps)
    with pytest.warns(FutureWarning):
        theirs = galore_torch.GaLoreAdamW([{"params": [p2], **kw, "proj_type": "std"},
                                           {"params": [bias2]}], lr=0.01, eps=eps)
    for t in range(10):
        G, g = gradient(shape, t), gradient((shape[0],), t)
        p1.grad, p2.grad = G.clone(), G.clone()
        bias1.grad, bias2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        assert torch.allclose(p1, p2, atol=1e-6, rtol=1e-5), t
        assert torch.allclose(bias1, bias2, atol=1e-6, rtol=1e-5), t


def test_dense_parameters_get_exactly_torch_adamw():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(3, 3))]
    twins = copy.deepcopy(params)
    ours = mo.GaLoreAdamW(params, lr=0.01, weight_decay=0.1, rank=8)    # nothing is projected
    theirs = torch.optim.AdamW(twins, lr=0.01, weight_decay=0.1, foreach=True)
    for t in range(5):
        for a, b in zip(params, twins):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(params, twins):
        assert torch.equal(a, b)


def test_dct_refresh_keeps_moments_of_indices_that_stay_when_rotating():
    shape = (40, 64)                      # left basis over 40 rows
    p = matrix_param(shape)
    opt = mo.DCTAdamW([p], lr=0.01, rank=6, update_proj_gap=2, moments_on_refresh="rotate")
    for t in range(2):
        p.grad = gradient(shape, t)
        opt.step()
    old_idx = opt.state[p]["proj_indices"].clone()
    old_m = opt.state[p]["exp_avg"].clone()
    p.grad = gradient(shape, 7)
    # replay the refresh alone to see the carried moments before this step's Adam update
    new_idx = mo.lowrank.make_projector("dct", 6).update(p.grad).indices
    opt.step()
    m = opt.state[p]["exp_avg"]
    R = dct_matrix(40)[new_idx] @ p.grad            # this step's projected gradient
    carried = (m - 0.1 * R) / 0.9                   # undo m <- 0.9 m + 0.1 R
    for j, k in enumerate(new_idx.tolist()):
        if k in old_idx.tolist():
            i = old_idx.tolist().index(k)
            assert torch.allclose(carried[j], old_m[i], atol=1e-5)
        else:
            assert carried[j].abs().max() < 1e-5


@pytest.mark.parametrize("projector", ["svd", "polar"])
def test_rotation_carries_moments_into_the_new_basis(projector):
    shape = (48, 32)                      # right basis
    p = matrix_param(shape)
    opt = mo.GaLoreAdamW([p], lr=0.01, rank=5, update_proj_gap=2, projector=projector,
                         moments_on_refresh="rotate")
    for t in range(2):
        p.grad = gradient(shape, t)
        opt.step()
    B_old = opt.projector(p).basis().clone()
    m_old = opt.state[p]["exp_avg"].clone()
    p.grad = gradient(shape, 9)
    opt.step()
    B_new = opt.projector(p).basis()
    R = p.grad @ B_new
    carried = (opt.state[p]["exp_avg"] - 0.1 * R) / 0.9
    assert torch.allclose(carried, m_old @ (B_new.T @ B_old).T, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotation_into_the_same_subspace_keeps_what_a_fixed_basis_keeps(side):
    """A refresh that returns the same subspace with its vectors reordered and sign-flipped
    (as a new SVD may): "rotate" carries m and v so that each direction keeps its moments,
    as if the basis had not changed (P_new m_new = P_old m_old; v follows its direction);
    "keep" would pair them with the wrong directions. Any rotation keeps v >= 0."""
    gen = torch.Generator().manual_seed(3)
    d, r, n = 30, 5, 12
    P_old = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    signs = torch.tensor([1.0, -1, -1, 1, 1], dtype=torch.float64)
    P_new = P_old[:, [3, 0, 4, 1, 2]] * signs
    shape = (r, n) if side == "left" else (n, r)
    m = torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.rand(shape, generator=gen, dtype=torch.float64)
    m2, v2 = carry_moments(m.clone(), v.clone(), "rotate", P_new, P_old, side)
    lift = (lambda X, P: P @ X) if side == "left" else (lambda X, P: X @ P.mT)
    assert torch.allclose(lift(m2, P_new), lift(m, P_old), atol=1e-12)
    assert torch.allclose(lift(v2, P_new.abs()), lift(v, P_old.abs()), atol=1e-12)
    kept, _ = carry_moments(m.clone(), v.clone(), "keep", P_new, P_old, side)
    assert not torch.allclose(lift(kept, P_new), lift(m, P_old), atol=1e-3)
    Q = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    assert (carry_moments(m.clone(), v.clone(), "rotate", Q, P_old, side)[1] >= 0).all()


@pytest.mark.parametrize("side", ["left", "right"])
def test_rotate_fill_gives_new_directions_the_gradients_square(side):
    """A DCT-like refresh (a selection of orthonormal vectors) keeps two old directions and
    brings one new: "rotate" and "rotate_fill" carry the kept ones alike; the new one gets
    v = 0 under "rotate" and bias2 R^2 under "rotate_fill" (m = 0 under both). A direction
    half inside the old subspace gets half of each."""
    eye = torch.eye(6, dtype=torch.float64)
    P_old, P_new = eye[:, [0, 1, 2]], eye[:, [2, 0, 5]]
    n = 4
    shape = (3, n) if side == "left" else (n, 3)
    gen = torch.Generator().manual_seed(0)
    m, v = torch.randn(shape, generator=gen, dtype=torch.float64), \
        torch.rand(shape, generator=gen, dtype=torch.float64)
    G = torch.randn((6, n) if side == "left" else (n, 6), generator=gen, dtype=torch.float64)
    R = P_new.T @ G if side == "left" else G @ P_new
    col = (lambda X, i: X[i]) if side == "left" else (lambda X, i: X[:, i])
    m1, v1 = carry_moments(m.clone(), v.clone(), "rotate", P_new, P_old, side)
    m2, v2 = carry_moments(m.clone(), v.clone(), "rotate_fill", P_new, P_old, side, R, 0.25)
    assert torch.equal(m1, m2)
    for new, old in ((0, 2), (1, 0)):
        assert torch.equal(col(v2, new), col(v, old)) and torch.equal(col(m2, new), col(m, old))
    assert (col(v1, 2) == 0).all() and (col(m2, 2) == 0).all()
    assert torch.allclose(col(v2, 2), 0.25 * col(R, 2) ** 2, atol=1e-15)
    half = P_new.clone()
    half[:, 2] = (eye[:, 1] + eye[:, 5]) / 2 ** 0.5
    R = half.T @ G if side == "left" else G @ half
    _, v3 = carry_moments(m.clone(), v.clone(), "rotate_fill", half, P_old, side, R, 1.0)
    assert torch.allclose(col(v3, 2), 0.5 * col(v, 1) + 0.5 * col(R, 2) ** 2, atol=1e-12)


def test_rotate_fill_first_step_after_refresh_is_not_oversized():
    """In the optimizer: gradients along DCT vectors 0-3 for three steps, then along 8-11 at
    the refresh (a disjoint subspace), step t = 4. Along the new vectors "rotate" moves by
    m_hat / sqrt(v_hat) with m = (1 - b1) R, v = (1 - b2) R^2 (3.2 lr once t is large),
    "rotate_fill" by m_hat / |R|: Adam's step with a known second moment (0.1 lr, t large)."""
    from memopt.projections.dct import dct_matrix
    D = dct_matrix(16, dtype=torch.float64).to(torch.float32)
    gen = torch.Generator().manual_seed(1)
    coefficients = torch.randn(4, 24, generator=gen)
    sizes = {}
    for mode in ("rotate", "rotate_fill"):
        p = torch.nn.Parameter(torch.zeros(16, 24))
        opt = mo.DCTAdamW([p], lr=1.0, rank=4, update_proj_gap=3, scale=1.0,
                          moments_on_refresh=mode)
        for step in range(4):
            rows = [0, 1, 2, 3] if step < 3 else [8, 9, 10, 11]
            basis = D[rows].T                     # dct_matrix: one DCT vector per row
            p.grad = basis @ coefficients
            before = p.detach().clone()
            opt.step()
        step_along_new = basis.T @ (p.detach() - before)
        sizes[mode] = step_along_new.abs().max().item()
    b1, b2, t = 0.9, 0.999, 4
    m_hat = (1 - b1) / (1 - b1**t)
    assert sizes["rotate"] == pytest.approx(m_hat / ((1 - b2) / (1 - b2**t)) ** 0.5, rel=1e-4)
    assert sizes["rotate_fill"] == pytest.approx(m_hat, rel=1e-4)


def test_reset_zeros_moments_and_restarts_bias_correction():
    shape = (48, 32)
    p = matrix_param(shape)
    opt = mo.GaLoreAdamW([p], lr=0.01, rank=5, update_proj_gap=3, moments_on_refresh="reset")
    for t in range(3):
        p.grad = gradient(shape, t)
        opt.step()
    assert int(opt.state[p]["step"]) == 3
    p.grad = gradient(shape, 3)
    opt.step()                            # refresh: moments zeroed, then one Adam step
    B = opt.projector(p).basis()
    R = p.grad @ B
    assert int(opt.state[p]["step"]) == 1
    assert torch.allclose(opt.state[p]["exp_avg"], 0.1 * R, atol=1e-6)


def test_keep_leaves_moments_untouched_at_refresh():
    shape = (48, 32)
    p = matrix_param(shape)
    opt = mo.GaLoreAdamW([p], lr=0.01, rank=5, update_proj_gap=2)
    for t in range(2):
        p.grad = gradient(shape, t)
        opt.step()
    m_old = opt.state[p]["exp_avg"].clone()
    p.grad = gradient(shape, 5)
    opt.step()
    R = p.grad @ opt.projector(p).basis()
    assert torch.allclose(opt.state[p]["exp_avg"], 0.9 * m_old + 0.1 * R, atol=1e-6)
    assert int(opt.state[p]["step"]) == 3


def test_8bit_tracks_32bit():
    shape = (256, 192)
    p32, p8 = matrix_param(shape), matrix_param(shape)
    o32 = mo.GaLoreAdamW([p32], lr=1e-3, rank=32)
    o8 = mo.GaLoreAdamW8bit([p8], lr=1e-3, rank=32)
    start = p32.detach().clone()
    for t in range(10):
        G = gradient(shape, t)
        p32.grad, p8.grad = G.clone(), G.clone()
        o32.step()
        o8.step()
    assert o8.state[p8]["exp_avg"].dtype == torch.uint8
    moved = (p32 - start).norm()
    assert (p8 - p32).norm() < 0.1 * moved


def test_the_8bit_classes_are_the_same_engine_with_8_bits():
    p = matrix_param()
    for cls, base in [(mo.GaLoreAdamW8bit, mo.GaLoreAdamW), (mo.DCTAdamW8bit, mo.DCTAdamW),
                      (mo.FiraAdamW8bit, mo.FiraAdamW)]:
        opt = cls([p])
        assert isinstance(opt, base) and opt.defaults["state_bits"] == 8
    assert mo.DCTAdamW([p]).defaults["projector"] == "dct"
    assert mo.FiraAdamW([p]).defaults["residual"] == "fira"
    assert mo.GaLoreAdamW([p]).defaults["projector"] == "svd"


def test_dct_state_is_indices_not_a_basis():
    p = matrix_param((256, 192))
    opt = mo.DCTAdamW([p], rank=32)
    p.grad = gradient((256, 192), 0)
    opt.step()
    state = opt.state[p]
    assert "proj_basis" not in state
    assert state["proj_indices"].shape == (32,) and state["proj_indices"].dtype == torch.int64


def test_chunked_steps_equal_one_chunk(monkeypatch):
    from memopt.optim import executors
    results = []
    for chunk_bytes in (1, 2**40):         # every matrix its own slice / all in one
        monkeypatch.setattr(executors, "CHUNK_BYTES", chunk_bytes)
        ps = [matrix_param((48, 32), seed=i) for i in range(3)]
        opt = mo.FiraAdamW(ps, lr=0.01, rank=5, update_proj_gap=2)
        for t in range(3):
            for i, p in enumerate(ps):
                p.grad = gradient((48, 32), 10 * t + i)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["galore", "dct", "fira"])
@pytest.mark.parametrize("pad", [0, 3])
def test_batched_and_one_by_one_products_agree(name, pad, monkeypatch):
    """Small matrices are projected and lifted with batched products over stacked copies
    (with zero-padded rows where rows are unaligned), large ones one by one; both give the
    same steps (to fp32 rounding)."""
    from helpers import make
    from memopt.optim import executors_lowrank
    shapes = [(48, 32)] * 3 + [(32, 48)] * 2 + [(30, 45)]
    results = []
    for flops, extra in ((0, 0), (float("inf"), pad)):   # one by one; batched (and padded)
        monkeypatch.setattr(executors_lowrank, "BATCHED_PRODUCT_FLOPS", flops)
        monkeypatch.setattr(executors_lowrank, "aligned_width",
                            lambda n, like, extra=extra: n + extra)
        ps = [matrix_param(shape, seed=i) for i, shape in enumerate(shapes)]
        opt = make(name, ps, weight_decay=0.1)
        for t in range(5):                     # gap 3: a refresh at step 3
            for i, p in enumerate(ps):
                p.grad = gradient(p.shape, 10 * t + i)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
