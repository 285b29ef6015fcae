"""Re-export shim for nnU-Net's trainer lookup (nnUNet_extTrainer). Keep it free of logic."""
from nnunet_topomae.trainers import *  # noqa: F401,F403
from nnunet_topomae.trainers import __all__  # noqa: F401
