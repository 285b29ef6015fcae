"""Unit tests of nnUNetTrainerHybridMIMPretrain and its ablations (CPU, no data on disk).

The trainers are built from synthetic plans dicts exactly as nnU-Net builds them (``__init__`` with
the plans, ``build_network_architecture``, ``_build_loss``); only ``initialize`` (which needs
preprocessed data) is replaced by setting the network, loss and optimiser directly.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_topomae.architectures.hybridmim_net import HybridMIMNetwork
from nnunet_topomae.trainers.hybridmim_pretrain import nnUNetTrainerHybridMIMPretrain
from nnunet_topomae.trainers.hybridmim_variants import (
    nnUNetTrainerHybridMIMPretrain_noContrast,
    nnUNetTrainerHybridMIMPretrain_noPartial,
    nnUNetTrainerHybridMIMPretrain_noPerception,
)
from nnunet_topomae.utils import synthetic_plans
from nnunet_topomae.utils.checkpoint import state_dict_to_cpu
from ddp_nt_xent import check_gathered_nt_xent



class _ZeroWeights(nnUNetTrainerHybridMIMPretrain):
    """Disabling objectives by weight instead of flag must also drop their heads."""
    w_contrast = 0.0
    w_count = w_position = w_consistency = 0.0


ALL_TRAINERS = [nnUNetTrainerHybridMIMPretrain, nnUNetTrainerHybridMIMPretrain_noPartial,
                nnUNetTrainerHybridMIMPretrain_noContrast, nnUNetTrainerHybridMIMPretrain_noPerception,
                _ZeroWeights]
PLAIN, RESENC = synthetic_plans.PLAIN, synthetic_plans.RESENC
ISO = ((32, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
ANISO = ((12, 48, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]])  # last stride [1,2,2]: 4 cubes
HEADS = ("perception_count.", "perception_position.", "projection.")


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def make_plans(patch, strides, arch=PLAIN, features=(8, 16, 32, 48), batch_size=2, channels=1):
    return synthetic_plans.plans(patch, strides, features, arch, batch_size, channels,
                                 dataset_name="Dataset990_HybridUnit", n_conv=1 if arch == RESENC else 2)


DATASET_JSON = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2},
                "numTraining": 4, "file_ending": ".nii.gz"}


def make_trainer(cls, plans, tmp_path, monkeypatch, channels=1, seed=0):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    dj = copy.deepcopy(DATASET_JSON)
    dj["channel_names"] = {str(c): f"MR{c}" for c in range(channels)}
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    tr = cls(plans, "3d_fullres", 0, dj, torch.device("cpu"))
    torch.manual_seed(seed)
    tr.num_input_channels = channels
    tr.network = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, channels,
                                               tr.label_manager.num_segmentation_heads, tr.enable_deep_supervision)
    tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
    tr.loss = tr._build_loss()
    tr.set_deep_supervision_enabled(tr.enable_deep_supervision)
    return tr


def smooth_batch(b, patch, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, channels, *[p + 8 for p in patch], generator=g)
    x = F.avg_pool3d(x, 9, stride=1)[(Ellipsis, *[slice(0, p) for p in patch])]
    return (x - x.mean()) / x.std()


# --------------------------------------------------------------------------- network = the plan's CNN
@pytest.mark.parametrize("arch", [PLAIN, RESENC])
@pytest.mark.parametrize("geom", [ISO, ANISO], ids=["iso", "aniso"])
def test_network_keys_are_the_stock_cnn_and_stock_loader_accepts_them(arch, geom, tmp_path, monkeypatch):
    patch, strides = geom
    plans = make_plans(patch, strides, arch=arch, channels=2)
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain, plans, tmp_path, monkeypatch, channels=2)
    net = tr.network
    assert isinstance(net, HybridMIMNetwork)
    # what the stock trainer builds for finetuning (3 segmentation outputs, deep supervision on)
    pm = PlansManager(copy.deepcopy(plans))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(5)
    stock = nnUNetTrainer.build_network_architecture(pm, cm, 2, 3, True)
    own = {k: v.shape for k, v in net.state_dict().items()}
    ref = {k: v.shape for k, v in stock.state_dict().items()}
    assert {k for k in own if not k.startswith(HEADS)} == set(ref)
    assert all(k.startswith(("encoder.", "decoder.")) or k.startswith(HEADS) for k in own)
    for k, shape in ref.items():
        if ".seg_layers." not in k:
            assert own[k] == shape, k
    # the stock -pretrained_weights loader: every non-seg_layers tensor equal afterwards
    fname = str(tmp_path / "checkpoint_final.pth")
    torch.save({"network_weights": state_dict_to_cpu(net.state_dict())}, fname)
    before = {k: v.clone() for k, v in stock.state_dict().items()}
    load_pretrained_weights(stock, fname)
    n = 0
    for k, v in stock.state_dict().items():
        if ".seg_layers." in k:
            assert torch.equal(v, before[k])
        else:
            assert torch.equal(v, net.state_dict()[k]), k
            n += 1
    assert n == len([k for k in ref if ".seg_layers." not in k]) > 10


def test_geometry_follows_plan(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain, make_plans(*ANISO), tmp_path, monkeypatch)
    g = tr.geometry
    assert g.subvolume_size == (2, 8, 8) and g.subvolume_grid == (6, 6, 6)
    assert g.cubes_per_subvolume == (1, 2, 2) and g.n_cubes == 4
    assert tr.network.perception_count.out_channels == 5
    cm, vm = tr.sample_masks(3)
    assert cm.shape == (3, 6, 6, 6, 4)
    assert torch.all(cm.flatten(1).sum(1) == round(0.4 * g.total_cubes))
    assert vm.shape == (3, 1, *ANISO[0])


# --------------------------------------------------------------------------- deep supervision / DDP needs
@pytest.mark.parametrize("cls", ALL_TRAINERS, ids=lambda c: c.__name__.split("_")[-1] or "zeroWeights")
def test_every_parameter_gets_a_gradient(cls, tmp_path, monkeypatch):
    tr = make_trainer(cls, make_plans(*ISO), tmp_path, monkeypatch)
    net = tr.network
    names = [k for k, _ in net.named_parameters()]
    assert any(".seg_layers.0." in k for k in names) and any(".seg_layers.2." in k for k in names)
    if cls.contrast_on():
        assert hasattr(net, "projection")
    else:
        assert not hasattr(net, "projection") and not any(k.startswith("projection.") for k in names)
    if cls.perception_on():
        assert hasattr(net, "perception_count") and hasattr(net, "perception_position")
    else:
        assert not any(k.startswith(("perception_count.", "perception_position.")) for k in names)
    net.train()
    torch.manual_seed(1)
    terms = tr.compute_terms({"data": smooth_batch(2, ISO[0])})
    expected = {"rec", "loss"} | ({"count", "position", "consistency"} if cls.perception_on() else set()) \
        | ({"contrast"} if cls.contrast_on() else set())
    assert set(terms) == expected
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    missing = [k for k, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    # the weighted sum uses the released weights
    w = dict(rec=cls.w_rec, count=cls.w_count, position=cls.w_position, consistency=cls.w_consistency,
             contrast=cls.w_contrast)
    total = sum(w[k] * v for k, v in terms.items() if k != "loss")
    torch.testing.assert_close(terms["loss"], total)


def test_partial_decoding_decodes_the_box_only(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain, make_plans(*ISO), tmp_path, monkeypatch)
    net = tr.network.train()
    x = smooth_batch(2, ISO[0])
    torch.manual_seed(0)
    boxes = {tr.sample_box() for _ in range(30)}
    assert len(boxes) > 1  # random each step
    for lb, ub in boxes:
        assert tuple(u - l for l, u in zip(lb, ub)) == (3, 3, 3)  # round(4 * 2/3) sub-volumes per axis
    box = ((1, 0, 1), (4, 3, 4))
    out = net(x, box=box, second_view=True)
    assert out["recon"].shape == (2, 1, 24, 24, 24)
    assert [tuple(r.shape[2:]) for r in out["recon_ds"]] == [(24, 24, 24), (12, 12, 12), (6, 6, 6)]
    assert out["projection2"].shape == out["projection"].shape == (2, 384)
    assert out["projection2"].requires_grad  # the projection head learns from the second view too
    # the reconstruction term scores the box only: a perfect reconstruction inside it gives 0
    cm, vm = tr.sample_masks(2)
    fake = {"recon": x[..., 8:32, 0:24, 8:32].clone(),
            "recon_ds": [x[..., 8:32, 0:24, 8:32].clone()]}
    tr.loss.w.update(count=0.0, position=0.0, consistency=0.0, contrast=0.0)
    assert tr.loss(fake, x, vm, cm, box)["rec"].item() == 0.0
    assert tr.loss(fake, x, vm, cm, ((0, 0, 1), (3, 3, 4)))["rec"].item() > 0.1
    # validation (eval mode) and _noPartial decode the whole patch
    net.eval()
    assert tr.sample_box() is None
    tr2 = make_trainer(nnUNetTrainerHybridMIMPretrain_noPartial, make_plans(*ISO), tmp_path, monkeypatch)
    tr2.network.train()
    assert tr2.sample_box() is None


def test_set_deep_supervision_enabled_switches_the_decoder(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain, make_plans(*ISO), tmp_path, monkeypatch)
    x = smooth_batch(1, ISO[0])
    tr.set_deep_supervision_enabled(False)
    assert tr.network.decoder.deep_supervision is False
    out = tr.network(x)
    assert "recon_ds" not in out and out["recon"].shape == (1, 1, *ISO[0])
    tr.set_deep_supervision_enabled(True)
    out = tr.network(x)
    assert len(out["recon_ds"]) == 3 and out["recon"] is out["recon_ds"][0]


# --------------------------------------------------------------------------- contrastive second view
def test_second_view_equals_a_no_grad_encoder_pass(tmp_path, monkeypatch):
    """nnU-Net's CNN has no dropout layers, so the reused (detached) bottleneck is exactly what the
    released no-grad second encoder pass computes; with a dropout layer the encoder runs again."""
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain, make_plans(*ISO), tmp_path, monkeypatch)
    net = tr.network.train()
    x = smooth_batch(2, ISO[0])
    assert not net._encoder_is_stochastic()
    out = net(x, second_view=True)
    torch.manual_seed(7)
    reused = net._project(out["bottleneck"].detach())
    torch.manual_seed(7)
    explicit = net.projection_only(x)
    torch.testing.assert_close(reused, explicit)
    assert not torch.allclose(out["projection"], out["projection2"])  # different dropout draws
    # the encoder gets no gradient from the second view, the projection head does
    net.zero_grad()
    out["projection2"].sum().backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert net.projection[0].weight.grad is not None
    # an encoder with active dropout is run a second time (no grad)
    net.encoder.stages[0].append(torch.nn.Dropout3d(0.2))
    assert net._encoder_is_stochastic()
    calls = []
    h = net.encoder.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    net(x, second_view=True)
    h.remove()
    assert calls == [True, False]


def test_every_parameter_gets_a_gradient_under_autocast(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain, make_plans(*ISO), tmp_path, monkeypatch)
    tr.network.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = tr.compute_terms({"data": smooth_batch(2, ISO[0])})
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tr.network.parameters())


def test_contrast_negatives_gathered_across_ranks_with_uneven_batches():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    check_gathered_nt_xent([3, 2])  # nnU-Net splits a batch of 5 as 3 + 2


# --------------------------------------------------------------------------- optimisation
def test_loss_decreases_on_a_fixed_batch(tmp_path, monkeypatch):
    """The trainer's loss composition (masking, random box, forward, HybridMIMLoss) through its own
    train_step and AdamW optimiser lowers the total loss on a fixed batch."""
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain, make_plans(*ISO), tmp_path, monkeypatch)
    for g in tr.optimizer.param_groups:
        g["lr"] = 3e-3
    x = smooth_batch(2, ISO[0], seed=3)
    batch = {"data": x}

    def evaluate():
        tr.network.train()
        torch.manual_seed(1234)  # same masks, box and dropout draws every time
        with torch.no_grad():
            return {k: v.item() for k, v in tr.compute_terms(batch).items()}

    start = evaluate()
    history = []
    for step in range(25):
        torch.manual_seed(step)
        tr.network.train()
        history.append(float(tr.train_step(batch)["loss"]))
    end = evaluate()
    assert all(map(lambda v: v == v, history))
    assert end["loss"] < 0.7 * start["loss"], (start, end)
    assert end["rec"] < start["rec"] and end["count"] < start["count"] and end["position"] < start["position"]


def test_pretraining_record(tmp_path, monkeypatch):
    tr = make_trainer(nnUNetTrainerHybridMIMPretrain_noPerception, make_plans(*ANISO), tmp_path, monkeypatch)
    rec = tr.pretraining_record()
    assert rec["method"] == "hybridmim" and rec["mask_ratio"] == 0.4
    assert rec["trainer"] == "nnUNetTrainerHybridMIMPretrain_noPerception"
    assert rec["perception"] is False and rec["contrast"] is True and rec["partial"] is True
    g = rec["mask_geometry"]
    assert g["subvolume_grid"] == [6, 6, 6] and g["cubes_per_subvolume"] == [1, 2, 2] and g["n_cubes"] == 4
    assert g["strides"] == ANISO[1]
    assert rec["loss_weights"] == dict(rec=1.0, count=0.0, position=0.0, consistency=0.0, contrast=0.1)
    torch.save(rec, tmp_path / "rec.pth")  # plain python types only
    assert torch.load(tmp_path / "rec.pth", weights_only=True) == rec


def test_class_attributes_are_the_released_weights():
    t = nnUNetTrainerHybridMIMPretrain
    assert (t.w_rec, t.w_count, t.w_position, t.w_consistency, t.w_contrast) == (1.0, 0.1, 0.1, 0.01, 0.1)
    assert t.mask_ratio == 0.4 and t.temperature == 0.5 and t.partial
    assert not nnUNetTrainerHybridMIMPretrain_noPartial.partial
