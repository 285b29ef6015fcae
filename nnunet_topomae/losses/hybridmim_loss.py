"""The HybridMIM objective (Xing et al., arXiv 2303.10333): a weighted sum of the component losses.

    L = w_rec L_rec + w_count L_count + w_position L_position + w_consistency L_consistency
        + w_contrast L_contrast

with the released code's weights ``(1, 0.1, 0.1, 0.01, 0.1)`` (the trainer's class attributes):

* ``rec``: MSE on the masked voxels inside the decoded box (partial region prediction; the whole
  patch without a box). With deep supervision every decoder output is scored against the
  average-pooled target and mask of the box (:func:`deep_supervision_masked_mse`), so that every
  ``seg_layers`` head gets a gradient (DDP without ``find_unused_parameters``).
* ``count`` / ``position`` / ``consistency``: patch-masking perception
  (:class:`~nnunet_topomae.losses.perception.PatchMaskingPerceptionLoss`), when the network has the
  perception heads.
* ``contrast``: NT-Xent (temperature 0.5) between the two dropout views ``projection`` and
  ``projection2``, when the network has the projection head. Under DDP the views of all ranks are
  gathered (:func:`nnunet_topomae.losses.contrastive.gather_with_grad`, which handles nnU-Net's
  uneven per-rank batches) so that every other sample of the *global* batch is a negative.

A term whose weight is 0 is not computed (and its head should not exist: see the trainer).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from nnunet_topomae.losses.contrastive import nt_xent
from nnunet_topomae.losses.perception import PatchMaskingPerceptionLoss
from nnunet_topomae.losses.reconstruction import deep_supervision_masked_mse
from nnunet_topomae.masking.two_level import Box, MaskGeometry, box_to_voxel_slices, perception_targets

__all__ = ["HybridMIMLoss"]


def crop_to_box(t: torch.Tensor, box: Optional[Box], geometry: MaskGeometry) -> torch.Tensor:
    if box is None:
        return t
    return t[(Ellipsis, *box_to_voxel_slices(box, geometry))]


class HybridMIMLoss(nn.Module):
    def __init__(self, geometry: MaskGeometry, w_rec: float = 1.0, w_count: float = 0.1, w_position: float = 0.1,
                 w_consistency: float = 0.01, w_contrast: float = 0.1, temperature: float = 0.5,
                 consistency: str = "soft", gather_negatives: bool = True):
        super().__init__()
        self.geometry = geometry
        self.w = dict(rec=w_rec, count=w_count, position=w_position, consistency=w_consistency,
                      contrast=w_contrast)
        self.temperature = float(temperature)
        self.gather_negatives = bool(gather_negatives)
        self.perception = PatchMaskingPerceptionLoss(consistency)

    @property
    def uses_perception(self) -> bool:
        return any(self.w[k] > 0 for k in ("count", "position", "consistency"))

    @property
    def uses_contrast(self) -> bool:
        return self.w["contrast"] > 0

    def forward(self, out: Dict[str, torch.Tensor], image: torch.Tensor, voxel_mask: torch.Tensor,
                cube_mask: torch.Tensor, box: Optional[Box] = None) -> Dict[str, torch.Tensor]:
        """``out``: the network's output dict; ``image`` the *unmasked* input ``(B, C, *patch)``;
        ``voxel_mask`` ``(B, 1, *patch)`` (1 = masked); ``cube_mask`` the two-level mask
        ``(B, *subvolume_grid, n_cubes)``; ``box`` the decoded box (None: whole patch).

        Returns every term (unweighted, for logging) and ``loss`` (weighted total)."""
        terms: Dict[str, torch.Tensor] = {}
        target = crop_to_box(image, box, self.geometry)
        mask = crop_to_box(voxel_mask, box, self.geometry)
        recon = out.get("recon_ds", out["recon"])
        terms["rec"] = deep_supervision_masked_mse(recon, target.float(), mask.float())
        if self.uses_perception:
            if "count_logits" not in out:
                raise ValueError("perception loss weights are > 0 but the network has no perception heads")
            count, position = perception_targets(cube_mask)
            c, p, k = self.perception(out["count_logits"].float(), out["position_logits"].float(), count, position)
            terms.update(count=c, position=p, consistency=k)
        if self.uses_contrast:
            if "projection" not in out or "projection2" not in out:
                raise ValueError("the contrastive weight is > 0 but the network output has no two projection views")
            terms["contrast"] = nt_xent(out["projection"], out["projection2"], self.temperature,
                                               gather=self.gather_negatives)
        terms["loss"] = sum(self.w[k] * v for k, v in terms.items())
        return terms
