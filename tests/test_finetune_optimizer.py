"""nnUNetTrainerTopoMAEFinetune's optimiser: one learning rate per part (pretrained ViT, pretrained
CNN, new layers), following the warm-up/cosine schedule; the _lowCNNlr variant changes only the CNN's.
And its -pretrained_weights loader, which takes the trainer's transfer_parts (_encoderOnly: no CNN decoder)."""
from __future__ import annotations

import pytest
import torch

from nnunet_topomae.trainers import (nnUNetTrainerTopoMAEFinetune, nnUNetTrainerTopoMAEFinetune_encoderOnly,
                                     nnUNetTrainerTopoMAEFinetune_lowCNNlr, nnUNetTrainerTopoMAEPretrain)
from nnunet_topomae.utils import synthetic_plans

DATASET_JSON = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def _trainer(cls, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    folder = tmp_path / "preprocessed" / "Dataset999_Synthetic" / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case_0.b2nd").touch()  # initialize() infers the dataset class from the file ending
    plans = synthetic_plans.plans((32, 32, 32), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [8, 16, 32, 64])
    plans["continue_training"] = False
    tr = cls(plans, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    tr.num_epochs = 20
    tr.initialize()
    return tr


def _lr_by_part(tr) -> dict:
    return {g["name"]: g["lr"] for g in tr.optimizer.param_groups}


@pytest.mark.parametrize("cls,cnn_scale", [(nnUNetTrainerTopoMAEFinetune, 1.0),
                                           (nnUNetTrainerTopoMAEFinetune_lowCNNlr, 0.3)])
def test_learning_rate_per_part(cls, cnn_scale, tmp_path, monkeypatch):
    tr = _trainer(cls, tmp_path, monkeypatch)
    net = tr.network
    grouped = [id(p) for g in tr.optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())  # every parameter exactly once
    for epoch in (0, 5, 15):
        tr.lr_scheduler.step(epoch)
        lr = _lr_by_part(tr)
        new = lr["new"]
        assert new == pytest.approx(tr.lr_scheduler.lr_at(epoch)) and new > 0
        assert lr["new_no_decay"] == pytest.approx(new)
        assert lr["vit"] == pytest.approx(cls.vit_lr_scale * new)
        assert lr["cnn"] == pytest.approx(cnn_scale * new)
        assert lr["cnn_no_decay"] == pytest.approx(cnn_scale * new)
    cnn_ids = {id(p) for g in tr.optimizer.param_groups if g["name"].startswith("cnn") for p in g["params"]}
    seg = [p for n, p in net.cnn.named_parameters() if ".seg_layers." in f".{n}"]
    assert seg and not any(id(p) in cnn_ids for p in seg)  # the fresh heads learn at the full rate


@pytest.mark.parametrize("cls", [nnUNetTrainerTopoMAEFinetune, nnUNetTrainerTopoMAEFinetune_encoderOnly])
def test_pretrained_weights_load_the_trainers_transfer_parts(cls, tmp_path, monkeypatch):
    """The trainer's -pretrained_weights loader takes exactly its transfer_parts from the checkpoint."""
    tr = _trainer(cls, tmp_path, monkeypatch)
    net = tr.network
    pre = nnUNetTrainerTopoMAEPretrain.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 1, True)
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(1.0)  # no chance that a fresh tensor equals its pretrained one by initialisation
    fname = str(tmp_path / "checkpoint_final.pth")
    torch.save({"network_weights": pre.state_dict(),
                "pretraining": {"trainer": "nnUNetTrainerTopoMAEPretrain", **tr.expected_pretraining()}}, fname)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tr.load_pretraining_checkpoint(fname)
    after, src = net.state_dict(), pre.state_dict()
    for prefix in ("vit_encoder.", "cnn.encoder."):
        keys = [k for k in after if k.startswith(prefix) and after[k].is_floating_point()]
        assert keys and all(torch.equal(after[k], src[k]) for k in keys)
    # the decoder's own tensors (it also holds the encoder, whose tensors it names cnn.decoder.encoder.*)
    own = [k for k in after if k.startswith("cnn.decoder.") and not k.startswith("cnn.decoder.encoder.")
           and ".seg_layers." not in k]
    dec = [k for k in own if after[k].is_floating_point()]
    loaded = {k for k in dec if torch.equal(after[k], src[k])}
    if "CNN decoder" in cls.transfer_parts:
        assert loaded == set(dec)
    else:
        assert not loaded and all(torch.equal(after[k], before[k]) for k in dec)
    assert tr.pretrained_from["loaded"]["CNN decoder"] == (len(own) if "CNN decoder" in cls.transfer_parts else 0)
