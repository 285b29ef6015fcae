"""Spatial pretext task of Gu et al. 2024: regress where the crop sits in its case.

For a crop with voxel box [lb, ub) cut from a preprocessed case of shape S, the targets are nine
points, the crop centre (lb + ub) / 2 and its eight corners lb + c * (ub - lb), c in {0, 1}^3
(C order of c), each normalised per axis to the case extent, or to the patch where the case is smaller,

    p_hat = 2 * (p - S / 2) / max(S, P)

flattened to 27 numbers. Where S >= P this is 2 p / S - 1: the case spans [-1, 1]. Where a case is
smaller than the patch P (nnU-Net pads it), dividing by S would blow the targets up (a 4-voxel case
under a 40-voxel patch gave targets of about +-20 and a spatial term 100x its usual size); dividing by
P keeps every target within [-3, 3] (a crop always overlaps the case, so |p - S/2| <= P + S/2). The
loss is the mean squared error of the 27 numbers.

*Paper*: centre + octant (corner) point regression from the pooled encoding. *Interpretation*:
continuous voxel-edge coordinates, the [-1, 1] normalisation, the patch-sized floor and MSE.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

NUM_SPATIAL_TARGETS = 27

_CORNERS = np.array(list(itertools.product((0, 1), repeat=3)), dtype=np.float64)  # (8, 3)


def octant_targets(bbox_lb: Sequence[int], patch_size: Sequence[int], case_shape: Sequence[int]) -> np.ndarray:
    """(27,) float32: centre then 8 corners of the crop [lb, lb + patch) in a case of ``case_shape``
    (normalised by the larger of the case's extent and the patch, per axis)."""
    lb = np.asarray(bbox_lb, dtype=np.float64)
    ps = np.asarray(patch_size, dtype=np.float64)
    shape = np.asarray(case_shape, dtype=np.float64)
    points = np.concatenate([(lb + ps / 2)[None], lb[None] + _CORNERS * ps[None]], 0)  # (9, 3)
    extent = np.maximum(shape, ps)
    return (2 * (points - shape[None] / 2) / extent[None]).reshape(-1).astype(np.float32)


def spatial_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((pred - target) ** 2)
