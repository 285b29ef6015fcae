"""Linear warm-up then cosine decay, stepped once per epoch like nnU-Net's PolyLRScheduler.

Each param group may carry ``lr_scale`` (e.g. a smaller rate for pretrained parts of a network);
its rate is ``lr_scale * schedule(epoch)``.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer


class WarmupCosineLR:
    def __init__(self, optimizer: Optimizer, initial_lr: float, warmup_epochs: int, max_epochs: int,
                 min_lr_fraction: float = 0.0):
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.warmup_epochs = warmup_epochs
        self.max_epochs = max_epochs
        self.min_lr_fraction = min_lr_fraction

    def lr_at(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.initial_lr * (epoch + 1) / (self.warmup_epochs + 1)
        span = max(1, self.max_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        cos = 0.5 * (1 + math.cos(math.pi * progress))
        return self.initial_lr * (self.min_lr_fraction + (1 - self.min_lr_fraction) * cos)

    def step(self, epoch: int) -> None:
        lr = self.lr_at(epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
