"""Short CPU schedules used by ``nnunet-topomae demo`` (and handy for a first try on a laptop)."""
from nnunet_topomae.trainers.topomae_finetune import nnUNetTrainerTopoMAEFinetune
from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain


class nnUNetTrainerTopoMAEPretrain_demo(nnUNetTrainerTopoMAEPretrain):
    """100 pretraining steps (5 epochs x 20, the first a warm-up). With the finetuning below, sized so that
    the whole demo stays under 10 minutes on a slow 2-core VM (13.1 min there with 200 + 300 steps)."""
    pretrain_epochs = 5
    pretrain_iterations_per_epoch = 20
    pretrain_val_iterations_per_epoch = 2
    warmup_epochs = 1
    preview_every = 2


class nnUNetTrainerTopoMAEFinetune_demo(nnUNetTrainerTopoMAEFinetune):
    """240 finetuning steps (8 epochs x 30)."""
    finetune_epochs = 8
    finetune_iterations_per_epoch = 30

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        import torch
        super().__init__(plans, configuration, fold, dataset_json, device if device is not None else torch.device("cuda"))
        self.num_val_iterations_per_epoch = 3


class nnUNetTrainerTopoMAEPretrain_demoLong(nnUNetTrainerTopoMAEPretrain_demo):
    """4x the demo's pretraining (400 steps)."""
    pretrain_epochs = 20


class nnUNetTrainerTopoMAEFinetune_demoLong(nnUNetTrainerTopoMAEFinetune_demo):
    """4x the demo's finetuning (960 steps)."""
    finetune_epochs = 32
