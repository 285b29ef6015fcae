"""Behaviour shared by all nnunet-topomae trainers (pretraining and finetuning).

- Checkpoints are data, not code (``nnunet_topomae.utils.checkpoint``): written atomically with CPU
  tensors and only plain contents; ``--c`` loads them with ``weights_only=True`` (nnU-Net 2.8.1's own
  ``load_checkpoint`` unpickles anything).
- Partial ``.tmp_*.pth`` files of a killed save are removed when the same fold starts again.
- nnU-Net's data-loading workers (forked at the start of training) die with the training process.
- ``PretrainedStartMixin`` (finetuning trainers): a run started from ``-pretrained_weights`` never
  silently becomes a from-scratch run on ``--c`` (see its docstring).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

from batchgenerators.utilities.file_and_folder_operations import isfile, join
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.utils.process import children_die_with_this_process
from nnunet_topomae.utils.ddp import DDPDeviceMixin
from nnunet_topomae.utils.files import file_sha256
from nnunet_topomae.utils.checkpoint import atomic_torch_save, remove_stale_temporaries, safe_load, state_dict_to_cpu, to_plain


class TopoMAETrainerMixin(DDPDeviceMixin):
    """Mix in before nnUNetTrainer: atomic, device-independent, safely loaded checkpoints with extra fields;
    DDP on the CPU and across nodes (``DDPDeviceMixin``, for ``python -m nnunet_topomae.distributed``)."""

    def _unwrapped_network(self):
        # not `if self.is_ddp`: nnU-Net calls configure_optimizers before it wraps the network in DDP
        mod = self.network.module if isinstance(self.network, DistributedDataParallel) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def extra_checkpoint_fields(self) -> dict:
        return {}

    def check_preprocessed(self) -> None:
        folder = self.preprocessed_dataset_folder
        if not os.path.isdir(folder) or not any(f.endswith((".b2nd", ".npz", ".npy")) for f in os.listdir(folder)):
            ds = self.plans_manager.dataset_name
            cmd = (f"nnUNetv2_plan_and_preprocess -d {ds.split('_')[0].replace('Dataset', '')} -c {self.configuration_name}"
                   if self.plans_manager.plans_name == "nnUNetPlans" else
                   f"nnUNetv2_preprocess -d {ds.split('_')[0].replace('Dataset', '')} -plans_name {self.plans_manager.plans_name} "
                   f"-c {self.configuration_name}")
            raise UserInputError(f"{ds} is not preprocessed for configuration {self.configuration_name} "
                                 f"({folder} is missing or empty): run {cmd}")

    def initialize(self):
        if not self.was_initialized:
            self.check_preprocessed()  # nnU-Net's initialize would fail deep inside on the missing folder
        super().initialize()

    def on_train_start(self):
        self.check_preprocessed()
        # nnU-Net's data-loading workers are forked in super().on_train_start(): they end with this process
        # (kill -9, OOM killer) instead of living on for minutes
        children_die_with_this_process()
        if self.local_rank == 0 and self.output_folder is not None:
            # no save of this fold is under way now: what a killed save left is garbage
            removed = remove_stale_temporaries(self.output_folder)
            if removed:
                self.print_to_log_file(f"Removed {len(removed)} partial checkpoint file(s) left by an interrupted run")
        super().on_train_start()

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": state_dict_to_cpu(self._unwrapped_network().state_dict()),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": to_plain(self.logger.get_checkpoint()),
            "_best_ema": to_plain(self._best_ema),
            "current_epoch": self.current_epoch + 1,
            "num_epochs": int(self.num_epochs),
            "init_args": to_plain(self.my_init_kwargs),
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": to_plain(self.inference_allowed_mirroring_axes),
            **to_plain(self.extra_checkpoint_fields()),
        }
        atomic_torch_save(checkpoint, filename)

    def read_checkpoint(self, filename_or_checkpoint) -> dict:
        if isinstance(filename_or_checkpoint, dict):
            return filename_or_checkpoint
        return safe_load(filename_or_checkpoint, map_location=self.device)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``load_checkpoint`` on a safely loaded dict (2.8.1's only takes a path, which it
        unpickles with ``weights_only=False``; a dict leaves its ``checkpoint`` unbound)."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = self.read_checkpoint(filename_or_checkpoint)
        net = self._unwrapped_network()
        own = net.state_dict().keys()
        # weights saved from a DDP-wrapped network carry 'module.' (nnU-Net's heuristic)
        weights = {(k[7:] if k not in own and k.startswith("module.") else k): v
                   for k, v in checkpoint["network_weights"].items()}
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        net.load_state_dict(weights)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.after_checkpoint_loaded(checkpoint)

    def after_checkpoint_loaded(self, checkpoint: dict) -> None:
        """Restore a subclass's extra fields (``extra_checkpoint_fields``)."""


PRETRAINED_START_FILE = "pretrained_start.json"


class PretrainedStartMixin:
    """Finetuning from ``-pretrained_weights`` that survives a crash before the first checkpoint.

    nnU-Net forbids ``--c`` with ``-pretrained_weights``, and ``--c`` without a checkpoint silently starts
    a *new* training, which for a finetuning run means from scratch. Here (through the hook that
    ``nnunet_topomae.trainers.transfer`` installs on nnU-Net's ``maybe_load_checkpoint``):

    - a start remembers how it started in ``fold_X/pretrained_start.json`` (the weights file and its
      SHA-256, or ``null`` for a from-scratch start);
    - ``--c`` with a checkpoint continues from it, as nnU-Net does (a ``-pretrained_weights`` given too
      is then not needed, and said so);
    - ``--c`` without a checkpoint starts again from ``-pretrained_weights`` if given, else from the
      remembered weights (the same file, unchanged), else from scratch if that is how the run started;
      otherwise it stops with one line naming the command to run.
    """

    def _pretrained_start_record(self) -> str:
        return join(self.output_folder, PRETRAINED_START_FILE)

    def _remember_start(self, weights: Optional[str]) -> None:
        if self.local_rank != 0:
            return
        os.makedirs(self.output_folder, exist_ok=True)
        rec = {"pretrained_weights": None if weights is None else os.path.abspath(weights),
               "sha256": None if weights is None else file_sha256(weights)}
        tmp = self._pretrained_start_record() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, self._pretrained_start_record())

    def resolve_start(self, continue_training: bool, validation_only: bool,
                      pretrained_weights: Optional[str]) -> Tuple[bool, Optional[str]]:
        """(continue_training, pretrained_weights) to hand to nnU-Net's ``maybe_load_checkpoint``."""
        if validation_only:
            return continue_training, None
        has_checkpoint = any(isfile(join(self.output_folder, f)) for f in
                             ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"))
        if continue_training and has_checkpoint:
            if pretrained_weights is not None:
                self.print_to_log_file(f"--c: continuing from the checkpoint in {self.output_folder}; "
                                       f"-pretrained_weights is not needed for that and not loaded again")
            return True, None
        if continue_training:
            if pretrained_weights is None:
                pretrained_weights = self._remembered_weights()
                if pretrained_weights is None:
                    self.print_to_log_file("--c: no checkpoint yet; this run started from scratch, so it starts "
                                           "again from scratch")
                    self._remember_start(None)
                    return False, None
                self.print_to_log_file(f"--c: no checkpoint yet; starting again from the pretrained weights this "
                                       f"run started from: {pretrained_weights}")
            else:
                self.print_to_log_file(f"--c: no checkpoint yet; starting from -pretrained_weights {pretrained_weights}")
        if pretrained_weights is not None and not isfile(pretrained_weights):
            raise UserInputError(f"pretrained weights file {pretrained_weights} does not exist")
        self._remember_start(pretrained_weights)
        return False, pretrained_weights

    def _remembered_weights(self) -> Optional[str]:
        path = self._pretrained_start_record()
        cmd = (f"nnUNetv2_train {self.plans_manager.dataset_name} {self.configuration_name} {self.fold} "
               f"-tr {self.__class__.__name__} -p {self.plans_manager.plans_name} -pretrained_weights PRETRAINING_CHECKPOINT")
        if not isfile(path):
            raise UserInputError(f"--c found no checkpoint and no record of how this run started in {self.output_folder}; "
                                 f"start it again: {cmd} (or without -pretrained_weights for a run from scratch)")
        with open(path) as f:
            rec = json.load(f)
        weights = rec.get("pretrained_weights")
        if weights is None:
            return None
        if not isfile(weights):
            raise UserInputError(f"--c: this run started from {weights}, which no longer exists; give it again: "
                                 f"{cmd.replace('PRETRAINING_CHECKPOINT', weights)} --c")
        if rec.get("sha256") and file_sha256(weights) != rec["sha256"]:
            raise UserInputError(f"--c: {weights} changed since this run started from it; to start from the new file "
                                 f"say so: {cmd.replace('PRETRAINING_CHECKPOINT', weights)} --c")
        return weights
