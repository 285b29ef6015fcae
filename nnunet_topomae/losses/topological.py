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
  * Resolution: ``TopologicalLoss`` can average-pool both volumes to <= ``max_size``
    voxels per axis and, with ``max_voxels``, to at most that many voxels in all
    (``reduce_volume``; the trainer's default, 32 and 12288, bounds the cost per volume
    whatever the patch), or work at full resolution (None). Axes of equal length get
    equal kernels (``reduction_kernel``). A pooled gradient is spread over its kernel, so it
    cannot point at the creator/destroyer voxels: only full resolution is close to the
    paper's gradient (docs/BENCHMARKS.md, fidelity).
  * Pair budget: with ``max_pairs`` only the k most persistent finite points per dimension
    of each diagram are matched (``pair_mass``: the fewest carrying that fraction of the
    squared persistence); ties are broken by a stable rule (persistence, then birth, then
    position; ``rank_pairs``), so the points kept do not depend on the library's pair order
    or on 1e-7 changes of tied (quantised) intensities. The points outside the budget are
    dropped (``tail='drop'``) or matched to the diagonal (``tail='diagonal'``, an upper bound
    of the exact value).
  * Matching: exact (``wasserstein2_matching``), on the sparse graph of the pairs whose
    matching can be optimal; computed in the persistence pool's processes during training
    (``pairs_and_plan``).
  * Essential classes: a box is contractible, so only dimension 0 has an
    essential class (death = inf). Essential points are matched by birth
    alone (sorted to sorted, optimal for 1-D squared cost), cost (b - b')^2.
  * Reconstruction: the trainer passes the network's raw output, or with
    ``topo_reconstruction = 'composed'`` the input on the visible voxels
    (``compose_reconstruction``).
"""
from __future__ import annotations

import itertools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from gudhi import CubicalComplex
from scipy.optimize import linear_sum_assignment

from nnunet_topomae.errors import UserInputError


def reduction_kernel(shape, max_size: int | None = 32, max_voxels: int | None = None) -> tuple:
    """Pooling kernel (= stride) per axis: every reduced axis <= ``max_size`` and, if given, the
    reduced volume <= ``max_voxels`` voxels. ``None`` (or 0) for both: full resolution, kernel 1.

    Over the voxel budget, the longest reduced axes are coarsened, all axes tied at that length
    together: axes of equal length always get equal kernels, so a cubic patch is pooled
    isotropically (96^3 -> kernel 5, 20^3; it was (5, 4, 4), 20x24x24, before issue 24), and a
    patch with few slices (ACDC's 10x96x80) keeps them (kernel (1, 3, 3), 10x32x27)."""
    kernel = [math.ceil(s / max_size) if max_size else 1 for s in shape]
    if max_voxels:
        reduced = [math.ceil(s / k) for s, k in zip(shape, kernel)]
        while math.prod(reduced) > max_voxels:
            longest = max(reduced)
            for axis, r in enumerate(reduced):
                if r == longest:
                    kernel[axis] += 1
                    reduced[axis] = math.ceil(shape[axis] / kernel[axis])
    return tuple(kernel)


def reduce_volume(x: torch.Tensor, max_size: int | None = 32, max_voxels: int | None = None) -> torch.Tensor:
    """Average-pool (B, C, X, Y, Z) so that every spatial axis is <= max_size (and the volume
    <= max_voxels voxels, if given); ``x`` itself at full resolution (kernel 1 on every axis)."""
    kernel = reduction_kernel(x.shape[2:], max_size, max_voxels)
    if all(k == 1 for k in kernel):
        return x
    # ceil_mode keeps the partial border windows; with zero padding PyTorch
    # averages them over the voxels actually inside, so borders are not darkened.
    return F.avg_pool3d(x, kernel_size=kernel, stride=kernel, ceil_mode=True)


def compose_reconstruction(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m * recon + (1 - m) * image``: the reconstruction where the network could not see, the input
    where it could (``mask`` 1 = masked, broadcast over channels). What MAE papers show as "the
    reconstruction"; as the topological loss's input, no gradient reaches the visible voxels' outputs."""
    mask = mask.to(recon.dtype)
    return mask * recon + (1 - mask) * image.detach().to(recon.dtype)


RECONSTRUCTIONS = ("raw", "composed")
TAILS = ("drop", "diagonal")


def check_topo_settings(reconstruction: str = "raw", tail: str = "drop") -> None:
    """One-line user error for a trainer's ``topo_reconstruction`` / ``topo_tail`` outside their choices."""
    if reconstruction not in RECONSTRUCTIONS:
        raise UserInputError(f"topo_reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got {reconstruction!r}")
    if tail not in TAILS:
        raise UserInputError(f"topo_tail must be one of {', '.join(TAILS)}, got {tail!r}")


def composed_outputs(out: dict, image: torch.Tensor) -> dict:
    """A copy of a TopoMAE network's outputs with the full-resolution reconstructions (``vit_recon``,
    the CNN's first deep-supervision output) composed with the input (``compose_reconstruction``).
    Every other term of TopoMAE's loss scores masked voxels only with a binary mask, where composed
    and raw reconstructions are equal, so only the topological term (and its gradient) changes."""
    out = dict(out)
    m = out["voxel_mask"]
    out["vit_recon"] = compose_reconstruction(out["vit_recon"], image, m)
    cnn = out.get("cnn_recon")
    if isinstance(cnn, (list, tuple)):
        out["cnn_recon"] = type(cnn)([compose_reconstruction(cnn[0], image, m), *cnn[1:]])
    elif cnn is not None:
        out["cnn_recon"] = compose_reconstruction(cnn, image, m)
    return out


def tie_tolerance(values: np.ndarray) -> float:
    """Values closer than this count as equal when points are ranked: 1e-5 of the volume's range
    (quantised MRI intensities tie exactly; a 1e-7 change of a tied voxel must not reorder them)."""
    if values.size == 0:
        return 0.0
    return 1e-5 * float(values.max() - values.min())


def _groups(x: np.ndarray, tol: float) -> np.ndarray:
    """Rank of each value's tie group: sorted values closer than ``tol`` to their neighbour share a group."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    order = np.argsort(x, kind="stable")
    step = np.concatenate([[0], (np.diff(x[order]) > tol).astype(np.int64)])
    out = np.empty(len(x), np.int64)
    out[order] = np.cumsum(step)
    return out


def rank_pairs(pairs: np.ndarray, flat: np.ndarray, tol: float | None = None) -> np.ndarray:
    """Finite pairs with persistence > ``tol``, in a canonical order that does not depend on the
    library's order of pairs: persistence descending, then birth ascending (values within ``tol``
    tie), then position (birth voxel, then death voxel, C-order index). Points of persistence up to
    ``tol`` are left out: they are what a perturbation of tied voxels creates or removes (each costs
    at most tol^2 / 4 in L_topo)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if tol is None:
        tol = tie_tolerance(flat)
    birth, death = flat[pairs[:, 0]], flat[pairs[:, 1]]
    keep = death - birth > tol
    pairs, birth, death = pairs[keep], birth[keep], death[keep]
    order = np.lexsort((pairs[:, 1], pairs[:, 0], _groups(birth, tol), -_groups(death - birth, tol)))
    return pairs[order]


def pair_budget(pers: np.ndarray, max_pairs: int | None = None, pair_mass: float | None = None) -> int:
    """How many of the points (persistences ``pers``, sorted descending) are matched: at most
    ``max_pairs``, and with ``pair_mass`` the fewest that carry that fraction of the diagram's squared
    persistence (its distance to the empty diagram, sum p^2 / 2)."""
    k = len(pers)
    if pair_mass is not None and pair_mass < 1 and k:
        cum = np.cumsum(pers.astype(np.float64) ** 2)
        k = min(k, int(np.searchsorted(cum, pair_mass * cum[-1] * (1 - 1e-12))) + 1)
    if max_pairs is not None:
        k = min(k, max_pairs)
    return k


def _select(out_pairs, flat, max_pairs, pair_mass=None, tol=None):
    """(matched pairs, the rest): the ``pair_budget`` first of ``rank_pairs``."""
    pairs = rank_pairs(out_pairs, flat, tol)
    pers = flat[pairs[:, 1]] - flat[pairs[:, 0]]
    k = pair_budget(pers, max_pairs, pair_mass)
    return pairs[:k], pairs[k:]


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
                      backend: str = "gudhi", pair_mass: float | None = None) -> dict:
    """Creator/destroyer voxels (flat C-order indices) of the sublevel persistence of ``volume``.

    Returns {d: int64 (n, 2) [birth voxel, death voxel]} for the finite points that are matched
    (the ``pair_budget``: at most ``max_pairs``, the most persistent first, and with ``pair_mass``
    the fewest carrying that fraction of the squared persistence; ties broken by ``rank_pairs``),
    {('tail', d): (k, 2)} for the finite points left out of the budget, same order, and
    {('essential', d): int64 (k,) birth voxels} for points dying at infinity.
    ``backend``: 'gudhi' (default, the reference) or 'cripser' (optional, faster, GPL-3.0).
    """
    volume = np.ascontiguousarray(volume, dtype=np.float64)
    if backend not in BACKENDS:
        raise ValueError(f"unknown persistence backend {backend!r}; available: {available_backends()}")
    reg, ess = BACKENDS[backend](volume, tuple(dims))
    flat = volume.ravel()
    tol = tie_tolerance(flat)
    out = {}
    for d in dims:
        out[d], out[("tail", d)] = _select(reg[d], flat, max_pairs, pair_mass, tol)
        out[("essential", d)] = np.sort(ess[d])
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

    def __init__(self, workers: int, dims=(0, 1, 2), max_pairs: int | None = 64, backend: str = "gudhi",
                 pair_mass: float | None = None):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        self.dims, self.max_pairs, self.backend, self.pair_mass = tuple(dims), max_pairs, backend, pair_mass
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                            initializer=_exit_with_parent)

    def map(self, volumes):
        n = len(volumes)
        return list(self.executor.map(persistence_pairs, volumes, [self.dims] * n, [self.max_pairs] * n,
                                      [self.backend] * n, [self.pair_mass] * n))

    def plans(self, recons, targets, target_pairs, tail: str = "drop"):
        """``pairs_and_plan`` of many volume pairs: persistence AND matching in the workers (at full
        resolution the matching of thousands of points costs as much as the persistence)."""
        n = len(recons)
        return list(self.executor.map(pairs_and_plan, recons, targets, target_pairs, [self.dims] * n,
                                      [self.max_pairs] * n, [self.backend] * n, [self.pair_mass] * n, [tail] * n))

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

    def __init__(self, max_size: int | None = 32, dims=(0, 1, 2), max_pairs: int | None = 64, backend: str = "gudhi",
                 max_voxels: int | None = None, low_priority: bool = False, pair_mass: float | None = None):
        self.max_size, self.dims, self.max_pairs, self.backend = max_size, tuple(dims), max_pairs, backend
        self.pair_mass = pair_mass
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
        return [persistence_pairs(reduced[c], self.dims, self.max_pairs, self.backend, getattr(self, "pair_mass", None))
                for c in range(len(reduced))]


def diagram_from_pairs(values, pairs):
    """(n, 2) birth/death values of ``pairs`` gathered from the flattened ``values`` (numpy or torch)."""
    if isinstance(values, torch.Tensor):
        idx = torch.as_tensor(pairs, dtype=torch.long, device=values.device)
        return values.reshape(-1)[idx]
    return np.asarray(values).reshape(-1)[np.asarray(pairs, dtype=np.int64)]


def _diag_cost(diag: np.ndarray) -> np.ndarray:
    return (diag[:, 1] - diag[:, 0]) ** 2 / 2


DENSE_MATCHING_MAX_POINTS = 256  # up to this many points in all, the dense assignment (both are exact)


def _dense_matching(a: np.ndarray, b: np.ndarray):
    n, m = len(a), len(b)
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
    return r[real], c[real]


def useful_edges(a: np.ndarray, b: np.ndarray):
    """Index pairs (i, j) whose matching costs less than sending both to the diagonal,
    |a_i - b_j|^2 < diag(a_i) + diag(b_j). Only these can be in an optimal matching (replacing any
    other matched pair by two diagonal assignments costs no more), and they are few: a point of
    persistence p can only be matched within distance p (found with a k-d tree, from both sides)."""
    from scipy.spatial import cKDTree
    pa, pb = a[:, 1] - a[:, 0], b[:, 1] - b[:, 0]
    found = []
    for pts, radius, other, swap in ((a, pa, b, False), (b, pb, a, True)):
        near = cKDTree(other).query_ball_point(pts, radius, return_sorted=False)
        lens = np.fromiter(map(len, near), np.int64, len(near))
        src = np.repeat(np.arange(len(pts)), lens)
        dst = np.fromiter(itertools.chain.from_iterable(near), np.int64, int(lens.sum()))
        found.append((dst, src) if swap else (src, dst))
    key = np.unique(np.concatenate([i * len(b) + j for i, j in found]))
    i, j = key // len(b), key % len(b)
    c = ((a[i] - b[j]) ** 2).sum(1)
    keep = c < _diag_cost(a)[i] + _diag_cost(b)[j]
    return i[keep], j[keep], c[keep]


def _sparse_matching(a: np.ndarray, b: np.ndarray):
    """The same assignment as ``_dense_matching`` on the graph of ``useful_edges`` (exact): rows are
    a's points and b's diagonal copies, columns b's points and a's diagonal copies; a diagonal copy
    pairs with a diagonal copy at no cost where their points are matched to each other."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching
    n, m = len(a), len(b)
    i, j, c = useful_edges(a, b)
    rows = np.concatenate([i, np.arange(n), n + np.arange(m), n + j])
    cols = np.concatenate([j, m + np.arange(n), np.arange(m), m + i])
    # every perfect matching has n + m edges, so a constant added to all weights changes no optimum;
    # it keeps zero-cost edges from reading as absent entries
    w = np.concatenate([c, _diag_cost(a), _diag_cost(b), np.zeros(len(i))]) + 1.0
    r, col = min_weight_full_bipartite_matching(csr_matrix((w, (rows, cols)), shape=(n + m, m + n)))
    real = (r < n) & (col < m)
    return r[real], col[real]


def wasserstein2_matching(diag_a: np.ndarray, diag_b: np.ndarray):
    """Optimal squared-W2 matching of two finite diagrams (exact).

    Returns (rows, cols, to_diag_a, to_diag_b): a[rows[i]] <-> b[cols[i]], and
    the indices of a's / b's points sent to the diagonal. Small diagrams: the dense augmented
    assignment; larger ones: the same assignment restricted to ``useful_edges`` (sparse, exact; the
    dense one took 18-38 s per dimension on full-resolution Hippocampus diagrams of 2-3 thousand
    points, the sparse one 0.06-0.3 s).
    """
    a = np.asarray(diag_a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(diag_b, dtype=np.float64).reshape(-1, 2)
    n, m = len(a), len(b)
    empty = np.zeros(0, dtype=np.int64)
    if n == 0 or m == 0:
        return empty, empty, np.arange(n), np.arange(m)
    rows, cols = (_dense_matching if n + m <= DENSE_MATCHING_MAX_POINTS else _sparse_matching)(a, b)
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    order = np.argsort(rows, kind="stable")
    rows, cols = rows[order], cols[order]
    to_diag_a = np.setdiff1d(np.arange(n), rows)
    to_diag_b = np.setdiff1d(np.arange(m), cols)
    return rows, cols, to_diag_a, to_diag_b


def matching_plan(recon_values: np.ndarray, target_values: np.ndarray, recon_pairs: dict, target_pairs: dict,
                  dims=(0, 1, 2), tail: str = "drop") -> dict:
    """Everything L_topo of one volume pair needs from the optimal matchings, on detached values (numpy
    only, so a pool worker can compute it): flat voxel indices of the reconstruction and what they are
    compared with. 'sq' / 'sq_target': (R[i] - t)^2 terms (matched births and deaths, essential
    classes); 'diag_birth' / 'diag_death': (R[death] - R[birth])^2 / 2 terms (reconstruction points
    matched to the diagonal); 'const': the input's points matched to the diagonal (constant w.r.t.
    the reconstruction). ``tail``: see ``topological_loss_batch``."""
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; one of {TAILS}")
    r_np = np.asarray(recon_values, dtype=np.float64).reshape(-1)
    t_np = np.asarray(target_values, dtype=np.float64).reshape(-1)
    sq, sq_tgt, dg = [], [], []
    const = 0.0
    for d in dims:
        rp = np.asarray(recon_pairs[d], np.int64).reshape(-1, 2)
        tp = np.asarray(target_pairs[d], np.int64).reshape(-1, 2)
        dt = diagram_from_pairs(t_np, tp)
        rows, cols, diag_r, diag_t = wasserstein2_matching(diagram_from_pairs(r_np, rp), dt)
        sq.append(rp[rows].ravel()), sq_tgt.append(dt[cols].ravel())
        dg.append(rp[diag_r])
        const += float(_diag_cost(dt[diag_t]).sum())
        if tail == "diagonal":
            rt = np.asarray(recon_pairs.get(("tail", d), np.zeros((0, 2))), np.int64).reshape(-1, 2)
            tt = np.asarray(target_pairs.get(("tail", d), np.zeros((0, 2))), np.int64).reshape(-1, 2)
            dg.append(rt)
            const += float(_diag_cost(diagram_from_pairs(t_np, tt)).sum())
        # essential points are matched by birth alone, sorted to sorted (optimal for a 1-D squared cost)
        er = np.asarray(recon_pairs[("essential", d)], np.int64)
        et = np.sort(t_np[np.asarray(target_pairs[("essential", d)], np.int64)])
        k = min(len(er), len(et))  # equal (1 in dim 0, 0 otherwise) for same-shape boxes
        sq.append(er[np.argsort(r_np[er], kind="stable")[:k]]), sq_tgt.append(et[:k])
    dg = np.concatenate(dg) if dg else np.zeros((0, 2), np.int64)
    return {"sq": np.concatenate(sq).astype(np.int64), "sq_target": np.concatenate(sq_tgt).astype(np.float64),
            "diag_birth": dg[:, 0].copy(), "diag_death": dg[:, 1].copy(), "const": const}


def topological_loss_from_plans(recon: torch.Tensor, plans) -> torch.Tensor:
    """(N,) L_topo of the N volumes of ``recon`` (N, *spatial) from their ``matching_plan``s, with ONE
    gather over the whole batch: every separate gather costs a full-size zero gradient in backward,
    and on a busy CPU those small ops cost more than the arithmetic (a Hippocampus batch of 4 reduced
    volumes under load: 60 ms with one gather per volume and dimension, 45 ms with one;
    docs/BENCHMARKS.md, speed)."""
    n, size, dev = recon.shape[0], recon[0].numel(), recon.device

    def cat(key, offset=True, dtype=torch.long):
        parts = [p[key] + (v * size if offset else 0) for v, p in enumerate(plans)]
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), dtype=dtype, device=dev)

    def volume_of(key):
        return torch.as_tensor(np.concatenate([np.full(len(p[key]), v) for v, p in enumerate(plans)])
                               if plans else np.zeros(0), dtype=torch.long, device=dev)

    sq_i, b_i, d_i = cat("sq"), cat("diag_birth"), cat("diag_death")
    m, k = len(sq_i), len(b_i)
    g = recon.reshape(-1)[torch.cat([sq_i, b_i, d_i])]
    sq = (g[:m] - cat("sq_target", offset=False, dtype=recon.dtype)) ** 2
    dg = (g[m + k:] - g[m:m + k]) ** 2 / 2
    total = torch.zeros(n, dtype=recon.dtype, device=dev)
    total = total.index_add(0, volume_of("sq"), sq).index_add(0, volume_of("diag_birth"), dg)
    const = torch.as_tensor([p["const"] for p in plans], dtype=recon.dtype, device=dev)
    return 0.5 * (total + const)


def topological_loss_batch(recon: torch.Tensor, target: np.ndarray, recon_pairs, target_pairs,
                           dims=(0, 1, 2), tail: str = "drop") -> torch.Tensor:
    """L_topo of N volume pairs at once: (N,) tensor, differentiable w.r.t. ``recon`` (N, *spatial).

    ``target``: (N, *spatial) numpy; ``recon_pairs`` / ``target_pairs``: per volume, its
    ``persistence_pairs``. The optimal matchings are found per volume and dimension on detached
    values (``matching_plan``), the distances then come from one gather (``topological_loss_from_plans``).

    ``tail``: what happens to the points left out of the pair budget (``('tail', d)``): 'drop' (they
    are not part of the loss) or 'diagonal' (each is matched to the diagonal: a constant for the
    input's, a term pulling birth and death together for the reconstruction's). With 'diagonal' the
    value is the cost of a feasible matching of the whole diagrams, so never below the exact W_2^2.
    """
    n = recon.shape[0]
    r_np = recon.detach().cpu().numpy().reshape(n, -1).astype(np.float64)
    t_np = np.asarray(target, dtype=np.float64).reshape(n, -1)
    plans = [matching_plan(r_np[v], t_np[v], recon_pairs[v], target_pairs[v], dims, tail) for v in range(n)]
    return topological_loss_from_plans(recon, plans)


def pairs_and_plan(recon_volume: np.ndarray, target_volume: np.ndarray, target_pairs: dict | None, dims=(0, 1, 2),
                   max_pairs: int | None = None, backend: str = "gudhi", pair_mass: float | None = None,
                   tail: str = "drop"):
    """A pool worker's whole share of one volume pair: the reconstruction's (and, if not given, the
    input's) ``persistence_pairs``, then the ``matching_plan``. Returns (recon pairs, plan)."""
    r_pairs = persistence_pairs(recon_volume, dims, max_pairs, backend, pair_mass)
    if target_pairs is None:
        target_pairs = persistence_pairs(target_volume, dims, max_pairs, backend, pair_mass)
    return r_pairs, matching_plan(recon_volume, target_volume, r_pairs, target_pairs, dims, tail)


def topological_loss_single(recon: torch.Tensor, target, dims=(0, 1, 2), max_pairs=None,
                            target_pairs: dict | None = None, recon_pairs: dict | None = None,
                            backend: str = "gudhi", pair_mass: float | None = None,
                            tail: str = "drop") -> torch.Tensor:
    """L_topo for one 3D volume pair; differentiable w.r.t. ``recon``.

    ``target_pairs`` (e.g. from data-loading workers) must come from
    ``persistence_pairs(target, dims, max_pairs, backend, pair_mass)`` with the same settings.
    With the defaults (every point, exact matching, no reduction) this is the exact L_topo.
    """
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    target = np.asarray(target, dtype=np.float64)
    if target_pairs is None:
        target_pairs = persistence_pairs(target, dims, max_pairs, backend, pair_mass)
    if recon_pairs is None:
        recon_pairs = persistence_pairs(recon.detach().cpu().numpy().astype(np.float64), dims, max_pairs, backend,
                                        pair_mass)
    return topological_loss_batch(recon[None], target[None], [recon_pairs], [target_pairs], dims, tail)[0]


def reduced_diagrams(volumes: dict, max_size: int | None = 32, max_voxels: int | None = None, dims=(0, 1, 2),
                     max_pairs: int | None = None, backend: str = "gudhi", pair_mass: float | None = None,
                     tail: str = "drop") -> dict:
    """What L_topo sees of each volume, for pictures: name -> ({d: (n, 2) finite (birth, death)},
    L_topo against the first volume). Volumes are reduced and their points selected exactly as in
    ``TopologicalLoss`` (float32 pooling, then float64 persistence); the diagrams hold the matched
    points (the tail is left out of the picture, but in the loss with ``tail='diagonal'``)."""
    out, ref = {}, None
    for name, volume in volumes.items():
        r = reduce_volume(torch.as_tensor(np.asarray(volume), dtype=torch.float32)[None, None], max_size,
                          max_voxels)[0, 0].double()
        pairs = persistence_pairs(r.numpy(), dims, max_pairs, backend, pair_mass)
        if ref is None:
            ref, loss = (r.numpy(), pairs), 0.0
        else:
            loss = float(topological_loss_batch(r[None], ref[0][None], [pairs], [ref[1]], dims, tail)[0])
        out[name] = ({d: diagram_from_pairs(r.numpy(), pairs[d]) for d in dims}, loss)
    return out


class TopologicalLoss(torch.nn.Module):
    """Batch L_topo on reduced-resolution volumes, averaged over batch and channels.

    Settings (what each costs and how faithful it is: docs/BENCHMARKS.md, fidelity):
    ``max_size`` / ``max_voxels``: average-pool to at most that many voxels per axis / in all (None:
    full resolution); ``max_pairs`` / ``pair_mass``: the pair budget per dimension (``pair_budget``;
    None: every point); ``tail``: the points outside the budget dropped or matched to the diagonal
    (``topological_loss_batch``); ``backend``: gudhi or cripser.

    ``workers`` > 0 computes the reconstructions' persistence in a persistent process pool
    (``PersistencePool``); ``target_pairs`` (from ``InputPersistence`` in the data-loading workers)
    skips the inputs' persistence on the training step."""

    def __init__(self, max_size: int | None = 32, dims=(0, 1, 2), max_pairs: int | None = 64,
                 backend: str = "gudhi", workers: int = 0, max_voxels: int | None = None,
                 pair_mass: float | None = None, tail: str = "drop"):
        super().__init__()
        if tail not in TAILS:
            raise ValueError(f"unknown tail {tail!r}; one of {TAILS}")
        self.max_size = max_size
        self.max_voxels = max_voxels
        self.dims = tuple(dims)
        self.max_pairs = max_pairs
        self.pair_mass = pair_mass
        self.tail = tail
        self.backend = backend
        self.workers = workers
        self._pool = None

    def start(self) -> None:
        if self.workers > 0 and self._pool is None:
            self._pool = PersistencePool(self.workers, self.dims, self.max_pairs, self.backend, self.pair_mass)

    def input_persistence(self, low_priority: bool = False) -> "InputPersistence":
        """The data-loading workers' half of this loss: the inputs' diagrams, on volumes reduced
        exactly as ``per_volume`` reduces them (one set of settings, so the two cannot drift)."""
        return InputPersistence(self.max_size, self.dims, self.max_pairs, self.backend, self.max_voxels,
                                low_priority=low_priority, pair_mass=self.pair_mass)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _pairs(self, volumes):
        if self.workers > 0 and len(volumes) > 1:
            self.start()
            return self._pool.map(volumes)
        return [persistence_pairs(v, self.dims, self.max_pairs, self.backend, self.pair_mass) for v in volumes]

    def _plans(self, recons, targets, target_pairs):
        """Per volume pair, its ``matching_plan``: in the pool (persistence and matching) when there is
        one and more than one volume, else here."""
        if self.workers > 0 and len(recons) > 1:
            self.start()
            return [plan for _, plan in self._pool.plans(recons, targets, target_pairs, self.tail)]
        return [pairs_and_plan(r, t, tp, self.dims, self.max_pairs, self.backend, self.pair_mass, self.tail)[1]
                for r, t, tp in zip(recons, targets, target_pairs)]

    def per_volume(self, recon: torch.Tensor, target: torch.Tensor, target_pairs=None) -> torch.Tensor:
        """(B, C) losses. ``target_pairs``: per sample, a list over channels of persistence_pairs."""
        # float32 so PH/matching are not hit by AMP half precision.
        recon = reduce_volume(recon.float(), self.max_size, self.max_voxels)
        target = reduce_volume(target.detach().float(), self.max_size, self.max_voxels).cpu().numpy().astype(np.float64)
        b, c = recon.shape[:2]
        recon_np = recon.detach().cpu().numpy().astype(np.float64)
        recons = [recon_np[i, j] for i in range(b) for j in range(c)]
        targets = [target[i, j] for i in range(b) for j in range(c)]
        t_pairs = [None] * (b * c) if target_pairs is None else [target_pairs[i][j] for i in range(b) for j in range(c)]
        plans = self._plans(recons, targets, t_pairs)
        return topological_loss_from_plans(recon.reshape(b * c, *recon.shape[2:]), plans).reshape(b, c)

    def forward(self, recon: torch.Tensor, target: torch.Tensor, target_pairs=None) -> torch.Tensor:
        return self.per_volume(recon, target, target_pairs).mean()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = None
        return state
