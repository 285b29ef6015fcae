"""Persistence backends and the machinery that moves persistence off the training step.

- gudhi (the reference) and cripser (optional, GPL-3.0; CI installs it through the `fast` extra) give the same diagrams
  and the same topological loss. Pairs may differ where voxels tie (each library picks its own
  creator/destroyer voxel), values may not. Tests needing cripser are skipped without it.
- ``PersistencePool`` gives exactly the pairs of serial ``persistence_pairs``.
- ``InputPersistence`` (run in the data-loading workers) gives exactly
  ``persistence_pairs(reduce_volume(...))``, which ``TopologicalLoss`` would compute on the step.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gudhi import CubicalComplex
from scipy.ndimage import gaussian_filter

from nnunet_topomae.losses.topological import (
    InputPersistence,
    PersistencePool,
    TopologicalLoss,
    available_backends,
    diagram_from_pairs,
    persistence_pairs,
    reduce_volume,
)

CRIPSER_REASON = ("cripser is not installed: it is an optional GPL-3.0 persistence backend "
                  "(pip install cripser); CI installs it with the fast extra")
SHAPES = [(6, 9, 13), (16, 8, 5), (3, 17, 10), (20, 11, 2), (1, 12, 14)]
DIMS = (0, 1, 2)


@pytest.fixture
def cripser():
    return pytest.importorskip("cripser", reason=CRIPSER_REASON)


def _volume(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random(shape)
    if kind == "smooth":
        return gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    if kind == "ties":  # few distinct values: many equal births/deaths, tie-breaking differs by library
        return rng.integers(0, 4, shape).astype(np.float64)
    raise ValueError(kind)


def _multiset(rows) -> list:
    return sorted(tuple(float(v) for v in r) for r in rows)


def _gudhi_diagrams(v):
    """{dim: (finite (b, d) multiset, essential births multiset)} straight from gudhi, zero-persistence dropped."""
    cc = CubicalComplex(vertices=v)
    out = {d: ([], []) for d in DIMS}
    for d, (b, death) in cc.persistence(min_persistence=-1):
        if d in out and death > b:
            (out[d][1].append(b) if np.isinf(death) else out[d][0].append((b, death)))
    return {d: (_multiset(f), sorted(e)) for d, (f, e) in out.items()}


def _cripser_diagrams(cripser, v):
    res = cripser.computePH(np.ascontiguousarray(v, dtype=np.float64), maxdim=2)
    out = {d: ([], []) for d in DIMS}
    for row in res:
        d, b, death = int(row[0]), float(row[1]), float(row[2])
        if d in out and death > b:
            (out[d][1].append(b) if death >= np.finfo(np.float64).max / 2 else out[d][0].append((b, death)))
    return {d: (_multiset(f), sorted(e)) for d, (f, e) in out.items()}


def _our_diagrams(v, backend, max_pairs=None):
    """The same, through persistence_pairs (the voxel indices the loss gathers from)."""
    pairs = persistence_pairs(v, DIMS, max_pairs, backend)
    return {d: (_multiset(diagram_from_pairs(v, pairs[d]).reshape(-1, 2)),
                sorted(float(x) for x in v.reshape(-1)[pairs[("essential", d)]])) for d in DIMS}


def _assert_pairs_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_available_backends_lists_gudhi_first():
    assert available_backends()[0] == "gudhi"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown persistence backend 'nope'"):
        persistence_pairs(np.zeros((3, 3, 3)), backend="nope")


# ------------------------------------------------------------------------------------ gudhi vs cripser
@pytest.mark.parametrize("kind", ["random", "smooth", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_libraries_give_the_same_diagrams(cripser, shape, kind):
    v = _volume(kind, shape, seed=sum(shape))
    g, c = _gudhi_diagrams(v), _cripser_diagrams(cripser, v)
    for d in DIMS:
        assert g[d][0] == c[d][0], f"dim {d} finite"
        assert g[d][1] == c[d][1], f"dim {d} essential"
    assert len(g[0][1]) == 1 and g[0][1][0] == v.min()  # a box: one essential class, born at the minimum


@pytest.mark.parametrize("kind", ["random", "smooth", "ties"])
@pytest.mark.parametrize("shape", SHAPES)
def test_persistence_pairs_backends_agree_on_values(cripser, shape, kind):
    v = _volume(kind, shape, seed=sum(shape) + 1)
    reference = _gudhi_diagrams(v)
    assert _our_diagrams(v, "gudhi") == reference  # the voxel indices point at the right values...
    assert _our_diagrams(v, "cripser") == reference  # ...with either backend (C-order indices both)
    if kind != "ties":  # top-k by persistence is only well defined without ties at the cut
        assert _our_diagrams(v, "gudhi", max_pairs=8) == _our_diagrams(v, "cripser", max_pairs=8)


@pytest.mark.parametrize("kind,max_pairs", [("random", 64), ("smooth", 64), ("ties", None)])
@pytest.mark.parametrize("shape", [(2, 1, 40, 24, 12), (1, 2, 10, 36, 20), (3, 1, 12, 12, 30)])
def test_topological_loss_same_value_with_both_backends(cripser, shape, kind, max_pairs):
    rng = np.random.default_rng(7)
    target = torch.as_tensor(np.stack([[_volume(kind, shape[2:], seed=10 * i + j) for j in range(shape[1])]
                                       for i in range(shape[0])]), dtype=torch.float32)
    recon = (target + 0.5 * torch.as_tensor(rng.standard_normal(shape), dtype=torch.float32)).requires_grad_(True)
    values = {}
    for backend in ("gudhi", "cripser"):
        loss = TopologicalLoss(max_size=16, max_pairs=max_pairs, backend=backend, workers=0)
        values[backend] = loss.per_volume(recon, target)
        values[backend].sum().backward()  # differentiable with either backend
        assert recon.grad is not None and torch.isfinite(recon.grad).all()
        recon.grad = None
    torch.testing.assert_close(values["gudhi"], values["cripser"], rtol=1e-5, atol=1e-6)
    assert (values["gudhi"] > 0).all()


# ------------------------------------------------------------------------------------ pool and inputs
@pytest.fixture(scope="module")
def pool():
    p = PersistencePool(2, DIMS, max_pairs=16)
    yield p
    p.close()


def test_pool_gives_the_serial_pairs(pool):
    vols = [_volume(kind, shape, seed=i) for i, (kind, shape) in
            enumerate([("random", (8, 10, 12)), ("smooth", (16, 16, 8)), ("ties", (9, 9, 9)), ("smooth", (4, 20, 6))])]
    got = pool.map(vols)
    assert len(got) == len(vols)
    for v, pairs in zip(vols, got):
        _assert_pairs_equal(pairs, persistence_pairs(v, DIMS, 16))


@pytest.mark.parametrize("backend", ["gudhi", "cripser"])
def test_pool_gives_the_serial_pairs_per_backend(backend):
    if backend not in available_backends():
        pytest.skip(CRIPSER_REASON)
    vols = [_volume("smooth", (10, 12, 14), seed=s) for s in range(3)]
    p = PersistencePool(2, DIMS, max_pairs=None, backend=backend)
    try:
        for v, pairs in zip(vols, p.map(vols)):
            _assert_pairs_equal(pairs, persistence_pairs(v, DIMS, None, backend))
    finally:
        p.close()


@pytest.mark.parametrize("max_size,tail", [(16, "drop"), (None, "diagonal")])
def test_loss_with_pool_equals_serial(pool, max_size, tail):
    """Persistence and matching in the pool (pairs_and_plan) give exactly the serial loss, also at
    full resolution with the tail matched to the diagonal (the _faithfulTopo settings)."""
    rng = np.random.default_rng(3)
    target = torch.as_tensor(gaussian_filter(rng.standard_normal((3, 1, 24, 20, 16)), sigma=(0, 0, 2, 2, 2)),
                             dtype=torch.float32)
    recon = target + 0.3 * torch.as_tensor(rng.standard_normal(target.shape), dtype=torch.float32)
    kw = dict(max_size=max_size, max_voxels=None, max_pairs=16, tail=tail)
    serial = TopologicalLoss(workers=0, **kw)
    pooled = TopologicalLoss(workers=2, **kw)
    pooled._pool = pool  # the started module pool (same settings), instead of starting another
    torch.testing.assert_close(pooled.per_volume(recon, target), serial.per_volume(recon, target), rtol=0, atol=0)


@pytest.mark.parametrize("shape,max_size", [((1, 40, 36, 20), 16), ((2, 24, 24, 24), 32), ((1, 33, 17, 9), 8)])
def test_input_persistence_equals_pairs_of_reduced_volume(shape, max_size):
    rng = np.random.default_rng(sum(shape))
    image = gaussian_filter(rng.standard_normal(shape), sigma=(0, 1.5, 1.5, 1.5)).astype(np.float32)
    got = InputPersistence(max_size, DIMS, max_pairs=32)(image)
    reduced = reduce_volume(torch.from_numpy(image)[None], max_size)[0].numpy()
    assert len(got) == shape[0]
    for c in range(shape[0]):
        _assert_pairs_equal(got[c], persistence_pairs(reduced[c], DIMS, 32))


def _call_in_worker(fn, image):
    return fn(image), fn.priority_lowered, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
@pytest.mark.parametrize("low_priority", [True, False])
def test_input_persistence_lowers_only_a_worker_process_priority(low_priority):
    """In a data-loading worker (another process) the first call lowers that process's priority and
    the diagrams are unchanged; in the process that built it (nnUNet_n_proc_DA=0: the training
    process itself) nothing is lowered."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    rng = np.random.default_rng(3)
    image = gaussian_filter(rng.standard_normal((1, 24, 20, 16)), sigma=(0, 1.5, 1.5, 1.5)).astype(np.float32)
    fn = InputPersistence(16, DIMS, max_pairs=16, low_priority=low_priority)
    before = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    here = fn(image)
    assert fn.priority_lowered == "" and (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == before
    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:  # nnU-Net's workers are forked
        there, lowered, policy, nice = pool.submit(_call_in_worker, fn, image).result()
    for a, b in zip(here, there):
        _assert_pairs_equal(a, b)
    if low_priority:
        assert lowered in ("idle", "nice")
        assert policy == os.SCHED_IDLE if lowered == "idle" else nice == 19
    else:
        assert (lowered, policy, nice) == ("", *before)


def test_precomputed_input_pairs_give_the_same_loss():
    """What the trainer does (inputs' pairs from the data loader) equals computing them on the step."""
    rng = np.random.default_rng(5)
    image = gaussian_filter(rng.standard_normal((2, 1, 30, 22, 26)), sigma=(0, 0, 2, 2, 2)).astype(np.float32)
    recon = torch.from_numpy(image) + 0.3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    fn = InputPersistence(16, DIMS, max_pairs=24)
    pairs = [fn(image[i]) for i in range(len(image))]
    loss = TopologicalLoss(max_size=16, max_pairs=24, workers=0)
    torch.testing.assert_close(loss.per_volume(recon, torch.from_numpy(image), target_pairs=pairs),
                               loss.per_volume(recon, torch.from_numpy(image)), rtol=0, atol=0)
