"""``python -m nnunet_topomae.distributed``: nnU-Net training under PyTorch's launcher, on GPUs or CPUs,
on one node or several.

    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
        -m nnunet_topomae.distributed DATASET 3d_fullres 0 -tr nnUNetTrainerTopoMAEPretrain [--c]

The arguments are ``nnUNetv2_train``'s (plus ``-backend``). Each process reads torchrun's environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), joins the process group (nccl on
GPUs, gloo on the CPU), takes its node-local GPU and then runs exactly what ``nnUNetv2_train`` runs
(nnU-Net's ``get_trainer_from_args``, ``maybe_load_checkpoint`` and the trainer's ``run_training``);
the trainer sees an initialised process group and takes nnU-Net's own DDP code paths (per-rank batch
size, rank 0 logs, pictures and checkpoints). What nnU-Net assumes about CUDA there is handled by
``nnunet_topomae.utils.ddp.DDPDeviceMixin`` in every nnunet-topomae trainer.

Beyond ``nnUNetv2_train``:

- every rank seeds torch, numpy and ``random`` with its own seed (a base from rank 0, or
  ``NNUNET_TOPOMAE_SEED``, plus the rank), so ranks draw different masks, crops and augmentations;
- a process restarted by torchrun (``--max-restarts``, ``TORCHELASTIC_RESTART_COUNT > 0``) continues
  from the fold's checkpoint as with ``--c`` if there is one, and starts again as asked otherwise;
- on several nodes the results folder must be one shared folder (checked at the start);
- one-line refusals (``UserInputError``) for what cannot work: not started by torchrun, no rendezvous
  endpoint, nccl on the CPU, a GPU run on a node without GPUs (or with fewer than its processes),
  a global batch smaller than the number of ranks, ``-num_gpus``, one of nnU-Net's own trainers
  where its DDP code cannot run (CPU, several nodes).

A rank that dies ends the job: torchrun stops the other ranks of its node and names the failed rank;
ranks on other nodes see their peer's connection close (or, if its node vanished, the process-group
timeout, ``NNUNET_TOPOMAE_DDP_TIMEOUT_MIN``, default 30 minutes).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import secrets
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Mapping, Optional, Sequence, Tuple

from nnunet_topomae.errors import UserInputError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
SEED_ENV = "NNUNET_TOPOMAE_SEED"
TIMEOUT_ENV = "NNUNET_TOPOMAE_DDP_TIMEOUT_MIN"
USAGE = ("torchrun --nproc_per_node G [--nnodes N --rdzv_backend c10d --rdzv_endpoint HOST:PORT] "
         "-m nnunet_topomae.distributed DATASET CONFIGURATION FOLD -tr TRAINER")


# ----------------------------------------------------------------------------- arguments (nnUNetv2_train's)
def build_parser() -> argparse.ArgumentParser:
    """nnUNetv2_train's arguments (nnunetv2.run.run_training.run_training_entry, 2.8.1), same names, types,
    defaults, plus ``-backend``."""
    parser = argparse.ArgumentParser(
        prog="python -m nnunet_topomae.distributed",
        description="nnUNetv2_train under torchrun (several GPUs or CPU processes, one or several nodes): "
                    + USAGE)
    parser.add_argument('dataset_name_or_id', type=str,
                        help="Dataset name or ID to train with")
    parser.add_argument('configuration', type=str,
                        help="Configuration that should be trained")
    parser.add_argument('fold', type=str,
                        help='Fold of the 5-fold cross-validation. Should be an int between 0 and 4.')
    parser.add_argument('-tr', type=str, required=False, default='nnUNetTrainer',
                        help='[OPTIONAL] Use this flag to specify a custom trainer. Default: nnUNetTrainer')
    parser.add_argument('-p', type=str, required=False, default='nnUNetPlans',
                        help='[OPTIONAL] Use this flag to specify a custom plans identifier. Default: nnUNetPlans')
    parser.add_argument('-pretrained_weights', type=str, required=False, default=None,
                        help='[OPTIONAL] path to nnU-Net checkpoint file to be used as pretrained model. Will only '
                             'be used when actually training. Beta. Use with caution.')
    parser.add_argument('-num_gpus', type=int, default=1, required=False,
                        help='nnU-Net\'s own launcher; under torchrun the processes are --nnodes x --nproc_per_node, '
                             'so leave this out')
    parser.add_argument('--npz', action='store_true', required=False,
                        help='[OPTIONAL] Save softmax predictions from final validation as npz files (in addition to '
                             'predicted segmentations). Needed for finding the best ensemble.')
    parser.add_argument('--c', action='store_true', required=False,
                        help='[OPTIONAL] Continue training from latest checkpoint')
    parser.add_argument('--val', action='store_true', required=False,
                        help='[OPTIONAL] Set this flag to only run the validation. Requires training to have finished.')
    parser.add_argument('--val_best', action='store_true', required=False,
                        help='[OPTIONAL] If set, the validation will be performed with the checkpoint_best instead '
                             'of checkpoint_final. NOT COMPATIBLE with --disable_checkpointing!')
    parser.add_argument('--disable_checkpointing', action='store_true', required=False,
                        help='[OPTIONAL] Set this flag to disable checkpointing.')
    parser.add_argument('-device', type=str, default='cuda', required=False,
                        help="'cuda' (GPU: each process takes the GPU of its LOCAL_RANK) or 'cpu' (gloo).")
    parser.add_argument('-backend', type=str, default='auto', choices=['auto', 'nccl', 'gloo'], required=False,
                        help="process-group backend; auto: nccl with -device cuda, gloo with -device cpu")
    return parser


# ----------------------------------------------------------------------------- torchrun's environment
@dataclass
class Launch:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: str
    restart_count: int = 0
    max_restarts: int = 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def multi_node(self) -> bool:
        return self.world_size > self.local_world_size


def read_launch(environ: Mapping[str, str] = os.environ) -> Launch:
    missing = [v for v in TORCHRUN_VARS if v not in environ]
    if missing:
        raise UserInputError(f"python -m nnunet_topomae.distributed must be started by torchrun ({', '.join(missing)} "
                             f"not set): {USAGE}; for one process use nnUNetv2_train")
    if not environ.get("MASTER_ADDR") or not environ.get("MASTER_PORT"):
        raise UserInputError("no rendezvous endpoint (MASTER_ADDR/MASTER_PORT not set): start through torchrun with "
                             "--rdzv_backend c10d --rdzv_endpoint HOST:PORT (several nodes) or --standalone (one node)")
    try:
        launch = Launch(int(environ["RANK"]), int(environ["LOCAL_RANK"]), int(environ["WORLD_SIZE"]),
                        int(environ["LOCAL_WORLD_SIZE"]), environ["MASTER_ADDR"], environ["MASTER_PORT"],
                        int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
                        int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0))
    except ValueError:
        raise UserInputError(f"torchrun's environment is not numeric: "
                             f"{', '.join(f'{v}={environ[v]}' for v in TORCHRUN_VARS)}") from None
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size
            and launch.local_world_size <= launch.world_size):
        raise UserInputError(f"inconsistent torchrun environment: {', '.join(f'{v}={environ[v]}' for v in TORCHRUN_VARS)}")
    return launch


def choose_device_and_backend(device: str, backend: str, launch: Launch, cuda_available: bool,
                              cuda_devices: int) -> Tuple[str, str]:
    """(device type, process-group backend), or a one-line refusal."""
    if device not in ("cuda", "cpu"):
        raise UserInputError(f"-device {device}: distributed training runs on cuda (nccl) or cpu (gloo)")
    if device == "cpu":
        if backend == "nccl":
            raise UserInputError("-backend nccl needs GPUs, but this is a CPU run (-device cpu): leave -backend out "
                                 "(gloo), or train on GPUs with -device cuda")
        return "cpu", "gloo"
    if not cuda_available or cuda_devices == 0:
        raise UserInputError("-device cuda (nnU-Net's default) but torch sees no GPU on this node: add -device cpu "
                             "to train on CPU processes (gloo)")
    if launch.local_world_size > cuda_devices:
        raise UserInputError(f"{launch.local_world_size} processes on this node (--nproc_per_node) but only "
                             f"{cuda_devices} GPU(s) visible: use --nproc_per_node {cuda_devices} or fewer")
    return "cuda", ("nccl" if backend == "auto" else backend)


def check_global_batch(global_batch: int, world_size: int, plans: str = "nnUNetPlans") -> None:
    """nnU-Net splits the plan's batch over the ranks (global batch = the plan's batch size)."""
    if global_batch < world_size:
        raise UserInputError(f"the plan's batch size {global_batch} (the global batch, split over the ranks) is smaller "
                             f"than the {world_size} ranks: run at most {global_batch} processes in all, or use a "
                             f"plans variant with a batch size of at least {world_size} (-p; now {plans})")


def split_batch(global_batch: int, world_size: int) -> List[int]:
    """Per-rank batch sizes as nnU-Net's ``_set_batch_size_and_oversample`` computes them."""
    per = [global_batch // world_size] * world_size
    return [b + 1 if b * world_size + i < global_batch else b for i, b in enumerate(per)]


def threads_per_rank(local_world_size: int, cores: Optional[int] = None) -> int:
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else multiprocessing.cpu_count()
    return max(1, cores // max(1, local_world_size))


# ----------------------------------------------------------------------------- collective decisions
def _refuse(message: str, prints: bool):
    """A refusal that holds on every rank: one rank prints it; the others stay quiet (briefly, so that the
    printing rank is not stopped by torchrun before its line is out) and exit with 1 too."""
    if prints:
        raise UserInputError(message)
    time.sleep(3)
    raise SystemExit(1)


def _broadcast(obj, launch: Launch):
    import torch.distributed as dist
    box = [obj if launch.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _seed_this_rank(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _check_shared_folder(folder: str, token: str, launch: Launch, wait: float = 30.0) -> None:
    """On several nodes every rank must see the files rank 0 writes (checkpoints for --c and restarts,
    nnU-Net's final validation, which every rank writes into and rank 0 scores)."""
    import torch.distributed as dist
    if not launch.multi_node:
        return
    path = os.path.join(folder, f".nnunet_topomae_shared_{token}")
    if launch.rank == 0:
        with open(path, "w") as f:
            f.write(socket.gethostname())
    dist.barrier()
    deadline = time.time() + wait
    seen = os.path.isfile(path)
    while not seen and time.time() < deadline:  # network file systems may cache a directory for a while
        time.sleep(1.0)
        os.listdir(folder)
        seen = os.path.isfile(path)
    views = [None] * launch.world_size
    dist.all_gather_object(views, (launch.rank, socket.gethostname(), seen))
    if launch.rank == 0:
        os.remove(path)
    blind = [(r, h) for r, h, s in views if not s]
    if blind:
        hosts = sorted({h for _, h in blind})
        _refuse(f"the results folder {folder} is not shared between the nodes: rank(s) "
                f"{', '.join(str(r) for r, _ in blind)} on {', '.join(hosts)} do not see what rank 0 writes; training on "
                f"several nodes needs nnUNet_results (and nnUNet_preprocessed) on a file system every node mounts",
                launch.rank == 0)


def has_checkpoint(folder: Optional[str]) -> bool:
    return folder is not None and any(os.path.isfile(os.path.join(folder, f)) for f in CHECKPOINTS)


def decide_start(continue_training: bool, validation_only: bool, pretrained_weights: Optional[str],
                 restart_count: int, checkpoint_exists: bool,
                 trainer_resolves_start: bool) -> Tuple[bool, Optional[str], Optional[str]]:
    """(--c, -pretrained_weights, note) for this start. A torchrun restart (restart_count > 0) continues
    from the checkpoint like --c where there is one; where there is none it starts again as asked."""
    if restart_count == 0 or continue_training or validation_only:
        return continue_training, pretrained_weights, None
    if not checkpoint_exists:
        return False, pretrained_weights, (f"torchrun restart {restart_count}: no checkpoint yet, so this run starts "
                                           f"again as first asked")
    if pretrained_weights is not None and not trainer_resolves_start:
        pretrained_weights = None  # nnU-Net refuses --c together with -pretrained_weights; the checkpoint has them
    return True, pretrained_weights, (f"torchrun restart {restart_count}: continuing from the last checkpoint "
                                      f"(as with --c)")


def trainer_supported(trainer, device: str, launch: Launch) -> Optional[str]:
    """None, or why this trainer cannot run here (nnU-Net's own trainers: one node with GPUs only)."""
    from nnunet_topomae.utils.ddp import DDPDeviceMixin
    if isinstance(trainer, DDPDeviceMixin) or (device == "cuda" and not launch.multi_node):
        return None
    where = "on CPU processes" if device != "cuda" else "on several nodes"
    return (f"{type(trainer).__name__} is not an nnunet-topomae trainer: nnU-Net's own DDP code needs GPUs on one node "
            f"and cannot run {where}; use an nnunet-topomae trainer (for HybridMIM weights: "
            f"nnUNetTrainerHybridMIMFinetune), or nnUNetv2_train -num_gpus on one GPU node")


# ----------------------------------------------------------------------------- the process group's store
ROUND_KEYS = "nnunet_topomae/round"


def agree_round_token(store, rank: int, world_size: int, timeout: float, poll: float = 0.05) -> str:
    """A token that every rank of this start, and no earlier start, gets from ``store``.

    torchrun (2.x, c10d rendezvous) hands every restart of the workers the *same* TCPStore, still holding the
    keys the previous workers wrote, and the process group's own keys carry no round (the workers' restart
    counts differ between nodes, so they cannot tell them apart either). A new rank could then read a dead
    peer's address and fail, or hang (seen on a two-node restart here). So the ranks meet under keys nobody
    used before: every other rank publishes a fresh nonce; rank 0 answers every nonce it sees with its fresh
    token, until every rank has confirmed the token (an old nonce gets an answer nobody reads)."""
    deadline = time.time() + timeout
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{ROUND_KEYS}/hello/{rank}", nonce)
        store.wait([f"{ROUND_KEYS}/welcome/{nonce}"], timedelta(seconds=timeout))
        token = store.get(f"{ROUND_KEYS}/welcome/{nonce}").decode()
        store.set(f"{ROUND_KEYS}/joined/{token}/{rank}", "1")
        return token
    token = uuid.uuid4().hex
    pending, answered = set(range(1, world_size)), set()
    while pending:
        for r in sorted(pending):
            key = f"{ROUND_KEYS}/hello/{r}"
            if store.check([key]):
                nonce = store.get(key).decode()
                if nonce not in answered:
                    store.set(f"{ROUND_KEYS}/welcome/{nonce}", token)
                    answered.add(nonce)
        pending = {r for r in pending if not store.check([f"{ROUND_KEYS}/joined/{token}/{r}"])}
        if pending:
            if time.time() > deadline:
                raise UserInputError(f"rank(s) {sorted(pending)} did not join within {timeout:.0f} s")
            time.sleep(poll)
    return token


def init_process_group(backend: str, launch: Launch, timeout: timedelta) -> None:
    import torch.distributed as dist
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # torchrun's agent store not shared: nothing stale
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
        return
    base = dist.TCPStore(launch.master_addr, int(launch.master_port), is_master=False, timeout=timeout)
    token = agree_round_token(base, launch.rank, launch.world_size, timeout.total_seconds())
    dist.init_process_group(backend, store=dist.PrefixStore(f"{ROUND_KEYS}/{token}/", base), rank=launch.rank,
                            world_size=launch.world_size, timeout=timeout)


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace, launch: Launch, device_type: str) -> None:
    import torch
    import torch.distributed as dist
    import nnunetv2.run.run_training as nnunet_run
    from torch.backends import cudnn

    rank0 = launch.rank == 0
    seed = int(os.environ.get(SEED_ENV) or secrets.randbelow(2 ** 31 - 2 ** 20))
    shared = _broadcast({"seed": seed, "token": uuid.uuid4().hex}, launch)
    _seed_this_rank(shared["seed"] + launch.rank)

    fold = args.fold if args.fold == "all" else int(args.fold)
    if rank0 and args.p == "nnUNetPlans":
        print("INFO: You are using the old nnU-Net default plans (nnUNetPlans); see nnU-Net's "
              "documentation/resenc_presets.md for the newer recommendations.")

    device = torch.device("cuda", launch.local_rank) if device_type == "cuda" else torch.device("cpu")
    trainer = nnunet_run.get_trainer_from_args(args.dataset_name_or_id, args.configuration, fold, args.tr, args.p,
                                               args.c or launch.restart_count > 0, device=device)
    why = trainer_supported(trainer, device_type, launch)
    if why:
        _refuse(why, rank0)
    global_batch = int(trainer.configuration_manager.batch_size)
    if global_batch < launch.world_size:
        try:
            check_global_batch(global_batch, launch.world_size, args.p)
        except UserInputError as e:
            _refuse(e.message, rank0)
    _check_shared_folder(trainer.output_folder, shared["token"], launch)

    # a node restarted for a failure counts the restart; the others restart for the membership change, which
    # torchrun does not count: this start is a restart if any rank says so
    counts = [None] * launch.world_size
    dist.all_gather_object(counts, launch.restart_count)
    decision = None
    if rank0:  # one decision, from one view of the folder
        decision = decide_start(args.c, args.val, args.pretrained_weights, max(counts),
                                has_checkpoint(trainer.output_folder), callable(getattr(trainer, "resolve_start", None)))
    continue_training, pretrained_weights, note = _broadcast(decision, launch)

    trainer.print_to_log_file(
        f"torchrun: {launch.world_size} ranks ({launch.nodes} node(s) x {launch.local_world_size}), device {device_type}, "
        f"backend {dist.get_backend()}; global batch {global_batch} split as {split_batch(global_batch, launch.world_size)}; "
        f"seeds {shared['seed']} + rank" + (f"; {note}" if note else ""))
    if args.disable_checkpointing:
        trainer.disable_checkpointing = True
    # through the module attribute: nnunet_topomae.trainers.transfer wraps it (--c with -pretrained_weights)
    nnunet_run.maybe_load_checkpoint(trainer, continue_training, args.val, pretrained_weights)
    if device_type == "cuda":
        cudnn.deterministic = False
        cudnn.benchmark = True
    if not args.val:
        trainer.run_training()
    if args.val_best:
        trainer.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_best.pth"))
    trainer.perform_actual_validation(args.npz)
    dist.barrier()  # nobody leaves before rank 0 has written everything


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    launch = read_launch()
    node_prints = launch.local_rank == 0
    if args.num_gpus != 1:
        _refuse("-num_gpus is nnU-Net's own single-machine launcher; under torchrun the processes are --nnodes x "
                "--nproc_per_node: leave -num_gpus out", launch.rank == 0)
    if args.c and args.val:
        _refuse("--c and --val cannot be used together", launch.rank == 0)
    if args.val_best and args.disable_checkpointing:
        _refuse("--val_best is not compatible with --disable_checkpointing", launch.rank == 0)
    if args.fold != "all" and not args.fold.lstrip("-").isdigit():
        _refuse(f"fold must be 'all' or an integer, not {args.fold!r}", launch.rank == 0)
    if os.environ.get(SEED_ENV) and not os.environ[SEED_ENV].isdigit():
        _refuse(f"{SEED_ENV} must be a non-negative integer, not {os.environ[SEED_ENV]!r}", launch.rank == 0)

    import torch
    import torch.distributed as dist
    try:
        device_type, backend = choose_device_and_backend(args.device, args.backend, launch, torch.cuda.is_available(),
                                                         torch.cuda.device_count() if torch.cuda.is_available() else 0)
    except UserInputError as e:  # the same on every rank of a node
        _refuse(e.message, node_prints)
    if device_type == "cpu":
        torch.set_num_threads(threads_per_rank(launch.local_world_size))
    else:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        torch.cuda.set_device(launch.local_rank)
    minutes = float(os.environ.get(TIMEOUT_ENV) or 30)
    init_process_group(backend, launch, timedelta(minutes=minutes))
    try:
        run(args, launch, device_type)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
