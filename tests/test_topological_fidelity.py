"""Issue 24: the topological loss as published.

- fidelity against an exact reference on fixed synthetic volumes: the trainers' settings
  (default and ``_faithfulTopo``) against the exact L_topo (full-resolution persistence, every point,
  an exact assignment, checked here against the dense assignment and gudhi.hera);
- the exact sparse assignment equals the dense one;
- the tie rule: the points kept do not depend on the library's pair order or on 1e-7 changes of tied voxels;
- isotropic pooling; the composed reconstruction and its gradient; the pair budget; the tail.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.losses import topological as topo
from nnunet_topomae.losses.topological import (
    TopologicalLoss,
    check_topo_settings,
    compose_reconstruction,
    composed_outputs,
    diagram_from_pairs,
    pair_budget,
    persistence_pairs,
    rank_pairs,
    reduction_kernel,
    topological_loss_single,
    wasserstein2_matching,
)
from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain
from nnunet_topomae.trainers.variants import (nnUNetTrainerTopoMAEPretrain_faithfulTopo,
                                              nnUNetTrainerTopoMAEPretrain_faithfulTopoCripser)


def _mri_like(shape, seed, noise=0.3):
    """A smooth field with texture, quantised to 1/16 (MRI intensities tie), and its blurred copy
    (a smooth reconstruction), float32 as the trainer sees them."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.standard_normal(shape), 2.0)
    x = (x - x.mean()) / x.std() + noise * rng.standard_normal(shape)
    x = np.round(x * 16) / 16
    return x.astype(np.float32), gaussian_filter(x, 1.0).astype(np.float32)


def _loss_of(trainer_cls) -> TopologicalLoss:
    t = trainer_cls
    return TopologicalLoss(max_size=t.topo_max_size, max_voxels=t.topo_max_voxels, max_pairs=t.topo_max_pairs,
                           pair_mass=t.topo_pair_mass, tail=t.topo_tail, backend="gudhi", workers=0)


def _value_and_grad(loss: TopologicalLoss, image, recon, mask=None):
    leaf = torch.from_numpy(recon)[None, None].requires_grad_(True)
    r = leaf if mask is None else compose_reconstruction(leaf, torch.from_numpy(image)[None, None],
                                                         torch.from_numpy(mask)[None, None])
    value = loss.per_volume(r, torch.from_numpy(image)[None, None])[0, 0]
    value.backward()
    return value.item(), leaf.grad[0, 0].double().numpy().ravel()


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


EXACT = dict(max_size=None, max_voxels=None, max_pairs=None, tail="drop", workers=0)


# ------------------------------------------------------------------------------ fidelity
@pytest.mark.parametrize("recon_noise", [0.0, 0.1, 0.2])
def test_faithful_variant_meets_the_bar_the_default_misses(recon_noise):
    """(20, 36, 20) is pooled by the default to 20x18x20; a smooth (blurred) and two noisier
    reconstructions. Measured: the default 0.17-0.33 of the exact value, gradient cosine 0.08-0.25;
    the faithful variant 1.00 / 1.00 (and with 256 points instead of 1024: 1.7-1.8 / 0.46-0.48 at
    noise 0.2, where the budget cuts into the reconstruction's noise)."""
    image, recon = _mri_like((20, 36, 20), seed=0)
    if recon_noise:
        recon = recon + recon_noise * np.random.default_rng(1).standard_normal(recon.shape).astype(np.float32)
    exact, g_exact = _value_and_grad(TopologicalLoss(**EXACT), image, recon)
    assert exact > 0

    value, grad = _value_and_grad(_loss_of(nnUNetTrainerTopoMAEPretrain_faithfulTopo), image, recon)
    assert 0.8 <= value / exact <= 1.25 and value >= exact * (1 - 1e-9)  # the tail to the diagonal: an upper bound
    assert _cos(grad, g_exact) >= 0.8

    value, grad = _value_and_grad(_loss_of(nnUNetTrainerTopoMAEPretrain), image, recon)
    assert value / exact < 0.8 and _cos(grad, g_exact) < 0.8


def test_faithful_variant_composed_meets_the_bar():
    image, recon = _mri_like((20, 36, 20), seed=1)
    mask = np.zeros(image.shape, np.float32)
    mask[:, 4:24, :] = 1  # masked slab: visible voxels above and below
    exact, g_exact = _value_and_grad(TopologicalLoss(**EXACT), image, recon, mask)
    value, grad = _value_and_grad(_loss_of(nnUNetTrainerTopoMAEPretrain_faithfulTopo), image, recon, mask)
    assert 0.8 <= value / exact <= 1.5 and _cos(grad, g_exact) >= 0.8


def test_exact_reference_is_exact():
    """The exact value (sparse assignment) equals gudhi.hera's auction solver on gudhi's own diagrams."""
    hera = pytest.importorskip("gudhi.hera")
    from gudhi import CubicalComplex
    image, recon = _mri_like((12, 16, 10), seed=2)
    recon = recon + 0.2 * np.random.default_rng(3).standard_normal(recon.shape).astype(np.float32)
    value = topological_loss_single(torch.from_numpy(recon).double(), image.astype(np.float64)).item()

    def diagrams(v):
        cc = CubicalComplex(vertices=v.astype(np.float64))
        cc.compute_persistence()
        return [cc.persistence_intervals_in_dimension(d).reshape(-1, 2) for d in (0, 1, 2)]

    ref = 0.5 * sum(hera.wasserstein_distance(a, b, order=2, internal_p=2, delta=1e-7) ** 2
                    for a, b in zip(diagrams(recon), diagrams(image)))
    assert value == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------------------ exact matching
def _cost(a, b, rows, cols, da, db):
    return (((a[rows] - b[cols]) ** 2).sum() + ((a[da, 1] - a[da, 0]) ** 2 / 2).sum()
            + ((b[db, 1] - b[db, 0]) ** 2 / 2).sum())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantised", [False, True])
def test_sparse_assignment_equals_dense(seed, quantised):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 160, 2)
    a = np.stack([rng.random(n), rng.random(n)], 1)
    b = np.stack([rng.random(m), rng.random(m)], 1)
    a[:, 1] = a[:, 0] + rng.exponential(0.1, n)
    b[:, 1] = b[:, 0] + rng.exponential(0.1, m)
    if quantised:  # duplicated points, as quantised MRI intensities give
        a, b = np.round(a * 8) / 8, np.round(b * 8) / 8
        a[:, 1] = np.maximum(a[:, 1], a[:, 0] + 0.125)
        b[:, 1] = np.maximum(b[:, 1], b[:, 0] + 0.125)
    rows, cols = topo._sparse_matching(a, b)
    dense_rows, dense_cols = topo._dense_matching(a, b)

    def full(r, c):
        return r, c, np.setdiff1d(np.arange(n), r), np.setdiff1d(np.arange(m), c)

    assert _cost(a, b, *full(rows, cols)) == pytest.approx(_cost(a, b, *full(dense_rows, dense_cols)), rel=1e-12, abs=1e-12)
    assert len(np.unique(rows)) == len(rows) and len(np.unique(cols)) == len(cols)
    # the public function picks one of them by size and returns the same optimum
    assert _cost(a, b, *wasserstein2_matching(a, b)) == pytest.approx(_cost(a, b, *full(rows, cols)), rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------ ties
def _quantised(seed=0, shape=(12, 12, 12)):
    return np.round(np.random.default_rng(seed).random(shape) * 8) / 8  # many tied values


def _chosen_values(volume, pairs):
    """The chosen points as a multiset of (birth, death) values, rounded to 1e-5."""
    out = []
    for d in (0, 1, 2):
        v = np.round(diagram_from_pairs(volume, pairs[d]), 5) + 0.0
        out.append(v[np.lexsort(v.T[::-1])].tolist())
    return out


def test_ties_do_not_depend_on_the_library_pair_order():
    v = _quantised()
    reg, _ = topo._gudhi_raw(v, (0, 1, 2))
    rng = np.random.default_rng(1)
    for d in (0, 1, 2):
        ref = topo._select(reg[d], v.ravel(), 10)
        for _ in range(5):
            shuffled = reg[d][rng.permutation(len(reg[d]))]
            got = topo._select(shuffled, v.ravel(), 10)
            assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


@pytest.mark.parametrize("max_pairs", [5, 10, 40])
def test_a_1e7_change_of_tied_voxels_keeps_the_chosen_points(max_pairs):
    v = _quantised()
    ref = _chosen_values(v, persistence_pairs(v, max_pairs=max_pairs))
    rng = np.random.default_rng(2)
    for _ in range(4):
        w = v.copy()
        idx = rng.choice(v.size, 300, replace=False)
        w.ravel()[idx] += 1e-7 * rng.choice([-1.0, 1.0], 300)
        assert _chosen_values(w, persistence_pairs(w, max_pairs=max_pairs)) == ref


def test_a_1e7_change_moves_the_budgeted_loss_by_about_1e7():
    v = _quantised(3)
    recon = gaussian_filter(v, 1.0)
    base = topological_loss_single(torch.tensor(recon), v, max_pairs=10).item()
    w = v.copy()
    w.ravel()[np.random.default_rng(4).choice(v.size, 300, replace=False)] += 2e-7
    moved = topological_loss_single(torch.tensor(recon), w, max_pairs=10).item()
    assert abs(moved - base) < 1e-5 * base


def test_rank_pairs_order():
    flat = np.array([0.0, 1.0, 0.5, 1.5, 0.2, 0.7, 3.0, 3.0])
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])  # persistence 1, 1, 0.5, 0 (dropped)
    assert rank_pairs(pairs, flat).tolist() == [[0, 1], [2, 3], [4, 5]]  # equal persistence: lower birth first
    assert rank_pairs(pairs[[1, 0, 2, 3]], flat).tolist() == [[0, 1], [2, 3], [4, 5]]


# ------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("shape,expected", [
    ((96, 96, 96), (5, 5, 5)),        # isotropic (was (5, 4, 4), a 20x24x24 grid)
    ((128, 128, 128), (6, 6, 6)),
    ((64, 64, 64), (3, 3, 3)),        # 22^3
    ((10, 96, 80), (1, 3, 3)),        # ACDC's CPU plan keeps its 10 slices
    ((40, 56, 40), (2, 2, 2)),        # Hippocampus
    ((48, 64, 64), (2, 3, 3)),
])
def test_reduction_kernel_is_isotropic_where_the_patch_is(shape, expected):
    kernel = reduction_kernel(shape, 32, 12288)
    assert kernel == expected
    for i in range(3):
        for j in range(3):
            if shape[i] == shape[j]:
                assert kernel[i] == kernel[j]
    assert reduction_kernel(shape, None, None) == (1, 1, 1)


# ------------------------------------------------------------------------------ composed reconstruction
def test_composed_gradient_is_zero_on_visible_voxels():
    image, recon = _mri_like((12, 16, 10), seed=4)
    recon = recon + 0.3 * np.random.default_rng(5).standard_normal(recon.shape).astype(np.float32)
    mask = (np.random.default_rng(6).random((3, 4, 5)) < 0.75).astype(np.float32)
    mask = np.kron(mask, np.ones((4, 4, 2), np.float32))
    _, grad = _value_and_grad(TopologicalLoss(**EXACT), image, recon, mask)
    grad = grad.reshape(image.shape)
    assert np.all(grad[mask == 0] == 0)
    assert np.abs(grad[mask == 1]).sum() > 0
    composed = compose_reconstruction(torch.from_numpy(recon), torch.from_numpy(image), torch.from_numpy(mask))
    assert torch.equal(composed[torch.from_numpy(mask) == 0], torch.from_numpy(image)[torch.from_numpy(mask) == 0])


def test_composed_outputs_change_only_the_topological_term():
    """Every other TopoMAE term scores masked voxels only: values and gradients are those of the raw outputs."""
    from nnunet_topomae.losses.topomae_loss import TopoMAELoss
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, 8)
    m = (torch.rand(2, 1, 2, 2, 2) < 0.75).float().repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    vit = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    cnn0 = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    cnn1 = torch.randn(2, 1, 4, 4, 4, requires_grad=True)
    loss = TopoMAELoss(w_topo=0.0)
    results = []
    for compose in (False, True):
        out = {"voxel_mask": m, "vit_recon": vit, "cnn_recon": [cnn0, cnn1]}
        if compose:
            out = composed_outputs(out, x)
        terms = loss(out, x)
        grads = torch.autograd.grad(terms["loss"], [vit, cnn0, cnn1])
        results.append(({k: v.item() for k, v in terms.items()}, grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ budget, tail, settings
def test_pair_budget():
    pers = np.array([3.0, 2.0, 1.0, 1.0, 0.5])  # squared: 9, 4, 1, 1, 0.25 (total 15.25)
    assert pair_budget(pers) == 5
    assert pair_budget(pers, max_pairs=2) == 2
    assert pair_budget(pers, pair_mass=0.5) == 1   # 9 / 15.25 = 0.59
    assert pair_budget(pers, pair_mass=0.9) == 3   # 14 / 15.25 = 0.918
    assert pair_budget(pers, pair_mass=0.9, max_pairs=2) == 2
    assert pair_budget(np.zeros(0), pair_mass=0.9) == 0


def test_tail_to_the_diagonal_is_an_upper_bound_and_exact_without_a_cut():
    image, recon = _mri_like((10, 14, 12), seed=7)
    recon = recon + 0.2 * np.random.default_rng(8).standard_normal(recon.shape).astype(np.float32)
    r, t = torch.from_numpy(recon).double(), image.astype(np.float64)
    exact = topological_loss_single(r, t).item()
    for k in (4, 16, 64):
        assert topological_loss_single(r, t, max_pairs=k, tail="diagonal").item() >= exact * (1 - 1e-12)
        assert topological_loss_single(r, t, max_pairs=k).item() <= topological_loss_single(
            r, t, max_pairs=k, tail="diagonal").item()
    assert topological_loss_single(r, t, max_pairs=10 ** 6, tail="diagonal").item() == pytest.approx(exact, rel=1e-12)


def test_settings_are_checked():
    check_topo_settings("raw", "drop")
    check_topo_settings("composed", "diagonal")
    with pytest.raises(UserInputError, match="topo_reconstruction"):
        check_topo_settings("masked", "drop")
    with pytest.raises(UserInputError, match="topo_tail"):
        check_topo_settings("raw", "nearest")


def test_trainer_settings_reach_the_loss():
    class Cfg(nnUNetTrainerTopoMAEPretrain_faithfulTopo):
        topo_workers = 0
    loss = nnUNetTrainerTopoMAEPretrain_faithfulTopo._build_loss(Cfg).topo_loss
    assert (loss.max_size, loss.max_voxels, loss.max_pairs, loss.pair_mass, loss.tail) == (None, None, 1024, None, "diagonal")
    pfn = loss.input_persistence()
    assert (pfn.max_size, pfn.max_voxels, pfn.max_pairs, pfn.pair_mass) == (None, None, 1024, None)

    class Fast(nnUNetTrainerTopoMAEPretrain_faithfulTopoCripser):
        topo_workers = 0
    fast = nnUNetTrainerTopoMAEPretrain_faithfulTopoCripser._build_loss(Fast).topo_loss
    assert (fast.max_size, fast.max_pairs, fast.tail, fast.backend) == (None, 1024, "diagonal", "cripser")
    assert fast.input_persistence().backend == "cripser"  # the data-loading workers' half uses it too

    class Bad(nnUNetTrainerTopoMAEPretrain):
        topo_workers = 0
        topo_reconstruction = "visible"
    with pytest.raises(UserInputError, match="topo_reconstruction"):
        nnUNetTrainerTopoMAEPretrain._build_loss(Bad)


@pytest.mark.parametrize("reconstruction", ["raw", "composed"])
def test_trainer_gives_the_loss_the_configured_reconstruction(reconstruction):
    class Cfg(nnUNetTrainerTopoMAEPretrain):
        topo_reconstruction = reconstruction
    trainer = object.__new__(Cfg)
    x = torch.randn(1, 1, 4, 4, 4)
    m = torch.zeros(1, 1, 4, 4, 4)
    m[..., :2] = 1
    recon = torch.randn(1, 1, 4, 4, 4)

    class Net(torch.nn.Module):
        def forward(self, inp):
            return {"voxel_mask": m, "vit_recon": recon, "cnn_recon": [recon.clone(), recon[..., ::2, ::2, ::2]]}

    seen = []
    trainer.device, trainer.network, trainer.current_epoch, trainer.num_epochs = torch.device("cpu"), Net().eval(), 0, 1
    trainer.loss = lambda out, x, spatial, topo_pairs=None, with_topo=True: seen.append(out) or {}
    trainer.compute_terms({"data": x, "spatial": torch.zeros(1, 27)})
    expected = recon if reconstruction == "raw" else m * recon + (1 - m) * x
    torch.testing.assert_close(seen[0]["vit_recon"], expected)
    torch.testing.assert_close(seen[0]["cnn_recon"][0], expected)
    torch.testing.assert_close(seen[0]["cnn_recon"][1], recon[..., ::2, ::2, ::2])
