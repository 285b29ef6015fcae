"""Cross-branch consistency of TopoMAE's co-pretraining (Gu et al. 2024, hybrid co-pretraining).

    L_rec_cons = sum_v m_v (I'_vit,v - I'_cnn,v)^2 / sum_v m_v
    L_sp_cons  = mean (P_vit - P_cnn)^2

Both branches see the same masked input; tying their reconstructions of the masked region and
their nine-point predictions makes each a teacher of the other. *Interpretation*: the paper names
the terms; the squared-error form and restricting the reconstruction term to masked voxels (the
visible ones are trivial for the CNN) are ours. Gradients flow into both branches.
"""
from __future__ import annotations

import torch

from nnunet_topomae.losses.reconstruction import masked_mse


def reconstruction_consistency(vit_recon: torch.Tensor, cnn_recon: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mse(vit_recon, cnn_recon, mask)


def spatial_consistency(vit_coords: torch.Tensor, cnn_coords: torch.Tensor) -> torch.Tensor:
    return torch.mean((vit_coords - cnn_coords) ** 2)
