"""Short CPU schedules used by ``nnunet-topomae demo`` (and handy for a first try on a laptop)."""
from nnunet_topomae.trainers.topomae_finetune import nnUNetTrainerTopoMAEFinetune
from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain


class nnUNetTrainerTopoMAEPretrain_demo(nnUNetTrainerTopoMAEPretrain):
    """100 pretraining steps (5 epochs x 20, the first a warm-up). With the finetuning below, sized so that
    the whole demo stays under 10 minutes on a slow 2-core VM (there: 13.1 min with 200 + 300 steps,
    10.8 min with 100 + 240; 5.3 min with 100 + 180 on a faster 2-core machine, 2026-12-02)."""
    pretrain_epochs = 5
    pretrain_iterations_per_epoch = 20
    pretrain_val_iterations_per_epoch = 2
    warmup_epochs = 1
    preview_every = 2


class nnUNetTrainerTopoMAEFinetune_demo(nnUNetTrainerTopoMAEFinetune):
    """180 finetuning steps (6 epochs x 30)."""
    finetune_epochs = 6
    finetune_iterations_per_epoch = 30

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        import torch
        super().__init__(plans, configuration, fold, dataset_json, device if device is not None else torch.device("cuda"))
        self.num_val_iterations_per_epoch = 3


class nnUNetTrainerTopoMAEPretrain_demoLong(nnUNetTrainerTopoMAEPretrain_demo):
    """4x the demo's pretraining (400 steps)."""
    pretrain_epochs = 20


class nnUNetTrainerTopoMAEFinetune_demoLong(nnUNetTrainerTopoMAEFinetune_demo):
    """4x the demo's finetuning (720 steps)."""
    finetune_epochs = 24
