"""Weight transfer from pretraining checkpoints into the hybrid finetuning network, and its errors."""
import os

import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_topomae.trainers import transfer
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.trainers import (nnUNetTrainerMAEPretrain, nnUNetTrainerTopoMAEFinetune,
                                     nnUNetTrainerTopoMAEPretrain)
from test_hybrid_net import CASES, plans


@pytest.fixture(scope="module")
def nets():
    pm = PlansManager(plans(*CASES[0][:4]))
    cm = pm.get_configuration("3d_fullres")
    build = lambda cls, out: cls.build_network_architecture(pm, cm, 1, out, True)
    return {"topomae": build(nnUNetTrainerTopoMAEPretrain, 3), "mae": build(nnUNetTrainerMAEPretrain, 3),
            "finetune": build(nnUNetTrainerTopoMAEFinetune, 3)}


def test_topomae_checkpoint_loads_vit_encoder_and_whole_cnn(nets):
    target = nets["finetune"].state_dict()
    load, per_part, fresh = transfer.select_transfer(target, nets["topomae"].state_dict())
    assert per_part["ViT encoder"] and per_part["CNN encoder"] and per_part["CNN decoder"]
    assert all(k.startswith(("vit_encoder.", "cnn.")) for k in load)
    assert not any(".seg_layers." in k for k in load)
    assert set(fresh) == {k for k in target if k.startswith("fusion.") or ".seg_layers." in k}
    assert set(load) | set(fresh) == set(target)
    for k, v in load.items():
        assert torch.equal(v, nets["topomae"].state_dict()[k])


def test_mae_checkpoint_leaves_the_cnn_fresh(nets):
    load, per_part, fresh = transfer.select_transfer(nets["finetune"].state_dict(), nets["mae"].state_dict())
    assert per_part["ViT encoder"] and not per_part["CNN encoder"] and not per_part["CNN decoder"]
    assert any(k.startswith("cnn.encoder.") for k in fresh)


def test_missing_vit_tensor_and_wrong_shape_are_clear_errors(nets):
    src = dict(nets["topomae"].state_dict())
    key = next(k for k in src if k.startswith("vit_encoder.blocks."))
    with pytest.raises(UserInputError, match="lacks the ViT encoder tensor"):
        transfer.select_transfer(nets["finetune"].state_dict(), {k: v for k, v in src.items() if k != key})
    ckey = next(k for k in src if k.startswith("cnn.encoder.") and src[k].ndim == 5)
    src[ckey] = torch.zeros(1, 1, 1, 1, 1)
    with pytest.raises(UserInputError, match="other plans"):
        transfer.select_transfer(nets["finetune"].state_dict(), src)


def expected(net):
    return {"dataset_name": "Dataset999_T", "plans_name": "nnUNetPlans", "configuration": "3d_fullres",
            "patch_size": [32, 32, 32], "num_input_channels": 1, "vit_config": net.vit_cfg.to_dict()}


def test_compatibility_checks(nets):
    record = {"trainer": "nnUNetTrainerTopoMAEPretrain", **expected(nets["topomae"])}
    transfer.check_compatibility(record, expected(nets["finetune"]), "f.pth")  # fits
    # another dataset or plans name with the same plans' contents fits (pretrain once, finetune many)
    transfer.check_compatibility({**record, "dataset_name": "Dataset001_Other", "plans_name": "P2"},
                                 expected(nets["finetune"]), "f.pth")
    for key, value, needle in [("configuration", "3d_lowres", "configuration"),
                               ("patch_size", [64, 64, 64], "patch_size"),
                               ("spacing", [2.0, 1.0, 1.0], "spacing"),
                               ("normalization_schemes", ["CTNormalization"], "normalization_schemes")]:
        with pytest.raises(UserInputError, match=needle):
            transfer.check_compatibility({**record, key: value}, {**expected(nets["finetune"]), "spacing": [1.0, 1.0, 1.0],
                                         "normalization_schemes": ["ZScoreNormalization"]}, "f.pth")
    # from another dataset whose plans differ: names nnU-Net's command that copies the plans
    with pytest.raises(UserInputError, match="nnUNetv2_move_plans_between_datasets -s Dataset001_Other -t Dataset999_T"):
        transfer.check_compatibility({**record, "dataset_name": "Dataset001_Other", "patch_size": [64, 64, 64]},
                                     expected(nets["finetune"]), "f.pth")
    vit = dict(record["vit_config"], embed_dim=768)
    with pytest.raises(UserInputError, match="ViT preset"):
        transfer.check_compatibility({**record, "vit_config": vit}, expected(nets["finetune"]), "f.pth")
    no_vit = {k: v for k, v in record.items() if k != "vit_config"}
    with pytest.raises(UserInputError, match="has no ViT"):
        transfer.check_compatibility(no_vit, expected(nets["finetune"]), "f.pth")


def test_unreadable_files_are_one_line_errors(tmp_path, nets):
    with pytest.raises(UserInputError, match="does not exist"):
        transfer.read_pretraining_checkpoint(str(tmp_path / "nope.pth"))
    good = tmp_path / "good.pth"
    torch.save({"network_weights": nets["topomae"].state_dict(), "pretraining": {}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(UserInputError, match="cannot read") as e:
        transfer.read_pretraining_checkpoint(str(truncated))
    assert "\n" not in str(e.value)
    seg = tmp_path / "seg.pth"
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer"}, seg)
    with pytest.raises(UserInputError, match="not an nnunet-topomae pretraining checkpoint"):
        transfer.read_pretraining_checkpoint(str(seg))


def test_checkpoints_are_read_onto_the_cpu(tmp_path, monkeypatch, nets):
    # a GPU-written checkpoint loads on a CPU machine only with map_location
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    f = tmp_path / "c.pth"
    torch.save({"network_weights": {}, "pretraining": {}}, f)
    monkeypatch.setattr(torch, "load", spy)
    transfer.read_pretraining_checkpoint(str(f))
    assert str(seen.get("map_location")) == "cpu"


def test_hook_dispatches_only_networks_with_a_loader(monkeypatch):
    import nnunetv2.run.run_training as rt
    transfer.install_pretrained_weights_hook()
    calls = []
    net = torch.nn.Linear(1, 1)
    net.pretrained_loader = lambda f: calls.append(f)
    rt.load_pretrained_weights(net, "x.pth")
    assert calls == ["x.pth"]
    monkeypatch.setattr(transfer, "_original_loader", lambda n, f, v=False: calls.append(("stock", f)))
    rt.load_pretrained_weights(torch.nn.Linear(1, 1), "y.pth")
    assert calls[-1] == ("stock", "y.pth")


def test_encoder_only_transfer_leaves_the_cnn_decoder_fresh(nets):
    target = nets["finetune"].state_dict()
    src = nets["topomae"].state_dict()
    load, per_part, fresh = transfer.select_transfer(target, src, ("ViT encoder", "CNN encoder"))
    assert per_part["ViT encoder"] and per_part["CNN encoder"] and not per_part["CNN decoder"]
    # the decoder holds the encoder too (cnn.decoder.encoder.*: the same tensors under a second name)
    own = lambda k: k.startswith("cnn.decoder.") and not k.startswith("cnn.decoder.encoder.")
    assert not any(own(k) for k in load)
    assert {k for k in target if own(k)} <= set(fresh)
    assert {k for k in target if k.startswith("cnn.decoder.encoder.")} <= set(load)
    assert set(load) | set(fresh) == set(target)
    # the same encoder tensors as a whole-network transfer
    full, _, _ = transfer.select_transfer(target, src)
    assert set(load) == {k for k in full if not own(k)}
    # the trainer variant asks for exactly this
    from nnunet_topomae.trainers import nnUNetTrainerTopoMAEFinetune_encoderOnly
    assert set(nnUNetTrainerTopoMAEFinetune_encoderOnly.transfer_parts) == {"ViT encoder", "CNN encoder"}


def test_transfer_parts_are_checked(nets):
    with pytest.raises(UserInputError, match="must be one of"):
        transfer.select_transfer(nets["finetune"].state_dict(), nets["topomae"].state_dict(), ("CNN encoder",))
    with pytest.raises(UserInputError, match="must be one of"):
        transfer.select_transfer(nets["finetune"].state_dict(), nets["topomae"].state_dict(), ("ViT encoder", "decoder"))
