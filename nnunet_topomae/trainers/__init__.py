"""Public trainers. ``PUBLIC_TRAINERS`` is what ``nnunet-topomae doctor`` checks nnU-Net can find."""
from nnunet_topomae.trainers.demo_variants import (
    nnUNetTrainerTopoMAEFinetune_demo,
    nnUNetTrainerTopoMAEFinetune_demoLong,
    nnUNetTrainerTopoMAEPretrain_demo,
    nnUNetTrainerTopoMAEPretrain_demoLong,
)
from nnunet_topomae.trainers.hybridmim_finetune import nnUNetTrainerHybridMIMFinetune
from nnunet_topomae.trainers.hybridmim_pretrain import nnUNetTrainerHybridMIMPretrain
from nnunet_topomae.trainers.hybridmim_variants import (
    nnUNetTrainerHybridMIMPretrain_noContrast,
    nnUNetTrainerHybridMIMPretrain_noPartial,
    nnUNetTrainerHybridMIMPretrain_noPerception,
)
from nnunet_topomae.trainers.topomae_finetune import nnUNetTrainerTopoMAEFinetune
from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain
from nnunet_topomae.trainers.variants import (
    nnUNetTrainerMAEPretrain,
    nnUNetTrainerTopoMAEFinetune_encoderOnly,
    nnUNetTrainerTopoMAEFinetune_lowCNNlr,
    nnUNetTrainerTopoMAEFinetune_token8,
    nnUNetTrainerTopoMAEPretrain_cripser,
    nnUNetTrainerTopoMAEPretrain_faithfulTopo,
    nnUNetTrainerTopoMAEPretrain_faithfulTopoCripser,
    nnUNetTrainerTopoMAEPretrain_lateTopo,
    nnUNetTrainerTopoMAEPretrain_lowTopo,
    nnUNetTrainerTopoMAEPretrain_noSpatial,
    nnUNetTrainerTopoMAEPretrain_noTopo,
    nnUNetTrainerTopoMAEPretrain_token8,
    nnUNetTrainerTopoMAEPretrain_topoEvery2,
    nnUNetTrainerTopoMAEPretrain_ViTB,
)

__all__ = [
    "nnUNetTrainerTopoMAEPretrain",
    "nnUNetTrainerTopoMAEPretrain_noTopo",
    "nnUNetTrainerTopoMAEPretrain_lowTopo",
    "nnUNetTrainerTopoMAEPretrain_lateTopo",
    "nnUNetTrainerTopoMAEPretrain_noSpatial",
    "nnUNetTrainerTopoMAEPretrain_ViTB",
    "nnUNetTrainerTopoMAEPretrain_cripser",
    "nnUNetTrainerTopoMAEPretrain_topoEvery2",
    "nnUNetTrainerTopoMAEPretrain_faithfulTopo",
    "nnUNetTrainerTopoMAEPretrain_faithfulTopoCripser",
    "nnUNetTrainerTopoMAEPretrain_token8",
    "nnUNetTrainerMAEPretrain",
    "nnUNetTrainerTopoMAEFinetune",
    "nnUNetTrainerTopoMAEFinetune_lowCNNlr",
    "nnUNetTrainerTopoMAEFinetune_encoderOnly",
    "nnUNetTrainerTopoMAEFinetune_token8",
    "nnUNetTrainerTopoMAEPretrain_demo",
    "nnUNetTrainerTopoMAEFinetune_demo",
    "nnUNetTrainerTopoMAEPretrain_demoLong",
    "nnUNetTrainerTopoMAEFinetune_demoLong",
    "nnUNetTrainerHybridMIMPretrain",
    "nnUNetTrainerHybridMIMPretrain_noPartial",
    "nnUNetTrainerHybridMIMPretrain_noContrast",
    "nnUNetTrainerHybridMIMPretrain_noPerception",
    "nnUNetTrainerHybridMIMFinetune",
]
PUBLIC_TRAINERS = list(__all__)
