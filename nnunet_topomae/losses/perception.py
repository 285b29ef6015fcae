"""Patch-masking perception loss of HybridMIM (Xing et al., arXiv 2303.10333).

Paper idea
----------
From the bottleneck, predict for every sub-volume (a) the number of masked cubes, a
classification into ``n_cubes + 1`` classes (cross-entropy), and (b) which cubes are masked,
``n_cubes`` independent binary labels (BCE-with-logits); plus a consistency term tying the two
predictions together. Released code: ``forward_loss_mask`` (CE) and
``forward_loss_mask_position`` (BCEWithLogits) in ``Pretrain/losses/loss.py``, consistency in
the training loop of ``Pretrain/main.py``::

    position_pred = (sigmoid(position_logits) > 0.5).float()
    n_from_position = position_pred.sum(-1)
    consistency = (CE(count_logits, n_from_position.detach())
                   + MSE(n_from_position, count_logits.argmax(-1).float().detach())) / 2

Our interpretation
------------------
The released MSE half is a constant (threshold + argmax + detach: no gradient reaches any
parameter) and the CE half only pulls the count head towards the thresholded position head.
By default (``consistency="soft"``) we therefore use a differentiable, symmetric version:
``mean |E_softmax[count] - sum_j sigmoid(position_j)|`` where ``E_softmax[count] =
sum_k k * softmax(count_logits)_k``. ``consistency="released"`` reproduces the released formula
(value and gradients) for comparison. Loss weights are not applied here (released total:
``L_rec + 0.1 L_count + 0.1 L_position + 0.01 L_consistency + 0.1 L_contrast``).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchMaskingPerceptionLoss", "soft_consistency", "released_consistency"]


def soft_consistency(count_logits: torch.Tensor, position_logits: torch.Tensor) -> torch.Tensor:
    """``mean |sum_k k softmax(count)_k - sum_j sigmoid(position)_j|`` over batch and grid.

    ``count_logits`` ``(B, n+1, *grid)``, ``position_logits`` ``(B, n, *grid)``.
    """
    k = torch.arange(count_logits.shape[1], device=count_logits.device, dtype=count_logits.dtype)
    k = k.view(1, -1, *([1] * (count_logits.ndim - 2)))
    expected = (count_logits.softmax(dim=1) * k).sum(dim=1)
    from_position = torch.sigmoid(position_logits).sum(dim=1)
    return (expected - from_position).abs().mean()


def released_consistency(count_logits: torch.Tensor, position_logits: torch.Tensor) -> torch.Tensor:
    """The released ``Pretrain/main.py`` consistency term on channel-first logits."""
    hard = (torch.sigmoid(position_logits) > 0.5).float().sum(dim=1)  # (B, *grid), no grad anyway
    ce = F.cross_entropy(count_logits, hard.long().detach())
    mse = F.mse_loss(hard, count_logits.argmax(dim=1).float().detach())
    return (ce + mse) / 2


class PatchMaskingPerceptionLoss(nn.Module):
    """Returns ``(count_ce, position_bce, consistency)`` (unweighted).

    ``forward(count_logits, position_logits, count_target, position_target)`` with
    ``count_logits`` ``(B, n+1, *grid)``, ``position_logits`` ``(B, n, *grid)`` (the network's
    channel-first outputs) and the targets from
    :func:`nnunet_topomae.masking.two_level.perception_targets`: ``count_target`` ``(B, *grid)``
    long, ``position_target`` ``(B, *grid, n)`` (channel-last, as the cube mask).
    """

    def __init__(self, consistency: str = "soft"):
        super().__init__()
        if consistency not in ("soft", "released"):
            raise ValueError(f"consistency must be 'soft' or 'released', got {consistency!r}")
        self.consistency = consistency

    def forward(
        self,
        count_logits: torch.Tensor,
        position_logits: torch.Tensor,
        count_target: torch.Tensor,
        position_target: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = position_logits.shape[1]
        if count_logits.shape[1] != n + 1:
            raise ValueError(f"count_logits has {count_logits.shape[1]} classes, expected n_cubes + 1 = {n + 1}")
        position_target = position_target.movedim(-1, 1).to(position_logits.dtype)
        if position_target.shape != position_logits.shape:
            raise ValueError(
                f"position target {tuple(position_target.shape)} (channel-first) does not match logits "
                f"{tuple(position_logits.shape)}"
            )
        count_ce = F.cross_entropy(count_logits, count_target.long())
        position_bce = F.binary_cross_entropy_with_logits(position_logits, position_target)
        if self.consistency == "soft":
            cons = soft_consistency(count_logits, position_logits)
        else:
            cons = released_consistency(count_logits, position_logits)
        return count_ce, position_bce, cons
