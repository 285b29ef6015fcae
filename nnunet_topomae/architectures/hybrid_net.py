"""Hybrid ViT + nnU-Net segmentation network for finetuning (Gu et al. 2024, item 5: "complementing
the pre-trained ViT encoder with the pre-trained SOTA model").

    skips_k <- skips_k + Z_k( resize( grid( ViT block b_k tokens ), skips_k grid ) )   for every stage k

nnU-Net's CNN (from the plans, encoder and decoder unchanged) does the segmentation. The unmasked ViT
encoder runs beside it; the token sequences of evenly spaced blocks (UNETR-style: deeper blocks for
deeper stages) are reshaped to their 3D token grid, resampled trilinearly to each CNN stage's grid and
added to that stage's skip through a 1x1x1 convolution Z_k (applied before resampling, which is
equivalent and cheaper). The token grid equals the grid of one CNN
stage by construction (token size = that stage's cumulative stride), where no resampling is needed.

*Interpretation* (the paper does not publish its fusion): additive fusion into every skip, and
Z_k initialised to zero, so that at the first finetuning step the network computes exactly the
pretrained CNN and the ViT's contribution grows from there; this avoids the transfer shock that
random fusion layers would inject into pretrained features.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_topomae.architectures.vit3d import ViTConfig, ViTEncoder3D


def fusion_blocks(depth: int, n_stages: int) -> List[int]:
    """ViT block feeding each CNN stage: evenly spaced, the last block for the bottleneck."""
    return [int(round((k + 1) * depth / n_stages)) - 1 for k in range(n_stages)]


class HybridViTUNet(nn.Module):
    def __init__(self, vit_cfg: ViTConfig, cnn: nn.Module):
        super().__init__()
        self.vit_cfg = vit_cfg
        self.vit_encoder = ViTEncoder3D(vit_cfg)
        self.cnn = cnn
        channels = list(cnn.encoder.output_channels)
        self.block_for_stage = fusion_blocks(vit_cfg.depth, len(channels))
        self.fusion = nn.ModuleList([nn.Conv3d(vit_cfg.embed_dim, c, kernel_size=1) for c in channels])
        for conv in self.fusion:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def decoder(self):
        # nnU-Net's stock helpers (set_deep_supervision_enabled) reach for network.decoder
        return self.cnn.decoder

    def forward(self, x: torch.Tensor):
        skips = self.cnn.encoder(x)
        tokens = self.vit_encoder(x, return_all=True)
        b = x.shape[0]
        fused = []
        for k, skip in enumerate(skips):
            t = tokens[self.block_for_stage[k]]
            grid = t.transpose(1, 2).reshape(b, t.shape[-1], *self.vit_cfg.grid)
            # project at token resolution, then resample: both are linear, so this equals resampling
            # first, at a fraction of the cost for high-resolution stages with few channels
            z = self.fusion[k](grid)
            if tuple(z.shape[2:]) != tuple(skip.shape[2:]):
                z = F.interpolate(z, size=skip.shape[2:], mode="trilinear", align_corners=False)
            fused.append(skip + z)
        return self.cnn.decoder(fused)

    def parameter_groups(self):
        """(name, parameters) for per-part learning rates: pretrained ViT, pretrained CNN, new layers."""
        seg = [p for n, p in self.cnn.named_parameters() if ".seg_layers." in f".{n}"]
        seg_ids = {id(p) for p in seg}
        cnn = [p for p in self.cnn.parameters() if id(p) not in seg_ids]
        return [("vit", list(self.vit_encoder.parameters())), ("cnn", cnn),
                ("new", list(self.fusion.parameters()) + seg)]
