"""Tests for the spatial pretext task: octant_targets against hand-computed numbers, and that
PretrainDataLoader's targets describe the crop it actually cut."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_topomae.data.pretrain_loader import PretrainDataLoader
from nnunet_topomae.architectures.spatial_head import SpatialHead
from nnunet_topomae.losses.spatial import NUM_SPATIAL_TARGETS, octant_targets, spatial_loss

# corner order of the targets: c in {0,1}^3 in C order
CORNER_ORDER = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]


def test_octant_targets_hand_computed():
    # case (40, 60, 80), crop lb (0, 10, 20), patch (20, 20, 40) -> box x [0, 20], y [10, 30], z [20, 60]
    # p_hat = 2p/S - 1:  x: 0 -> -1, 20 -> 0, centre 10 -> -0.5
    #                    y: 10 -> -2/3, 30 -> 0, centre 20 -> -1/3
    #                    z: 20 -> -0.5, 60 -> 0.5, centre 40 -> 0
    expected = [
        -0.5, -1 / 3, 0.0,      # centre
        -1.0, -2 / 3, -0.5,     # (0,0,0)
        -1.0, -2 / 3, 0.5,      # (0,0,1)
        -1.0, 0.0, -0.5,        # (0,1,0)
        -1.0, 0.0, 0.5,         # (0,1,1)
        0.0, -2 / 3, -0.5,      # (1,0,0)
        0.0, -2 / 3, 0.5,       # (1,0,1)
        0.0, 0.0, -0.5,         # (1,1,0)
        0.0, 0.0, 0.5,          # (1,1,1)
    ]
    t = octant_targets((0, 10, 20), (20, 20, 40), (40, 60, 80))
    assert t.shape == (NUM_SPATIAL_TARGETS,) and t.dtype == np.float32
    np.testing.assert_allclose(t, expected, atol=1e-6)


def test_octant_targets_whole_case_spans_minus_one_to_one():
    t = octant_targets((0, 0, 0), (32, 48, 16), (32, 48, 16)).reshape(9, 3)
    np.testing.assert_allclose(t[0], [0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(t[1:], 2 * np.array(CORNER_ORDER) - 1, atol=1e-6)


def test_octant_targets_anisotropic():
    # case (12, 200, 160), lb (2, 40, 0), patch (8, 128, 160): box x [2, 10], y [40, 168], z [0, 160]
    # x: 2 -> -2/3, 10 -> 2/3, centre 6 -> 0;  y: 40 -> -0.6, 168 -> 0.68, centre 104 -> 0.04
    # z: 0 -> -1, 160 -> 1, centre 80 -> 0
    expected = [0.0, 0.04, 0.0,
                -2 / 3, -0.6, -1.0, -2 / 3, -0.6, 1.0, -2 / 3, 0.68, -1.0, -2 / 3, 0.68, 1.0,
                2 / 3, -0.6, -1.0, 2 / 3, -0.6, 1.0, 2 / 3, 0.68, -1.0, 2 / 3, 0.68, 1.0]
    np.testing.assert_allclose(octant_targets((2, 40, 0), (8, 128, 160), (12, 200, 160)), expected, atol=1e-6)


def test_octant_targets_negative_lb_of_padded_small_case():
    # case (10, 30, 30) smaller than the patch on x: nnU-Net pads, lb (-3, 5, 0), patch (16, 16, 16)
    # box x [-3, 13], y [5, 21], z [0, 16]; p_hat = 2 (p - S/2) / max(S, P)
    # x (S 10 < P 16, divided by 16): -3 -> -1, 13 -> 1, centre 5 -> 0
    # y: 5 -> -2/3, 21 -> 0.4, centre 13 -> -2/15;  z: 0 -> -1, 16 -> 1/15, centre 8 -> -7/15
    expected = [0.0, -2 / 15, -7 / 15,
                -1.0, -2 / 3, -1.0, -1.0, -2 / 3, 1 / 15, -1.0, 0.4, -1.0, -1.0, 0.4, 1 / 15,
                1.0, -2 / 3, -1.0, 1.0, -2 / 3, 1 / 15, 1.0, 0.4, -1.0, 1.0, 0.4, 1 / 15]
    np.testing.assert_allclose(octant_targets((-3, 5, 0), (16, 16, 16), (10, 30, 30)), expected, atol=1e-6)


def test_octant_targets_stay_bounded_for_a_tiny_case():
    # a 4^3 case under a 40^3 patch: every crop position nnU-Net's padding allows keeps |target| <= 3
    # (dividing by the case's extent gave about +-20 here)
    worst = max(np.abs(octant_targets((lb, lb, lb), (40, 40, 40), (4, 4, 4))).max() for lb in range(-36, 1))
    assert worst <= 3.0
    assert np.abs(octant_targets((-18, -18, -18), (40, 40, 40), (4, 4, 4))).max() == pytest.approx(1.0)


def test_spatial_head_and_loss_shapes():
    head = SpatialHead(8, hidden=16)
    assert head(torch.randn(3, 8)).shape == (3, 27) and NUM_SPATIAL_TARGETS == 27  # the head's default fits the targets
    assert head(torch.randn(3, 8, 2, 3, 4)).shape == (3, 27)  # feature maps are mean-pooled
    p, t = torch.zeros(2, 27), torch.ones(2, 27)
    assert spatial_loss(p, t).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- data loader

def _encode(shape) -> np.ndarray:
    """Voxel value = (x+1)*10000 + (y+1)*100 + (z+1): never 0 inside the case, so zero padding is
    recognisable; exact in float32 for axes < 99."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return ((x + 1) * 10000 + (y + 1) * 100 + (z + 1)).astype(np.float32)


class FakeNNUNetDataset:
    """The part of nnU-Net's dataset interface the data loaders use (see nnunetv2/training/dataloading/
    nnunet_dataset.py): ``identifiers`` and ``load_case(key) -> (data, seg, seg_prev, properties)``."""

    def __init__(self, shapes: dict):
        self.identifiers = sorted(shapes)
        self.cases = {}
        for k, shape in shapes.items():
            enc = _encode(shape)
            data = np.stack([enc, -enc])  # two channels, the second a function of the first
            seg = np.zeros((1, *shape), np.int16)
            self.cases[k] = (data, seg, None, {"class_locations": {}})

    def load_case(self, key):
        return self.cases[key]


def _decode_lb(crop: np.ndarray, case_shape) -> tuple:
    """Crop position from the encoded image; checks that the crop is a pure translation of the case
    (zero-padded outside it)."""
    v = crop[0].astype(np.int64)
    inside = v > 0
    assert inside.any()
    idx = np.stack(np.nonzero(inside), -1)
    vals = v[inside]
    coords = np.stack([vals // 10000 - 1, (vals // 100) % 100 - 1, vals % 100 - 1], -1)
    lbs = coords - idx
    assert (lbs == lbs[0]).all(), "the crop is not a translated window of the case"
    lb = lbs[0]
    # exactly the voxels inside the case are non-zero
    grid = np.stack(np.meshgrid(*[np.arange(p) for p in crop.shape[1:]], indexing="ij"), -1) + lb
    expect_inside = np.all((grid >= 0) & (grid < np.asarray(case_shape)), -1)
    np.testing.assert_array_equal(inside, expect_inside)
    np.testing.assert_array_equal(crop[1], -crop[0])
    return tuple(int(i) for i in lb)


def _decode_targets(t: np.ndarray, case_shape, patch):
    """Invert p_hat = 2 (p - S/2) / max(S, P) -> (centre, corners (8, 3)) in voxel coordinates."""
    s = np.asarray(case_shape, np.float64)
    p = t.reshape(9, 3).astype(np.float64) * np.maximum(s, np.asarray(patch, np.float64)) / 2 + s / 2
    return p[0], p[1:]


def test_loader_targets_describe_the_crop_taken():
    np.random.seed(1234)
    patch = (16, 12, 20)
    shapes = {"big": (40, 30, 50), "aniso": (20, 60, 24), "small": (10, 30, 12)}  # small: padded on x and z
    ds = FakeNNUNetDataset(shapes)
    lm = LabelManager({"background": 0, "fg": 1}, regions_class_order=None)
    dl = PretrainDataLoader(ds, 3, patch, lm, transforms=None)
    seen_negative_lb, seen_lbs = False, {k: set() for k in shapes}
    for _ in range(15):
        batch = dl.generate_train_batch()
        assert batch["data"].shape == (3, 2, *patch) and batch["data"].dtype == torch.float32
        assert batch["spatial"].shape == (3, 27) and batch["spatial"].dtype == torch.float32
        for i, key in enumerate(batch["keys"]):
            shape = shapes[key]
            lb = _decode_lb(batch["data"][i].numpy(), shape)
            centre, corners = _decode_targets(batch["spatial"][i].numpy(), shape, patch)
            np.testing.assert_allclose(corners[0], lb, atol=1e-3)
            np.testing.assert_allclose(centre, np.asarray(lb) + np.asarray(patch) / 2, atol=1e-3)
            np.testing.assert_allclose(corners, np.asarray(lb) + np.array(CORNER_ORDER) * np.asarray(patch), atol=1e-3)
            seen_negative_lb |= min(lb) < 0
            seen_lbs[key].add(lb)
    assert seen_negative_lb, "the padded small case never produced a negative lb"
    assert len(seen_lbs["big"]) > 1, "crops of the big case should be at random positions"


def test_loader_spatial_term_of_a_tiny_case_stays_in_its_usual_range():
    # issue 22: one 4x4x4 case among normal ones made the spatial term 57-95 instead of 0.4-0.9. The
    # term for a network that predicts the crop centre of the case (0) is the mean squared target:
    # with the patch-sized floor a tiny case's crops give a term of the same size as a normal case's.
    np.random.seed(0)
    patch = (40, 40, 40)
    ds = FakeNNUNetDataset({"tiny": (4, 4, 4), "normal": (60, 70, 50)})
    lm = LabelManager({"background": 0, "fg": 1}, regions_class_order=None)
    dl = PretrainDataLoader(ds, 4, patch, lm, transforms=None)
    terms = {"tiny": [], "normal": []}
    for _ in range(10):
        batch = dl.generate_train_batch()
        for i, key in enumerate(batch["keys"]):
            terms[key].append(float(spatial_loss(torch.zeros(27), batch["spatial"][i])))
    assert terms["tiny"] and terms["normal"]
    assert max(terms["tiny"]) < 2.0, terms["tiny"]
    assert 0.1 < np.mean(terms["normal"]) < 2.0
