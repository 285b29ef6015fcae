"""Unit tests for the HybridMIM components (two-level masking, network, perception + contrastive losses)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_topomae.architectures.hybridmim_net import HybridMIMNetwork, box_to_voxel_slices, sample_box
from nnunet_topomae.losses.contrastive import gather_with_grad, nt_xent
from nnunet_topomae.losses.perception import PatchMaskingPerceptionLoss, released_consistency
from nnunet_topomae.masking.two_level import (
    MaskGeometry,
    apply_voxel_mask,
    cube_mask_to_voxels,
    perception_targets,
    sample_cube_mask,
)
from nnunet_topomae.utils import synthetic_plans
from ddp_nt_xent import check_gathered_nt_xent


pytestmark = pytest.mark.usefixtures("single_threaded_torch")


PLAIN, RESENC, REQ_IMPORT = synthetic_plans.PLAIN, synthetic_plans.RESENC, synthetic_plans.REQ_IMPORT
ISO4 = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
ANISO5 = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]


def plain_kwargs(strides, features=None, kernel=3, norm=synthetic_plans.INSTANCE_NORM, n_dec=1):
    """arch_kwargs as an nnU-Net plans file holds them (small widths, two convolutions per stage)."""
    return synthetic_plans.arch_kwargs(strides, features, n_conv=2, n_conv_decoder=n_dec, kernel=kernel, norm=norm)


def resenc_kwargs(strides):
    return synthetic_plans.arch_kwargs(strides, arch=RESENC)


def build_cnn(kwargs, in_ch=1, out_ch=None, arch=PLAIN, deep_supervision=False, seed=0):
    torch.manual_seed(seed)
    return get_network_from_plans(
        arch, kwargs, REQ_IMPORT, in_ch, in_ch if out_ch is None else out_ch,
        allow_init=True, deep_supervision=deep_supervision,
    )


def _masked_mse(pred, target, voxel_mask):
    """HybridMIM reconstruction loss: MSE over masked voxels only (private test helper)."""
    m = voxel_mask.expand_as(pred)
    return ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- geometry
def test_geometry_isotropic_40x56x40():
    g = MaskGeometry.from_plan((40, 56, 40), ISO4)
    assert g.patch_size == (40, 56, 40)
    assert g.subvolume_size == (8, 8, 8)
    assert g.subvolume_grid == (5, 7, 5)
    assert g.cubes_per_subvolume == (2, 2, 2)
    assert g.n_cubes == 8
    assert g.cube_size == (4, 4, 4)
    assert g.total_cubes == 5 * 7 * 5 * 8


def test_geometry_96_five_stride2_stages_matches_released_layout():
    # released code: 96^3 patch, 3x3x3 regions of 2x2x2 cubes of 16^3 (a 6x6x6 cube grid)
    g = MaskGeometry.from_plan((96, 96, 96), [[1, 1, 1]] + [[2, 2, 2]] * 5)
    assert g.subvolume_size == (32, 32, 32)
    assert g.subvolume_grid == (3, 3, 3)
    assert g.cube_size == (16, 16, 16)
    assert g.cube_grid == (6, 6, 6)
    assert g.n_cubes == 8 and g.total_cubes == 216
    assert g.n_masked(0.4) == 86


def test_geometry_anisotropic():
    g = MaskGeometry.from_plan((20, 64, 64), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]])
    assert g.subvolume_size == (4, 8, 8)
    assert g.subvolume_grid == (5, 8, 8)
    assert g.cubes_per_subvolume == (2, 2, 2)
    assert g.cube_size == (2, 4, 4)
    g2 = MaskGeometry.from_plan((20, 64, 64), ANISO5)
    assert g2.subvolume_size == (4, 16, 16)
    assert g2.subvolume_grid == (5, 4, 4)
    assert g2.cubes_per_subvolume == (1, 2, 2)
    assert g2.n_cubes == 4
    assert g2.cube_size == (4, 8, 8)


def test_geometry_not_divisible_raises():
    with pytest.raises(ValueError, match="not divisible"):
        MaskGeometry.from_plan((40, 50, 40), ISO4)
    with pytest.raises(ValueError):
        MaskGeometry.from_plan((40, 56, 40), [[1, 1], [2, 2]])


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize(
    "patch,strides",
    [((40, 56, 40), ISO4), ((20, 64, 64), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]), ((20, 64, 64), ANISO5)],
)
def test_voxel_mask_blocks_match_cube_mask(patch, strides):
    g = MaskGeometry.from_plan(patch, strides)
    gen = torch.Generator().manual_seed(1)
    cm = sample_cube_mask(2, g, 0.4, generator=gen)
    assert cm.dtype == torch.bool and cm.shape == (2, *g.subvolume_grid, g.n_cubes)
    vm = cube_mask_to_voxels(cm, g)
    assert vm.shape == (2, 1, *patch) and vm.dtype == torch.float32
    vm_np, cm_np = vm.numpy(), cm.numpy()
    covered = np.zeros(vm_np.shape, dtype=np.int64)
    for b in range(2):
        for gi in np.ndindex(*g.subvolume_grid):
            for j in range(g.n_cubes):
                local = np.unravel_index(j, g.cubes_per_subvolume)  # C-order local index
                start = [gi[a] * g.subvolume_size[a] + local[a] * g.cube_size[a] for a in range(3)]
                sl = tuple(slice(s, s + c) for s, c in zip(start, g.cube_size))
                block = vm_np[(b, 0) + sl]
                # the block lies inside sub-volume gi
                for a in range(3):
                    lo = gi[a] * g.subvolume_size[a]
                    assert lo <= sl[a].start and sl[a].stop <= lo + g.subvolume_size[a]
                assert np.all(block == float(cm_np[(b,) + gi + (j,)]))
                covered[(b, 0) + sl] += 1
    assert np.all(covered == 1)  # cubes tile the patch exactly


def test_mask_ratio_exact_and_random():
    g = MaskGeometry.from_plan((40, 56, 40), ISO4)
    for ratio in (0.0, 0.25, 0.4, 0.75, 1.0):
        cm = sample_cube_mask(4, g, ratio, generator=torch.Generator().manual_seed(3))
        per_sample = cm.flatten(1).sum(1)
        assert torch.all(per_sample == round(ratio * g.total_cubes))
        vm = cube_mask_to_voxels(cm, g)
        assert torch.allclose(vm.flatten(1).mean(1), per_sample.float() / g.total_cubes)
    cm = sample_cube_mask(4, g, 0.4, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(cm[0], cm[1])
    assert torch.equal(cm, sample_cube_mask(4, g, 0.4, generator=torch.Generator().manual_seed(3)))
    # all count classes should be reachable -> counts vary across sub-volumes
    count, _ = perception_targets(cm)
    assert count.unique().numel() >= 4


def test_perception_targets_equal_mask():
    g = MaskGeometry.from_plan((20, 64, 64), ANISO5)
    cm = sample_cube_mask(3, g, 0.5, generator=torch.Generator().manual_seed(0))
    count, position = perception_targets(cm)
    assert count.dtype == torch.long and count.shape == (3, *g.subvolume_grid)
    assert position.dtype == torch.float32 and position.shape == (3, *g.subvolume_grid, g.n_cubes)
    assert count.min() >= 0 and count.max() <= g.n_cubes
    for b in range(3):
        for gi in np.ndindex(*g.subvolume_grid):
            assert count[(b,) + gi].item() == int(cm[(b,) + gi].sum())
            assert position[(b,) + gi].tolist() == [float(v) for v in cm[(b,) + gi].tolist()]
    # counts also equal the number of masked cube blocks found in the voxel mask
    vm = cube_mask_to_voxels(cm, g)
    pooled = F.avg_pool3d(vm, kernel_size=g.cube_size, stride=g.cube_size)
    per_sub = F.avg_pool3d(pooled, kernel_size=g.cubes_per_subvolume) * g.n_cubes
    assert torch.allclose(per_sub[:, 0], count.float())


def test_apply_voxel_mask():
    g = MaskGeometry.from_plan((16, 16, 16), [[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    x = torch.randn(2, 2, 16, 16, 16) + 5
    vm = cube_mask_to_voxels(sample_cube_mask(2, g, 0.5, generator=torch.Generator().manual_seed(0)), g)
    xm = apply_voxel_mask(x, vm, 0.0)
    assert torch.all(xm[vm.expand_as(x) == 1] == 0)
    assert torch.equal(xm[vm.expand_as(x) == 0], x[vm.expand_as(x) == 0])


# --------------------------------------------------------------------------- network
def test_box_sampling_and_slices():
    g = MaskGeometry.from_plan((40, 56, 40), ISO4)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        lb, ub = sample_box(g, generator=gen)
        assert tuple(u - l for l, u in zip(lb, ub)) == (3, 5, 3)  # round(5*2/3)=3, round(7*2/3)=5
        assert all(0 <= l and u <= s for l, u, s in zip(lb, ub, g.subvolume_grid))
        seen.add(lb)
    assert len(seen) > 5
    assert box_to_voxel_slices(((1, 2, 0), (4, 7, 3)), g) == (slice(8, 32), slice(16, 56), slice(0, 24))
    tiny = MaskGeometry.from_plan((8, 16, 8), ISO4)  # grid (1, 2, 1)
    assert sample_box(tiny, 0.1, generator=gen)[1][0] == 1  # size clamped to >= 1


def test_partial_decoding_exact_on_pointwise_network_anisotropic():
    """With 1x1x1 convs (and no instance norm) the decoder is pointwise per bottleneck tile, so the
    partial decoding of a box must equal the same region of the full decoding exactly."""
    patch = (20, 64, 64)
    g = MaskGeometry.from_plan(patch, ANISO5)
    cnn = build_cnn(plain_kwargs(ANISO5, kernel=1, norm=None), in_ch=2)
    net = HybridMIMNetwork(cnn, g, proj_dim=16).eval()
    x = torch.randn(2, 2, *patch)
    box = ((1, 0, 1), (4, 3, 3))
    with torch.no_grad():
        full = net(x)["recon"]
        part = net(x, box=box)["recon"]
    assert full.shape == (2, 2, *patch)
    assert part.shape == (2, 2, 3 * 4, 3 * 16, 2 * 16)
    sl = (Ellipsis, *box_to_voxel_slices(box, g))
    torch.testing.assert_close(part, full[sl], rtol=1e-5, atol=1e-5)
    # the comparison can fail: a box shifted by one bottleneck position does not match
    shifted = (Ellipsis, *box_to_voxel_slices(((1, 1, 1), (4, 4, 3)), g))
    assert not torch.allclose(part, full[shifted], atol=1e-3)


def test_partial_decoding_central_region_3x3_network():
    """nnU-Net-like 3x3x3 network (BatchNorm in eval mode so normalisation is local): inside the box,
    away from its border by the decoder's receptive-field margin, partial == full decoding."""
    patch = (48, 48, 48)
    g = MaskGeometry.from_plan(patch, ISO4)
    kw = plain_kwargs(ISO4, norm="torch.nn.modules.batchnorm.BatchNorm3d", n_dec=1)
    cnn = build_cnn(kw)
    net = HybridMIMNetwork(cnn, g, proj_dim=16)
    net.train()
    with torch.no_grad():  # populate running stats so BN is non-trivial
        for _ in range(3):
            net(torch.randn(2, 1, *patch))
    net.eval()
    x = torch.randn(1, 1, *patch)
    box = ((1, 2, 0), (5, 6, 4))
    with torch.no_grad():
        full = net(x)["recon"]
        part = net(x, box=box)["recon"]
    assert part.shape == (1, 1, 32, 32, 32)
    # margin: transpconvs (kernel == stride) are local, each 3x3x3 conv adds 1 voxel, upsampling multiplies
    margin = 0
    for stride in reversed([s[0] for s in ISO4[1:]]):
        margin = margin * stride + 1 * (3 // 2)
    assert margin == 7
    vs = box_to_voxel_slices(box, g)
    full_box = full[(Ellipsis, *vs)]
    inner = (Ellipsis, *[slice(margin, 32 - margin)] * 3)
    torch.testing.assert_close(part[inner], full_box[inner], rtol=1e-4, atol=1e-4)
    # border differs (zero padding vs real neighbours) -> the comparison is not vacuous
    assert not torch.allclose(part, full_box, atol=1e-4)
    shifted = full[(Ellipsis, *box_to_voxel_slices(((0, 2, 0), (4, 6, 4)), g))]
    assert not torch.allclose(part[inner], shifted[inner], atol=1e-3)


def test_forward_shapes_and_heads_plain_and_resenc():
    patch = (32, 32, 32)
    g = MaskGeometry.from_plan(patch, ISO4)
    for arch, kw in ((PLAIN, plain_kwargs(ISO4)), (RESENC, resenc_kwargs(ISO4))):
        net = HybridMIMNetwork(build_cnn(kw, arch=arch), g, proj_dim=24)
        x = torch.randn(2, 1, *patch)
        out = net(x, box=((0, 1, 1), (3, 4, 4)))
        assert out["recon"].shape == (2, 1, 24, 24, 24)
        assert out["count_logits"].shape == (2, 9, 4, 4, 4)
        assert out["position_logits"].shape == (2, 8, 4, 4, 4)
        assert out["projection"].shape == (2, 24)
        assert net(x)["recon"].shape == (2, 1, *patch)
        with torch.no_grad():
            p2 = net.projection_only(x)
        assert p2.shape == (2, 24)
        # dropout views differ even in eval mode
        net.eval()
        with torch.no_grad():
            assert not torch.allclose(net.projection_only(x), net.projection_only(x))
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 40, 32, 32))


def test_projection_only_encoder_no_grad_head_grad():
    g = MaskGeometry.from_plan((32, 32, 32), ISO4)
    net = HybridMIMNetwork(build_cnn(plain_kwargs(ISO4)), g, proj_dim=8)
    z = net.projection_only(torch.randn(2, 1, 32, 32, 32))
    z.sum().backward()
    assert net.projection[0].weight.grad is not None
    assert all(p.grad is None for p in net.encoder.parameters())


@pytest.mark.parametrize("arch", [PLAIN, RESENC])
def test_stock_load_pretrained_weights_accepts_checkpoint(arch, tmp_path):
    patch = (32, 32, 32)
    g = MaskGeometry.from_plan(patch, ISO4)
    kw = plain_kwargs(ISO4) if arch == PLAIN else resenc_kwargs(ISO4)
    pre = HybridMIMNetwork(build_cnn(kw, in_ch=2, arch=arch, seed=1), g, proj_dim=16)
    # key set == the plain network's keys + our heads
    ref_keys = set(build_cnn(kw, in_ch=2, arch=arch).state_dict().keys())
    head_prefixes = ("perception_count.", "perception_position.", "projection.")
    own = set(pre.state_dict().keys())
    assert {k for k in own if not k.startswith(head_prefixes)} == ref_keys
    fname = os.path.join(tmp_path, "checkpoint_final.pth")
    torch.save({"network_weights": pre.state_dict()}, fname)

    fine = build_cnn(kw, in_ch=2, out_ch=5, arch=arch, deep_supervision=True, seed=2)
    before = {k: v.clone() for k, v in fine.state_dict().items()}
    load_pretrained_weights(fine, fname, verbose=False)
    pre_sd, fine_sd = pre.state_dict(), fine.state_dict()
    n_checked = 0
    for k, v in fine_sd.items():
        if ".seg_layers." in k:
            assert torch.equal(v, before[k])  # new classes: not transferred
            assert v.shape[0] == 5
        else:
            assert torch.equal(v, pre_sd[k]), k
            n_checked += 1
    assert n_checked > 10
    out = fine(torch.randn(1, 2, *patch))
    assert isinstance(out, list) and out[0].shape == (1, 5, *patch)


# --------------------------------------------------------------------------- losses
def test_nt_xent_matches_explicit_loops():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    T = 0.5
    z = [r.tolist() for r in torch.cat([z1, z2])]
    n2 = len(z)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))

    total = 0.0
    for i in range(n2):
        pos = (i + 3) % n2
        num = math.exp(cos(z[i], z[pos]) / T)
        den = sum(math.exp(cos(z[i], z[k]) / T) for k in range(n2) if k != i)
        total += -math.log(num / den)
    expected = total / n2
    got = nt_xent(z1, z2, temperature=T)
    assert abs(got.item() - expected) < 1e-5
    assert abs(nt_xent(z1, z2, temperature=T, gather=True).item() - expected) < 1e-5  # no dist: no-op
    assert gather_with_grad(z1) is z1
    # identical views give a lower loss than random ones
    assert nt_xent(z1, z1).item() < nt_xent(z1, z2).item()


def test_nt_xent_gather_ddp_gradient_equals_global_batch():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    check_gathered_nt_xent([2, 2])


def test_perception_loss_terms():
    g = MaskGeometry.from_plan((32, 32, 32), ISO4)
    cm = sample_cube_mask(2, g, 0.4, generator=torch.Generator().manual_seed(0))
    count, position = perception_targets(cm)
    crit = PatchMaskingPerceptionLoss()
    # near-perfect logits -> all three terms ~ 0
    cl = F.one_hot(count, g.n_cubes + 1).movedim(-1, 1).float() * 40 - 20
    pl = position.movedim(-1, 1) * 40 - 20
    ce, bce, cons = crit(cl, pl, count, position)
    assert ce.item() < 1e-6 and bce.item() < 1e-6 and cons.item() < 1e-6
    # random logits -> positive, differentiable terms
    cl = torch.randn(2, 9, 4, 4, 4, requires_grad=True)
    pl = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    ce, bce, cons = crit(cl, pl, count, position)
    assert torch.isclose(ce, F.cross_entropy(cl, count))
    assert torch.isclose(bce, F.binary_cross_entropy_with_logits(pl, position.movedim(-1, 1)))
    k = torch.arange(9.0).view(1, 9, 1, 1, 1)
    manual = ((cl.softmax(1) * k).sum(1) - torch.sigmoid(pl).sum(1)).abs().mean()
    assert torch.isclose(cons, manual)
    cons.backward()
    assert cl.grad.abs().sum() > 0 and pl.grad.abs().sum() > 0
    # released variant: only the count logits receive gradient
    cl2 = cl.detach().clone().requires_grad_(True)
    pl2 = pl.detach().clone().requires_grad_(True)
    r = PatchMaskingPerceptionLoss("released")(cl2, pl2, count, position)[2]
    assert torch.isclose(r, released_consistency(cl2, pl2))
    r.backward()
    assert cl2.grad.abs().sum() > 0 and pl2.grad is None
    with pytest.raises(ValueError):
        crit(torch.randn(2, 8, 4, 4, 4), pl, count, position)


# --------------------------------------------------------------------------- end to end
def _hybridmim_loss(net, x, geom, cube_mask, box, crit):
    vm = cube_mask_to_voxels(cube_mask, geom)
    xm = apply_voxel_mask(x, vm)
    out = net(xm, box=box)
    sl = (Ellipsis, *box_to_voxel_slices(box, geom))
    l_rec = _masked_mse(out["recon"], x[sl], vm[sl])
    count, position = perception_targets(cube_mask)
    l_cnt, l_pos, l_cons = crit(out["count_logits"], out["position_logits"], count, position)
    z2 = net.projection_only(xm)
    l_con = nt_xent(out["projection"], z2)
    return l_rec + 0.1 * l_cnt + 0.1 * l_pos + 0.01 * l_cons + 0.1 * l_con


def test_optimisation_lowers_total_hybridmim_loss():
    patch = (32, 32, 32)
    g = MaskGeometry.from_plan(patch, ISO4)
    net = HybridMIMNetwork(build_cnn(plain_kwargs(ISO4)), g, proj_dim=32)
    torch.manual_seed(0)
    x = F.avg_pool3d(torch.randn(2, 1, 40, 40, 40), 9, stride=1)[..., :32, :32, :32] * 3  # smooth, ~unit var
    x = (x - x.mean()) / x.std()
    cm = sample_cube_mask(2, g, 0.4, generator=torch.Generator().manual_seed(0))
    box = ((0, 1, 0), (3, 4, 3))
    crit = PatchMaskingPerceptionLoss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def evaluate():
        torch.manual_seed(123)  # same dropout draws for both evaluations
        with torch.no_grad():
            return _hybridmim_loss(net, x, g, cm, box, crit).item()

    start = evaluate()
    for step in range(12):
        torch.manual_seed(step)
        opt.zero_grad()
        loss = _hybridmim_loss(net, x, g, cm, box, crit)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    end = evaluate()
    assert end < 0.8 * start, (start, end)
