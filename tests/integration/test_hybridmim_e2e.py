"""HybridMIM end to end through nnU-Net's real commands (marked ``integration``):

    nnUNetv2_train 901 3d_fullres 0 -tr nnUNetTrainerHybridMIMPretrain_test -device cpu
    nnUNetv2_train 901 3d_fullres 0 -tr nnUNetTrainer_test_finetune -device cpu \
        -pretrained_weights .../nnUNetTrainerHybridMIMPretrain_test__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth

``nnUNetTrainer_test_finetune`` is nnU-Net's stock trainer with a 1-epoch schedule that snapshots its
network when training starts (after nnU-Net loaded the weights): every tensor except the
segmentation heads must equal the pretrained one.
"""
from __future__ import annotations

import glob
import os
import re

import pytest
import torch

from nnunet_topomae.utils.checkpoint import safe_load

from integration.helpers import INTERRUPT_ENV, INTERRUPT_EXIT_CODE, describe, is_png, output_folder, train

pytestmark = pytest.mark.integration

PRETRAIN = "nnUNetTrainerHybridMIMPretrain_test"
FINETUNE = "nnUNetTrainer_test_finetune"
TERMS = ["rec", "count", "position", "consistency", "contrast"]
EPOCHS = 2  # ShortScheduleMixin.pretrain_epochs
HEADS = ("perception_count.", "perception_position.", "projection.")


def _load(path):
    return safe_load(path)  # our checkpoints must load with weights_only=True


@pytest.fixture(scope="module")
def hybridmim_run(nnunet_dataset):
    results = nnunet_dataset.fresh_results("hybridmim")
    res = train(nnunet_dataset, PRETRAIN, env=nnunet_dataset.env(nnUNet_results=results))
    return results, output_folder(results, nnunet_dataset.dataset_name, PRETRAIN), res


def test_pretraining_writes_nnunet_outputs(hybridmim_run):
    _, fold, res = hybridmim_run
    files = os.listdir(fold)
    assert {"checkpoint_final.pth", "checkpoint_best.pth"} <= set(files), files
    assert "checkpoint_latest.pth" not in files and not [f for f in files if f.startswith(".tmp_")], files
    for png in ("progress.png", "loss_terms.png", "reconstruction_preview.png"):
        assert is_png(os.path.join(fold, png)), (png, files)
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    text = "\n".join(open(p).read() for p in glob.glob(os.path.join(fold, "training_log_*.txt")))
    for term in TERMS + ["train_loss", "val_loss"]:
        assert re.search(rf"'?\b{term}\b", text), f"{term} not in the training log"
    assert "segmentation validation does not apply" in text


def test_checkpoint_keys_and_record(hybridmim_run, nnunet_dataset):
    _, fold, _ = hybridmim_run
    ckpt = _load(os.path.join(fold, "checkpoint_final.pth"))
    assert ckpt["trainer_name"] == PRETRAIN and ckpt["current_epoch"] == EPOCHS
    w = ckpt["network_weights"]
    assert all(k.startswith(("encoder.", "decoder.") + HEADS) for k in w), [k for k in w if "." not in k]
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in w.values())
    assert any(k.startswith("perception_count.") for k in w) and any(k.startswith("projection.") for k in w)

    conf = nnunet_dataset.load_plans()["configurations"]["3d_fullres"]
    strides = conf["architecture"]["arch_kwargs"]["strides"]
    rec = ckpt["pretraining"]
    assert rec["method"] == "hybridmim" and rec["mask_ratio"] == 0.4 and rec["partial"] is True
    assert rec["patch_size"] == conf["patch_size"] and rec["configuration"] == "3d_fullres"
    g = rec["mask_geometry"]
    assert g["patch_size"] == conf["patch_size"] and g["strides"] == [list(s) for s in strides]
    total = [1, 1, 1]
    for s in strides:
        total = [t * i for t, i in zip(total, s)]
    assert g["subvolume_size"] == total and g["cubes_per_subvolume"] == list(strides[-1])
    assert rec["loss_weights"] == dict(rec=1.0, count=0.1, position=0.1, consistency=0.01, contrast=0.1)
    for split in ("train", "val"):
        hist = ckpt["term_history"][split]
        assert set(hist) == set(TERMS) | {"loss"}, hist.keys()
        assert all(len(v) == EPOCHS for v in hist.values())


def test_stock_nnunet_trainer_loads_every_pretrained_tensor_but_the_seg_heads(hybridmim_run, nnunet_dataset):
    results, fold, _ = hybridmim_run
    pretrained = os.path.join(fold, "checkpoint_final.pth")
    res = train(nnunet_dataset, FINETUNE, extra_args=["-pretrained_weights", pretrained],
                env=nnunet_dataset.env(nnUNet_results=results))
    assert "Loading pretrained weights from file" in res.stdout, describe(res)
    ft_fold = output_folder(results, nnunet_dataset.dataset_name, FINETUNE)
    # nnU-Net's stock run completed: training, final checkpoint, segmentation validation
    assert os.path.isfile(os.path.join(ft_fold, "checkpoint_final.pth")), os.listdir(ft_fold)
    assert os.path.isfile(os.path.join(ft_fold, "validation", "summary.json")), os.listdir(ft_fold)

    initial = safe_load(os.path.join(ft_fold, "initial_weights.pth"))
    pre = _load(pretrained)["network_weights"]
    n_seg, compared = 0, []
    for k, v in initial.items():
        if ".seg_layers." in k:
            n_seg += 1
            assert v.shape[0] == 3 and pre[k].shape[0] == 1  # 3 classes vs. 1 reconstructed channel
        else:
            assert k in pre, k
            assert torch.equal(v, pre[k]), f"{k} differs from the pretrained tensor"
            compared.append(k)
    assert n_seg > 0 and len(compared) > 20
    assert {k for k in pre if not k.startswith(HEADS) and ".seg_layers." not in k} == set(compared)
    # and training moved on from there (the weights are trained, not frozen)
    final = _load(os.path.join(ft_fold, "checkpoint_final.pth"))["network_weights"]
    assert any(not torch.equal(final[k], initial[k]) for k in compared if k.endswith(".weight"))


def test_continue_after_interruption(nnunet_dataset):
    """--c reloads the HybridMIM checkpoint (network with heads, optimiser, history) and finishes."""
    results = nnunet_dataset.fresh_results("hybridmim_continue")
    fold = output_folder(results, nnunet_dataset.dataset_name, PRETRAIN)
    first = train(nnunet_dataset, PRETRAIN, env=nnunet_dataset.env(nnUNet_results=results, **{INTERRUPT_ENV: "0"}),
                  check=False)
    assert first.returncode == INTERRUPT_EXIT_CODE, describe(first)
    latest = _load(os.path.join(fold, "checkpoint_latest.pth"))
    assert latest["current_epoch"] == 1
    train(nnunet_dataset, PRETRAIN, extra_args=["--c"], env=nnunet_dataset.env(nnUNet_results=results))
    final = _load(os.path.join(fold, "checkpoint_final.pth"))
    assert final["current_epoch"] == EPOCHS
    for split in ("train", "val"):
        hist = final["term_history"][split]
        assert all(len(v) == EPOCHS for v in hist.values())
        assert hist["loss"][0] == latest["term_history"][split]["loss"][0]
