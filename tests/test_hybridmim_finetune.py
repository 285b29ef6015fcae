"""nnUNetTrainerHybridMIMFinetune: proportionate warm-up, and --c restoring the optimiser stage of the
saved epoch with the state the stock loader reads (nnU-Net 2.8.1's own warm-up trainer cannot load)."""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.warmup import Lin_incr_LRScheduler, PolyLRScheduler_offset

from nnunet_topomae.trainers import nnUNetTrainerHybridMIMFinetune
from nnunet_topomae.utils import synthetic_plans

DATASET_JSON = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


def _trainer(tmp_path, monkeypatch, epochs=40):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    # initialize() infers nnU-Net's dataset class from the preprocessed files' ending; no case is read
    folder = tmp_path / "preprocessed" / "Dataset999_Synthetic" / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case_0.b2nd").touch()
    plans = synthetic_plans.plans((16, 16, 16), [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [4, 8, 16])
    plans["continue_training"] = False  # nnU-Net's run_training sets it
    tr = nnUNetTrainerHybridMIMFinetune(plans, "3d_fullres", 0, DATASET_JSON, torch.device("cpu"))
    tr.num_epochs = epochs  # as a schedule shim does, after __init__
    tr.initialize()
    return tr


def test_warmup_is_five_percent_of_the_schedule(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, monkeypatch, epochs=40)
    assert tr.warmup_duration_whole_net == 2
    assert isinstance(tr.lr_scheduler, Lin_incr_LRScheduler)
    tr.lr_scheduler.step(0)
    assert tr.optimizer.param_groups[0]["lr"] < tr.initial_lr


def test_continue_restores_stage_and_optimizer_state(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, monkeypatch)
    x = torch.randn(2, 1, 16, 16, 16)
    out = tr.network(x)
    sum(o.sum() for o in out).backward()
    tr.optimizer.step()
    for epoch in range(5):  # what nnU-Net logs during training: numpy scalars among them
        tr.logger.log("mean_fg_dice", np.float32(0.5), epoch)
        tr.logger.log("ema_fg_dice", np.float64(0.5), epoch)
        tr.logger.log("dice_per_class_or_region", [np.float32(0.5)], epoch)
    tr.current_epoch = 4  # saved as "next epoch 5", past the 2-epoch warm-up
    path = str(tmp_path / "checkpoint_latest.pth")
    tr.save_checkpoint(path)

    tr2 = _trainer(tmp_path, monkeypatch)
    tr2.load_checkpoint(path)
    assert tr2.current_epoch == 5
    assert isinstance(tr2.lr_scheduler, PolyLRScheduler_offset) and tr2.training_stage == "train"
    saved = tr.optimizer.state_dict()["state"]
    loaded = tr2.optimizer.state_dict()["state"]
    assert saved and set(saved) == set(loaded)
    for k in saved:
        torch.testing.assert_close(loaded[k]["momentum_buffer"], saved[k]["momentum_buffer"])
    for a, b in zip(tr.network.state_dict().values(), tr2.network.state_dict().values()):
        torch.testing.assert_close(a, b)
