"""nnUNetTrainerHybridMIMFinetune: nnU-Net's own warm-up trainer, for HybridMIM-pretrained weights.

HybridMIM pretrains nnU-Net's CNN under its own module names, so the stock ``nnUNetTrainer`` accepts
the checkpoint with ``-pretrained_weights``. Its SGD (lr 0.01, momentum 0.99) starts at full learning
rate, which moved naively pretrained weights far from where they started in our probes (SPEC
section 5). nnU-Net ships ``nnUNetTrainer_warmup`` (linear warm-up, then its poly schedule) for this
case; this subclass
  - sizes the warm-up as a fraction of the schedule (nnU-Net's 50 of 1000 epochs = 5 %), so shorter
    schedules (benchmarks, CPU runs) get a proportionate warm-up instead of all-warm-up;
  - makes ``--c`` work: nnU-Net 2.8.1's ``nnUNetTrainer_warmup.load_checkpoint`` calls ``torch.load``
    without ``weights_only=False`` (refused by torch >= 2.6) and ignores a checkpoint dict; we load
    with the stock trainer's loader and then select the optimiser stage of the saved epoch;
  - writes checkpoints atomically and loads ``--c`` checkpoints and ``-pretrained_weights`` safely
    (``weights_only=True``; nnU-Net's own loader unpickles anything), as every trainer of this package;
  - never turns a run started from pretrained weights into a from-scratch run on ``--c``
    (``PretrainedStartMixin``).
Whether it beats the stock trainer on HybridMIM weights is for the benchmark to say
(``hybridmim_warmup`` arm of benchmarks/run.py).
"""
from __future__ import annotations

from typing import Union

from nnunetv2.training.nnUNetTrainer.variants.lr_schedule.nnUNetTrainer_warmup import nnUNetTrainer_warmup

from nnunet_topomae.trainers.common import PretrainedStartMixin, TopoMAETrainerMixin
from nnunet_topomae.trainers.transfer import install_pretrained_weights_hook, load_with_stock_rules

install_pretrained_weights_hook()


class nnUNetTrainerHybridMIMFinetune(PretrainedStartMixin, TopoMAETrainerMixin, nnUNetTrainer_warmup):
    warmup_fraction: float = 0.05

    def initialize(self):
        # num_epochs is final here (subclasses and schedule shims set it after __init__)
        self.warmup_duration_whole_net = max(1, int(round(self.warmup_fraction * self.num_epochs)))
        super().initialize()
        # picked up by the -pretrained_weights hook: nnU-Net's key rule on a safely loaded file
        self._unwrapped_network().pretrained_loader = self.load_pretrained_safely

    def load_pretrained_safely(self, fname: str) -> None:
        n = load_with_stock_rules(self._unwrapped_network(), fname)
        self.print_to_log_file(f"Pretrained weights from {fname}: loaded {n} tensors (segmentation layers fresh)")

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        # both stages use the same SGD over the same parameters, so the stock loader restores the
        # optimiser state whichever stage initialize() built; the saved epoch then picks the stage
        TopoMAETrainerMixin.load_checkpoint(self, filename_or_checkpoint)
        stage = "warmup_all" if self.current_epoch < self.warmup_duration_whole_net else "train"
        self.optimizer, self.lr_scheduler = self.configure_optimizers(stage)
