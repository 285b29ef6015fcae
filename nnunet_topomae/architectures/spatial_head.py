"""The spatial pretext task's regression head (Gu et al. 2024): pooled encoding -> 9 points x 3 coordinates.

The targets and the loss are in ``nnunet_topomae.losses.spatial`` (``NUM_SPATIAL_TARGETS`` = 27); the head is a
network part, so it lives with the architectures, and takes its output size as an argument instead of importing it
from the loss (losses and architectures do not depend on each other; tests/test_spatial.py checks the two agree).
"""
from __future__ import annotations

import torch
from torch import nn


class SpatialHead(nn.Module):
    """Pooled features (B, D) or feature map (B, D, x, y, z) -> ``out_features`` coordinates (9 points x 3)."""

    def __init__(self, in_features: int, hidden: int = 256, out_features: int = 27):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.ndim > 2:
            feats = feats.flatten(2).mean(-1)
        return self.mlp(feats)
