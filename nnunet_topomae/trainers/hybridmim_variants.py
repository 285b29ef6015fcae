"""HybridMIM ablations: one change per subclass, as in nnU-Net's ``variants/``."""
from nnunet_topomae.trainers.hybridmim_pretrain import nnUNetTrainerHybridMIMPretrain


class nnUNetTrainerHybridMIMPretrain_noPartial(nnUNetTrainerHybridMIMPretrain):
    """Ablation: the decoder reconstructs the whole patch every step (no partial region prediction)."""
    partial = False


class nnUNetTrainerHybridMIMPretrain_noContrast(nnUNetTrainerHybridMIMPretrain):
    """Ablation: without dropout contrastive learning (no projection head, no second view)."""
    use_contrast = False


class nnUNetTrainerHybridMIMPretrain_noPerception(nnUNetTrainerHybridMIMPretrain):
    """Ablation: without patch-masking perception (no count / position heads, no consistency term)."""
    use_perception = False
