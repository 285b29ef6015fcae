"""nnU-Net plans dictionaries for networks of a chosen geometry, without planning a dataset.

Unit tests and the micro-benchmarks build trainers and networks for isotropic and anisotropic plans,
PlainConvUNet and ResidualEncoderUNet, without running ``nnUNetv2_plan_and_preprocess``. The dicts
have exactly the fields nnU-Net's ``PlansManager``/``ConfigurationManager`` and
``get_network_from_plans`` read, so every consumer sees what a planned dataset would give it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
INSTANCE_NORM = "torch.nn.modules.instancenorm.InstanceNorm3d"


def arch_kwargs(strides, features: Optional[Sequence[int]] = None, arch: str = PLAIN, n_conv: int = 1,
                n_conv_decoder: int = 1, kernel: int = 3, norm: Optional[str] = INSTANCE_NORM) -> dict:
    """``arch_kwargs`` as a plans file holds them. ``features`` defaults to 8, 16, ... capped at 64;
    ``n_conv`` is convolutions per encoder stage (PlainConvUNet) or residual blocks (ResidualEncoderUNet)."""
    n = len(strides)
    features = list(features) if features is not None else [min(8 * 2 ** i, 64) for i in range(n)]
    kw = {
        "n_stages": n, "features_per_stage": features[:n], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[kernel] * 3 for _ in range(n)], "strides": [list(s) for s in strides],
        "n_conv_per_stage_decoder": [n_conv_decoder] * (n - 1), "conv_bias": True,
        "norm_op": norm, "norm_op_kwargs": {"eps": 1e-05, "affine": True} if norm else None,
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    kw["n_blocks_per_stage" if arch == RESENC else "n_conv_per_stage"] = [n_conv] * n
    return kw


def configuration(patch, strides, features=None, arch: str = PLAIN, batch_size: int = 2, channels: int = 1,
                  **arch_options) -> dict:
    """One ``configurations`` entry (3D)."""
    median = [int(p * 1.5) for p in patch]
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size, "patch_size": list(patch), "median_image_size_in_voxels": median,
        "spacing": [1.0] * len(patch), "normalization_schemes": ["ZScoreNormalization"] * channels,
        "use_mask_for_norm": [False] * channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling, "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {"network_class_name": arch, "arch_kwargs": arch_kwargs(strides, features, arch, **arch_options),
                         "_kw_requires_import": list(REQ_IMPORT)},
        "batch_dice": False,
    }


def plans(patch: Tuple[int, ...], strides, features=None, arch: str = PLAIN, batch_size: int = 2, channels: int = 1,
          dataset_name: str = "Dataset999_Synthetic", with_2d: bool = False, **arch_options) -> dict:
    """A whole plans dict with one ``3d_fullres`` configuration (and a ``2d`` one with ``with_2d``, to test
    that 2D configurations are refused)."""
    configs = {"3d_fullres": configuration(patch, strides, features, arch, batch_size, channels, **arch_options)}
    if with_2d:
        c2 = configuration(patch, strides, features, arch, batch_size, channels, **arch_options)
        c2.update(data_identifier="nnUNetPlans_2d", patch_size=list(patch[1:]), spacing=[1.0, 1.0])
        configs["2d"] = c2
    return {
        "dataset_name": dataset_name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * len(patch),
        "original_median_shape_after_transp": [int(p * 1.5) for p in patch], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {}, "configurations": configs,
    }
