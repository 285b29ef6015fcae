"""What DDP costs on the CPU: training steps of one global batch in one process against the same global batch
split over gloo ranks on the same machine (docs/BENCHMARKS.md, "torchrun on the CPU").

    python -m nnunet_topomae.ddp_bench --trainer topomae --global-batch 4 --ranks 2 --steps 8 --repeats 3

Both sides build the trainer through nnU-Net's ``initialize`` (DDP wrapping, per-rank batch size) on a
Hippocampus-sized synthetic plan (patch 40x56x40, nnU-Net's CNN 32-256 wide); the batch is random data
(no data loading), the persistence of the reconstructions runs in each rank's default pool
(``default_pool_workers``, or ``--topo-workers``), torch threads = cores / processes. A step is ``train_step`` with the
ranks lined up by a barrier before each step; the figure is the median step time of each repeat (after
``--warmup`` steps), and the ratio DDP / one process of those medians; plus the time of one gloo
all-reduce of all gradients (what DDP adds to each step).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

PATCH, STRIDES = (40, 56, 40), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def _trainer_class(name: str, topo_workers):
    from nnunet_topomae.trainers import nnUNetTrainerHybridMIMPretrain, nnUNetTrainerTopoMAEPretrain

    class TopoMAE(nnUNetTrainerTopoMAEPretrain):
        pass

    TopoMAE.topo_workers = topo_workers
    return {"topomae": TopoMAE, "hybridmim": nnUNetTrainerHybridMIMPretrain}[name]


def _trainer(name: str, root: str, global_batch: int, topo_workers=None):
    from nnunet_topomae.utils import synthetic_plans
    plans = synthetic_plans.plans(PATCH, STRIDES, [32, 64, 128, 256], batch_size=global_batch,
                                  dataset_name="Dataset992_DDPBench", n_conv=2)
    folder = os.path.join(root, "preprocessed", "Dataset992_DDPBench", "nnUNetPlans_3d_fullres")
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "case.b2nd"), "w").close()
    os.environ.update(nnUNet_preprocessed=os.path.join(root, "preprocessed"), nnUNet_results=os.path.join(root, "results"))
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    tr = _trainer_class(name, topo_workers)(plans, "3d_fullres", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    tr.initialize()
    tr.network.train()
    return tr


def _steps(tr, warmup: int, steps: int) -> list:
    g = torch.Generator().manual_seed(0)
    batch = {"data": torch.randn(tr.batch_size, 1, *PATCH, generator=g),
             "spatial": torch.rand(tr.batch_size, 27, generator=g)}
    times = []
    for i in range(warmup + steps):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        tr.train_step(batch)
        if dist.is_initialized():
            dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    topo = getattr(tr.loss, "topo_loss", None)
    if topo is not None:
        topo.close()
    return times


def _rank(rank: int, world: int, port: int, args, root: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, args.cores // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    try:
        tr = _trainer(args.trainer, root, args.global_batch, args.topo_workers)
        times = _steps(tr, args.warmup, args.steps)
        # what DDP adds per step: one all-reduce of every gradient (DDP splits it into buckets)
        flat = torch.zeros(sum(p.numel() for p in tr.network.parameters()))
        reduce_times = []
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            reduce_times.append(time.perf_counter() - t0)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"steps": times, "allreduce": statistics.median(reduce_times), "params": flat.numel()}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=["topomae", "hybridmim"], default="topomae")
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--topo-workers", type=int, default=None,
                   help="TopoMAE's persistence processes per rank (default: the trainer's default_pool_workers; "
                        "0: in the training process)")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count())
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.repeats):
            torch.set_num_threads(args.cores)
            single = statistics.median(_steps(_trainer(args.trainer, root, args.global_batch, args.topo_workers),
                                              args.warmup, args.steps))
            out = os.path.join(root, f"ddp{r}.json")
            torch.multiprocessing.spawn(_rank, args=(args.ranks, _free_port(), args, root, out), nprocs=args.ranks)
            with open(out) as f:
                res = json.load(f)
            ddp = statistics.median(res["steps"])
            rows.append((single, ddp, res["allreduce"]))
            print(f"repeat {r}: one process {single:.3f} s/step, {args.ranks} gloo ranks {ddp:.3f} s/step, "
                  f"ratio {ddp / single:.2f}; all-reduce of the {res['params'] / 1e6:.1f} M gradients "
                  f"{res['allreduce']:.3f} s", flush=True)
    print(json.dumps({"trainer": args.trainer, "global_batch": args.global_batch, "ranks": args.ranks,
                      "topo_workers": args.topo_workers,
                      "cores": args.cores, "one_process_s": [round(a, 3) for a, _, _ in rows],
                      "ddp_s": [round(b, 3) for _, b, _ in rows], "allreduce_s": [round(c, 3) for _, _, c in rows],
                      "median_ratio": round(statistics.median(b / a for a, b, _ in rows), 3)}))


if __name__ == "__main__":
    main()
