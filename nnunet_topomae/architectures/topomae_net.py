"""TopoMAE co-pretraining network (Gu et al. 2024): a 3D ViT-MAE and nnU-Net's own CNN
reconstruct the same masked patch and both regress the crop's position.

Parameter names are the contract with finetuning: ``vit_encoder.*`` and ``cnn.*`` are loaded by
``HybridViTUNet``; ``vit_decoder.*``, the spatial heads and the CNN's reconstruction heads
(``cnn.decoder.seg_layers.*``) are pretraining-only.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from nnunet_topomae.architectures.vit3d import MAEDecoder3D, ViTConfig, ViTEncoder3D
from nnunet_topomae.architectures.spatial_head import SpatialHead
from nnunet_topomae.masking.token_masking import random_token_mask, token_mask_to_voxels


class TopoMAENetwork(nn.Module):
    def __init__(self, vit_cfg: ViTConfig, cnn: Optional[nn.Module], mask_ratio: float = 0.75,
                 spatial_heads: bool = True):
        """cnn: the plan's network (PlainConvUNet / ResidualEncoderUNet) with as many outputs as
        input channels, or None for the plain MAE baseline."""
        super().__init__()
        self.vit_cfg = vit_cfg
        self.mask_ratio = mask_ratio
        self.vit_encoder = ViTEncoder3D(vit_cfg)
        self.vit_decoder = MAEDecoder3D(vit_cfg)
        self.vit_spatial_head = SpatialHead(vit_cfg.embed_dim) if spatial_heads else None
        self.cnn = cnn
        self.cnn_spatial_head = SpatialHead(cnn.encoder.output_channels[-1]) \
            if (spatial_heads and cnn is not None) else None

    def sample_mask(self, batch_size: int, device, generator: Optional[torch.Generator] = None):
        return random_token_mask(batch_size, self.vit_cfg.num_tokens, self.mask_ratio, generator, device)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                ids_keep: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        if mask is None:
            mask, ids_keep = self.sample_mask(x.shape[0], x.device)
        voxel_mask = token_mask_to_voxels(mask, self.vit_cfg.grid, self.vit_cfg.token_size).to(x.dtype)
        out = {"voxel_mask": voxel_mask}

        latent = self.vit_encoder(x, ids_keep)
        out["vit_recon"] = self.vit_decoder(latent, ids_keep)
        if self.vit_spatial_head is not None:
            out["vit_coords"] = self.vit_spatial_head(latent.mean(1))

        if self.cnn is not None:
            skips = self.cnn.encoder(x * (1 - voxel_mask))
            out["cnn_recon"] = self.cnn.decoder(skips)  # a list when deep supervision is on
            if self.cnn_spatial_head is not None:
                out["cnn_coords"] = self.cnn_spatial_head(skips[-1])
        return out
