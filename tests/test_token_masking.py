"""Tests for nnunet_topomae.masking.token_masking (random MAE token masks and their voxel form)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nnunet_topomae.architectures.vit3d import patchify
from nnunet_topomae.masking.token_masking import random_token_mask, token_mask_to_voxels


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("num_tokens,ratio,n_masked", [
    (175, 0.75, 131),   # round(131.25)
    (175, 0.5, 88),     # round(87.5) -> 88 (banker's rounding of .5 gives the even 88)
    (64, 0.75, 48),
    (27, 0.6, 16),      # round(16.2)
    (10, 0.0, 0),
    (8, 0.875, 7),      # one visible token left
])
def test_exact_number_of_masked_tokens_per_sample(num_tokens, ratio, n_masked):
    mask, ids_keep = random_token_mask(5, num_tokens, ratio, generator=_gen(0))
    assert mask.shape == (5, num_tokens) and mask.dtype == torch.bool
    assert ids_keep.shape == (5, num_tokens - n_masked) and ids_keep.dtype == torch.long
    assert mask.sum(1).tolist() == [n_masked] * 5


def test_ids_keep_sorted_and_exactly_the_unmasked_tokens():
    mask, ids_keep = random_token_mask(6, 175, 0.75, generator=_gen(3))
    for b in range(6):
        keep = ids_keep[b].tolist()
        assert keep == sorted(keep)
        assert len(set(keep)) == len(keep)
        assert keep == torch.nonzero(~mask[b]).flatten().tolist()


def test_samples_in_a_batch_get_different_masks():
    mask, _ = random_token_mask(4, 175, 0.75, generator=_gen(0))
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.equal(mask[a], mask[b])


def test_seeded_generator_is_deterministic():
    m1, k1 = random_token_mask(3, 175, 0.75, generator=_gen(123))
    m2, k2 = random_token_mask(3, 175, 0.75, generator=_gen(123))
    m3, k3 = random_token_mask(3, 175, 0.75, generator=_gen(124))
    assert torch.equal(m1, m2) and torch.equal(k1, k2)
    assert not torch.equal(m1, m3)
    assert not torch.equal(k1, k3)


def test_every_token_is_masked_with_probability_ratio():
    # uniform over subsets -> every token masked with marginal probability n_masked / N
    mask, _ = random_token_mask(4000, 16, 0.75, generator=_gen(7))
    freq = mask.float().mean(0)
    assert torch.all((freq - 0.75).abs() < 0.04), freq


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_ratio_raises(ratio):
    with pytest.raises(ValueError):
        random_token_mask(2, 64, ratio)


def test_ratio_leaving_no_visible_token_raises():
    # round(0.9 * 4) = 4 masked out of 4
    with pytest.raises(ValueError, match="no visible token"):
        random_token_mask(2, 4, 0.9)


def test_device_argument():
    mask, ids_keep = random_token_mask(2, 10, 0.5, device="cpu")
    assert mask.device.type == "cpu" and ids_keep.device.type == "cpu"


def _reference_voxel_mask(mask: torch.Tensor, grid, token_size) -> np.ndarray:
    """Independent loop: token n of the raster (C-order) grid covers one block of voxels."""
    b = mask.shape[0]
    out = np.full((b, 1, *(g * t for g, t in zip(grid, token_size))), -1.0)
    for s in range(b):
        for n in range(mask.shape[1]):
            gx, gy, gz = np.unravel_index(n, grid)
            tx, ty, tz = token_size
            out[s, 0, gx * tx:(gx + 1) * tx, gy * ty:(gy + 1) * ty, gz * tz:(gz + 1) * tz] = float(mask[s, n])
    assert (out >= 0).all()
    return out


@pytest.mark.parametrize("grid,token_size", [((2, 3, 4), (3, 2, 5)), ((1, 5, 2), (4, 1, 3)), ((3, 3, 3), (2, 2, 2))])
def test_token_mask_to_voxels_matches_loop_reference(grid, token_size):
    n = int(np.prod(grid))
    mask, _ = random_token_mask(3, n, 0.5, generator=_gen(1))
    vox = token_mask_to_voxels(mask, grid, token_size)
    assert vox.shape == (3, 1, *(g * t for g, t in zip(grid, token_size)))
    assert vox.dtype == torch.float32
    np.testing.assert_array_equal(vox.numpy(), _reference_voxel_mask(mask, grid, token_size))


def test_token_mask_to_voxels_agrees_with_vit_patchify_order():
    """The voxel mask and the ViT tokens must use the same raster order: patchifying the voxel mask
    gives, per token, a constant block equal to the token mask."""
    grid, token_size = (2, 3, 4), (3, 2, 5)
    mask, _ = random_token_mask(2, 24, 0.75, generator=_gen(5))
    tokens = patchify(token_mask_to_voxels(mask, grid, token_size), token_size)  # (B, N, voxels)
    assert torch.equal(tokens.amin(-1), tokens.amax(-1))
    assert torch.equal(tokens[..., 0].bool(), mask)
