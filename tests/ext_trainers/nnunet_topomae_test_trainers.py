"""Short-schedule trainers for the integration tests (the test "shim" folder on nnUNet_extTrainer).

nnU-Net imports every module of every nnUNet_extTrainer folder as a *top-level* module and may
forget it again afterwards, so:
  - keep this module importable on its own: absolute imports of the installed package only, no
    relative imports, no imports of other test files;
  - do not put any other ``.py`` file into this folder (nnU-Net would import it too);
  - class names must be unique across all nnUNet_extTrainer folders and nnU-Net itself.
The folder is appended to nnUNet_extTrainer by ``NNUNetTestDataset.env()`` (tests/integration/helpers.py).

To add a test trainer, append a class here, e.g.::

    class nnUNetTrainerTopoMAEFinetune_test(ShortScheduleMixin, nnUNetTrainerTopoMAEFinetune):
        pass

``ShortScheduleMixin`` must come first in the bases. It also writes checkpoint_latest.pth after every
epoch (``save_every = 1``) and, when the environment variable named by ``INTERRUPT_ENV`` holds an
epoch number, kills the process (exit code ``INTERRUPT_EXIT_CODE``, no clean-up, like a crashed or
cancelled job) right after that epoch's checkpoints were written, so that ``--c`` can be tested.
"""
import os
import sys

import torch

from nnunet_topomae.trainers import nnUNetTrainerMAEPretrain, nnUNetTrainerTopoMAEPretrain
from nnunet_topomae.trainers.pretrain_base import nnUNetPretrainTrainerBase

INTERRUPT_ENV = "NNUNET_TOPOMAE_TEST_INTERRUPT_AFTER_EPOCH"
INTERRUPT_EXIT_CODE = 75
# "train_start": the process sends itself SIGKILL (kill -9) right after on_train_start, i.e. after
# -pretrained_weights were loaded and before the first checkpoint
SIGKILL_ENV = "NNUNET_TOPOMAE_TEST_SIGKILL_AT"


class ShortScheduleMixin:
    # pretraining schedule (read by nnUNetPretrainTrainerBase.__init__)
    pretrain_epochs = 2
    pretrain_iterations_per_epoch = 3
    pretrain_val_iterations_per_epoch = 2
    preview_every = 1
    # schedule of trainers that are not pretraining trainers (nnU-Net's own attributes)
    test_num_epochs = 2
    test_num_iterations_per_epoch = 3
    test_num_val_iterations_per_epoch = 2
    test_save_every = 1

    # nnU-Net records the __init__ arguments by name (inspect.signature(self.__init__)): keep this
    # exact signature, no *args/**kwargs.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = self.test_save_every
        if not isinstance(self, nnUNetPretrainTrainerBase):
            # e.g. a finetuning trainer: shorten nnU-Net's own schedule (pretraining trainers take
            # theirs from the pretrain_* attributes above)
            self.num_epochs = self.test_num_epochs
            self.num_iterations_per_epoch = self.test_num_iterations_per_epoch
            self.num_val_iterations_per_epoch = self.test_num_val_iterations_per_epoch

    def on_train_start(self):
        super().on_train_start()
        if os.environ.get(SIGKILL_ENV) == "train_start":
            self.print_to_log_file(f"{SIGKILL_ENV}=train_start: kill -9 before the first checkpoint")
            sys.stdout.flush()
            os.kill(os.getpid(), 9)

    def on_epoch_end(self):
        super().on_epoch_end()  # writes the checkpoints, then increments current_epoch
        stop = os.environ.get(INTERRUPT_ENV)
        if stop is not None and self.current_epoch - 1 == int(stop):
            self.print_to_log_file(f"{INTERRUPT_ENV}={stop}: simulated interruption after epoch {stop}")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(INTERRUPT_EXIT_CODE)


class nnUNetTrainerTopoMAEPretrain_test(ShortScheduleMixin, nnUNetTrainerTopoMAEPretrain):
    """TopoMAE pretraining, 2 epochs x 3 iterations (+ 2 validation iterations)."""


class nnUNetTrainerMAEPretrain_test(ShortScheduleMixin, nnUNetTrainerMAEPretrain):
    """Plain MAE baseline, 2 epochs x 3 iterations (+ 2 validation iterations)."""


# ----------------------------------------------------------------------------- HybridMIM (tests/integration/test_hybridmim_e2e.py)
from nnunet_topomae.trainers import nnUNetTrainerHybridMIMPretrain  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402


class nnUNetTrainerHybridMIMPretrain_test(ShortScheduleMixin, nnUNetTrainerHybridMIMPretrain):
    """HybridMIM pretraining, 2 epochs x 3 iterations (+ 2 validation iterations)."""


class nnUNetTrainer_test_finetune(nnUNetTrainer):
    """nnU-Net's stock trainer, unchanged except a 1-epoch schedule (2 + 1 iterations) and a snapshot of
    the network as it is when training starts, i.e. right after ``-pretrained_weights`` was loaded by
    nnU-Net's run_training: ``<fold>/initial_weights.pth`` (CPU state_dict)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 2
        self.num_val_iterations_per_epoch = 1

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            mod = self.network.module if self.is_ddp else self.network
            mod = getattr(mod, "_orig_mod", mod)
            torch.save({k: v.detach().cpu().clone() for k, v in mod.state_dict().items()},
                       os.path.join(self.output_folder, "initial_weights.pth"))


from nnunet_topomae.trainers import nnUNetTrainerTopoMAEFinetune  # noqa: E402


class nnUNetTrainerTopoMAEFinetune_test(ShortScheduleMixin, nnUNetTrainerTopoMAEFinetune):
    """Saves the network right after -pretrained_weights were loaded (on_train_start runs after it)."""

    def on_train_start(self):
        super().on_train_start()
        torch.save(self._unwrapped_network().state_dict(), os.path.join(self.output_folder, "initial_weights.pth"))


# ----------------------------------------------------------------------------- unlabelled cases (tests/integration/test_unlabelled_e2e.py)
import json as _json  # noqa: E402


class _RecordKeysMixin:
    """Writes the case keys of every training / validation batch to <fold>/seen_keys.json."""

    def _record_keys(self, split, batch):
        path = os.path.join(self.output_folder, "seen_keys.json")
        seen = _json.load(open(path)) if os.path.isfile(path) else {"train": [], "val": []}
        seen[split] += [str(k) for k in batch["keys"]]
        with open(path, "w") as f:
            _json.dump(seen, f)

    def train_step(self, batch):
        self._record_keys("train", batch)
        return super().train_step(batch)

    def validation_step(self, batch):
        self._record_keys("val", batch)
        return super().validation_step(batch)


class nnUNetTrainerTopoMAEPretrain_testKeys(_RecordKeysMixin, ShortScheduleMixin, nnUNetTrainerTopoMAEPretrain):
    """TopoMAE test pretraining that records which cases it saw."""


class nnUNetTrainer_testKeys(_RecordKeysMixin, ShortScheduleMixin, nnUNetTrainer):
    """nnU-Net's stock trainer, short, recording which cases it saw."""


# ----------------------------------------------------------------------------- torchrun (tests/integration/test_distributed_e2e.py)
import signal as _signal  # noqa: E402

import torch.distributed as _dist  # noqa: E402

from nnunet_topomae.trainers import nnUNetTrainerHybridMIMPretrain as _HybridMIMPretrain  # noqa: E402
from nnunet_topomae.trainers import nnUNetTrainerTopoMAEFinetune as _TopoMAEFinetune  # noqa: E402
from nnunet_topomae.trainers import nnUNetTrainerTopoMAEPretrain as _TopoMAEPretrain  # noqa: E402

# a folder: after training, every rank writes its network's weights there as rank<R>.pth (outside the run folder)
DDP_DUMP_ENV = "NNUNET_TOPOMAE_TEST_DDP_DUMP"
# "R:E": rank R kills itself (kill -9) right after epoch E's checkpoints were written, once: it leaves the file
# "killed" in the DDP_DUMP_ENV folder (required), and a restarted or continued run does not kill again
DDP_KILL_ENV = "NNUNET_TOPOMAE_TEST_DDP_KILL"


class _DDPTestMixin:
    """Short DDP runs: 2 epochs x 2 steps (+ 1 validation step), persistence in the training process."""
    pretrain_iterations_per_epoch = 2
    pretrain_val_iterations_per_epoch = 1
    test_num_iterations_per_epoch = 2
    test_num_val_iterations_per_epoch = 1
    topo_workers = 0

    def on_epoch_end(self):
        super().on_epoch_end()  # rank 0 writes the checkpoints, then current_epoch + 1
        spec = os.environ.get(DDP_KILL_ENV)
        if spec:
            rank, epoch = (int(i) for i in spec.split(":"))
            marker = os.path.join(os.environ[DDP_DUMP_ENV], "killed")
            # every rank looks before the barrier, the marker is only written after it: the same decision everywhere
            if self.current_epoch - 1 == epoch and not os.path.isfile(marker):
                _dist.barrier()  # rank 0's checkpoints are on disk
                if _dist.get_rank() == rank:
                    open(marker, "w").close()
                    print(f"{DDP_KILL_ENV}={spec}: rank {rank} kills itself", flush=True)
                    os.kill(os.getpid(), _signal.SIGKILL)

    def on_train_end(self):
        super().on_train_end()
        folder = os.environ.get(DDP_DUMP_ENV)
        if folder:
            rank = _dist.get_rank() if _dist.is_initialized() else 0
            torch.save({k: v.detach().cpu() for k, v in self._unwrapped_network().state_dict().items()},
                       os.path.join(folder, f"rank{rank}.pth"))


class nnUNetTrainerTopoMAEPretrain_ddptest(_DDPTestMixin, ShortScheduleMixin, _TopoMAEPretrain):
    """TopoMAE pretraining for the torchrun tests."""


class nnUNetTrainerHybridMIMPretrain_ddptest(_DDPTestMixin, ShortScheduleMixin, _HybridMIMPretrain):
    """HybridMIM pretraining for the torchrun tests."""


class nnUNetTrainerTopoMAEFinetune_ddptest(_DDPTestMixin, ShortScheduleMixin, _TopoMAEFinetune):
    """Hybrid finetuning for the torchrun tests: 1 epoch x 2 steps, then nnU-Net's final validation."""
    test_num_epochs = 1
