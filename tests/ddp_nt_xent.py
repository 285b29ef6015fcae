"""Two-process (gloo) check of nt_xent with negatives gathered across ranks: each rank takes its slice
of one global batch; the loss and the gradient must equal a single process on the whole batch."""
from __future__ import annotations

import os
import socket
import tempfile

import torch

from nnunet_topomae.losses.contrastive import gather_with_grad, nt_xent


def _worker(rank, sizes, port, path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        x1, x2 = torch.randn(sum(sizes), 4), torch.randn(sum(sizes), 4)
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        g = gather_with_grad(torch.full((sizes[rank], 2), float(rank)))  # ranks' rows in rank order
        assert g.shape == (sum(sizes), 2)
        assert all(g[sum(sizes[:r]):sum(sizes[:r + 1])].eq(r).all() for r in range(len(sizes)))
        model = DDP(lin)
        loss = nt_xent(model(x1[sl]), model(x2[sl]), temperature=0.5, gather=True)
        loss.backward()
        if rank == 0:
            torch.save({"loss": loss.detach(), "grad": lin.weight.grad.clone()}, path)
    finally:
        # both ranks done with their collectives before gloo tears down: without it, rank 0 sometimes aborted
        # ("terminate called without an active exception") while the other rank was still in DDP's all-reduce
        dist.barrier()
        dist.destroy_process_group()


def check_gathered_nt_xent(sizes) -> None:
    """Spawns one process per entry of ``sizes`` (rows per rank) and compares with one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "out.pt")
        torch.multiprocessing.spawn(_worker, args=(list(sizes), port, path), nprocs=len(sizes), join=True)
        res = torch.load(path)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x1, x2 = torch.randn(sum(sizes), 4), torch.randn(sum(sizes), 4)
    ref = nt_xent(lin(x1), lin(x2), temperature=0.5)
    ref.backward()
    torch.testing.assert_close(res["loss"], ref.detach())
    torch.testing.assert_close(res["grad"], lin.weight.grad)
