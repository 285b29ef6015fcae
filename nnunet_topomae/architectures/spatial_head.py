"""The spatial pretext task's regression head (Gu et al. 2024): pooled encoding -> 9 points x 3 coordinates.

The targets and the loss are in ``nnunet_topomae.losses.spatial``; the head is a network part, so it
lives with the architectures (losses sit below architectures in this package's layers).
"""
from __future__ import annotations

import torch
from torch import nn

from nnunet_topomae.losses.spatial import NUM_SPATIAL_TARGETS


class SpatialHead(nn.Module):
    """Pooled features (B, D) or feature map (B, D, x, y, z) -> 27 coordinates."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, NUM_SPATIAL_TARGETS))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim > 2:
            feats = feats.flatten(2).mean(-1)
        return self.mlp(feats)
