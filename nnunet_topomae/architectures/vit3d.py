"""A 3D Vision Transformer masked autoencoder on nnU-Net's patch grid.

Reads top to bottom like facebookresearch/mae ``models_mae.py``: token size from the plans,
patchify, encoder on visible tokens, light decoder on all tokens, unpatchify.

- *Paper* (Gu et al. 2024, after Zhou et al. ISBI 2023 / He et al. 2022): 3D ViT-MAE, the
  encoder sees only visible tokens, a light decoder with a learned mask token reconstructs the
  voxels of every token; fixed sin-cos position embeddings.
- *Interpretation*: the token size is not fixed at 16^3 but taken from the cumulative strides of
  the nnU-Net plan (``token_size_from_plan``): the token grid then equals the grid of one CNN
  stage, which is what lets the finetuning network fuse ViT tokens into nnU-Net's CNN, and the
  token size always divides the patch, also for anisotropic plans.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from timm.models.vision_transformer import Block


def token_size_from_plan(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                         max_token: int = 16) -> Tuple[Tuple[int, ...], int]:
    """Token size per axis = cumulative stride of the deepest CNN stage whose stride is <= max_token
    on every axis. Returns (token_size, stage). nnU-Net makes the patch divisible by the total
    stride, hence by every cumulative stride, so the token always divides the patch."""
    cum = np.cumprod(np.asarray(strides, dtype=int), axis=0)
    stage = 0
    for s in range(len(cum)):
        if np.all(cum[s] <= max_token):
            stage = s
    token = tuple(int(t) for t in cum[stage])
    if any(p % t for p, t in zip(patch_size, token)):
        raise ValueError(f"token size {token} does not divide patch size {tuple(patch_size)}; "
                         f"the plan's strides {list(map(list, strides))} are inconsistent with its patch size")
    return token, stage


def sincos_pos_embed_3d(dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding (MAE's 2D version extended to three axes).
    dim is split into three equal even parts, one per axis; the remainder is zero."""
    per_axis = (dim // 6) * 2
    out = np.zeros((int(np.prod(grid)), dim), dtype=np.float32)
    coords = np.stack(np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij"), -1).reshape(-1, 3)
    omega = 1.0 / 10000 ** (np.arange(per_axis // 2, dtype=np.float64) / (per_axis / 2.0))
    for axis in range(3):
        ang = coords[:, axis:axis + 1] * omega[None]
        out[:, axis * per_axis:(axis + 1) * per_axis] = np.concatenate([np.sin(ang), np.cos(ang)], 1)
    return torch.from_numpy(out)[None]


@dataclass
class ViTConfig:
    """Everything needed to rebuild the ViT; stored in pretraining checkpoints."""
    in_channels: int
    patch_size: Tuple[int, int, int]
    token_size: Tuple[int, int, int]
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 128
    decoder_depth: int = 2
    decoder_num_heads: int = 4

    @property
    def grid(self) -> Tuple[int, int, int]:
        return tuple(p // t for p, t in zip(self.patch_size, self.token_size))

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.grid))

    @property
    def token_voxels(self) -> int:
        return int(np.prod(self.token_size)) * self.in_channels

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        d = dict(d)
        for k in ("patch_size", "token_size"):
            d[k] = tuple(int(i) for i in d[k])
        return cls(**d)


def patchify(x: torch.Tensor, token_size: Sequence[int]) -> torch.Tensor:
    """(B, C, X, Y, Z) -> (B, N, tx*ty*tz*C), tokens in raster order of the grid."""
    b, c, X, Y, Z = x.shape
    tx, ty, tz = token_size
    x = x.reshape(b, c, X // tx, tx, Y // ty, ty, Z // tz, tz)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (X // tx) * (Y // ty) * (Z // tz), tx * ty * tz * c)


def unpatchify(tokens: torch.Tensor, token_size: Sequence[int], grid: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of ``patchify``."""
    b = tokens.shape[0]
    tx, ty, tz = token_size
    gx, gy, gz = grid
    x = tokens.reshape(b, gx, gy, gz, tx, ty, tz, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gx * tx, gy * ty, gz * tz)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ViTEncoder3D(nn.Module):
    """Patch embedding + transformer encoder. Used unmasked by the finetuning network, so its
    parameter names are shared between pretraining and finetuning checkpoints."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=cfg.token_size, stride=cfg.token_size)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(cfg.embed_dim, cfg.grid), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True)
                                     for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.embed_dim)
        # MAE initialises the patch embedding like a linear layer
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        self.blocks.apply(_init_linear)

    def forward(self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None,
                return_all: bool = False) -> torch.Tensor | List[torch.Tensor]:
        """x (B, C, X, Y, Z) -> (B, N_visible, D). With ``return_all`` a list of the token sequence
        after every block (the last one normalised), for UNETR-style skip connections."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        if ids_keep is not None:
            t = torch.gather(t, 1, ids_keep[..., None].expand(-1, -1, t.shape[-1]))
        outs = []
        for blk in self.blocks:
            t = blk(t)
            outs.append(t)
        t = self.norm(t)
        if return_all:
            outs[-1] = t
            return outs
        return t


class MAEDecoder3D(nn.Module):
    """Light MAE decoder: visible-token embeddings + learned mask tokens -> voxels of every token."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed_3d(cfg.decoder_embed_dim, cfg.grid), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True)
                                     for _ in range(cfg.decoder_depth)])
        self.norm = nn.LayerNorm(cfg.decoder_embed_dim)
        self.pred = nn.Linear(cfg.decoder_embed_dim, cfg.token_voxels)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """latent (B, N_visible, D) -> reconstruction (B, C, X, Y, Z) of the whole patch."""
        b = latent.shape[0]
        v = self.embed(latent)
        full = self.mask_token.expand(b, self.cfg.num_tokens, -1).clone()
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, v.shape[-1]), v)
        full = full + self.pos_embed
        for blk in self.blocks:
            full = blk(full)
        tokens = self.pred(self.norm(full))
        return unpatchify(tokens, self.cfg.token_size, self.cfg.grid, self.cfg.in_channels)


# Size presets; the default is small enough for CPU tests, the others are variants.
VIT_PRESETS = {
    "small": dict(embed_dim=192, depth=6, num_heads=6, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=12),
}
