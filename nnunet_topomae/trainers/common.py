"""Behaviour shared by all nnunet-topomae trainers (pretraining and finetuning)."""
from __future__ import annotations

from torch._dynamo import OptimizedModule

from nnunet_topomae.utils.checkpoint import atomic_torch_save, state_dict_to_cpu


class TopoMAETrainerMixin:
    """Mix in before nnUNetTrainer: atomic, device-independent checkpoints with extra fields."""

    def _unwrapped_network(self):
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def extra_checkpoint_fields(self) -> dict:
        return {}

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": state_dict_to_cpu(self._unwrapped_network().state_dict()),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            **self.extra_checkpoint_fields(),
        }
        atomic_torch_save(checkpoint, filename)
