"""nnUNetTrainerTopoMAEPretrain: method A's pretraining stage (Gu et al. 2024).

A 3D ViT-MAE and nnU-Net's own CNN (built from the plans) are co-pretrained on the same masked
patches of the dataset's preprocessed images (labels unused): masked reconstruction, the
topological loss, the spatial pretext task and the two consistency terms (see
``nnunet_topomae.losses.topomae_loss``). Variants are class-attribute overrides in
``nnunet_topomae.trainers.variants``.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_topomae.architectures.topomae_net import TopoMAENetwork
from nnunet_topomae.architectures.vit3d import VIT_PRESETS, ViTConfig, token_size_from_plan
from nnunet_topomae.losses.topological import (TopologicalLoss, check_topo_settings, composed_outputs,
                                                default_pool_workers, reduced_diagrams, reduction_kernel,
                                                require_backend)
from nnunet_topomae.losses.topomae_loss import TopoMAELoss
from nnunet_topomae.trainers.pretrain_base import nnUNetPretrainTrainerBase
from nnunet_topomae.utils.ddp import local_world_size
from nnunet_topomae.utils.memory import keep_freed_memory
from nnunet_topomae.utils.plotting import save_persistence_diagrams


def build_plan_cnn(configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool):
    """nnU-Net's auto-configured CNN exactly as the stock trainer builds it."""
    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels, num_output_channels, allow_init=True, deep_supervision=deep_supervision)


def vit_config_from_plan(configuration_manager, num_input_channels: int, preset: str = "small",
                         max_token: int = 16) -> ViTConfig:
    patch = tuple(int(i) for i in configuration_manager.patch_size)
    strides = configuration_manager.network_arch_init_kwargs["strides"]
    token, _ = token_size_from_plan(patch, strides, max_token)
    return ViTConfig(in_channels=num_input_channels, patch_size=patch, token_size=token, **VIT_PRESETS[preset])


class nnUNetTrainerTopoMAEPretrain(nnUNetPretrainTrainerBase):
    vit_preset: str = "small"
    max_token: int = 16
    mask_ratio: float = 0.75
    use_cnn: bool = True
    spatial_heads: bool = True
    # loss weights (interpretation; the paper does not give them)
    w_rec: float = 1.0
    w_topo: float = 0.1
    w_spatial: float = 0.1
    w_rec_consistency: float = 0.1
    w_spatial_consistency: float = 0.1
    # topological loss on a reduced copy: at most topo_max_size voxels per axis and topo_max_voxels in
    # all (about 23^3: Hippocampus's 40x56x40 patch -> 20x28x20, a 128^3 patch -> 22^3); most persistent pairs
    topo_max_size: Optional[int] = 32
    topo_max_voxels: Optional[int] = 12288
    topo_max_pairs: Optional[int] = 64
    topo_backend: str = "gudhi"       # 'cripser' (optional extra, GPL-3.0) is faster
    # pair budget by persistence mass (None: by count only), and the points outside the budget: 'drop'
    # them or match them to the 'diagonal' (losses.topological.pair_budget / topological_loss_batch;
    # how faithful each setting is to the exact L_topo and what it costs: docs/BENCHMARKS.md, fidelity)
    topo_pair_mass: Optional[float] = None
    topo_tail: str = "drop"
    # what the loss compares with the input: the network's 'raw' output, or the 'composed' image
    # m * recon + (1 - m) * input (the input on the visible voxels; docs/METHOD.md)
    topo_reconstruction: str = "raw"
    # processes for the reconstructions' persistence (0: in process; None: default_pool_workers, i.e.
    # 2 on a 2-core machine, up to one per reconstruction of a step where there are more cores)
    topo_workers: Optional[int] = None
    topo_inputs_in_dataloader: bool = True
    # on the CPU device the network's threads use every core, so the data-loading workers (whose main
    # extra work here is the inputs' persistence) run at idle priority and fill the gaps instead of
    # preempting them (InputPersistence; docs/BENCHMARKS.md: TopoMAE's step about 11 % shorter on 2 cores)
    topo_inputs_idle_priority_on_cpu: bool = True
    topo_every: int = 1               # compute the topological term every N steps
    # the topological term only from this fraction of the pretraining epochs on (0: from the start), so
    # that it shapes reconstructions that already resemble the input (interpretation; not in the paper)
    topo_from_fraction: float = 0.0
    # glibc keeps freed big blocks instead of faulting them in again every step (nnunet_topomae.utils.memory)
    malloc_keep_freed: bool = True

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # num_output_channels (the label count) is irrelevant: both branches reconstruct the input
        cfg = vit_config_from_plan(configuration_manager, num_input_channels, cls.vit_preset, cls.max_token)
        cnn = build_plan_cnn(configuration_manager, num_input_channels, num_input_channels,
                             enable_deep_supervision) if cls.use_cnn else None
        return TopoMAENetwork(cfg, cnn, mask_ratio=cls.mask_ratio, spatial_heads=cls.spatial_heads)

    def _build_loss(self):
        topo = None
        if self.w_topo > 0:
            require_backend(self.topo_backend, hint=f" with {type(self).__name__}, or use nnUNetTrainerTopoMAEPretrain (gudhi)")
            check_topo_settings(self.topo_reconstruction, self.topo_tail)
            workers = self.topo_workers
            if workers is None:  # nnU-Net's initialize() has set this rank's batch size before _build_loss
                volumes = self.batch_size * self.num_input_channels * (2 if self.use_cnn else 1)
                # the cores of this node are shared by the ranks on this node (torchrun's LOCAL_WORLD_SIZE)
                workers = default_pool_workers(volumes, ranks=local_world_size() if self.is_ddp else 1)
            topo = TopologicalLoss(max_size=self.topo_max_size, max_pairs=self.topo_max_pairs, backend=self.topo_backend,
                                   workers=workers, max_voxels=self.topo_max_voxels,
                                   pair_mass=self.topo_pair_mass, tail=self.topo_tail)
        return TopoMAELoss(self.w_rec, self.w_topo, self.w_spatial if self.spatial_heads else 0.0,
                           self.w_rec_consistency if self.use_cnn else 0.0,
                           self.w_spatial_consistency if (self.use_cnn and self.spatial_heads) else 0.0,
                           topo_loss=topo)

    def persistence_fn(self):
        # nnU-Net's initialize() has built self.loss before the data loaders
        topo = self.loss.topo_loss
        if topo is None or not self.topo_inputs_in_dataloader:
            return None
        return topo.input_persistence(low_priority=self.topo_inputs_idle_priority_on_cpu and self.device.type == "cpu")

    def compute_terms(self, batch: dict) -> Dict[str, torch.Tensor]:
        x = batch["data"].to(self.device, non_blocking=True)
        spatial = batch["spatial"].to(self.device, non_blocking=True)
        out = self.network(x)
        if self.topo_reconstruction == "composed":  # changes the topological term only (composed_outputs)
            out = composed_outputs(out, x)
        with_topo = True
        if self.network.training:  # the schedules count training steps and epochs; validation always scores it
            self._train_step_count = getattr(self, "_train_step_count", -1) + 1
            with_topo = (self._train_step_count % self.topo_every == 0
                         and self.current_epoch >= self.topo_from_fraction * self.num_epochs)
        return self.loss(out, x, spatial, topo_pairs=batch.get("topo_pairs"), with_topo=with_topo)

    def on_train_start(self):
        # before super(), so that the data-loading workers it forks inherit it
        kept = keep_freed_memory() if self.malloc_keep_freed else False
        super().on_train_start()
        self.print_to_log_file(f"glibc malloc keeps freed memory (malloc_keep_freed): {kept}")
        if self.loss.topo_loss is not None:
            self.loss.topo_loss.start()  # the pool's start-up (seconds) is not charged to the first step
            n = self.loss.topo_loss.workers
            self.print_to_log_file(f"topological loss: reconstructions' persistence in "
                                   f"{f'{n} processes' if n else 'the training process'} (topo_workers), "
                                   f"backend {self.loss.topo_loss.backend}")
            pfn = self.persistence_fn()
            if pfn is not None:
                workers = get_allowed_n_proc_DA()
                where = (f"nnU-Net's data-loading workers (nnUNet_n_proc_DA={workers})" if workers else
                         "the training process (nnUNet_n_proc_DA=0: no data-loading workers)")
                idle = " at idle priority (topo_inputs_idle_priority_on_cpu)" if workers and pfn.low_priority else ""
                self.print_to_log_file(f"topological loss: inputs' persistence in {where}{idle}")

    def on_train_end(self):
        super().on_train_end()
        if self.loss.topo_loss is not None:
            self.loss.topo_loss.close()

    def preview_columns(self, batch: dict) -> Dict[str, np.ndarray]:
        x = batch["data"][:1].to(self.device)
        out = self._unwrapped_network()(x)
        m = out["voxel_mask"]
        cols = {"input": x, "masked input": x * (1 - m), "ViT reconstruction": out["vit_recon"]}
        if "cnn_recon" in out:
            cnn = out["cnn_recon"]
            cols["CNN reconstruction"] = cnn[0] if isinstance(cnn, (list, tuple)) else cnn
        return {k: v[0, 0].float().cpu().numpy() for k, v in cols.items()}

    def write_extra_pictures(self, columns: Dict[str, np.ndarray]) -> None:
        # the diagrams the topological loss matches (reduced volume, top-k points), also for _noTopo and
        # MAE, whose reconstructions are then judged by a loss they never saw
        volumes = {k: v for k, v in columns.items() if k != "masked input"}
        # an optional backend is only checked when the loss uses it; gudhi is always there
        backend = self.topo_backend if self.loss.topo_loss is not None else "gudhi"
        diagrams = reduced_diagrams(volumes, self.topo_max_size, self.topo_max_voxels,
                                    max_pairs=self.topo_max_pairs, backend=backend, pair_mass=self.topo_pair_mass,
                                    tail=self.topo_tail)
        shape = columns["input"].shape
        reduced = "x".join(str(-(-s // k)) for s, k in zip(shape, reduction_kernel(shape, self.topo_max_size,
                                                                                     self.topo_max_voxels)))
        save_persistence_diagrams(diagrams, join(self.output_folder, "persistence_diagrams.png"),
                                  title=f"{self.__class__.__name__}, epoch {self.current_epoch}: persistence of the "
                                        f"validation case reduced to {reduced}, top {self.topo_max_pairs} points per dimension")

    def pretraining_record(self) -> dict:
        rec = super().pretraining_record()
        net = self._unwrapped_network()
        rec.update(method="topomae", vit_config=net.vit_cfg.to_dict(), token_size=list(net.vit_cfg.token_size),
                   mask_ratio=self.mask_ratio, has_cnn=self.use_cnn)
        return rec
