"""The full TopoMAE objective can be optimised: a few AdamW steps on one fixed batch (fixed mask)
lower the total loss, the topological term included."""
from __future__ import annotations

import os
import time
import types

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_topomae.architectures.topomae_net import TopoMAENetwork
from nnunet_topomae.architectures.vit3d import ViTConfig, token_size_from_plan
from nnunet_topomae.losses.spatial import octant_targets
from nnunet_topomae.losses.topological import TopologicalLoss
from nnunet_topomae.losses.topomae_loss import TopoMAELoss

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
PATCH = (24, 24, 24)
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]


def smooth_volume(seed: int) -> np.ndarray:
    """A few Gaussian blobs, z-scored like nnU-Net's normalisation."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in PATCH], indexing="ij"), -1)
    v = np.zeros(PATCH)
    for _ in range(4):
        c = rng.uniform(4, 20, 3)
        v += np.exp(-((g - c) ** 2).sum(-1) / (2 * rng.uniform(2.5, 4) ** 2))
    return ((v - v.mean()) / v.std()).astype(np.float32)


def build():
    token, _ = token_size_from_plan(PATCH, STRIDES)  # (4, 4, 4) -> 216 tokens
    cfg = ViTConfig(in_channels=1, patch_size=PATCH, token_size=token, embed_dim=48, depth=2, num_heads=3,
                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    kwargs = {
        "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": STRIDES, "n_conv_per_stage": [1] * 3,
        "n_conv_per_stage_decoder": [1] * 2, "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }
    cnn = get_network_from_plans(PLAIN, kwargs, REQ_IMPORT, 1, 1, allow_init=True, deep_supervision=True)
    return TopoMAENetwork(cfg, cnn, mask_ratio=0.75, spatial_heads=True)


def test_optimisation_lowers_the_total_loss():
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = build()
        x = torch.from_numpy(np.stack([smooth_volume(0), smooth_volume(1)]))[:, None]
        spatial = torch.from_numpy(np.stack([octant_targets((0, 8, 16), PATCH, (48, 40, 40)),
                                             octant_targets((24, 0, 4), PATCH, (48, 40, 40))]))
        mask, ids_keep = net.sample_mask(2, "cpu", torch.Generator().manual_seed(0))
        loss_fn = TopoMAELoss(topo_loss=TopologicalLoss(max_size=16, max_pairs=16))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        history = []
        t0 = time.time()
        for _ in range(15):
            opt.zero_grad(set_to_none=True)
            terms = loss_fn(net(x, mask, ids_keep), x, spatial)
            assert {"topo_vit", "topo_cnn"} <= set(terms)
            terms["loss"].backward()
            opt.step()
            history.append({k: float(v.detach()) for k, v in terms.items()})
        elapsed = time.time() - t0
    finally:
        torch.set_num_threads(old_threads)
    first, last = history[0]["loss"], history[-1]["loss"]
    assert np.isfinite([h["loss"] for h in history]).all()
    assert last < 0.6 * first, f"loss {first:.4f} -> {last:.4f}: " + str([round(h["loss"], 3) for h in history])
    for k in ("rec_vit", "rec_cnn", "topo_cnn", "rec_consistency"):
        assert history[-1][k] < history[0][k], f"{k}: {history[0][k]:.4f} -> {history[-1][k]:.4f}"
    assert elapsed < 20, f"15 steps took {elapsed:.1f} s"


def _bare_trainer(cls, batch_size: int = 2):
    """A trainer with only what ``_build_loss`` reads besides class attributes (nnU-Net's initialize()
    sets the batch size and input channels before it builds the loss)."""
    trainer = object.__new__(cls)
    trainer.batch_size, trainer.num_input_channels, trainer.is_ddp = batch_size, 1, False
    trainer.device = torch.device("cpu")
    return trainer


def test_pool_size_follows_the_batch_and_the_cores(monkeypatch):
    from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    class ViTOnly(nnUNetTrainerTopoMAEPretrain):
        use_cnn = False

    sizes = {}
    for cls, batch in ((nnUNetTrainerTopoMAEPretrain, 9), (nnUNetTrainerTopoMAEPretrain, 2), (ViTOnly, 2)):
        sizes[(cls.__name__, batch)] = _bare_trainer(cls, batch)._build_loss().topo_loss.workers
    # 16 cores: half of them, but no more than the step's reconstructions (batch x 2 branches; ViT only: 1)
    assert sizes == {("nnUNetTrainerTopoMAEPretrain", 9): 8, ("nnUNetTrainerTopoMAEPretrain", 2): 4, ("ViTOnly", 2): 2}

    class Fixed(nnUNetTrainerTopoMAEPretrain):
        topo_workers = 0

    assert _bare_trainer(Fixed, 9)._build_loss().topo_loss.workers == 0  # a set value is kept


def test_trainer_gives_loss_and_data_workers_one_reduction():
    # the inputs' diagrams (data-loading workers) and the reconstructions' (loss) must come from
    # volumes reduced the same way, or the matching compares diagrams of different resolutions
    from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain

    class Coarse(nnUNetTrainerTopoMAEPretrain):
        topo_max_size, topo_max_voxels = 24, 4096

    for cls in (nnUNetTrainerTopoMAEPretrain, Coarse):
        trainer = _bare_trainer(cls)
        trainer.loss = trainer._build_loss()
        topo, fn = trainer.loss.topo_loss, trainer.persistence_fn()
        assert (topo.max_size, topo.max_voxels) == (fn.max_size, fn.max_voxels) == (cls.topo_max_size,
                                                                                   cls.topo_max_voxels)
        assert (topo.dims, topo.max_pairs, topo.backend) == (fn.dims, fn.max_pairs, fn.backend)

    class NoTopo(nnUNetTrainerTopoMAEPretrain):
        w_topo = 0.0

    trainer = _bare_trainer(NoTopo)
    trainer.loss = trainer._build_loss()
    assert trainer.loss.topo_loss is None and trainer.persistence_fn() is None


def test_data_workers_run_at_idle_priority_only_on_the_cpu():
    # on a GPU the cores are free for nnU-Net's data loading, which must not wait behind other jobs
    from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain

    class Normal(nnUNetTrainerTopoMAEPretrain):
        topo_inputs_idle_priority_on_cpu = False

    got = {}
    for cls, device in ((nnUNetTrainerTopoMAEPretrain, "cpu"), (nnUNetTrainerTopoMAEPretrain, "cuda"),
                        (Normal, "cpu")):
        trainer = _bare_trainer(cls)
        trainer.device = torch.device(device)  # constructing a cuda device needs no GPU
        trainer.loss = trainer._build_loss()
        got[(cls.__name__, device)] = trainer.persistence_fn().low_priority
    assert got == {("nnUNetTrainerTopoMAEPretrain", "cpu"): True, ("nnUNetTrainerTopoMAEPretrain", "cuda"): False,
                   ("Normal", "cpu"): False}


def test_late_topo_computes_the_term_only_in_the_second_half():
    from nnunet_topomae.trainers import variants

    late = object.__new__(variants.nnUNetTrainerTopoMAEPretrain_lateTopo)
    calls = []

    class Net(torch.nn.Module):
        def forward(self, x):
            return {}

    late.device, late.network, late.num_epochs = torch.device("cpu"), Net().train(), 4
    late.loss = lambda out, x, spatial, topo_pairs=None, with_topo=True: calls.append(with_topo) or {}
    batch = {"data": torch.zeros(1), "spatial": torch.zeros(1)}
    for epoch in range(4):
        late.current_epoch = epoch
        late.network.train()
        late.compute_terms(batch)
        late.compute_terms(batch)
        late.network.eval()
        late.compute_terms(batch)  # validation always scores the term, so val losses stay comparable
    assert calls == [False, False, True] * 2 + [True, True, True] * 2


def test_speed_variants_change_only_their_setting(monkeypatch):
    import pytest

    from nnunet_topomae.errors import UserInputError
    from nnunet_topomae.losses import topological
    from nnunet_topomae.trainers import variants

    every2 = object.__new__(variants.nnUNetTrainerTopoMAEPretrain_topoEvery2)
    calls = []

    class Net(torch.nn.Module):
        def forward(self, x):
            return {}

    every2.device, every2.network = torch.device("cpu"), Net().train()
    every2.current_epoch, every2.num_epochs = 0, 4  # nnU-Net's __init__ sets both
    every2.loss = lambda out, x, spatial, topo_pairs=None, with_topo=True: calls.append(with_topo) or {}
    batch = {"data": torch.zeros(1), "spatial": torch.zeros(1)}
    for _ in range(5):
        every2.compute_terms(batch)
    every2.network.eval()
    every2.compute_terms(batch)  # validation always scores the term
    assert calls == [True, False, True, False, True, True]
    every2.loss = types.SimpleNamespace(topo_loss=topological.TopologicalLoss())
    assert every2.persistence_fn() is None  # inputs' persistence on the step, only when the term is computed

    cripser = _bare_trainer(variants.nnUNetTrainerTopoMAEPretrain_cripser)
    monkeypatch.setattr(topological, "available_backends", lambda: ["gudhi"])
    with pytest.raises(UserInputError, match="pip install cripser"):
        cripser._build_loss()
    monkeypatch.setattr(topological, "available_backends", lambda: ["gudhi", "cripser"])
    loss = cripser._build_loss()
    assert loss.topo_loss.backend == "cripser"
    cripser.loss = loss
    assert cripser.persistence_fn().backend == "cripser"  # the data-loading workers use it too
