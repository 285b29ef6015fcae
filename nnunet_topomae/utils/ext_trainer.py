"""Where nnU-Net finds this package's trainers: the ``nnUNet_extTrainer`` folder of re-export shims.

Low in the layers (no nnU-Net or torch import) so that the CLI, the benchmarks, the demo and the
workflow helpers all take it from here instead of from each other.
"""
from __future__ import annotations

import os
from typing import Optional

EXT_TRAINER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ext_trainers")


def ext_trainer_value(current: Optional[str]) -> str:
    """Our folder first, then every folder already in the variable (without duplicates)."""
    parts = [EXT_TRAINER_DIR]
    for p in (current or "").split(os.pathsep):
        if p.strip() and os.path.abspath(p) != EXT_TRAINER_DIR and p not in parts:
            parts.append(p)
    return os.pathsep.join(parts)
