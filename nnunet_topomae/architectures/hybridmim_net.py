"""HybridMIM pretraining network wrapped around nnU-Net's own CNN.

Paper idea (Xing et al., arXiv 2303.10333)
-----------------------------------------
A U-Net is pretrained on a masked input with three groups of objectives:

1. *Partial region prediction*: the decoder reconstructs only a region of the patch. The
   released ``DeepUNet`` (``Pretrain/pretrain_models/deep_unet_v2.py``: ``cons_stages``,
   ``wrap_feature_selection``, ``forward_decoder``) crops every encoder feature map to a box
   given in bottleneck coordinates, scaled by the pooling factors below that stage, and decodes
   the cropped skips only: a fixed box ``[4, 12)^3`` of the 12^3 bottleneck of a 96^3 patch, i.e.
   voxels 32-96 on each axis, a 64^3 box anchored at the far corner of the patch, not a central one
   (a central 64^3 box would be voxels 16-80, bottleneck positions [2, 10)).
2. *Patch-masking perception* from the bottleneck: number of masked cubes per sub-volume
   (``n_cubes + 1`` classes) and their positions (``n_cubes`` binary labels); released heads
   ``pred_mask_region = nn.Linear(C, 9)`` and ``pred_mask_region_position = nn.Linear(C, 8)``.
3. *Dropout-based contrastive learning*: two forward passes of the same masked input differ
   only by dropout; the global-average-pooled bottleneck is projected
   (``contrast_learning_head = nn.Linear(C, 384)``, one linear layer) and NT-Xent is applied. The released code
   computes the second encoder pass under ``torch.no_grad()`` but applies the projection head
   with gradients.

Our interpretation for nnU-Net
------------------------------
* ``cnn`` is the plan's network (``PlainConvUNet`` / ``ResidualEncoderUNet``) built by nnU-Net
  with ``num_output_channels = num_input_channels``; its parts are
  registered as ``self.encoder`` / ``self.decoder`` so that the state_dict keys are exactly the
  ones of the plain network (``encoder.*``, ``decoder.*``, including the decoder's alias
  ``decoder.encoder.*``). The decoder's ``seg_layers`` act as reconstruction heads and are
  dropped by nnU-Net's ``load_pretrained_weights`` when finetuning; the extra heads
  (``perception_count``, ``perception_position``, ``projection``) are ignored by it because the
  finetuning network has no such keys. With deep supervision on (what the pretraining trainer
  uses) every decoder output is returned (``recon_ds``) so that a loss on all of them reaches
  every ``seg_layers`` head: DDP without ``find_unused_parameters`` needs a gradient for every
  parameter. For the same reason the heads of a disabled objective (``perception=False``,
  ``contrast=False``) are not created.
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
* The projection head is a two-layer MLP ``Linear(C, hidden) -> ReLU -> Linear(hidden, proj_dim)``
  (``hidden = C`` by default, SimCLR's head) where the released code has one linear layer
  ``Linear(C, 384)``; ``projection_hidden=0`` gives the released single ``Linear(C, proj_dim)``.
* The partial-region box is drawn at random every step by :func:`sample_box` (the released
  code fixes the corner-anchored box ``[4, 12)^3`` above); the default size is 2/3 of the
  bottleneck grid per axis, as in the released 8/12 setting.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# the partial-prediction box lives with the masking geometry (the loss uses it too, and losses sit
# below architectures); re-exported here for the network's callers
from nnunet_topomae.masking.two_level import Box, MaskGeometry, box_to_voxel_slices, normalise_box, sample_box

__all__ = ["HybridMIMNetwork", "sample_box", "box_to_voxel_slices", "Box"]

class HybridMIMNetwork(nn.Module):
    """nnU-Net CNN + HybridMIM heads. See the module docstring for the design."""

    def __init__(
        self,
        cnn: nn.Module,
        geometry: MaskGeometry,
        proj_dim: int = 384,
        contrast_dropout: float = 0.1,
        projection_hidden: Optional[int] = None,
        perception: bool = True,
        contrast: bool = True,
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
        # heads of disabled objectives are not created: every parameter must get a gradient (DDP)
        self.has_perception = bool(perception)
        self.has_contrast = bool(contrast)
        if self.has_perception:
            self.perception_count = conv_op(c_bottleneck, n + 1, 1, 1, 0, bias=True)
            self.perception_position = conv_op(c_bottleneck, n, 1, 1, 0, bias=True)
        hidden = c_bottleneck if projection_hidden is None else int(projection_hidden)
        if self.has_contrast and hidden > 0:
            self.projection = nn.Sequential(
                nn.Linear(c_bottleneck, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim)
            )
        elif self.has_contrast:
            self.projection = nn.Sequential(nn.Linear(c_bottleneck, proj_dim))

    # ------------------------------------------------------------------ helpers
    def crop_skips(self, skips: Sequence[torch.Tensor], box: Box) -> List[torch.Tensor]:
        """Crop encoder output ``k`` to ``box * (total_stride / cumulative_stride_k)`` per axis."""
        lb, ub = normalise_box(box, self.geometry)
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

    def _decode(self, skips: Sequence[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The decoder's output: one tensor, or (deep supervision on) the list of all outputs,
        highest resolution first."""
        return self.decoder(list(skips))

    def _encoder_is_stochastic(self) -> bool:
        return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
                   for m in self.encoder.modules())

    def _check_bottleneck(self, bottleneck: torch.Tensor) -> None:
        if tuple(bottleneck.shape[2:]) != tuple(self.geometry.subvolume_grid):
            raise ValueError(
                f"bottleneck grid {tuple(bottleneck.shape[2:])} != geometry.subvolume_grid "
                f"{self.geometry.subvolume_grid}; was the input patch {self.geometry.patch_size}?"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, box: Optional[Box] = None, second_view: bool = False) -> Dict[str, torch.Tensor]:
        """Returns ``recon`` (linear; whole patch, or only ``box`` in voxels), ``recon_ds`` (only
        with deep supervision on: every decoder output, highest resolution first, ``recon`` being
        the first), ``count_logits`` ``(B, n_cubes + 1, *grid)`` and ``position_logits``
        ``(B, n_cubes, *grid)`` (perception heads), ``projection`` ``(B, proj_dim)`` (one dropout
        view; contrast head) and ``bottleneck``.

        ``second_view=True`` adds ``projection2``, the second contrastive view: the released code's
        no-grad second encoder pass of the same input, then dropout, pooling and the projection
        head (with gradient). nnU-Net's CNN has no dropout layers, so that second pass would
        recompute exactly the same bottleneck: it is reused (detached) instead, which costs
        nothing; only an encoder with active dropout layers is run a second time (no grad, after
        the gradient pass, so that an autocast weight-cast cache only ever holds casts with
        autograd history)."""
        skips = self.encoder(x)
        bottleneck = skips[-1]
        self._check_bottleneck(bottleneck)
        out: Dict[str, torch.Tensor] = {"bottleneck": bottleneck}
        if self.has_perception:
            out["count_logits"] = self.perception_count(bottleneck)
            out["position_logits"] = self.perception_position(bottleneck)
        if self.has_contrast:
            out["projection"] = self._project(bottleneck)
        if box is not None:
            skips = self.crop_skips(skips, box)
        recon = self._decode(skips)
        if isinstance(recon, (list, tuple)):  # decoder built / switched to deep supervision
            out["recon_ds"] = list(recon)
            recon = recon[0]
        out["recon"] = recon
        if second_view and self.has_contrast:
            if self._encoder_is_stochastic():
                with torch.no_grad():
                    b2 = self.encoder(x)[-1]
            else:
                b2 = bottleneck.detach()
            out["projection2"] = self._project(b2)
        return out

    def projection_only(self, x: torch.Tensor, encoder_grad: bool = False) -> torch.Tensor:
        """Second contrastive view: encoder (no grad by default, as the released code) ->
        dropout -> pool -> projection head (with grad). No decoder, no perception heads."""
        if not self.has_contrast:
            raise RuntimeError("this network was built without the contrastive projection head")
        with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
            bottleneck = self.encoder(x)[-1]
        return self._project(bottleneck)
