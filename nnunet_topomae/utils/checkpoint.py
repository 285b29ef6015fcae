"""Checkpoint helpers: atomic writes and device-independent tensors."""
from __future__ import annotations

import os
import uuid
from typing import Dict

import torch


def state_dict_to_cpu(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # CPU tensors: the checkpoint then loads on CPU-only machines, also through nnU-Net's
    # load_pretrained_weights, which calls torch.load without map_location.
    return {k: v.detach().cpu() for k, v in sd.items()}


def atomic_torch_save(obj, filename: str) -> None:
    """Write to a temporary file in the same folder, then rename: an interrupted save never leaves
    a truncated checkpoint behind."""
    folder = os.path.dirname(os.path.abspath(filename))
    # open(..., "xb") honours the umask (mkstemp would make the checkpoint 0600, unlike nnU-Net's files)
    tmp = os.path.join(folder, f".tmp_{uuid.uuid4().hex}.pth")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
