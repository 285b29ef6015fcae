"""HybridViTUNet: shapes, deep supervision, zero-initialised fusion, rebuild from plans alone."""
import pytest
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_topomae.architectures.hybrid_net import HybridViTUNet, fusion_blocks
from nnunet_topomae.architectures.vit3d import VIT_PRESETS, ViTConfig, token_size_from_plan
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.trainers import nnUNetTrainerTopoMAEFinetune
from nnunet_topomae.utils import synthetic_plans

IMPORTS = synthetic_plans.REQ_IMPORT
BLOCKS = {"PlainConvUNet": synthetic_plans.PLAIN, "ResidualEncoderUNet": synthetic_plans.RESENC}


def arch(strides, widths, block="PlainConvUNet"):
    return BLOCKS[block], synthetic_plans.arch_kwargs(strides, widths, BLOCKS[block])


def plans(patch, strides, widths, block="PlainConvUNet"):
    return synthetic_plans.plans(patch, strides, widths, BLOCKS[block], dataset_name="Dataset999_T", with_2d=True)


CASES = [
    ((32, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [8, 16, 32, 64], "PlainConvUNet", 1),
    ((16, 64, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [8, 16, 32, 64], "PlainConvUNet", 2),
    ((16, 64, 48), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [8, 16, 32, 64], "ResidualEncoderUNet", 1),
]


@pytest.mark.parametrize("patch,strides,widths,block,channels", CASES)
def test_shapes_and_deep_supervision_rebuilt_from_plans(patch, strides, widths, block, channels):
    pm = PlansManager(plans(patch, strides, widths, block))
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainerTopoMAEFinetune.build_network_architecture(pm, cm, channels, 3, True)
    x = torch.randn(2, channels, *patch)
    out = net(x)
    assert isinstance(out, list) and len(out) == len(strides) - 1
    scale = [1, 1, 1]
    for o, s in zip(out, [[1, 1, 1]] + strides[1:]):
        scale = [a * b for a, b in zip(scale, s)]
        assert o.shape == (2, 3, *[p // f for p, f in zip(patch, scale)])
    net.decoder.deep_supervision = False
    assert net(x).shape == (2, 3, *patch)
    # inference rebuilds from the plans alone and loads strictly
    net2 = nnUNetTrainerTopoMAEFinetune.build_network_architecture(pm, cm, channels, 3, False)
    net2.load_state_dict(net.state_dict(), strict=True)


def test_zero_initialised_fusion_equals_the_cnn_at_start():
    patch, strides, widths = CASES[1][:3]
    cls, kw = arch(strides, widths)
    cnn = get_network_from_plans(cls, kw, IMPORTS, 1, 3, deep_supervision=False)
    token, _ = token_size_from_plan(patch, strides)
    net = HybridViTUNet(ViTConfig(1, patch, token, **VIT_PRESETS["small"]), cnn).eval()
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        assert torch.allclose(net(x), cnn(x), atol=1e-6)
        for conv in net.fusion:  # once fusion weights move, the ViT changes the output
            conv.weight.normal_(std=0.1)
        assert not torch.allclose(net(x), cnn(x), atol=1e-3)


def test_every_parameter_gets_a_gradient():
    patch, strides, widths = CASES[0][:3]
    cls, kw = arch(strides, widths)
    cnn = get_network_from_plans(cls, kw, IMPORTS, 1, 3, deep_supervision=True)
    token, _ = token_size_from_plan(patch, strides)
    net = HybridViTUNet(ViTConfig(1, patch, token, **VIT_PRESETS["small"]), cnn)
    sum(o.mean() for o in net(torch.randn(2, 1, *patch))).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_fusion_blocks_feed_deeper_stages_from_deeper_blocks():
    assert fusion_blocks(12, 4) == [2, 5, 8, 11]
    assert fusion_blocks(6, 6) == [0, 1, 2, 3, 4, 5]
    assert fusion_blocks(6, 4)[-1] == 5


def test_2d_configuration_is_a_clear_error():
    pm = PlansManager(plans(*CASES[0][:3]))
    with pytest.raises(UserInputError, match="3D configuration"):
        nnUNetTrainerTopoMAEFinetune.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, True)
