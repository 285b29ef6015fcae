"""Unit tests of training under torchrun (``nnunet_topomae.distributed``, ``nnunet_topomae.utils.ddp``).

The heavy one spawns two gloo ranks: one step of the TopoMAE and the HybridMIM trainer on a global batch of
4 (2 per rank), built through nnU-Net's own ``initialize`` (per-rank batch size, DDP wrapping), equals one
step of a single process on the whole batch: the same loss terms and gradients, with masking, the
contrastive dropout drawn per sample from fixed seeds (HybridMIM decodes the whole patch here). End-to-end runs
through torchrun are in tests/integration/test_distributed_e2e.py.
"""
from __future__ import annotations

import argparse
import copy
import os
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from ddp_nt_xent import free_port
from nnunet_topomae import distributed as nd
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.losses.topological import default_pool_workers
from nnunet_topomae.masking.token_masking import random_token_mask
from nnunet_topomae.masking.two_level import cube_mask_to_voxels, sample_cube_mask
from nnunet_topomae.trainers import nnUNetTrainerHybridMIMPretrain, nnUNetTrainerTopoMAEPretrain
from nnunet_topomae.utils import synthetic_plans
from nnunet_topomae.utils.ddp import local_world_size

TORCHRUN_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "node0", "MASTER_PORT": "29400"}


# ----------------------------------------------------------------------------- arguments and refusals
def test_arguments_are_those_of_nnunetv2_train(monkeypatch):
    """Every nnUNetv2_train argument, with the same flags, type, default and action; only -backend is new."""
    from nnunetv2.run import run_training

    class Captured(Exception):
        pass

    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as e:
        run_training.run_training_entry()
    theirs = {a.dest: a for a in e.value.args[0]._actions if a.dest != "help"}
    monkeypatch.undo()
    ours = {a.dest: a for a in nd.build_parser()._actions if a.dest != "help"}
    assert set(ours) - set(theirs) == {"backend"}
    for dest, a in theirs.items():
        b = ours[dest]
        assert (b.option_strings, b.type, b.default, b.required, type(b)) == \
               (a.option_strings, a.type, a.default, a.required, type(a)), dest
    args = nd.build_parser().parse_args(["901", "3d_fullres", "0", "-tr", "X", "--c", "-device", "cpu"])
    assert (args.dataset_name_or_id, args.fold, args.tr, args.c, args.device, args.backend) == \
           ("901", "0", "X", True, "cpu", "auto")


def test_not_started_by_torchrun_is_one_line():
    with pytest.raises(UserInputError, match="must be started by torchrun .*RANK.*nnUNetv2_train"):
        nd.read_launch({})
    env = {k: v for k, v in TORCHRUN_ENV.items() if not k.startswith("MASTER")}
    with pytest.raises(UserInputError, match="no rendezvous endpoint .*--rdzv_endpoint"):
        nd.read_launch(env)
    launch = nd.read_launch(dict(TORCHRUN_ENV, TORCHELASTIC_RESTART_COUNT="2"))
    assert (launch.rank, launch.local_rank, launch.world_size, launch.nodes, launch.multi_node,
            launch.restart_count) == (1, 1, 4, 2, True, 2)
    with pytest.raises(UserInputError, match="inconsistent"):
        nd.read_launch(dict(TORCHRUN_ENV, LOCAL_RANK="2"))


def test_argument_refusals_come_before_the_process_group(monkeypatch):
    for k, v in dict(TORCHRUN_ENV, RANK="0", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    base = ["901", "3d_fullres", "0", "-device", "cpu"]
    for extra, message in ((["-num_gpus", "2"], "leave -num_gpus out"), (["--c", "--val"], "--c and --val"),
                           (["--val_best", "--disable_checkpointing"], "--val_best is not compatible")):
        with pytest.raises(UserInputError, match=message):
            nd.main(base + extra)
    with pytest.raises(UserInputError, match="fold must be 'all' or an integer"):
        nd.main(["901", "3d_fullres", "zero", "-device", "cpu"])
    monkeypatch.setenv(nd.SEED_ENV, "abc")
    with pytest.raises(UserInputError, match="NNUNET_TOPOMAE_SEED must be"):
        nd.main(base)


def test_device_and_backend():
    launch = nd.read_launch(TORCHRUN_ENV)  # 2 processes on this node
    assert nd.choose_device_and_backend("cpu", "auto", launch, False, 0) == ("cpu", "gloo")
    assert nd.choose_device_and_backend("cuda", "auto", launch, True, 2) == ("cuda", "nccl")
    assert nd.choose_device_and_backend("cuda", "gloo", launch, True, 8) == ("cuda", "gloo")
    with pytest.raises(UserInputError, match="nccl needs GPUs"):
        nd.choose_device_and_backend("cpu", "nccl", launch, True, 2)
    with pytest.raises(UserInputError, match="no GPU on this node: add -device cpu"):
        nd.choose_device_and_backend("cuda", "auto", launch, False, 0)
    with pytest.raises(UserInputError, match="2 processes on this node .* only 1 GPU"):
        nd.choose_device_and_backend("cuda", "auto", launch, True, 1)
    with pytest.raises(UserInputError, match="cuda .* or cpu"):
        nd.choose_device_and_backend("mps", "auto", launch, False, 0)


def test_global_batch_and_its_split():
    with pytest.raises(UserInputError, match="batch size 2 .* smaller than the 3 ranks"):
        nd.check_global_batch(2, 3)
    nd.check_global_batch(2, 2)
    # nnU-Net's _set_batch_size_and_oversample
    assert nd.split_batch(9, 2) == [5, 4] and nd.split_batch(2, 2) == [1, 1] and nd.split_batch(7, 3) == [3, 2, 2]


def test_a_restart_continues_from_the_checkpoint():
    assert nd.decide_start(False, False, None, 0, True, False)[:2] == (False, None)  # first start: as asked
    c, w, note = nd.decide_start(False, False, None, 1, True, False)
    assert c is True and "continuing" in note
    c, w, note = nd.decide_start(False, False, "pre.pth", 1, False, True)
    assert (c, w) == (False, "pre.pth") and "no checkpoint yet" in note
    # nnU-Net refuses --c with -pretrained_weights: a trainer without resolve_start drops them on a restart
    assert nd.decide_start(False, False, "pre.pth", 1, True, False)[:2] == (True, None)
    assert nd.decide_start(False, False, "pre.pth", 1, True, True)[:2] == (True, "pre.pth")
    assert nd.decide_start(True, False, None, 3, False, False)[:2] == (True, None)  # --c stays --c


def test_persistence_pool_shares_the_node_between_its_ranks(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_world_size() == 4
    # 16 cores, 4 ranks on the node, 18 reconstructions per step: 16 / 4 / 2 = 2 processes each
    assert default_pool_workers(18, cores=16, ranks=local_world_size()) == 2
    assert default_pool_workers(18, cores=64, ranks=local_world_size()) == 8
    assert nd.threads_per_rank(4, cores=16) == 4 and nd.threads_per_rank(4, cores=2) == 1


def test_ranks_agree_on_a_fresh_round_despite_stale_keys():
    """torchrun hands a restart the same store with the previous workers' keys in it."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    server.set(f"{nd.ROUND_KEYS}/hello/1", "old-nonce")
    server.set(f"{nd.ROUND_KEYS}/welcome/old-nonce", "old-token")
    tokens = {}

    def rank(r, delay):
        time.sleep(delay)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        tokens[r] = nd.agree_round_token(store, r, 3, 30)

    threads = [threading.Thread(target=rank, args=a) for a in ((0, 0.0), (1, 0.6), (2, 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(tokens.values())) == 1 and len(tokens) == 3 and "old-token" not in tokens.values()


# ----------------------------------------------------------------------------- one step: 2 ranks == 1 process
PATCH, STRIDES = (32, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
GLOBAL_BATCH = 4
DATASET_JSON = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


class _TopoMAE(nnUNetTrainerTopoMAEPretrain):
    topo_workers = 0


class _HybridMIM(nnUNetTrainerHybridMIMPretrain):
    pass


TRAINERS = {"topomae": _TopoMAE, "hybridmim": _HybridMIM}


def _environment(root: str) -> dict:
    """nnU-Net's folders for initialize(): a preprocessed folder whose file ending names the dataset class."""
    plans = synthetic_plans.plans(PATCH, STRIDES, [8, 16, 32, 48], batch_size=GLOBAL_BATCH,
                                  dataset_name="Dataset991_DDPUnit")
    folder = os.path.join(root, "preprocessed", "Dataset991_DDPUnit", "nnUNetPlans_3d_fullres")
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "case.b2nd"), "w").close()
    os.environ["nnUNet_preprocessed"] = os.path.join(root, "preprocessed")
    os.environ["nnUNet_results"] = os.path.join(root, "results")
    return plans


def _trainer(name: str, root: str):
    plans = _environment(root)
    plans["continue_training"] = False
    torch.manual_seed(0)
    tr = TRAINERS[name](plans, "3d_fullres", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    tr.initialize()
    tr.set_deep_supervision_enabled(True)
    tr.network.train()
    return tr


def _batch(gids):
    g = torch.Generator().manual_seed(1234)
    x = torch.nn.functional.avg_pool3d(torch.randn(GLOBAL_BATCH, 1, *[p + 4 for p in PATCH], generator=g), 5, 1)
    x = (x - x.mean()) / x.std()
    spatial = torch.rand(GLOBAL_BATCH, 27, generator=g)  # 9 points x 3 coordinates
    return {"data": x[gids], "spatial": spatial[gids]}


def _seed_per_sample(tr, name: str, gids) -> None:
    """Masks, box and dropout of each sample from its own seed, whatever rank or batch it is in."""
    net = tr._unwrapped_network()
    if name == "topomae":
        def sample_mask(batch_size, device, generator=None):
            parts = [random_token_mask(1, net.vit_cfg.num_tokens, net.mask_ratio,
                                       torch.Generator().manual_seed(100 + int(i))) for i in gids]
            return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)
        net.sample_mask = sample_mask
        return
    geom = tr.geometry

    def sample_masks(batch_size):
        cube = torch.cat([sample_cube_mask(1, geom, tr.mask_ratio, torch.Generator().manual_seed(100 + int(i)))
                          for i in gids])
        return cube, cube_mask_to_voxels(cube, geom)

    # the whole patch: the masked-voxel count inside a partial box differs from sample to sample, and the
    # reconstruction loss divides by the count of the rank's batch (see docs/DISTRIBUTED.md)
    box = None
    calls = [0]

    def project(bottleneck):
        view, calls[0] = calls[0] % 2, calls[0] + 1
        keep = torch.stack([(torch.rand(bottleneck.shape[1:], generator=torch.Generator().manual_seed(
            1000 * (view + 1) + int(i))) >= net.contrast_dropout).float() for i in gids])
        h = bottleneck * keep / (1 - net.contrast_dropout)
        return net.projection(h.flatten(2).mean(dim=2))

    tr.sample_masks, tr.sample_box, net._project = sample_masks, (lambda: box), project


def _step(tr, name: str, gids):
    _seed_per_sample(tr, name, gids)
    tr.optimizer.zero_grad(set_to_none=True)
    terms = tr.compute_terms(_batch(gids))
    terms["loss"].backward()
    grads = {k: p.grad.detach().clone() for k, p in tr._unwrapped_network().named_parameters()}
    return {k: v.detach() for k, v in terms.items()}, grads


def _rank(rank: int, port: int, root: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must make them rank 0's
        result = {}
        for name in TRAINERS:
            tr = _trainer(name, root)
            from torch.nn.parallel import DistributedDataParallel
            assert isinstance(tr.network, DistributedDataParallel) and tr.network.device_ids is None
            assert tr.device.type == "cpu" and tr.grad_scaler is None and tr.batch_size == GLOBAL_BATCH // 2
            initial = {k: v.clone() for k, v in tr._unwrapped_network().state_dict().items()}
            gids = list(range(rank * 2, rank * 2 + 2))
            terms, grads = _step(tr, name, gids)
            for v in terms.values():  # the step's loss terms averaged over the ranks
                dist.all_reduce(v)
                v /= 2
            tr.optimizer.step()
            # DDP's forward does not communicate: a rank without validation case in nnU-Net's final validation
            # (more ranks than cases) does not leave the others' first no-grad forward waiting for it
            with torch.no_grad():
                for _ in range(rank):
                    tr.network(_batch(gids)["data"])
            flag = torch.ones(1)
            dist.all_reduce(flag)
            after = {k: v.clone() for k, v in tr._unwrapped_network().state_dict().items()}
            result[name] = {"initial": initial, "terms": terms, "grads": grads, "after": after, "flag": flag}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # passed: skip Python's teardown of gloo's C++ objects, which can abort (tests/ddp_nt_xent.py)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_one_step_on_two_ranks_equals_one_process_on_the_global_batch(tmp_path, monkeypatch):
    root, out = str(tmp_path / "nnunet"), str(tmp_path / "out")
    os.makedirs(out)
    torch.multiprocessing.spawn(_rank, args=(free_port(), root, out), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, os.path.join(root, var))  # _trainer sets them
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in TRAINERS:
            r0, r1 = ranks[0][name], ranks[1][name]
            assert r0["flag"].item() == 2
            for k in r0["initial"]:  # rank 0's initial weights everywhere, the same weights after the step
                assert torch.equal(r0["initial"][k], r1["initial"][k]), k
                assert torch.equal(r0["after"][k], r1["after"][k]), k
            tr = _trainer(name, root)  # one process (no process group): the whole global batch
            assert not tr.is_ddp and tr.batch_size == GLOBAL_BATCH
            tr._unwrapped_network().load_state_dict(r0["initial"])
            terms, grads = _step(tr, name, list(range(GLOBAL_BATCH)))
            assert set(terms) == set(r0["terms"])
            for k, v in terms.items():
                torch.testing.assert_close(r0["terms"][k], v, rtol=1e-4, atol=1e-5, msg=f"{name} term {k}")
            net_scale = max(float(g.abs().max()) for g in grads.values())
            for k, g in grads.items():
                # summation order differs between a batch of 2 and one of 4: within 1e-3 of the tensor's scale.
                # A conv bias ahead of instance normalisation has a true gradient of zero, so its "scale" is
                # rounding noise: for such tensors the network's largest gradient sets the scale instead
                scale = max(float(g.abs().max()), 1e-3 * net_scale)
                torch.testing.assert_close(r0["grads"][k], g, rtol=0, atol=1e-3 * scale + 1e-7,
                                           msg=f"{name} gradient {k}")
                torch.testing.assert_close(r1["grads"][k], r0["grads"][k], rtol=0, atol=0)
    finally:
        torch.set_num_threads(old_threads)
