"""nnUNetTrainerHybridMIMPretrain: HybridMIM pretraining of nnU-Net's own CNN (Xing et al., arXiv 2303.10333).

    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainerHybridMIMPretrain
    nnUNetv2_train DATASET 3d_fullres 0 -tr nnUNetTrainer -pretrained_weights \\
        $nnUNet_results/.../nnUNetTrainerHybridMIMPretrain__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth

The network is the plan's CNN (PlainConvUNet / ResidualEncoderUNet, exactly as the stock trainer
builds it, with as many outputs as input channels) plus the HybridMIM heads
(:class:`~nnunet_topomae.architectures.hybridmim_net.HybridMIMNetwork`): the checkpoint's keys are
``encoder.*`` / ``decoder.*`` as in the stock network, plus ``perception_*`` / ``projection.*``,
which the stock ``-pretrained_weights`` ignores (and the ``seg_layers``, which it skips).

One training step (``compute_terms``):

1. two-level mask on nnU-Net's grid (:mod:`nnunet_topomae.masking.two_level`): sub-volume = one
   bottleneck position, cube = one position of the stage above; 40 % of the cubes zero-filled;
2. a box of sub-volumes drawn at random (2/3 of the bottleneck grid per axis, as the released
   8/12); the decoder runs on the skips cropped to it only (partial region prediction);
3. the loss of :class:`~nnunet_topomae.losses.hybridmim_loss.HybridMIMLoss`: masked MSE inside the
   box on every deep-supervision output, perception (count CE, position BCE, consistency), NT-Xent
   between two dropout views of the bottleneck (negatives gathered across DDP ranks). The second
   view is the released code's no-grad second pass; nnU-Net's CNN has no dropout layers, so that
   pass would recompute the same bottleneck, and the network reuses it detached instead (free).

Validation decodes the whole patch (no box) for every variant, so that the validation losses of
``_noPartial`` and the default are comparable and measure what finetuning will use (the full
decoder). Everything else (logs, progress.png, loss_terms.png, reconstruction preview, checkpoints,
``--c``, AdamW warm-up + cosine, no segmentation validation) is
:class:`~nnunet_topomae.trainers.pretrain_base.nnUNetPretrainTrainerBase`. Ablations are subclasses
in :mod:`nnunet_topomae.trainers.hybridmim_variants`.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np
import torch

from nnunet_topomae.architectures.hybridmim_net import HybridMIMNetwork, sample_box
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.losses.hybridmim_loss import HybridMIMLoss
from nnunet_topomae.masking.two_level import (MaskGeometry, apply_voxel_mask, cube_mask_to_voxels,
                                              sample_cube_mask)
from nnunet_topomae.trainers.pretrain_base import nnUNetPretrainTrainerBase
from nnunet_topomae.trainers.topomae_pretrain import build_plan_cnn


def mask_geometry_from_plan(configuration_manager) -> MaskGeometry:
    patch = [int(i) for i in configuration_manager.patch_size]
    strides = configuration_manager.network_arch_init_kwargs["strides"]
    try:
        return MaskGeometry.from_plan(patch, strides)
    except ValueError as e:
        raise UserInputError(f"HybridMIM cannot lay its two-level mask on this plan: {e}") from e


class nnUNetTrainerHybridMIMPretrain(nnUNetPretrainTrainerBase):
    # masking (paper / released code: 40 % of the cubes, zero-filled)
    mask_ratio: float = 0.4
    mask_value: float = 0.0
    # partial region prediction: a random box of this fraction of the bottleneck grid per axis
    partial: bool = True
    box_fraction: float = 2.0 / 3.0
    # heads
    use_perception: bool = True
    use_contrast: bool = True
    proj_dim: int = 384
    projection_hidden: Optional[int] = None  # None: MLP with the bottleneck width; 0: a single Linear
    contrast_dropout: float = 0.1
    temperature: float = 0.5
    consistency: str = "soft"  # or "released"
    # loss weights of the released code
    w_rec: float = 1.0
    w_count: float = 0.1
    w_position: float = 0.1
    w_consistency: float = 0.01
    w_contrast: float = 0.1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.geometry = mask_geometry_from_plan(self.configuration_manager)

    # ------------------------------------------------------------------ network / loss
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # num_output_channels (the label count) is irrelevant: the decoder reconstructs the input.
        # Deep supervision on: the reconstruction loss then reaches every seg_layers head (DDP).
        cnn = build_plan_cnn(configuration_manager, num_input_channels, num_input_channels, enable_deep_supervision)
        return HybridMIMNetwork(cnn, mask_geometry_from_plan(configuration_manager), proj_dim=cls.proj_dim,
                                contrast_dropout=cls.contrast_dropout, projection_hidden=cls.projection_hidden,
                                perception=cls.perception_on(), contrast=cls.contrast_on())

    # An objective is on if its flag is set and it has a non-zero weight; otherwise its heads are not
    # built (an unused head would break DDP, which nnU-Net runs without find_unused_parameters).
    @classmethod
    def perception_on(cls) -> bool:
        return cls.use_perception and (cls.w_count > 0 or cls.w_position > 0 or cls.w_consistency > 0)

    @classmethod
    def contrast_on(cls) -> bool:
        return cls.use_contrast and cls.w_contrast > 0

    def _build_loss(self):
        p = self.perception_on()
        return HybridMIMLoss(self.geometry, w_rec=self.w_rec,
                             w_count=self.w_count if p else 0.0,
                             w_position=self.w_position if p else 0.0,
                             w_consistency=self.w_consistency if p else 0.0,
                             w_contrast=self.w_contrast if self.contrast_on() else 0.0,
                             temperature=self.temperature, consistency=self.consistency,
                             gather_negatives=True)

    # ------------------------------------------------------------------ steps
    def sample_masks(self, batch_size: int):
        """Cube mask ``(B, *grid, n_cubes)`` (bool) and its voxel mask ``(B, 1, *patch)`` on the device."""
        cube_mask = sample_cube_mask(batch_size, self.geometry, self.mask_ratio, device=self.device)
        return cube_mask, cube_mask_to_voxels(cube_mask, self.geometry)

    def sample_box(self):
        """Box of sub-volumes to decode this step (None: the whole patch)."""
        if not self.partial or not self.network.training:
            return None
        return sample_box(self.geometry, self.box_fraction)

    def compute_terms(self, batch: dict) -> Dict[str, torch.Tensor]:
        x = batch["data"].to(self.device, non_blocking=True)
        cube_mask, voxel_mask = self.sample_masks(x.shape[0])
        box = self.sample_box()
        out = self.network(apply_voxel_mask(x, voxel_mask, self.mask_value), box=box,
                           second_view=self.contrast_on())
        return self.loss(out, x, voxel_mask, cube_mask, box)

    # ------------------------------------------------------------------ pictures / checkpoint
    def preview_columns(self, batch: dict) -> Dict[str, np.ndarray]:
        x = batch["data"][:1].to(self.device)
        _, vm = self.sample_masks(1)
        xm = apply_voxel_mask(x, vm, self.mask_value)
        recon = self._unwrapped_network()(xm)["recon"].float()
        cols = {"input": x, "masked input": xm, "reconstruction": recon,
                "visible + reconstructed": x * (1 - vm) + recon * vm}
        return {k: v[0, 0].float().cpu().numpy() for k, v in cols.items()}

    def pretraining_record(self) -> dict:
        rec = super().pretraining_record()
        geom = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.geometry).items()}
        geom["strides"] = [list(s) for s in self.geometry.strides]
        rec.update(method="hybridmim", mask_geometry=geom, mask_ratio=self.mask_ratio, mask_value=self.mask_value,
                   partial=self.partial, box_fraction=self.box_fraction,
                   perception=self.perception_on(), contrast=self.contrast_on(), proj_dim=self.proj_dim,
                   loss_weights=dict(self.loss.w) if self.loss is not None else None)
        return rec
