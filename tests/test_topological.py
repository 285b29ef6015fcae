"""Tests for nnunet_topomae.losses.topological against independent references
(gudhi run directly, brute-force matching, hand-computed values, finite differences)."""
import itertools
import math

import numpy as np
import pytest
import torch
from gudhi import CubicalComplex

from nnunet_topomae.losses.topological import (
    InputPersistence,
    TopologicalLoss,
    diagram_from_pairs,
    persistence_pairs,
    reduce_volume,
    reduced_diagrams,
    reduction_kernel,
    topological_loss_batch,
    topological_loss_single,
    wasserstein2_matching,
)

N = 24


def _grid(n=N):
    c = (n - 1) / 2
    x, y, z = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    return x, y, z


def _volume(sdf, width=1.5):
    # Objects (sdf < 0) are dark, so they appear early in the sublevel filtration.
    return np.tanh(sdf / width)


def ball():
    x, y, z = _grid()
    return _volume(np.sqrt(x**2 + y**2 + z**2) - 8)


def shell():
    x, y, z = _grid()
    return _volume(np.abs(np.sqrt(x**2 + y**2 + z**2) - 8) - 2)


def cylinder():
    x, y, z = _grid()
    return _volume(np.maximum(np.sqrt(x**2 + y**2) - 8, np.abs(z) - 3))


def torus():
    x, y, z = _grid()
    return _volume(np.sqrt((np.sqrt(x**2 + y**2) - 7) ** 2 + z**2) - 3)


def _max_persistence(volume, d):
    pairs = persistence_pairs(volume, dims=(d,))[d]
    if len(pairs) == 0:
        return 0.0
    diag = diagram_from_pairs(volume, pairs)
    return float((diag[:, 1] - diag[:, 0]).max())


def _w2_sq(a, b, rows, cols, da, db):
    cost = ((a[rows] - b[cols]) ** 2).sum()
    cost += ((a[da, 1] - a[da, 0]) ** 2 / 2).sum() + ((b[db, 1] - b[db, 0]) ** 2 / 2).sum()
    return cost


def _brute_force_w2_sq(a, b):
    best = np.inf
    for k in range(min(len(a), len(b)) + 1):
        for ra in itertools.combinations(range(len(a)), k):
            for cb in itertools.permutations(range(len(b)), k):
                da = np.setdiff1d(np.arange(len(a)), ra).astype(int)
                db = np.setdiff1d(np.arange(len(b)), cb).astype(int)
                best = min(best, _w2_sq(a, b, np.array(ra, int), np.array(cb, int), da, db))
    return best


def _random_diagram(rng, n):
    birth = rng.random(n)
    return np.stack([birth, birth + rng.random(n)], axis=1)


# ---------------------------------------------------------------- loss values

@pytest.mark.parametrize("make", [ball, shell, torus])
def test_identical_volumes_zero_loss(make):
    v = make()
    loss = topological_loss_single(torch.tensor(v), v)
    assert abs(loss.item()) < 1e-8


def test_ball_vs_shell_void():
    b, s = ball(), shell()
    assert _max_persistence(s, 2) > 1.5  # enclosed cavity: born at ~-1, filled at ~+1
    assert _max_persistence(b, 2) < 0.1
    # The ball has no D_2 point, so the cavity goes to the diagonal: 1/2 * p^2 / 2.
    p = _max_persistence(s, 2)
    assert topological_loss_single(torch.tensor(b), s, dims=(2,)).item() == pytest.approx(p**2 / 4, rel=1e-6)
    assert topological_loss_single(torch.tensor(b), s).item() > 0.5


def test_cylinder_vs_torus_tunnel():
    c, t = cylinder(), torus()
    assert _max_persistence(t, 1) > 1.5
    assert _max_persistence(c, 1) < 0.1
    p = _max_persistence(t, 1)
    assert topological_loss_single(torch.tensor(c), t, dims=(1,)).item() == pytest.approx(p**2 / 4, rel=1e-6)
    assert topological_loss_single(torch.tensor(t), c).item() > 0.5


def test_inverted_shell_has_two_components():
    # Bright-object convention: the cavity becomes a separate dark component (D_0).
    s, b = -shell(), -ball()
    assert _max_persistence(s, 0) > 1.5
    assert _max_persistence(b, 0) < 0.1
    p = _max_persistence(s, 0)
    assert topological_loss_single(torch.tensor(b), s, dims=(0,)).item() == pytest.approx(p**2 / 4, rel=1e-3)


def test_essential_hand_computed():
    recon = torch.ones(4, 5, 3, dtype=torch.float64)
    recon[1, 2, 1] = 0.0
    recon.requires_grad_(True)
    target = np.ones((4, 5, 3))
    target[3, 0, 2] = -1.0
    # Only D_0 essential points (0, inf) vs (-1, inf): 1/2 * (0 - (-1))^2.
    loss = topological_loss_single(recon, target)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    expected = torch.zeros_like(recon)
    expected[1, 2, 1] = 1.0
    assert torch.equal(recon.grad, expected)


def test_precomputed_target_pairs():
    rng = np.random.default_rng(3)
    r, t = rng.random((6, 7, 5)), rng.random((6, 7, 5))
    a = topological_loss_single(torch.tensor(r), t, max_pairs=10)
    pre = persistence_pairs(t, max_pairs=10)
    b = topological_loss_single(torch.tensor(r), t, max_pairs=10, target_pairs=pre)
    assert a.item() == pytest.approx(b.item())


# ------------------------------------------------------- persistence pairs

def test_flat_index_is_c_order():
    v = np.zeros((2, 3, 4))
    v[1, 2, 3] = -5.0  # global minimum -> essential class
    v[0, 0, 1] = -2.0  # second component, dies at 0
    pairs = persistence_pairs(v)
    assert pairs[("essential", 0)].tolist() == [np.ravel_multi_index((1, 2, 3), v.shape)]
    assert pairs[0][:, 0].tolist() == [np.ravel_multi_index((0, 0, 1), v.shape)]
    assert len(pairs[1]) == 0 and len(pairs[2]) == 0


@pytest.mark.parametrize("shape", [(7, 9, 5), (5, 4, 8), (6, 6, 6)])
@pytest.mark.parametrize("seed", [0, 1])
def test_diagrams_match_gudhi(shape, seed):
    v = np.random.default_rng(seed).random(shape)
    pairs = persistence_pairs(v)
    cc = CubicalComplex(vertices=v)
    cc.persistence()
    for d in (0, 1, 2):
        ref = cc.persistence_intervals_in_dimension(d).reshape(-1, 2)
        finite = ref[np.isfinite(ref[:, 1])]
        finite = finite[finite[:, 1] > finite[:, 0]]
        ours = diagram_from_pairs(v, pairs[d])
        np.testing.assert_allclose(np.array(sorted(map(tuple, ours))).reshape(-1, 2),
                                   np.array(sorted(map(tuple, finite))).reshape(-1, 2))
        ess = np.sort(ref[~np.isfinite(ref[:, 1]), 0])
        np.testing.assert_allclose(np.sort(v.ravel()[pairs[("essential", d)]]), ess)
    assert len(pairs[("essential", 0)]) == 1


def test_max_pairs_keeps_most_persistent():
    v = np.random.default_rng(5).random((7, 9, 5))
    full, top = persistence_pairs(v), persistence_pairs(v, max_pairs=5)
    for d in (0, 1):
        pers_full = np.sort(np.diff(diagram_from_pairs(v, full[d]), axis=1).ravel())[::-1]
        pers_top = np.sort(np.diff(diagram_from_pairs(v, top[d]), axis=1).ravel())[::-1]
        assert len(pers_top) == min(5, len(pers_full))
        np.testing.assert_allclose(pers_top, pers_full[: len(pers_top)])


def test_diagram_from_pairs_torch_numpy_agree():
    v = np.random.default_rng(2).random((5, 6, 7))
    p = persistence_pairs(v)[0]
    np.testing.assert_allclose(diagram_from_pairs(torch.tensor(v), p).numpy(), diagram_from_pairs(v, p))


# ---------------------------------------------------------------- matching

def test_matching_hand_computed():
    a = np.array([[0.0, 1.0]])
    rows, cols, da, db = wasserstein2_matching(a, np.array([[0.0, 1.2]]))
    assert rows.tolist() == [0] and cols.tolist() == [0] and len(da) == 0 and len(db) == 0
    # Far apart: both to the diagonal, cost 0.5 + 0.005 < 25 + 16.81.
    rows, cols, da, db = wasserstein2_matching(a, np.array([[5.0, 5.1]]))
    assert len(rows) == 0 and da.tolist() == [0] and db.tolist() == [0]
    rows, cols, da, db = wasserstein2_matching(a, np.zeros((0, 2)))
    assert len(rows) == 0 and da.tolist() == [0] and len(db) == 0


@pytest.mark.parametrize("seed", range(20))
def test_matching_brute_force(seed):
    rng = np.random.default_rng(seed)
    a, b = _random_diagram(rng, rng.integers(0, 4)), _random_diagram(rng, rng.integers(0, 4))
    rows, cols, da, db = wasserstein2_matching(a, b)
    # Every point is used exactly once.
    assert sorted(np.concatenate([rows, da]).tolist()) == list(range(len(a)))
    assert sorted(np.concatenate([cols, db]).tolist()) == list(range(len(b)))
    assert _w2_sq(a, b, rows, cols, da, db) == pytest.approx(_brute_force_w2_sq(a, b), abs=1e-12)


def test_matching_vs_hera():
    hera = pytest.importorskip("gudhi.hera")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = _random_diagram(rng, 30), _random_diagram(rng, 25)
        ours = _w2_sq(a, b, *wasserstein2_matching(a, b))
        ref = hera.wasserstein_distance(a, b, order=2, internal_p=2, delta=1e-6) ** 2
        assert ours == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------- gradients

def test_gradients_only_on_pair_voxels():
    rng = np.random.default_rng(7)
    shape = (6, 7, 5)
    recon_np, target = rng.random(shape), rng.random(shape)
    recon = torch.tensor(recon_np, requires_grad=True)
    topological_loss_single(recon, target).backward()
    grad = recon.grad.numpy().ravel()

    pr, pt = persistence_pairs(recon_np), persistence_pairs(target)
    allowed = set(pr[("essential", 0)].tolist())
    for d in (0, 1, 2):
        allowed |= set(pr[d].ravel().tolist())
    assert set(np.flatnonzero(grad).tolist()) <= allowed

    for d in (0, 1, 2):
        dr, dt = diagram_from_pairs(recon_np, pr[d]), diagram_from_pairs(target, pt[d])
        rows, cols, diag_r, _ = wasserstein2_matching(dr, dt)
        for i, j in zip(rows, cols):
            for k in (0, 1):
                if abs(dr[i, k] - dt[j, k]) > 1e-9:
                    assert grad[pr[d][i, k]] != 0
        for i in diag_r:
            assert grad[pr[d][i, 0]] != 0 and grad[pr[d][i, 1]] != 0


def test_gradient_matches_finite_differences():
    # The loss is piecewise quadratic in the voxel values; random data keeps us
    # away from the pieces' boundaries, so central differences are exact-ish.
    rng = np.random.default_rng(11)
    shape = (5, 6, 4)
    recon_np, target = rng.random(shape), rng.random(shape)
    recon = torch.tensor(recon_np, requires_grad=True)
    topological_loss_single(recon, target).backward()
    h = 1e-7
    fd = np.zeros(recon_np.size)
    for i in range(recon_np.size):
        plus, minus = recon_np.copy().ravel(), recon_np.copy().ravel()
        plus[i] += h
        minus[i] -= h
        fp = topological_loss_single(torch.tensor(plus.reshape(shape)), target).item()
        fm = topological_loss_single(torch.tensor(minus.reshape(shape)), target).item()
        fd[i] = (fp - fm) / (2 * h)
    np.testing.assert_allclose(recon.grad.numpy().ravel(), fd, atol=1e-5)


# ------------------------------------------------------- reduction + module

@pytest.mark.parametrize("shape,expected", [((40, 56, 40), (20, 28, 20)), ((20, 160, 128), (20, 32, 32)),
                                            ((33, 31, 65), (17, 31, 22))])
def test_reduce_volume_shapes(shape, expected):
    x = torch.ones(2, 1, *shape)
    y = reduce_volume(x, max_size=32)
    assert tuple(y.shape[2:]) == expected
    assert all(s <= 32 for s in y.shape[2:])
    # Partial border windows are averaged over in-volume voxels only.
    assert torch.allclose(y, torch.ones_like(y))


@pytest.mark.parametrize("shape,expected", [
    ((40, 56, 40), (20, 28, 20)),     # Hippocampus: within the budget, only the per-axis cap applies
    ((128, 128, 128), (22, 22, 22)),  # 32^3 = 32768 voxels is over budget: coarsened to 22^3
    ((20, 160, 128), (20, 23, 26)),   # the longest reduced axis is coarsened first
    ((16, 16, 16), (16, 16, 16)),
])
def test_reduce_volume_voxel_budget(shape, expected):
    x = torch.ones(1, 1, *shape)
    y = reduce_volume(x, max_size=32, max_voxels=12288)
    assert tuple(y.shape[2:]) == expected
    assert math.prod(y.shape[2:]) <= 12288
    assert torch.allclose(y, torch.ones_like(y))
    assert reduction_kernel(shape, 32, None) == tuple(math.ceil(s / 32) for s in shape)


def test_topological_loss_and_input_persistence_share_the_budget():
    torch.manual_seed(0)
    image = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 64, 64, 64), 5, stride=1, padding=2)
    pairs = InputPersistence(32, max_pairs=16, max_voxels=4096)(image[0].numpy())
    reduced = reduce_volume(image, 32, 4096)
    assert tuple(reduced.shape[2:]) == (16, 16, 16)
    expected = persistence_pairs(reduced[0, 0].numpy().astype(np.float64), max_pairs=16)
    assert all(np.array_equal(pairs[0][k], expected[k]) for k in expected)
    recon = image + 0.05 * torch.randn_like(image)
    loss = TopologicalLoss(max_size=32, max_pairs=16, max_voxels=4096)
    with_pairs = loss(recon, image, target_pairs=[pairs]).item()
    assert with_pairs > 0 and with_pairs == pytest.approx(loss(recon, image).item(), rel=1e-9)


def test_reduce_volume_identity_and_grad():
    x = torch.rand(1, 2, 32, 16, 8)
    assert reduce_volume(x, max_size=32) is x
    x = torch.rand(1, 1, 40, 56, 40, requires_grad=True)
    reduce_volume(x).sum().backward()
    assert torch.all(x.grad > 0)


def test_topological_loss_module():
    torch.manual_seed(0)
    target = torch.nn.functional.avg_pool3d(torch.rand(2, 1, 40, 56, 40), 5, stride=1, padding=2)
    recon = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    loss = TopologicalLoss()(recon, target)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0
    assert TopologicalLoss()(target, target).item() < 1e-8


def test_batch_loss_equals_the_volumes_one_by_one():
    # one gather over the batch must not mix up volumes: values and gradients as if computed alone,
    # including a constant volume (no finite pairs at all) between two others
    rng = np.random.default_rng(3)
    shape = (10, 12, 9)
    recon = np.stack([rng.random(shape), np.full(shape, 0.5), rng.random(shape)])
    target = np.stack([rng.random(shape), rng.random(shape), np.full(shape, 0.2)])
    r_pairs = [persistence_pairs(v, max_pairs=20) for v in recon]
    t_pairs = [persistence_pairs(v, max_pairs=20) for v in target]
    batch = torch.tensor(recon, requires_grad=True)
    loss = topological_loss_batch(batch, target, r_pairs, t_pairs)
    (loss * torch.tensor([1.0, 2.0, 3.0], dtype=loss.dtype)).sum().backward()
    for v in range(3):
        single = torch.tensor(recon[v], requires_grad=True)
        ref = topological_loss_single(single, target[v], target_pairs=t_pairs[v], recon_pairs=r_pairs[v])
        (ref * (v + 1)).backward()
        assert loss[v].item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
        assert torch.allclose(batch.grad[v], single.grad)
    assert loss[0].item() > 0 and loss[2].item() > 0 and batch.grad[1].abs().sum() > 0


def test_reduced_diagrams_are_what_the_loss_sees():
    # the pictures show the points the loss matches and the loss's value, not a look-alike
    torch.manual_seed(1)
    image = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 40, 56, 40), 5, stride=1, padding=2)
    recon = image + 0.05 * torch.randn_like(image)
    out = reduced_diagrams({"input": image[0, 0].numpy(), "recon": recon[0, 0].numpy(),
                            "same": image[0, 0].numpy()}, max_size=32, max_voxels=4096, max_pairs=16)
    assert list(out) == ["input", "recon", "same"]
    loss = TopologicalLoss(max_size=32, max_pairs=16, max_voxels=4096)(recon, image).item()
    assert out["recon"][1] > 0 and out["recon"][1] == pytest.approx(loss, rel=1e-6)
    assert out["input"][1] == 0.0 and out["same"][1] == pytest.approx(0.0, abs=1e-12)
    reduced = reduce_volume(image, 32, 4096)[0, 0].numpy().astype(np.float64)
    pairs = persistence_pairs(reduced, max_pairs=16)
    for d in (0, 1, 2):
        diag = out["input"][0][d]
        assert diag.shape == (len(pairs[d]), 2) and len(diag) <= 16
        assert np.allclose(diag, diagram_from_pairs(reduced, pairs[d]))
        assert np.all(diag[:, 1] > diag[:, 0])


def test_default_pool_workers():
    from nnunet_topomae.losses.topological import default_pool_workers
    assert default_pool_workers(4, cores=2) == 2  # the 2-core development machine: as before
    assert default_pool_workers(18, cores=16) == 8  # half the cores
    assert default_pool_workers(4, cores=64) == 4  # no more processes than volumes
    assert default_pool_workers(18, cores=16, ranks=4) == 2  # DDP: each rank's share of the cores
    assert default_pool_workers(1, cores=2) == 1
