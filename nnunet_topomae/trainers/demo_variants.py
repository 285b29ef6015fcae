"""Short CPU schedules used by ``nnunet-topomae demo`` (and handy for a first try on a laptop)."""
from nnunet_topomae.trainers.topomae_finetune import nnUNetTrainerTopoMAEFinetune
from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain


class nnUNetTrainerTopoMAEPretrain_demo(nnUNetTrainerTopoMAEPretrain):
    """200 pretraining steps (8 epochs x 25)."""
    pretrain_epochs = 8
    pretrain_iterations_per_epoch = 25
    pretrain_val_iterations_per_epoch = 4
    warmup_epochs = 1
    preview_every = 2


class nnUNetTrainerTopoMAEFinetune_demo(nnUNetTrainerTopoMAEFinetune):
    """300 finetuning steps (10 epochs x 30)."""
    finetune_epochs = 10
    finetune_iterations_per_epoch = 30

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        import torch
        super().__init__(plans, configuration, fold, dataset_json, device if device is not None else torch.device("cuda"))
        self.num_val_iterations_per_epoch = 5


class nnUNetTrainerTopoMAEPretrain_demoLong(nnUNetTrainerTopoMAEPretrain_demo):
    """4x the demo's pretraining (800 steps)."""
    pretrain_epochs = 32


class nnUNetTrainerTopoMAEFinetune_demoLong(nnUNetTrainerTopoMAEFinetune_demo):
    """4x the demo's finetuning (1200 steps)."""
    finetune_epochs = 40
