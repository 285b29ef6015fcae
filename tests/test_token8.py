"""The ``_token8`` variants: a finer ViT token on plans whose deepest 16-voxel stage gives coarse tokens
(ACDC's CPU plans: 2 x 16 x 16 voxels), pretraining and finetuning on the same token grid."""
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.trainers import (nnUNetTrainerTopoMAEFinetune, nnUNetTrainerTopoMAEFinetune_token8,
                                     nnUNetTrainerTopoMAEPretrain, nnUNetTrainerTopoMAEPretrain_token8, transfer)
from nnunet_topomae.utils import synthetic_plans

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

# ACDC's CPU plans' strides (thick slices: the first axis is downsampled once), on a smaller in-plane patch
PATCH = (10, 64, 48)
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]


@pytest.fixture(scope="module")
def nets():
    pm = PlansManager(synthetic_plans.plans(PATCH, STRIDES, [4, 8, 16, 32, 32], synthetic_plans.PLAIN,
                                            dataset_name="Dataset999_T"))
    cm = pm.get_configuration("3d_fullres")
    build = lambda cls: cls.build_network_architecture(pm, cm, 1, 4, True)
    torch.manual_seed(0)
    return {"pre": build(nnUNetTrainerTopoMAEPretrain), "pre8": build(nnUNetTrainerTopoMAEPretrain_token8),
            "fine": build(nnUNetTrainerTopoMAEFinetune), "fine8": build(nnUNetTrainerTopoMAEFinetune_token8)}


def test_token8_halves_the_in_plane_token_and_quadruples_the_tokens(nets):
    assert nets["pre"].vit_cfg.token_size == (2, 16, 16) and nets["pre"].vit_cfg.grid == (5, 4, 3)
    assert nets["pre8"].vit_cfg.token_size == (2, 8, 8) and nets["pre8"].vit_cfg.grid == (5, 8, 6)
    assert nets["fine8"].vit_cfg.token_size == (2, 8, 8)
    out = nets["pre8"](torch.randn(1, 1, *PATCH))
    assert out["vit_recon"].shape == (1, 1, *PATCH)
    # masking stays token-wise: 75 % of the 240 tokens, each a 2 x 8 x 8 block of voxels
    assert out["voxel_mask"].mean().item() == pytest.approx(0.75)


def test_token8_pretraining_transfers_into_the_token8_finetuning(nets):
    load, per_part, fresh = transfer.select_transfer(nets["fine8"].state_dict(), nets["pre8"].state_dict())
    assert per_part["ViT encoder"] and per_part["CNN encoder"] and per_part["CNN decoder"]
    fine8 = nets["fine8"]
    fine8.load_state_dict(load, strict=False)
    fine8.decoder.deep_supervision = False
    assert fine8(torch.randn(1, 1, *PATCH)).shape == (1, 4, *PATCH)


def test_mixing_token_sizes_is_a_clear_error(nets):
    def record(net):
        return {"trainer": "x", "dataset_name": "Dataset999_T", "plans_name": "nnUNetPlans",
                "configuration": "3d_fullres", "patch_size": list(PATCH), "num_input_channels": 1,
                "vit_config": net.vit_cfg.to_dict()}
    with pytest.raises(UserInputError, match=r"token_size.*nnUNetTrainerTopoMAEFinetune_token8"):
        transfer.check_compatibility(record(nets["pre8"]), record(nets["fine"]), "f.pth")
    with pytest.raises(UserInputError, match="token_size"):
        transfer.check_compatibility(record(nets["pre"]), record(nets["fine8"]), "f.pth")
