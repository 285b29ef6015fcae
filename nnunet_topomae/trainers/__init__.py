"""Public trainers. ``PUBLIC_TRAINERS`` is what ``nnunet-topomae doctor`` checks nnU-Net can find."""
from nnunet_topomae.trainers.topomae_finetune import nnUNetTrainerTopoMAEFinetune
from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain
from nnunet_topomae.trainers.variants import (
    nnUNetTrainerMAEPretrain,
    nnUNetTrainerTopoMAEPretrain_noSpatial,
    nnUNetTrainerTopoMAEPretrain_noTopo,
    nnUNetTrainerTopoMAEPretrain_ViTB,
)

__all__ = [
    "nnUNetTrainerTopoMAEPretrain",
    "nnUNetTrainerTopoMAEPretrain_noTopo",
    "nnUNetTrainerTopoMAEPretrain_noSpatial",
    "nnUNetTrainerTopoMAEPretrain_ViTB",
    "nnUNetTrainerMAEPretrain",
    "nnUNetTrainerTopoMAEFinetune",
]
PUBLIC_TRAINERS = list(__all__)
