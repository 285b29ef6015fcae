"""DDP on any device and across nodes, inside nnU-Net's own DDP code paths.

nnU-Net 2.8.1 decides ``is_ddp`` from ``dist.is_initialized()`` and then assumes one machine with CUDA:

- ``nnUNetTrainer.__init__`` sets ``device = cuda:<global rank>`` (wrong on a second node, impossible
  on a CPU) and creates a CUDA ``GradScaler``;
- ``nnUNetTrainer.initialize`` wraps the network in ``DDP(network, device_ids=[<global rank>])``, which
  DDP refuses for a CPU module and which names a GPU that a second node does not have;
- nnU-Net's ``-num_gpus`` path (``run_ddp``) hard-codes nccl and ``torch.cuda.set_device(rank)``.

``DDPDeviceMixin`` (a base of ``TopoMAETrainerMixin``, so every nnunet-topomae trainer has it) fixes the
first two where they happen and leaves everything else to nnU-Net: per-rank batch size and
oversampling (``_set_batch_size_and_oversample``), rank 0 logging and checkpoints (``local_rank``, which
in nnU-Net is the *global* rank), the barriers. ``nnunet_topomae.distributed`` does the third
(the process group and the device for torchrun).

It also turns off DDP's buffer broadcast in the forward for our networks: their only buffers are constant
positional embeddings, and the broadcast is a collective in the first forward after every training
forward. In nnU-Net's final validation a rank without a validation case (more ranks than cases) never
makes that forward, and the other ranks' broadcast then waits for it until the timeout (measured with
gloo). Initial buffers are still synchronised when DDP is built; it also saves a broadcast per step.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import List, Optional

import numpy as np
import torch
from torch import distributed as dist

from nnunet_topomae.errors import UserInputError


def ddp_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK); nnU-Net's ``-num_gpus`` (one node,
    mp.spawn) sets no LOCAL_RANK, there it is the rank."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() if ddp_active() else 0


def local_world_size() -> int:
    """Training processes on this node (torchrun's LOCAL_WORLD_SIZE); without torchrun, every process
    of the group is on this node."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    return dist.get_world_size() if ddp_active() else 1


def ddp_device(requested: torch.device) -> torch.device:
    """The device of this rank for a requested ``-device``: the CPU stays the CPU, CUDA becomes the
    node-local GPU ``cuda:LOCAL_RANK``."""
    if requested.type == "cuda":
        return torch.device("cuda", local_rank())
    if requested.type == "cpu":
        return torch.device("cpu")
    raise UserInputError(f"distributed training on device '{requested.type}' is not supported; use -device cuda or cpu")


def worker_seeds(n: int) -> Optional[List[int]]:
    """Seeds for ``n`` data-loading workers of this rank (numpy and torch in each worker), drawn from this
    process's numpy generator, which ``nnunet_topomae.distributed`` seeds differently on every rank.
    None without DDP: nnU-Net's default (numpy from the OS, torch inherited from the parent) is kept."""
    if not ddp_active() or n <= 0:
        return None
    return [int(s) for s in np.random.randint(0, 2 ** 31 - 1, size=n)]


def _ddp_kwargs() -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    params = inspect.signature(DDP.__init__).parameters
    # no buffer broadcast in every forward (see the module docstring); torch >= 2.13 names it forward_sync_buffers
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def wrap_ddp(module: torch.nn.Module, device: torch.device):
    """DDP for a module on ``device``: ``device_ids=[index]`` on a GPU, none on the CPU."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if device.type != "cuda" and any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()):
        raise UserInputError("this plan's network uses BatchNorm, which nnU-Net turns into SyncBatchNorm under DDP; "
                             "SyncBatchNorm needs GPUs: train on GPUs (-device cuda) or on one CPU process")
    return DDP(module, device_ids=[device.index if device.index is not None else 0] if device.type == "cuda" else None,
               **_ddp_kwargs())


@contextlib.contextmanager
def _nnunet_wraps_with(device: torch.device):
    """While nnU-Net's ``initialize`` runs, its ``DDP(network, device_ids=[rank])`` builds ``wrap_ddp(network,
    device)`` instead (the module attribute it calls is swapped for the duration of the call only)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    original = nnunet_trainer_module.DDP

    def ddp(module, device_ids=None, **kwargs):
        return wrap_ddp(module, device)

    nnunet_trainer_module.DDP = ddp
    try:
        yield
    finally:
        nnunet_trainer_module.DDP = original


class DDPDeviceMixin:
    """Mix in before ``nnUNetTrainer``: nnU-Net's DDP code paths on the CPU (gloo) and on any node.

    Keeps nnU-Net's meaning of ``self.local_rank`` (the global rank; rank 0 writes)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp:
            # nnU-Net has just set cuda:<global rank> whatever was asked for
            self.device = ddp_device(device)
            if self.device.type != "cuda":
                self.grad_scaler = None  # nnU-Net made a CUDA GradScaler for its cuda device

    def initialize(self):
        if not self.is_ddp:
            return super().initialize()
        with _nnunet_wraps_with(self.device):
            return super().initialize()
