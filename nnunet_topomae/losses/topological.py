"""Topological reconstruction loss for topology-aware MAE pretraining.

Implements (Gu et al., arXiv:2406.10519)

    L_topo = 1/2 * sum_{d in dims} W_2(D_d(I), D_d(I'))^2

where I is the input (target) volume, I' the reconstruction, D_d the
dimension-d persistence diagram and W_2 the 2-Wasserstein distance between
diagrams with the Euclidean ground metric: matching (b, d) to (b', d') costs
(b - b')^2 + (d - d')^2, matching (b, d) to the diagonal costs (d - b)^2 / 2.

From the paper: the loss itself (persistent homology of the cubical complexes
of I and I', dimensions 0-2, squared W_2 between diagrams).

Our interpretation / engineering choices:
  * Filtration: voxels are the vertices of the cubical complex and the
    filtration is the sublevel set of intensity (gudhi
    ``CubicalComplex(vertices=...)``), so dark structures form features.
  * Differentiability: every finite diagram point is born at one voxel and
    killed at another (``vertices_of_persistence_pairs``); we gather those
    voxel values from the reconstruction tensor, so gradients flow only into
    the creator/destroyer voxels. The optimal matching is computed on detached
    values and treated as constant (the standard piecewise-linear argument).
  * Resolution: PH on a full patch is too slow for every training step, so
    ``TopologicalLoss`` first average-pools both volumes to <= ``max_size``
    voxels per axis and, with ``max_voxels``, to at most that many voxels in
    all (``reduce_volume``). Cubical PH costs grow faster than linearly with
    the voxel count (gudhi here: 22 ms at 24^3, 64 ms at 32^3), so a voxel
    budget bounds the cost per volume whatever the patch size.
  * Top-k: with ``max_pairs`` only the k most persistent finite points per
    dimension of each diagram enter the matching; this bounds the cost of the
    O((n+m)^3) assignment and drops noise-level features.
  * Essential classes: a box is contractible, so only dimension 0 has an
    essential class (death = inf). Essential points are matched by birth
    alone (sorted to sorted, optimal for 1-D squared cost), cost (b - b')^2.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from gudhi import CubicalComplex
from scipy.optimize import linear_sum_assignment

from nnunet_topomae.errors import UserInputError


def reduction_kernel(shape, max_size: int = 32, max_voxels: int | None = None) -> tuple:
    """Pooling kernel (= stride) per axis: every reduced axis <= ``max_size`` and, if given, the
    reduced volume <= ``max_voxels`` voxels (the longest reduced axis is coarsened first)."""
    kernel = [math.ceil(s / max_size) for s in shape]
    if max_voxels:
        reduced = [math.ceil(s / k) for s, k in zip(shape, kernel)]
        while math.prod(reduced) > max_voxels:
            axis = int(np.argmax(reduced))
            kernel[axis] += 1
            reduced[axis] = math.ceil(shape[axis] / kernel[axis])
    return tuple(kernel)


def reduce_volume(x: torch.Tensor, max_size: int = 32, max_voxels: int | None = None) -> torch.Tensor:
    """Average-pool (B, C, X, Y, Z) so that every spatial axis is <= max_size (and the volume
    <= max_voxels voxels, if given)."""
    kernel = reduction_kernel(x.shape[2:], max_size, max_voxels)
    if all(k == 1 for k in kernel):
        return x
    # ceil_mode keeps the partial border windows; with zero padding PyTorch
    # averages them over the voxels actually inside, so borders are not darkened.
    return F.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


def _select(out_pairs, flat, d, max_pairs):
    pairs = out_pairs
    pers = flat[pairs[:, 1]] - flat[pairs[:, 0]]
    keep = pers > 0
    pairs, pers = pairs[keep], pers[keep]
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs[np.argsort(-pers, kind="stable")[:max_pairs]]
    return pairs


def _gudhi_raw(volume: np.ndarray, dims):
    cc = CubicalComplex(vertices=volume)
    cc.compute_persistence()
    regular, essential = cc.vertices_of_persistence_pairs()

    # gudhi flattens the ``vertices`` array in Fortran order (first axis
    # fastest; verified against persistence() values), we use C order throughout.
    def to_c(idx):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return idx
        multi = np.unravel_index(idx, volume.shape, order="F")
        return np.ravel_multi_index(multi, volume.shape).astype(np.int64)

    reg = {d: to_c(regular[d]).reshape(-1, 2) if d < len(regular) else np.zeros((0, 2), np.int64) for d in dims}
    ess = {d: to_c(essential[d] if d < len(essential) else []).reshape(-1) for d in dims}
    return reg, ess


def _cripser_raw(volume: np.ndarray, dims):
    # CubicalRipser's default V-construction = voxels as vertices, like gudhi's vertices=;
    # rows are [dim, birth, death, birth voxel (3), death voxel (3)].
    import cripser
    res = cripser.computePH(volume, maxdim=max(dims))
    shape = volume.shape
    reg, ess = {}, {}
    for d in dims:
        rows = res[res[:, 0] == d]
        finite = rows[:, 2] < np.finfo(np.float64).max / 2
        b = np.ravel_multi_index(tuple(rows[:, 3:6].astype(np.int64).T), shape)
        fin = rows[finite]
        dd = np.ravel_multi_index(tuple(fin[:, 6:9].astype(np.int64).T), shape) if len(fin) else np.zeros(0, np.int64)
        reg[d] = np.stack([b[finite], dd], 1).astype(np.int64) if len(fin) else np.zeros((0, 2), np.int64)
        ess[d] = b[~finite].astype(np.int64)
    return reg, ess


BACKENDS = {"gudhi": _gudhi_raw, "cripser": _cripser_raw}


def available_backends():
    out = ["gudhi"]
    try:
        import cripser  # noqa: F401  (optional, GPL-3.0: pip install cripser)
        out.append("cripser")
    except ImportError:
        pass
    return out


def require_backend(backend: str, hint: str = "") -> None:
    """One-line user error if ``backend`` is not installed (cripser is an optional extra); ``hint`` says what else to use."""
    if backend not in available_backends():
        raise UserInputError(f"persistence backend {backend!r} is not installed (available: "
                             f"{', '.join(available_backends())}); pip install cripser (GPL-3.0) to use it{hint}")


def persistence_pairs(volume: np.ndarray, dims=(0, 1, 2), max_pairs: int | None = None,
                      backend: str = "gudhi") -> dict:
    """Creator/destroyer voxels (flat C-order indices) of the sublevel persistence of ``volume``.

    Returns {d: int64 (n, 2) [birth voxel, death voxel]} for finite points and
    {('essential', d): int64 (k,) birth voxels} for points dying at infinity.
    ``backend``: 'gudhi' (default, the reference) or 'cripser' (optional, faster, GPL-3.0).
    """
    volume = np.ascontiguousarray(volume, dtype=np.float64)
    if backend not in BACKENDS:
        raise ValueError(f"unknown persistence backend {backend!r}; available: {available_backends()}")
    reg, ess = BACKENDS[backend](volume, tuple(dims))
    flat = volume.ravel()
    out = {}
    for d in dims:
        out[d] = _select(reg[d], flat, d, max_pairs)
        out[("essential", d)] = ess[d]
    return out


def _exit_with_parent() -> None:
    """Pool-worker initializer: a worker ends when the training process dies (OOM killer, kill -9),
    instead of living on and holding the job's output streams."""
    import multiprocessing as mp
    import threading
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(0)), daemon=True).start()


def default_pool_workers(volumes_per_step: int, cores: int | None = None, ranks: int = 1) -> int:
    """How many persistence processes a training process starts when none is set: one per volume of
    a step's batch, within half of this process's share of the CPU cores (the other half is left to
    nnU-Net's data-loading workers and the network), and at least 2. On the 2-core development
    machine that is 2; on a GPU machine with 16 cores and a batch of 9 (18 reconstructions), 8, so
    that the step waits for 3 rounds of persistence instead of 9 with a fixed pool of 2."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(volumes_per_step, max(2, cores // max(1, ranks) // 2)))


class PersistencePool:
    """A persistent pool of worker processes computing ``persistence_pairs`` of many volumes at once.

    gudhi holds Python's lock, so threads do not help; processes do. Started once (spawn, so that
    no OpenMP/torch state is forked) and reused every step."""

    def __init__(self, workers: int, dims=(0, 1, 2), max_pairs: int | None = 64, backend: str = "gudhi"):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        self.dims, self.max_pairs, self.backend = tuple(dims), max_pairs, backend
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                            initializer=_exit_with_parent)

    def map(self, volumes):
        n = len(volumes)
        return list(self.executor.map(persistence_pairs, volumes, [self.dims] * n, [self.max_pairs] * n,
                                      [self.backend] * n))

    def close(self):
        self.executor.shutdown(wait=True, cancel_futures=True)


def lower_own_priority() -> str:
    """Let every other runnable thread of the machine go first: Linux's SCHED_IDLE policy where it
    exists, else the lowest nice value. Irreversible for an unprivileged process, so it is only for
    worker processes. Returns what was done: 'idle', 'nice' or '' (neither available or allowed)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.nice(19)
        return "nice"
    except (AttributeError, OSError):
        return ""


class InputPersistence:
    """Picklable per-sample function for nnU-Net's data-loading workers: the input's diagrams do
    not depend on the network, so they are computed next to the batch, off the training step.

    ``low_priority``: on its first call in a process other than the one that built it (a
    data-loading worker, never the training process itself), that process lowers its own priority
    (``lower_own_priority``). The inputs' persistence is prefetch work; on a CPU-only machine the
    network's threads already use every core, and a worker that preempts one of them stalls the
    other at OpenMP's barriers. At idle priority the workers fill the gaps instead."""

    def __init__(self, max_size: int = 32, dims=(0, 1, 2), max_pairs: int | None = 64, backend: str = "gudhi",
                 max_voxels: int | None = None, low_priority: bool = False):
        self.max_size, self.dims, self.max_pairs, self.backend = max_size, tuple(dims), max_pairs, backend
        self.max_voxels = max_voxels
        self.low_priority = low_priority
        self._owner = os.getpid()
        self.priority_lowered = ""

    def __call__(self, image: np.ndarray):
        """image (C, X, Y, Z) -> list over channels of persistence_pairs of the reduced volume."""
        if self.low_priority and not self.priority_lowered and os.getpid() != self._owner:
            self.priority_lowered = lower_own_priority() or "unavailable"
        reduced = reduce_volume(torch.as_tensor(image, dtype=torch.float32)[None], self.max_size,
                                self.max_voxels)[0].numpy()
        return [persistence_pairs(reduced[c], self.dims, self.max_pairs, self.backend) for c in range(len(reduced))]


def diagram_from_pairs(values, pairs):
    """(n, 2) birth/death values of ``pairs`` gathered from the flattened ``values`` (numpy or torch)."""
    if isinstance(values, torch.Tensor):
        idx = torch.as_tensor(pairs, dtype=torch.long, device=values.device)
        return values.reshape(-1)[idx]
    return np.asarray(values).reshape(-1)[np.asarray(pairs, dtype=np.int64)]


def _diag_cost(diag: np.ndarray) -> np.ndarray:
    return (diag[:, 1] - diag[:, 0]) ** 2 / 2


def wasserstein2_matching(diag_a: np.ndarray, diag_b: np.ndarray):
    """Optimal squared-W2 matching of two finite diagrams.

    Returns (rows, cols, to_diag_a, to_diag_b): a[rows[i]] <-> b[cols[i]], and
    the indices of a's / b's points sent to the diagonal.
    """
    a = np.asarray(diag_a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(diag_b, dtype=np.float64).reshape(-1, 2)
    n, m = len(a), len(b)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0 or m == 0:
        return empty, empty, np.arange(n), np.arange(m)
    # Standard augmentation: each point gets a private diagonal slot (inf off
    # the slot's own point), and diagonal-to-diagonal is free.
    cost = np.zeros((n + m, m + n))
    cost[:n, :m] = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    cost[:n, m:] = np.inf
    cost[:n, m:][np.arange(n), np.arange(n)] = _diag_cost(a)
    cost[n:, :m] = np.inf
    cost[n:, :m][np.arange(m), np.arange(m)] = _diag_cost(b)
    r, c = linear_sum_assignment(cost)
    real = (r < n) & (c < m)
    to_diag_a = r[(r < n) & (c >= m)]
    to_diag_b = c[(r >= n) & (c < m)]
    return r[real], c[real], to_diag_a, to_diag_b


def topological_loss_batch(recon: torch.Tensor, target: np.ndarray, recon_pairs, target_pairs,
                           dims=(0, 1, 2)) -> torch.Tensor:
    """L_topo of N volume pairs at once: (N,) tensor, differentiable w.r.t. ``recon`` (N, *spatial).

    ``target``: (N, *spatial) numpy; ``recon_pairs`` / ``target_pairs``: per volume, its
    ``persistence_pairs``. The optimal matchings are found per volume and dimension on detached
    values; the distances then come from ONE gather over the whole batch, because every separate
    gather costs a full-size zero gradient in backward, and on a busy CPU those small ops cost more
    than the arithmetic (a Hippocampus batch of 4 reduced volumes under load: 60 ms with one gather per
    volume and dimension, 45 ms with one; docs/BENCHMARKS.md, speed).
    """
    n, size, dev = recon.shape[0], recon[0].numel(), recon.device
    r_np = recon.detach().cpu().numpy().reshape(n, -1).astype(np.float64)
    t_np = np.asarray(target, dtype=np.float64).reshape(n, -1)
    # (R[i] - t)^2 terms: matched births and deaths, essential classes
    sq_idx, sq_tgt, sq_vol = [], [], []
    # (R[death] - R[birth])^2 / 2 terms: reconstruction points matched to the diagonal
    dg_b, dg_d, dg_vol = [], [], []
    # target points matched to the diagonal: part of the distance, constant w.r.t. recon
    const = np.zeros(n)

    def squared(v, idx, tgt):
        sq_idx.append(v * size + idx), sq_tgt.append(tgt), sq_vol.append(np.full(len(idx), v))

    for v in range(n):
        for d in dims:
            rp = np.asarray(recon_pairs[v][d], np.int64).reshape(-1, 2)
            tp = np.asarray(target_pairs[v][d], np.int64).reshape(-1, 2)
            dt = diagram_from_pairs(t_np[v], tp)
            rows, cols, diag_r, diag_t = wasserstein2_matching(diagram_from_pairs(r_np[v], rp), dt)
            squared(v, rp[rows].ravel(), dt[cols].ravel())
            dg_b.append(v * size + rp[diag_r, 0]), dg_d.append(v * size + rp[diag_r, 1])
            dg_vol.append(np.full(len(diag_r), v))
            const[v] += _diag_cost(dt[diag_t]).sum()
            # essential points are matched by birth alone, sorted to sorted (optimal for a 1-D squared cost)
            er = np.asarray(recon_pairs[v][("essential", d)], np.int64)
            et = np.sort(t_np[v][np.asarray(target_pairs[v][("essential", d)], np.int64)])
            k = min(len(er), len(et))  # equal (1 in dim 0, 0 otherwise) for same-shape boxes
            squared(v, er[np.argsort(r_np[v][er], kind="stable")[:k]], et[:k])

    def as_tensor(parts, dtype):
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), dtype=dtype, device=dev)

    sq_i, b_i, d_i = (as_tensor(p, torch.long) for p in (sq_idx, dg_b, dg_d))
    m, k = len(sq_i), len(b_i)
    g = recon.reshape(-1)[torch.cat([sq_i, b_i, d_i])]
    sq = (g[:m] - as_tensor(sq_tgt, recon.dtype)) ** 2
    dg = (g[m + k:] - g[m:m + k]) ** 2 / 2
    total = torch.zeros(n, dtype=recon.dtype, device=dev)
    total = total.index_add(0, as_tensor(sq_vol, torch.long), sq).index_add(0, as_tensor(dg_vol, torch.long), dg)
    return 0.5 * (total + torch.as_tensor(const, dtype=recon.dtype, device=dev))


def topological_loss_single(recon: torch.Tensor, target, dims=(0, 1, 2), max_pairs=None,
                            target_pairs: dict | None = None, recon_pairs: dict | None = None,
                            backend: str = "gudhi") -> torch.Tensor:
    """L_topo for one 3D volume pair; differentiable w.r.t. ``recon``.

    ``target_pairs`` (e.g. from data-loading workers) must come from
    ``persistence_pairs(target, dims, max_pairs)`` with the same settings.
    """
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    target = np.asarray(target, dtype=np.float64)
    if target_pairs is None:
        target_pairs = persistence_pairs(target, dims, max_pairs, backend)
    if recon_pairs is None:
        recon_pairs = persistence_pairs(recon.detach().cpu().numpy().astype(np.float64), dims, max_pairs, backend)
    return topological_loss_batch(recon[None], target[None], [recon_pairs], [target_pairs], dims)[0]


def reduced_diagrams(volumes: dict, max_size: int = 32, max_voxels: int | None = None, dims=(0, 1, 2),
                     max_pairs: int | None = None, backend: str = "gudhi") -> dict:
    """What L_topo sees of each volume, for pictures: name -> ({d: (n, 2) finite (birth, death)},
    L_topo against the first volume). Volumes are reduced and their points selected exactly as in
    ``TopologicalLoss`` (float32 pooling, then float64 persistence)."""
    out, ref = {}, None
    for name, volume in volumes.items():
        r = reduce_volume(torch.as_tensor(np.asarray(volume), dtype=torch.float32)[None, None], max_size,
                          max_voxels)[0, 0].double()
        pairs = persistence_pairs(r.numpy(), dims, max_pairs, backend)
        if ref is None:
            ref, loss = (r.numpy(), pairs), 0.0
        else:
            loss = float(topological_loss_batch(r[None], ref[0][None], [pairs], [ref[1]], dims)[0])
        out[name] = ({d: diagram_from_pairs(r.numpy(), pairs[d]) for d in dims}, loss)
    return out


class TopologicalLoss(torch.nn.Module):
    """Batch L_topo on reduced-resolution volumes, averaged over batch and channels.

    ``workers`` > 0 computes the reconstructions' persistence in a persistent process pool
    (``PersistencePool``); ``target_pairs`` (from ``InputPersistence`` in the data-loading workers)
    skips the inputs' persistence on the training step."""

    def __init__(self, max_size: int = 32, dims=(0, 1, 2), max_pairs: int | None = 64,
                 backend: str = "gudhi", workers: int = 0, max_voxels: int | None = None):
        super().__init__()
        self.max_size = max_size
        self.max_voxels = max_voxels
        self.dims = tuple(dims)
        self.max_pairs = max_pairs
        self.backend = backend
        self.workers = workers
        self._pool = None

    def start(self) -> None:
        if self.workers > 0 and self._pool is None:
            self._pool = PersistencePool(self.workers, self.dims, self.max_pairs, self.backend)

    def input_persistence(self, low_priority: bool = False) -> "InputPersistence":
        """The data-loading workers' half of this loss: the inputs' diagrams, on volumes reduced
        exactly as ``per_volume`` reduces them (one set of settings, so the two cannot drift)."""
        return InputPersistence(self.max_size, self.dims, self.max_pairs, self.backend, self.max_voxels,
                                low_priority=low_priority)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _pairs(self, volumes):
        if self.workers > 0 and len(volumes) > 1:
            self.start()
            return self._pool.map(volumes)
        return [persistence_pairs(v, self.dims, self.max_pairs, self.backend) for v in volumes]

    def per_volume(self, recon: torch.Tensor, target: torch.Tensor, target_pairs=None) -> torch.Tensor:
        """(B, C) losses. ``target_pairs``: per sample, a list over channels of persistence_pairs."""
        # float32 so PH/matching are not hit by AMP half precision.
        recon = reduce_volume(recon.float(), self.max_size, self.max_voxels)
        target = reduce_volume(target.detach().float(), self.max_size, self.max_voxels).cpu().numpy().astype(np.float64)
        b, c = recon.shape[:2]
        recon_np = recon.detach().cpu().numpy().astype(np.float64)
        todo = [recon_np[i, j] for i in range(b) for j in range(c)]
        if target_pairs is None:
            todo += [target[i, j] for i in range(b) for j in range(c)]
        pairs = self._pairs(todo)
        r_pairs = pairs[:b * c]
        t_pairs = pairs[b * c:] if target_pairs is None else [target_pairs[i][j] for i in range(b) for j in range(c)]
        return topological_loss_batch(recon.reshape(b * c, *recon.shape[2:]), target.reshape(b * c, *target.shape[2:]),
                                      r_pairs, t_pairs, self.dims).reshape(b, c)

    def forward(self, recon: torch.Tensor, target: torch.Tensor, target_pairs=None) -> torch.Tensor:
        return self.per_volume(recon, target, target_pairs).mean()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = None
        return state
