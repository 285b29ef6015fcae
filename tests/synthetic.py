"""A tiny synthetic nnU-Net raw dataset (tests must not need real data)."""
from __future__ import annotations

import json
import os

import numpy as np
import SimpleITK as sitk


def make_dataset(raw_root: str, dataset_id: int = 901, name: str = "Synth", n_cases: int = 6,
                 shape=(40, 40, 40), channels: int = 1, spacing=(1.0, 1.0, 1.0), seed: int = 0) -> str:
    """Bright ellipsoids (label 1) with a dark core (label 2) in noise; returns the dataset folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    for i in range(n_cases):
        c = np.array(shape) / 2 + rng.uniform(-4, 4, 3)
        r = np.array(shape) / 4 * rng.uniform(0.7, 1.2, 3)
        d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        seg = np.zeros(shape, np.uint8)
        seg[d < 1] = 1
        seg[d < 0.3] = 2
        for ch in range(channels):
            img = (seg == 1) * (100 + 20 * ch) + (seg == 2) * 40 + rng.normal(0, 10, shape)
            im = sitk.GetImageFromArray(img.astype(np.float32))
            im.SetSpacing(spacing[::-1])
            sitk.WriteImage(im, os.path.join(folder, "imagesTr", f"case_{i:03d}_{ch:04d}.nii.gz"))
        lab = sitk.GetImageFromArray(seg)
        lab.SetSpacing(spacing[::-1])
        sitk.WriteImage(lab, os.path.join(folder, "labelsTr", f"case_{i:03d}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {str(c): f"MR{c}" for c in range(channels)},
                   "labels": {"background": 0, "shell": 1, "core": 2},
                   "numTraining": n_cases, "file_ending": ".nii.gz"}, f, indent=2)
    return folder
