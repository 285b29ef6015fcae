"""Tests for the 3D ViT-MAE (token size from the plan, patchify, encoder/decoder) and TopoMAENetwork."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_topomae.architectures.topomae_net import TopoMAENetwork
from nnunet_topomae.architectures.vit3d import (
    MAEDecoder3D,
    ViTConfig,
    ViTEncoder3D,
    patchify,
    token_size_from_plan,
    unpatchify,
)
from nnunet_topomae.losses.topological import TopologicalLoss
from nnunet_topomae.losses.topomae_loss import TopoMAELoss
from nnunet_topomae.masking.token_masking import random_token_mask
from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain
from nnunet_topomae.trainers.variants import nnUNetTrainerMAEPretrain
from nnunet_topomae.utils import synthetic_plans

PLAIN, REQ_IMPORT = synthetic_plans.PLAIN, synthetic_plans.REQ_IMPORT
ANISO = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def plain_kwargs(strides, features):
    return synthetic_plans.arch_kwargs(strides, features)


def small_cnn(strides, in_ch, deep_supervision=True):
    feats = [8 * 2 ** i for i in range(len(strides))]
    return get_network_from_plans(PLAIN, plain_kwargs(strides, feats), REQ_IMPORT, in_ch, in_ch,
                                  allow_init=True, deep_supervision=deep_supervision)


def small_cfg(in_ch, patch, token):
    return ViTConfig(in_channels=in_ch, patch_size=tuple(patch), token_size=tuple(token), embed_dim=48, depth=2,
                     num_heads=3, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


# ----------------------------------------------------------------------------- token size

def test_token_size_isotropic():
    token, stage = token_size_from_plan((40, 56, 40), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    assert token == (8, 8, 8) and stage == 3


def test_token_size_capped_at_16_for_deep_plans():
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 5  # cumulative 1, 2, 4, 8, 16, 32
    token, stage = token_size_from_plan((128, 128, 128), strides)
    assert token == (16, 16, 16) and stage == 4


def test_token_size_anisotropic():
    # nnU-Net-like anisotropic plan: cumulative strides (1,1,1) (1,2,2) (2,4,4) (4,8,8) (4,16,16)
    token, stage = token_size_from_plan((20, 192, 160), ANISO)
    assert token == (4, 16, 16) and stage == 4
    assert all(p % t == 0 for p, t in zip((20, 192, 160), token))
    # one more in-plane stage (4, 32, 32) exceeds 16 in-plane -> still stage 4
    token, stage = token_size_from_plan((20, 192, 160), ANISO + [[1, 2, 2]])
    assert token == (4, 16, 16) and stage == 4
    # max_token lower -> shallower stage
    token, stage = token_size_from_plan((20, 192, 160), ANISO, max_token=8)
    assert token == (4, 8, 8) and stage == 3


def test_token_size_inconsistent_plan_raises():
    with pytest.raises(ValueError, match="does not divide"):
        token_size_from_plan((20, 190, 160), ANISO)


# ----------------------------------------------------------------------------- patchify

def test_patchify_unpatchify_round_trip_and_raster_order():
    token, grid, c = (2, 4, 3), (3, 2, 4), 2
    x = torch.randn(2, c, *(g * t for g, t in zip(grid, token)))
    tok = patchify(x, token)
    assert tok.shape == (2, int(np.prod(grid)), int(np.prod(token)) * c)
    assert torch.equal(unpatchify(tok, token, grid, c), x)
    # token n is the block at np.unravel_index(n, grid), voxels in (tx, ty, tz, C) order
    for n in (0, 5, 23):
        gx, gy, gz = np.unravel_index(n, grid)
        block = x[1, :, gx * 2:(gx + 1) * 2, gy * 4:(gy + 1) * 4, gz * 3:(gz + 1) * 3]
        assert torch.equal(tok[1, n], block.permute(1, 2, 3, 0).reshape(-1))


# ----------------------------------------------------------------------------- encoder / decoder

def test_encoder_decoder_shapes_anisotropic_two_channels():
    patch = (8, 32, 24)
    token, _ = token_size_from_plan(patch, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]])  # (2, 8, 8)
    cfg = small_cfg(2, patch, token)
    assert cfg.grid == (4, 4, 3) and cfg.num_tokens == 48 and cfg.token_voxels == 2 * 8 * 8 * 2
    enc, dec = ViTEncoder3D(cfg), MAEDecoder3D(cfg)
    x = torch.randn(3, 2, *patch)
    g = torch.Generator().manual_seed(0)
    mask, ids_keep = random_token_mask(3, cfg.num_tokens, 0.75, g)
    latent = enc(x, ids_keep)
    assert latent.shape == (3, 12, 48)
    assert enc(x).shape == (3, 48, 48)
    outs = enc(x, ids_keep, return_all=True)
    assert len(outs) == cfg.depth and all(o.shape == (3, 12, 48) for o in outs)
    assert torch.equal(outs[-1], latent)
    assert dec(latent, ids_keep).shape == (3, 2, *patch)
    # the encoder never sees the masked voxels
    vmask = torch.repeat_interleave(torch.repeat_interleave(torch.repeat_interleave(
        mask.float().reshape(3, 1, *cfg.grid), 2, 2), 8, 3), 8, 4)
    x2 = x + 100 * vmask * torch.randn_like(x)
    torch.testing.assert_close(enc(x2, ids_keep), latent)


def test_vit_config_dict_round_trip():
    cfg = small_cfg(2, (8, 32, 24), (2, 8, 8))
    d = cfg.to_dict()
    assert d["patch_size"] == [8, 32, 24] and d["token_size"] == [2, 8, 8]
    assert ViTConfig.from_dict(d) == cfg


# ----------------------------------------------------------------------------- TopoMAENetwork

PATCH = (8, 32, 24)
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]


def topomae_net(in_ch=2, cnn=True, spatial=True, deep_supervision=True):
    token, _ = token_size_from_plan(PATCH, STRIDES)  # (2, 4, 4)
    return TopoMAENetwork(small_cfg(in_ch, PATCH, token),
                          small_cnn(STRIDES, in_ch, deep_supervision) if cnn else None, 0.75, spatial)


def test_topomae_network_outputs():
    torch.manual_seed(0)
    net = topomae_net()
    x = torch.randn(2, 2, *PATCH)
    out = net(x)
    assert set(out) == {"voxel_mask", "vit_recon", "vit_coords", "cnn_recon", "cnn_coords"}
    assert out["voxel_mask"].shape == (2, 1, *PATCH)
    assert out["voxel_mask"].mean().item() == pytest.approx(0.75)  # 0.75 * 192 tokens = 144 exactly
    assert out["vit_recon"].shape == (2, 2, *PATCH)
    assert out["vit_coords"].shape == (2, 27) and out["cnn_coords"].shape == (2, 27)
    assert isinstance(out["cnn_recon"], (list, tuple)) and len(out["cnn_recon"]) == len(STRIDES) - 1
    assert out["cnn_recon"][0].shape == (2, 2, *PATCH)
    assert out["cnn_recon"][1].shape == (2, 2, 8, 16, 12)


def test_topomae_network_without_deep_supervision_returns_a_tensor():
    out = topomae_net(deep_supervision=False)(torch.randn(1, 2, *PATCH))
    assert isinstance(out["cnn_recon"], torch.Tensor) and out["cnn_recon"].shape == (1, 2, *PATCH)


def test_mae_baseline_config_gives_only_vit_keys():
    out = topomae_net(cnn=False, spatial=False)(torch.randn(2, 2, *PATCH))
    assert set(out) == {"voxel_mask", "vit_recon"}


def test_no_output_depends_on_masked_voxels():
    torch.manual_seed(0)
    net = topomae_net()
    x = torch.randn(2, 2, *PATCH)
    mask, ids_keep = net.sample_mask(2, "cpu", torch.Generator().manual_seed(1))
    out = net(x, mask, ids_keep)
    x2 = x + 50 * out["voxel_mask"] * torch.randn_like(x)
    out2 = net(x2, mask, ids_keep)
    for k in ("vit_recon", "vit_coords", "cnn_coords"):
        torch.testing.assert_close(out2[k], out[k])
    for a, b in zip(out2["cnn_recon"], out["cnn_recon"]):
        torch.testing.assert_close(a, b)


def _configuration_manager(in_patch=PATCH, strides=STRIDES):
    feats = [8 * 2 ** i for i in range(len(strides))]
    return ConfigurationManager({
        "patch_size": list(in_patch), "batch_size": 2, "data_identifier": "x", "preprocessor_name": "x",
        "architecture": {"network_class_name": PLAIN, "arch_kwargs": plain_kwargs(strides, feats),
                         "_kw_requires_import": REQ_IMPORT}})


def test_trainer_network_builders():
    """The trainers' build_network_architecture: both branches reconstruct the input channels (not the
    label count); the MAE baseline has no CNN and no spatial head."""
    cm = _configuration_manager()
    x = torch.randn(1, 2, *PATCH)
    net = nnUNetTrainerTopoMAEPretrain.build_network_architecture(None, cm, 2, 5, True)
    out = net(x)
    assert set(out) == {"voxel_mask", "vit_recon", "vit_coords", "cnn_recon", "cnn_coords"}
    assert net.vit_cfg.token_size == (2, 4, 4)
    assert [o.shape[1] for o in out["cnn_recon"]] == [2, 2]
    mae = nnUNetTrainerMAEPretrain.build_network_architecture(None, cm, 2, 5, True)
    assert mae.cnn is None
    assert set(mae(x)) == {"voxel_mask", "vit_recon"}


def _trainer_loss(trainer_cls, max_size=16, max_pairs=8):
    """The loss exactly as the trainer configures it (``_build_loss`` only reads class attributes)."""
    class Cfg(trainer_cls):
        topo_max_size = max_size
        topo_max_pairs = max_pairs
        topo_workers = 0  # persistence in this process (the worker pool is tested separately)
    return trainer_cls._build_loss(Cfg)


@pytest.mark.parametrize("variant", ["topomae", "mae", "noSpatial", "noTopo", "lowTopo"])
def test_every_parameter_gets_a_gradient(variant):
    """DDP without find_unused_parameters needs a gradient for every parameter each step."""
    from nnunet_topomae.trainers import variants
    cls = {"topomae": nnUNetTrainerTopoMAEPretrain, "mae": variants.nnUNetTrainerMAEPretrain,
           "noSpatial": variants.nnUNetTrainerTopoMAEPretrain_noSpatial,
           "noTopo": variants.nnUNetTrainerTopoMAEPretrain_noTopo,
           "lowTopo": variants.nnUNetTrainerTopoMAEPretrain_lowTopo}[variant]
    torch.manual_seed(0)
    net = cls.build_network_architecture(None, _configuration_manager(), 1, 3, True)
    loss_fn = _trainer_loss(cls)
    x = torch.randn(2, 1, *PATCH)
    terms = loss_fn(net(x), x, torch.rand(2, 27) * 2 - 1)
    terms["loss"].backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    expected = {"topomae": {"rec_vit", "rec_cnn", "topo_vit", "topo_cnn", "spatial_vit", "spatial_cnn",
                            "rec_consistency", "spatial_consistency"},
                "mae": {"rec_vit"},
                "noSpatial": {"rec_vit", "rec_cnn", "topo_vit", "topo_cnn", "rec_consistency"},
                "noTopo": {"rec_vit", "rec_cnn", "spatial_vit", "spatial_cnn", "rec_consistency",
                           "spatial_consistency"}}
    expected["lowTopo"] = expected["topomae"]
    expected = expected[variant]
    assert set(terms) == expected | {"loss"}


def test_loss_terms_weighted_sum():
    torch.manual_seed(0)
    net = topomae_net(in_ch=1)
    loss_fn = TopoMAELoss(w_rec=1.0, w_topo=0.3, w_spatial=0.2, w_rec_consistency=0.5, w_spatial_consistency=0.7,
                          topo_loss=TopologicalLoss(max_size=16, max_pairs=8))
    x = torch.randn(2, 1, *PATCH)
    t = loss_fn(net(x), x, torch.zeros(2, 27))
    expected = (t["rec_vit"] + t["rec_cnn"] + 0.3 * (t["topo_vit"] + t["topo_cnn"])
                + 0.2 * (t["spatial_vit"] + t["spatial_cnn"]) + 0.5 * t["rec_consistency"]
                + 0.7 * t["spatial_consistency"])
    torch.testing.assert_close(t["loss"], expected)


def test_loss_with_persistence_worker_pool_matches_in_process():
    """The trainer's default computes the reconstructions' persistence in a process pool; values and
    gradients must be those of the in-process computation."""
    torch.manual_seed(0)
    net = topomae_net(in_ch=1)
    x = torch.randn(2, 1, *PATCH)
    target = torch.rand(2, 27)
    results = []
    for workers in (0, 2):
        topo = TopologicalLoss(max_size=16, max_pairs=8, workers=workers)
        try:
            net.zero_grad(set_to_none=True)
            mask, ids_keep = net.sample_mask(2, "cpu", torch.Generator().manual_seed(3))
            terms = TopoMAELoss(topo_loss=topo)(net(x, mask, ids_keep), x, target)
            terms["loss"].backward()
            results.append(({k: v.item() for k, v in terms.items()},
                            {n: p.grad.clone() for n, p in net.named_parameters()}))
        finally:
            if topo._pool is not None:
                topo._pool.close()
    (t0, g0), (t1, g1) = results
    assert t0.keys() == t1.keys() and {"topo_vit", "topo_cnn"} <= set(t0)
    for k in t0:
        assert t1[k] == pytest.approx(t0[k], rel=1e-5, abs=1e-6), k
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
