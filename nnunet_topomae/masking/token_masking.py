"""Random token masking of the MAE (He et al. 2022, `random_masking` in facebookresearch/mae).

For every sample, a uniformly random subset of ``round(ratio * N)`` of the N tokens is masked:
tokens are ranked by i.i.d. uniform noise and the first ``N - n_masked`` are kept. The ViT encoder
sees the kept tokens only; the decoder and the CNN branch see the mask.

The same mask drives both branches of TopoMAE: the CNN gets the volume with the masked tokens
zero-filled (SimMIM style), so both reconstruct exactly the same missing region.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def random_token_mask(batch_size: int, num_tokens: int, ratio: float,
                      generator: Optional[torch.Generator] = None,
                      device: torch.device | str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(mask, ids_keep)``.

    mask: (B, N) bool, True where a token is masked; exactly ``round(ratio * N)`` per sample.
    ids_keep: (B, N_visible) long, indices of the visible tokens in increasing order, so that the
    encoder input keeps the raster order of the token grid.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    n_masked = int(round(ratio * num_tokens))
    n_keep = num_tokens - n_masked
    if n_keep < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible token out of {num_tokens}; lower the ratio")
    noise = torch.rand(batch_size, num_tokens, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_keep = torch.sort(ids_shuffle[:, :n_keep], dim=1).values
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool)
    mask.scatter_(1, ids_keep, False)
    return mask.to(device), ids_keep.to(device)


def token_mask_to_voxels(mask: torch.Tensor, grid: Sequence[int], token_size: Sequence[int]) -> torch.Tensor:
    """(B, N) token mask in raster order of ``grid`` -> (B, 1, X, Y, Z) float voxel mask (1 = masked)."""
    b = mask.shape[0]
    m = mask.float().reshape(b, 1, *grid)
    for axis, t in enumerate(token_size):
        m = m.repeat_interleave(int(t), dim=2 + axis)
    return m
