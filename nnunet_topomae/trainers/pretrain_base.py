"""Machinery shared by every self-pretraining trainer (TopoMAE, plain MAE, HybridMIM).

It keeps nnU-Net's behaviour where it makes sense (plans, preprocessed data, splits, per-epoch log
lines, progress.png, checkpoint_latest/best/final.pth, ``--c``, ``-device``, ``-num_gpus``) and
changes what segmentation-specific parts cannot do for pretraining:

- data: ``PretrainDataLoader`` (images only, crops of the plan's patch size, spatial targets);
- validation: the pretraining losses on the fold's validation cases; ``checkpoint_best.pth``
  follows their moving average; nnU-Net's final segmentation validation is skipped;
- optimiser: AdamW with warm-up and cosine decay (the usual MAE recipe);
- checkpoints: written atomically with CPU tensors (they load on CPU-only machines) and carry a
  ``pretraining`` record that finetuning uses to rebuild and check the network;
- pictures: ``loss_terms.png`` (every loss term) and ``reconstruction_preview.png`` beside
  ``progress.png``.

A subclass provides the network (``build_network_architecture``), the loss (``_build_loss``),
``compute_terms`` (one forward pass -> dict of loss terms with ``loss``) and ``preview_columns``.
"""
from __future__ import annotations

from time import time
from typing import Dict, List

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch import distributed as dist

from nnunet_topomae.data.pretrain_loader import PretrainDataLoader, cases_smaller_than_patch, intensity_transforms
from nnunet_topomae.data.unlabelled import CombinedDataset, complete_cases, unlabelled_folder
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.trainers.transfer import plan_fingerprint
from nnunet_topomae.trainers.common import TopoMAETrainerMixin
from nnunet_topomae.utils.ddp import worker_seeds
from nnunet_topomae.utils.lr_schedule import WarmupCosineLR
from nnunet_topomae.utils.plotting import plot_loss_terms, save_volume_preview

CHECKPOINT_FORMAT = 1


class nnUNetPretrainTrainerBase(TopoMAETrainerMixin, nnUNetTrainer):
    # Hyper-parameters are class attributes so that a variant is a few-line subclass.
    initial_lr_pretrain: float = 3e-4
    weight_decay_pretrain: float = 0.05
    warmup_epochs: int = 10
    val_ema_momentum: float = 0.9
    preview_every: int = 10
    grad_clip: float = 12.0
    # schedule (nnU-Net's defaults; CPU variants shorten it)
    pretrain_epochs: int = 1000
    pretrain_iterations_per_epoch: int = 250
    pretrain_val_iterations_per_epoch: int = 50
    # train on the unlabelled cases of `nnunet-topomae add-unlabelled` too (nnunet_topomae.data.unlabelled)
    use_unlabelled: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) != 3:
            raise UserInputError(
                f"{self.__class__.__name__} pretrains 3D networks, but configuration '{configuration}' is "
                f"{len(self.configuration_manager.patch_size)}D; use a 3D configuration such as 3d_fullres or 3d_lowres")
        self.initial_lr = self.initial_lr_pretrain
        self.weight_decay = self.weight_decay_pretrain
        self.num_epochs = self.pretrain_epochs
        self.num_iterations_per_epoch = self.pretrain_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.pretrain_val_iterations_per_epoch
        self.enable_deep_supervision = True
        self.term_history: Dict[str, Dict[str, List[float]]] = {"train": {}, "val": {}}
        self._val_ema = None
        self._preview_batch = None

    # ------------------------------------------------------------------ network / optimiser
    def set_deep_supervision_enabled(self, enabled: bool):
        cnn = getattr(self._unwrapped_network(), "cnn", None)
        decoder = getattr(self._unwrapped_network(), "decoder", None) if cnn is None else cnn.decoder
        if decoder is not None:
            decoder.deep_supervision = enabled

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.network.named_parameters():
            if not p.requires_grad:
                continue
            # norms, biases, tokens and embeddings are not decayed (MAE / timm convention)
            (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.initial_lr, betas=(0.9, 0.95))
        scheduler = WarmupCosineLR(optimizer, self.initial_lr, min(self.warmup_epochs, self.num_epochs // 5),
                                   self.num_epochs)
        return optimizer, scheduler

    # ------------------------------------------------------------------ data
    def get_tr_and_val_datasets(self):
        """The fold's training cases plus every unlabelled case of ``nnunet-topomae add-unlabelled``
        (``use_unlabelled``), and the fold's validation cases only."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        n_fold = len(dataset_tr.identifiers)
        folder = unlabelled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        extra = complete_cases(folder) if self.use_unlabelled else []
        if extra:
            dataset_tr = CombinedDataset([dataset_tr, self.dataset_class(folder, extra)])
        note = ("" if self.use_unlabelled or not complete_cases(folder)
                else f" ({len(complete_cases(folder))} unlabelled cases left out: use_unlabelled = False)")
        self.print_to_log_file(f"Pretraining on {n_fold} training cases of fold {self.fold} + {len(extra)} unlabelled "
                               f"cases; validating on {len(dataset_val.identifiers)} validation cases{note}")
        return dataset_tr, dataset_val

    def persistence_fn(self):
        """Per-sample function run in the data-loading workers (None: nothing precomputed)."""
        return None

    def get_dataloaders(self):
        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        if len(dataset_tr.identifiers) == 0 or len(dataset_val.identifiers) == 0:
            raise UserInputError(f"fold {self.fold} has {len(dataset_tr.identifiers)} training and "
                                 f"{len(dataset_val.identifiers)} validation cases; pretraining needs both "
                                 f"(check splits_final.json in {self.preprocessed_dataset_folder_base})")
        patch = self.configuration_manager.patch_size
        n_small, key, shape = cases_smaller_than_patch(dataset_tr, patch)
        if n_small:
            self.print_to_log_file(
                f"{n_small} of {len(dataset_tr.identifiers)} training cases are smaller than the patch {list(patch)} on some "
                f"axis (smallest: {key}, {list(shape)}); nnU-Net pads them, and their spatial targets are normalised by "
                f"the patch instead of the case (nnunet_topomae.losses.spatial)")
        pfn = self.persistence_fn()
        dl_tr = PretrainDataLoader(dataset_tr, self.batch_size, patch, self.label_manager,
                                   transforms=intensity_transforms(), persistence_fn=pfn)
        dl_val = PretrainDataLoader(dataset_val, self.batch_size, patch, self.label_manager,
                                    transforms=None, persistence_fn=pfn)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            gen_tr, gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            # under DDP every rank's workers get their own seeds (numpy and torch), else nnU-Net's default
            n_val = max(1, n_proc // 2)
            gen_tr = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), worker_seeds(n_proc),
                                                  pin, 0.002)
            gen_val = NonDetMultiThreadedAugmenter(dl_val, None, n_val, max(3, n_proc // 4),
                                                   worker_seeds(n_val), pin, 0.002)
        _ = next(gen_tr)
        _ = next(gen_val)
        return gen_tr, gen_val

    # ------------------------------------------------------------------ steps
    def compute_terms(self, batch: dict) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            terms = self.compute_terms(batch)
        loss = terms["loss"]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
            self.optimizer.step()
        return {k: v.detach().float().cpu().numpy() for k, v in terms.items()}

    def validation_step(self, batch: dict) -> dict:
        if self._preview_batch is None:
            self._preview_batch = batch
        with self._autocast():
            terms = self.compute_terms(batch)
        return {k: v.detach().float().cpu().numpy() for k, v in terms.items()}

    def _mean_terms(self, outputs: List[dict]) -> Dict[str, float]:
        # a term may be computed only every N steps: average it over the steps that have it
        names = sorted({k for o in outputs for k in o})
        if not self.is_ddp:
            return {k: float(np.mean([o[k] for o in outputs if k in o])) for k in names}
        # DDP: the mean over every rank's samples (nnU-Net splits a global batch of 9 as 5 + 4), the same
        # value on every rank, so that every rank takes the same checkpoint_best decision
        sums = {k: (float(np.sum([o[k] for o in outputs if k in o])) * self.batch_size,
                    self.batch_size * sum(k in o for o in outputs)) for k in names}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sums)
        total: Dict[str, List[float]] = {}
        for g in gathered:
            for k, (s, n) in g.items():
                acc = total.setdefault(k, [0.0, 0])
                acc[0] += s
                acc[1] += n
        return {k: s / n for k, (s, n) in sorted(total.items()) if n}

    def _record(self, split: str, means: Dict[str, float]) -> None:
        for k, v in means.items():
            self.term_history[split].setdefault(k, []).append(v)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        means = self._mean_terms(train_outputs)
        self._record("train", means)
        self.logger.log("train_losses", means["loss"], self.current_epoch)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        means = self._mean_terms(val_outputs)
        self._record("val", means)
        self.logger.log("val_losses", means["loss"], self.current_epoch)
        # there is no Dice in pretraining; nnU-Net's logger still wants one value per epoch
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [], self.current_epoch)

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        tr, val = self.term_history["train"], self.term_history["val"]
        self.print_to_log_file("train_loss", np.round(tr["loss"][-1], 4))
        self.print_to_log_file("val_loss", np.round(val["loss"][-1], 4))
        self.print_to_log_file("train terms", {k: round(v[-1], 4) for k, v in tr.items() if k != "loss"})
        self.print_to_log_file(
            f"Epoch time: {np.round(self.logger.get_value('epoch_end_timestamps', step=-1) - self.logger.get_value('epoch_start_timestamps', step=-1), decimals=2)} s")

        epoch = self.current_epoch
        v = val["loss"][-1]
        self._val_ema = v if self._val_ema is None else self.val_ema_momentum * self._val_ema + (1 - self.val_ema_momentum) * v
        if self._best_ema is None or self._val_ema < self._best_ema:
            self._best_ema = self._val_ema
            self.print_to_log_file(f"New best validation loss (moving average): {np.round(self._best_ema, 4)}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        # after the moving average, so that --c resumes it exactly
        if (epoch + 1) % self.save_every == 0 and epoch != (self.num_epochs - 1):
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))

        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
            plot_loss_terms(self.term_history, join(self.output_folder, "loss_terms.png"))
            if epoch % self.preview_every == 0 or epoch == self.num_epochs - 1:
                self.write_preview()
        self._preview_batch = None
        self.current_epoch += 1

    # ------------------------------------------------------------------ pictures
    def preview_columns(self, batch: dict) -> Dict[str, np.ndarray]:
        """name -> 3D volume of the first sample, first channel."""
        raise NotImplementedError

    def write_preview(self) -> None:
        if self._preview_batch is None:
            return
        try:
            self.network.eval()
            with torch.no_grad():
                cols = self.preview_columns(self._preview_batch)
            save_volume_preview(cols, join(self.output_folder, "reconstruction_preview.png"),
                                title=f"{self.__class__.__name__}, epoch {self.current_epoch} (validation case)",
                                spacing=self.configuration_manager.spacing)
            self.write_extra_pictures(cols)
        except Exception as e:  # a picture must never stop a training run
            self.print_to_log_file(f"Could not write the preview pictures: {e}")

    def write_extra_pictures(self, columns: Dict[str, np.ndarray]) -> None:
        """Further pictures of the preview's volumes (``preview_columns``); none by default."""

    # ------------------------------------------------------------------ checkpoints
    def pretraining_record(self) -> dict:
        """What finetuning needs to rebuild and check the network."""
        return {
            "format": CHECKPOINT_FORMAT,
            "trainer": self.__class__.__name__,
            "dataset_name": self.plans_manager.dataset_name,
            "plans_name": self.plans_manager.plans_name,
            "configuration": self.configuration_name,
            "patch_size": [int(i) for i in self.configuration_manager.patch_size],
            "num_input_channels": int(self.num_input_channels),
            "network_arch_class_name": self.configuration_manager.network_arch_class_name,
            **plan_fingerprint(self.configuration_manager),
        }

    def extra_checkpoint_fields(self) -> dict:
        return {"term_history": self.term_history, "_val_ema": self._val_ema,
                "pretraining": self.pretraining_record()}

    def after_checkpoint_loaded(self, checkpoint: dict) -> None:
        self.term_history = checkpoint.get("term_history", self.term_history)
        self._val_ema = checkpoint.get("_val_ema")

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("Pretraining: nnU-Net's segmentation validation does not apply and is skipped "
                               "(validation used the reconstruction losses every epoch).")
