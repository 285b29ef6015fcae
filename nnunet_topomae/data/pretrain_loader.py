"""Data loading for self-pretraining: nnU-Net's preprocessed cases, images only.

The crop must be the one the spatial pretext task's targets describe, so this loader cuts crops of
exactly the plan's patch size at a uniformly random position (nnU-Net's own ``get_bbox``, no
foreground oversampling: labels are ignored) and returns, next to the image, the 27 normalised
centre/corner coordinates of that crop. Geometric augmentation would move the voxels away from
those coordinates, so only nnU-Net's intensity augmentations are applied (*interpretation*).

Batches are dicts ``{'data', 'spatial', 'keys'}`` (plus ``'topo_pairs'`` when a persistence
function is given, so the inputs' diagrams are computed here, in nnU-Net's augmentation worker
processes, off the training step's critical path).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_topomae.losses.spatial import octant_targets


def intensity_transforms() -> ComposeTransforms:
    """nnU-Net's intensity augmentations with its probabilities; nothing that moves voxels."""
    return ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=0.1),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.15),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ])


def cases_smaller_than_patch(dataset, patch_size) -> Tuple[int, Optional[str], Optional[tuple]]:
    """(how many cases are smaller than the patch on some axis, the smallest one's key, its shape).
    nnU-Net pads such cases; the spatial targets stay bounded for them (``octant_targets``), but they
    carry little image, so the trainer names them once at the start."""
    small = []
    for key in dataset.identifiers:
        data = dataset.load_case(key)[0]  # nnU-Net's datasets open cases lazily (memory-mapped)
        shape = tuple(int(i) for i in data.shape[1:])
        if any(s < p for s, p in zip(shape, patch_size)):
            small.append((int(np.prod(shape)), key, shape))
    if not small:
        return 0, None, None
    _, key, shape = min(small)
    return len(small), key, shape


class PretrainDataLoader(nnUNetDataLoader):
    def __init__(self, data, batch_size: int, patch_size, label_manager, transforms=None,
                 persistence_fn: Optional[Callable[[np.ndarray], object]] = None):
        super().__init__(data, batch_size, patch_size, patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        # the random-crop branch of get_bbox must be taken even with an ignore label: labels are unused
        self.has_ignore = False
        self.persistence_fn = persistence_fn

    def generate_train_batch(self) -> dict:
        keys = self.get_indices()
        images, spatial, pairs = [], [], []
        with torch.no_grad():
            for key in keys:
                data, _, _, _ = self._data.load_case(key)
                shape = data.shape[1:]
                lbs, ubs = self.get_bbox(shape, False, None)
                img = torch.from_numpy(crop_and_pad_nd(data, [[a, b] for a, b in zip(lbs, ubs)], 0)).float()
                if self.transforms is not None:
                    img = self.transforms(image=img)["image"]
                images.append(img)
                spatial.append(octant_targets(lbs, self.patch_size, shape))
                if self.persistence_fn is not None:
                    pairs.append(self.persistence_fn(img.numpy()))
        batch = {"data": torch.stack(images), "spatial": torch.from_numpy(np.stack(spatial)), "keys": keys}
        if self.persistence_fn is not None:
            batch["topo_pairs"] = pairs
        return batch
