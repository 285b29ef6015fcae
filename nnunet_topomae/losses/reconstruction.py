"""Masked reconstruction loss (MAE, He et al. 2022, eq. in Sec. 3; SimMIM for the CNN branch).

    L_rec = sum_v m_v (I'_v - I_v)^2 / sum_v m_v

with m the voxel mask (1 = masked): only what the network could not see is scored. Targets are the
nnU-Net-normalised intensities themselves (*interpretation*: no per-token normalisation, so the
ViT and CNN reconstructions live in the same space and can be compared by the consistency loss
and the topological loss).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked voxels; ``mask`` (B, 1, ...) broadcasts over channels and may be
    fractional (a pooled mask weights each voxel by the fraction of it that was masked)."""
    w = mask.expand_as(pred)
    return ((pred - target) ** 2 * w).sum() / w.sum().clamp_min(1e-6)


def deep_supervision_masked_mse(preds: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor,
                                mask: torch.Tensor) -> torch.Tensor:
    """Masked MSE on each deep-supervision output of nnU-Net's decoder against an average-pooled
    target and mask, weighted 1, 1/2, 1/4, ... like nnU-Net's segmentation loss.

    Why: every output head then receives a gradient each step, which DDP without
    ``find_unused_parameters`` requires, and the lower decoder stages get a direct signal."""
    if isinstance(preds, torch.Tensor):
        return masked_mse(preds, target, mask)
    weights = torch.tensor([1 / 2 ** i for i in range(len(preds))])
    weights = weights / weights.sum()
    total = 0.0
    for w, p in zip(weights.tolist(), preds):
        if p.shape[2:] != target.shape[2:]:
            t = F.adaptive_avg_pool3d(target, p.shape[2:])
            m = F.adaptive_avg_pool3d(mask, p.shape[2:])
        else:
            t, m = target, mask
        total = total + w * masked_mse(p, t, m)
    return total
