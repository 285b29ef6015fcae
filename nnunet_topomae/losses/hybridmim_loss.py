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
  gathered (:func:`gather_variable_with_grad`) so that every other sample of the *global* batch is
  a negative.

Why a variable-size gather: nnU-Net splits the global batch over DDP ranks unevenly when it does
not divide (batch 9 on 2 GPUs -> 5 and 4 samples per rank, ``_set_batch_size_and_oversample``),
and ``torch.distributed.all_gather`` needs equal shapes, which
:func:`nnunet_topomae.losses.contrastive.gather_with_grad` assumes. Here the sizes are exchanged
first and the embeddings padded to the largest one.

A term whose weight is 0 is not computed (and its head should not exist: see the trainer).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from nnunet_topomae.architectures.hybridmim_net import Box, box_to_voxel_slices
from nnunet_topomae.losses.contrastive import nt_xent
from nnunet_topomae.losses.perception import PatchMaskingPerceptionLoss
from nnunet_topomae.losses.reconstruction import deep_supervision_masked_mse
from nnunet_topomae.masking.two_level import MaskGeometry, perception_targets

__all__ = ["HybridMIMLoss", "gather_variable_with_grad", "nt_xent_global"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_variable_with_grad(z: torch.Tensor) -> torch.Tensor:
    """Concatenate ``z`` (``(n_rank, D)``, ``n_rank`` may differ between ranks) from all ranks in rank
    order; the local slice keeps its autograd history, the others are constants. No-op without DDP."""
    world = _world_size()
    if world == 1:
        return z
    n = torch.tensor([z.shape[0]], device=z.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = z.detach().new_zeros((max(sizes), *z.shape[1:]))
    padded[: z.shape[0]] = z.detach()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    parts = [g[:s] for g, s in zip(gathered, sizes)]
    parts[dist.get_rank()] = z
    return torch.cat(parts, dim=0)


def nt_xent_global(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent over the global batch (all ranks' samples are negatives), with the same gradient scaling
    as :func:`nnunet_topomae.losses.contrastive.nt_xent` (value ``L``, gradient ``W * dL`` so that
    DDP's averaging over ``W`` ranks yields the gradient of the global-batch loss)."""
    world = _world_size() if gather else 1
    if world == 1:
        return nt_xent(z1, z2, temperature=temperature, gather=False)
    loss = nt_xent(gather_variable_with_grad(z1), gather_variable_with_grad(z2), temperature=temperature,
                   gather=False)
    return world * loss - (world - 1) * loss.detach()


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
            terms["contrast"] = nt_xent_global(out["projection"], out["projection2"], self.temperature,
                                               gather=self.gather_negatives)
        terms["loss"] = sum(self.w[k] * v for k, v in terms.items())
        return terms
