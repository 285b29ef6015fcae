"""nnUNetTrainerTopoMAEFinetune: method A's finetuning stage (Gu et al. 2024, item 5).

The hybrid ViT + nnU-Net network (``HybridViTUNet``) trained for segmentation with nnU-Net's loss,
data augmentation, deep supervision, validation and inference. With ``-pretrained_weights`` pointing
at a TopoMAE / MAE pretraining checkpoint, the ViT encoder and the whole CNN (encoder and decoder)
start from it; fusion layers and segmentation heads start fresh. Without it the same hybrid trains
from scratch (the ablation).

Optimiser (*interpretation*, see docs/METHOD.md): AdamW with linear warm-up and cosine decay, one
learning rate for the CNN and the new layers and a smaller one for the pretrained ViT encoder.
nnU-Net's SGD (lr 0.01, momentum 0.99) is tuned for randomly initialised CNNs; on AdamW-pretrained
weights it moved them far in the first steps in our probes (SPEC section 5).
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_topomae.architectures.hybrid_net import HybridViTUNet
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.trainers.common import PretrainedStartMixin, TopoMAETrainerMixin
from nnunet_topomae.trainers.topomae_pretrain import build_plan_cnn, vit_config_from_plan
from nnunet_topomae.trainers.transfer import (check_compatibility, install_pretrained_weights_hook, plan_fingerprint,
                                     read_pretraining_checkpoint, select_transfer)
from nnunet_topomae.utils.lr_schedule import WarmupCosineLR

install_pretrained_weights_hook()


class nnUNetTrainerTopoMAEFinetune(PretrainedStartMixin, TopoMAETrainerMixin, nnUNetTrainer):
    vit_preset: str = "small"
    max_token: int = 16
    finetune_lr: float = 1e-3
    vit_lr_scale: float = 0.3
    # pretrained CNN (encoder and decoder); fusion layers and segmentation heads always get the full rate
    cnn_lr_scale: float = 1.0
    # which pretrained parts -pretrained_weights loads (nnunet_topomae.trainers.transfer.PRETRAINED_PARTS); the rest start fresh
    transfer_parts: tuple = ("ViT encoder", "CNN encoder", "CNN decoder")
    finetune_weight_decay: float = 1e-4
    vit_weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    finetune_epochs: int = 1000
    finetune_iterations_per_epoch: int = 250

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 3:
            raise UserInputError(f"{self.__class__.__name__} needs a 3D configuration (3d_fullres, 3d_lowres), "
                                 f"not '{configuration}'")
        self.initial_lr = self.finetune_lr
        self.weight_decay = self.finetune_weight_decay
        self.num_epochs = self.finetune_epochs
        self.num_iterations_per_epoch = self.finetune_iterations_per_epoch
        self.pretrained_from = None

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        if len(configuration_manager.patch_size) != 3:
            raise UserInputError(f"{cls.__name__} needs a 3D configuration (3d_fullres, 3d_lowres)")
        cfg = vit_config_from_plan(configuration_manager, num_input_channels, cls.vit_preset, cls.max_token)
        cnn = build_plan_cnn(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        return HybridViTUNet(cfg, cnn)

    def initialize(self):
        super().initialize()
        # picked up by the -pretrained_weights hook installed above (nnunet_topomae.trainers.transfer)
        self._unwrapped_network().pretrained_loader = self.load_pretraining_checkpoint

    def set_deep_supervision_enabled(self, enabled: bool):
        self._unwrapped_network().cnn.decoder.deep_supervision = enabled

    def configure_optimizers(self):
        groups = []
        for name, params in self._unwrapped_network().parameter_groups():
            is_vit = name == "vit"
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            scale = {"vit": self.vit_lr_scale, "cnn": self.cnn_lr_scale}.get(name, 1.0)
            wd = self.vit_weight_decay if is_vit else self.weight_decay
            groups += [{"params": decay, "weight_decay": wd, "lr_scale": scale, "name": f"{name}"},
                       {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale, "name": f"{name}_no_decay"}]
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr)
        warmup = max(1, int(round(self.warmup_fraction * self.num_epochs))) if self.num_epochs > 2 else 0
        return optimizer, WarmupCosineLR(optimizer, self.initial_lr, warmup, self.num_epochs)

    # ------------------------------------------------------------------ pretrained weights
    def expected_pretraining(self) -> dict:
        net = self._unwrapped_network()
        return {"dataset_name": self.plans_manager.dataset_name, "plans_name": self.plans_manager.plans_name,
                "configuration": self.configuration_name,
                "patch_size": [int(i) for i in self.configuration_manager.patch_size],
                "num_input_channels": int(self.num_input_channels), "vit_config": net.vit_cfg.to_dict(),
                **plan_fingerprint(self.configuration_manager)}

    def load_pretraining_checkpoint(self, fname: str) -> None:
        ckpt = read_pretraining_checkpoint(fname)
        record = ckpt["pretraining"]
        check_compatibility(record, self.expected_pretraining(), fname)
        net = self._unwrapped_network()
        state = net.state_dict()
        load, per_part, fresh = select_transfer(state, ckpt["network_weights"], self.transfer_parts)
        state.update({k: v.to(state[k].device, state[k].dtype) for k, v in load.items()})
        net.load_state_dict(state)
        self.pretrained_from = {"file": fname, "trainer": record.get("trainer"),
                                "loaded": {k: len(v) for k, v in per_part.items()}, "fresh": len(fresh)}
        other = record.get("dataset_name") not in (None, self.plans_manager.dataset_name)
        self.print_to_log_file(f"Pretrained weights from {fname} (written by {record.get('trainer')}"
                               + (f" on {record.get('dataset_name')}, plans {record.get('plans_name')}" if other else "") + "):")
        for part, keys in per_part.items():
            why = "NOT in checkpoint, starts fresh" if part in self.transfer_parts else "not transferred (transfer_parts), starts fresh"
            self.print_to_log_file(f"  {part}: {'loaded ' + str(len(keys)) + ' tensors' if keys else why}")
        fresh_parts = ", ".join(["fusion layers", "segmentation heads"] + [p for p in ("CNN encoder", "CNN decoder") if not per_part[p]])
        self.print_to_log_file(f"  fresh ({fresh_parts}): {len(fresh)} tensors")

    def extra_checkpoint_fields(self) -> dict:
        return {"pretrained_from": self.pretrained_from}

    def after_checkpoint_loaded(self, checkpoint: dict) -> None:
        self.pretrained_from = checkpoint.get("pretrained_from")
