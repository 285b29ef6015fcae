"""HybridMIM pretraining network wrapped around nnU-Net's own CNN.

Paper idea (Xing et al., arXiv 2303.10333)
-----------------------------------------
A U-Net is pretrained on a masked input with three groups of objectives:

1. *Partial region prediction*: the decoder reconstructs only a region of the patch. The
   released ``DeepUNet`` (``Pretrain/pretrain_models/deep_unet_v2.py``: ``cons_stages``,
   ``wrap_feature_selection``, ``forward_decoder``) crops every encoder feature map to a box
   given in bottleneck coordinates, scaled by the pooling factors below that stage, and decodes
   the cropped skips only (a fixed centre box ``[4, 12)^3`` of the 12^3 bottleneck of a 96^3
   patch, i.e. the centre 64^3 voxels).
2. *Patch-masking perception* from the bottleneck: number of masked cubes per sub-volume
   (``n_cubes + 1`` classes) and their positions (``n_cubes`` binary labels); released heads
   ``pred_mask_region = nn.Linear(C, 9)`` and ``pred_mask_region_position = nn.Linear(C, 8)``.
3. *Dropout-based contrastive learning*: two forward passes of the same masked input differ
   only by dropout; the global-average-pooled bottleneck is projected
   (``contrast_learning_head = nn.Linear(C, 384)``) and NT-Xent is applied. The released code
   computes the second encoder pass under ``torch.no_grad()`` but applies the projection head
   with gradients.

Our interpretation for nnU-Net
------------------------------
* ``cnn`` is the plan's network (``PlainConvUNet`` / ``ResidualEncoderUNet``) built by nnU-Net
  with ``num_output_channels = num_input_channels`` and deep supervision off; its parts are
  registered as ``self.encoder`` / ``self.decoder`` so that the state_dict keys are exactly the
  ones of the plain network (``encoder.*``, ``decoder.*``, including the decoder's alias
  ``decoder.encoder.*``). The decoder's ``seg_layers`` act as reconstruction heads and are
  dropped by nnU-Net's ``load_pretrained_weights`` when finetuning; the extra heads
  (``perception_count``, ``perception_position``, ``projection``) are ignored by it because the
  finetuning network has no such keys.
* Sub-volume == one bottleneck position (see :mod:`nnunet_topomae.masking.two_level`), so the
  perception heads are 1x1x1 convolutions on the bottleneck (equivalent to the released
  per-region ``nn.Linear`` without the 4x4x4 average pooling).
* Reconstruction output is *linear*: nnU-Net images are z-score normalised (unbounded), whereas
  the released training loop applies ``torch.sigmoid`` to the logits because its images are
  scaled to [0, 1].
* nnU-Net's CNN has no dropout layers, so the contrastive views are made by
  ``F.dropout(bottleneck, p=contrast_dropout, training=True)`` applied to the bottleneck feature
  map right before global average pooling and the projection MLP. ``training=True`` is
  deliberate: the two views must differ in validation too. The other heads and the decoder see
  the un-dropped bottleneck. (Released code: dropout 0.1 inside the stem and decoder convs.)
* The projection head is an MLP ``Linear(C, hidden) -> ReLU -> Linear(hidden, proj_dim)``
  (``projection_hidden=0`` gives the released single ``Linear(C, proj_dim)``).
* The partial-region box is drawn at random every step by :func:`sample_box` (the released
  code fixes the centre box); the default size is 2/3 of the bottleneck grid per axis, as in
  the released 8/12 setting.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_topomae.masking.two_level import MaskGeometry

__all__ = ["HybridMIMNetwork", "sample_box", "box_to_voxel_slices", "Box"]

Box = Tuple[Tuple[int, ...], Tuple[int, ...]]


def _normalise_box(box: Box, geom: MaskGeometry) -> Box:
    lb, ub = box
    lb = tuple(int(i) for i in lb)
    ub = tuple(int(i) for i in ub)
    if len(lb) != geom.ndim or len(ub) != geom.ndim:
        raise ValueError(f"box {box} does not have {geom.ndim} entries per bound")
    for a in range(geom.ndim):
        if not (0 <= lb[a] < ub[a] <= geom.subvolume_grid[a]):
            raise ValueError(f"box {box} is empty or outside the bottleneck grid {geom.subvolume_grid}")
    return lb, ub


def sample_box(
    geom: MaskGeometry,
    fraction_per_axis: Union[float, Sequence[float]] = 2.0 / 3.0,
    generator: Optional[torch.Generator] = None,
) -> Box:
    """Random partial-prediction box ``(lb, ub)`` in bottleneck-grid coordinates (``ub`` exclusive).

    Box size per axis is ``max(1, round(grid * fraction))`` clamped to the grid; its position is
    uniform over all valid offsets.
    """
    if isinstance(fraction_per_axis, (int, float)):
        fraction_per_axis = [float(fraction_per_axis)] * geom.ndim
    if len(fraction_per_axis) != geom.ndim:
        raise ValueError(f"fraction_per_axis needs {geom.ndim} entries, got {fraction_per_axis!r}")
    lb, ub = [], []
    for g, f in zip(geom.subvolume_grid, fraction_per_axis):
        size = min(g, max(1, int(round(g * f))))
        start = int(torch.randint(0, g - size + 1, (1,), generator=generator).item())
        lb.append(start)
        ub.append(start + size)
    return tuple(lb), tuple(ub)


def box_to_voxel_slices(box: Box, geom: MaskGeometry) -> Tuple[slice, ...]:
    """Voxel slices (spatial axes only) covered by a bottleneck-grid box."""
    lb, ub = _normalise_box(box, geom)
    return tuple(slice(l * s, u * s) for l, u, s in zip(lb, ub, geom.subvolume_size))


class HybridMIMNetwork(nn.Module):
    """nnU-Net CNN + HybridMIM heads. See the module docstring for the design."""

    def __init__(
        self,
        cnn: nn.Module,
        geometry: MaskGeometry,
        proj_dim: int = 384,
        contrast_dropout: float = 0.1,
        projection_hidden: Optional[int] = None,
    ):
        super().__init__()
        if not (hasattr(cnn, "encoder") and hasattr(cnn, "decoder")):
            raise TypeError("cnn must expose .encoder and .decoder (PlainConvUNet / ResidualEncoderUNet)")
        self.encoder = cnn.encoder
        self.decoder = cnn.decoder
        self.geometry = geometry
        self.contrast_dropout = float(contrast_dropout)

        enc_strides = [tuple(int(i) for i in s) for s in self.encoder.strides]
        if geometry.strides and tuple(enc_strides) != tuple(geometry.strides):
            raise ValueError(f"geometry strides {geometry.strides} differ from the encoder's strides {enc_strides}")
        if any(i != 1 for i in enc_strides[0]):
            raise ValueError("the first stage must have stride 1 so that the decoder outputs full resolution")
        self._stage_strides = enc_strides
        total = [math.prod(s[a] for s in enc_strides) for a in range(len(enc_strides[0]))]
        cum = [1] * len(total)
        factors = []
        for s in enc_strides:
            cum = [c * i for c, i in zip(cum, s)]
            factors.append(tuple(t // c for t, c in zip(total, cum)))
        # skip k is cropped to box * factors[k]
        self._crop_factors: List[Tuple[int, ...]] = factors

        c_bottleneck = int(self.encoder.output_channels[-1])
        conv_op = self.encoder.conv_op
        n = geometry.n_cubes
        self.perception_count = conv_op(c_bottleneck, n + 1, 1, 1, 0, bias=True)
        self.perception_position = conv_op(c_bottleneck, n, 1, 1, 0, bias=True)
        hidden = c_bottleneck if projection_hidden is None else int(projection_hidden)
        if hidden > 0:
            self.projection = nn.Sequential(
                nn.Linear(c_bottleneck, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim)
            )
        else:
            self.projection = nn.Sequential(nn.Linear(c_bottleneck, proj_dim))

    # ------------------------------------------------------------------ helpers
    def crop_skips(self, skips: Sequence[torch.Tensor], box: Box) -> List[torch.Tensor]:
        """Crop encoder output ``k`` to ``box * (total_stride / cumulative_stride_k)`` per axis."""
        lb, ub = _normalise_box(box, self.geometry)
        out = []
        for k, s in enumerate(skips):
            f = self._crop_factors[k]
            sl = tuple(slice(l * fi, u * fi) for l, u, fi in zip(lb, ub, f))
            out.append(s[(Ellipsis, *sl)])
        return out

    def _project(self, bottleneck: torch.Tensor) -> torch.Tensor:
        h = F.dropout(bottleneck, p=self.contrast_dropout, training=True)
        h = h.flatten(2).mean(dim=2)
        return self.projection(h)

    def _decode(self, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.decoder(list(skips))
        if isinstance(out, (list, tuple)):  # decoder built / switched to deep supervision
            out = out[0]
        return out

    def _check_bottleneck(self, bottleneck: torch.Tensor) -> None:
        if tuple(bottleneck.shape[2:]) != tuple(self.geometry.subvolume_grid):
            raise ValueError(
                f"bottleneck grid {tuple(bottleneck.shape[2:])} != geometry.subvolume_grid "
                f"{self.geometry.subvolume_grid}; was the input patch {self.geometry.patch_size}?"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, box: Optional[Box] = None) -> Dict[str, torch.Tensor]:
        """Returns ``recon`` (linear; whole patch, or only ``box`` in voxels),
        ``count_logits`` ``(B, n_cubes + 1, *grid)``, ``position_logits`` ``(B, n_cubes, *grid)``,
        ``projection`` ``(B, proj_dim)`` (one dropout view) and ``bottleneck``."""
        skips = self.encoder(x)
        bottleneck = skips[-1]
        self._check_bottleneck(bottleneck)
        out = {
            "count_logits": self.perception_count(bottleneck),
            "position_logits": self.perception_position(bottleneck),
            "projection": self._project(bottleneck),
            "bottleneck": bottleneck,
        }
        if box is not None:
            skips = self.crop_skips(skips, box)
        out["recon"] = self._decode(skips)
        return out

    def projection_only(self, x: torch.Tensor, encoder_grad: bool = False) -> torch.Tensor:
        """Second contrastive view: encoder (no grad by default, as the released code) ->
        dropout -> pool -> projection head (with grad). No decoder, no perception heads."""
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            bottleneck = self.encoder(x)[-1]
        return self._project(bottleneck)
