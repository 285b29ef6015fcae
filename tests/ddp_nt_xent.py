"""Two-process (gloo) check of nt_xent with negatives gathered across ranks: each rank takes its slice
of one global batch; the loss and the gradient must equal a single process on the whole batch."""
from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import torch

from nnunet_topomae.losses.contrastive import gather_with_grad, nt_xent


def _worker(rank, sizes, port, path):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # a rank that fails leaves the other waiting in a collective: a timeout, not gloo's 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes), timeout=timedelta(seconds=120))
    try:
        _check_rank(rank, sizes, path)
        # both ranks done with their collectives before gloo tears down: without it, rank 0 sometimes aborted
        # ("terminate called without an active exception") while the other rank was still in DDP's all-reduce.
        # Only on success: a failed rank goes straight to teardown, which ends the other rank's wait with an error.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Past this point the rank has passed (its result is on disk, the group is gone). Python's own shutdown
    # would still destroy gloo's and DDP's C++ objects, and a clean-clone CI run saw rank 1 abort there with the
    # same message after the barrier; torch.multiprocessing.spawn counts a worker that returns with exit code 0 as
    # passed, so skip the interpreter's teardown. (Failures still raise above and reach spawn as tracebacks.)
    os._exit(0)


def _check_rank(rank, sizes, path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x1, x2 = torch.randn(sum(sizes), 4), torch.randn(sum(sizes), 4)
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    g = gather_with_grad(torch.full((sizes[rank], 2), float(rank)))  # ranks' rows in rank order
    assert g.shape == (sum(sizes), 2)
    assert all(g[sum(sizes[:r]):sum(sizes[:r + 1])].eq(r).all() for r in range(len(sizes)))
    model = DDP(lin)  # a local: DDP's reducer is freed on return, before the process group is destroyed
    loss = nt_xent(model(x1[sl]), model(x2[sl]), temperature=0.5, gather=True)
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grad": lin.weight.grad.clone()}, path)


def free_port() -> int:
    """A port that was free a moment ago, for a rendezvous on 127.0.0.1 (shared with tests/test_distributed.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_gathered_nt_xent(sizes) -> None:
    """Spawns one process per entry of ``sizes`` (rows per rank) and compares with one process."""
    port = free_port()
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
