"""End-to-end method A through nnU-Net's real commands: TopoMAE pretraining (fixture), hybrid
finetuning with -pretrained_weights, --val --npz, nnUNetv2_predict, nnU-Net's evaluation, and the
one-line error for a checkpoint that is not a pretraining checkpoint."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from nnunet_topomae.utils.checkpoint import safe_load

from integration.helpers import INTERRUPT_ENV, INTERRUPT_EXIT_CODE, console_script, output_folder, run, train

pytestmark = pytest.mark.integration
TRAINER = "nnUNetTrainerTopoMAEFinetune_test"


def _load(path):
    return safe_load(path)  # our checkpoints must load with weights_only=True


@pytest.fixture(scope="module")
def finetune_run(nnunet_dataset, topomae_pretrain_run):
    res = train(nnunet_dataset, TRAINER, extra_args=["-pretrained_weights", topomae_pretrain_run.checkpoint_final])
    return res, output_folder(nnunet_dataset.results, nnunet_dataset.dataset_name, TRAINER)


def test_finetuning_starts_from_the_pretrained_weights(finetune_run, topomae_pretrain_run):
    res, folder = finetune_run
    initial = _load(os.path.join(folder, "initial_weights.pth"))  # written right after loading
    pretrained = _load(topomae_pretrain_run.checkpoint_final)["network_weights"]
    transferred = [k for k in initial if k.startswith(("vit_encoder.", "cnn.")) and ".seg_layers." not in k]
    assert any(k.startswith("vit_encoder.") for k in transferred) and any(k.startswith("cnn.decoder.") for k in transferred)
    for k in transferred:
        assert torch.equal(initial[k], pretrained[k]), k
    for k in (k for k in initial if k.startswith("fusion.")):
        assert not initial[k].any(), f"{k} must start at zero"
    log = open(next(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("training_log"))).read()
    assert "ViT encoder: loaded" in log and "CNN decoder: loaded" in log
    final = _load(os.path.join(folder, "checkpoint_final.pth"))
    assert final["pretrained_from"]["trainer"] == topomae_pretrain_run.trainer
    # training moved the weights away from the pretrained ones
    assert any(not torch.equal(final["network_weights"][k], initial[k]) for k in transferred)
    summary = json.load(open(os.path.join(folder, "validation", "summary.json")))
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def test_val_npz_predict_and_evaluate(finetune_run, nnunet_dataset, tmp_path):
    _, folder = finetune_run
    train(nnunet_dataset, TRAINER, extra_args=["--val", "--npz"])
    assert any(f.endswith(".npz") for f in os.listdir(os.path.join(folder, "validation")))

    splits = json.load(open(os.path.join(nnunet_dataset.preprocessed_dataset, "splits_final.json")))
    cases = splits[0]["val"]
    imgs, refs, preds = tmp_path / "imgs", tmp_path / "refs", tmp_path / "preds"
    imgs.mkdir(), refs.mkdir()
    raw = os.path.join(nnunet_dataset.raw, nnunet_dataset.dataset_name)
    for c in cases:
        shutil.copy(os.path.join(raw, "imagesTr", f"{c}_0000.nii.gz"), imgs)
        shutil.copy(os.path.join(raw, "labelsTr", f"{c}.nii.gz"), refs)
    env = nnunet_dataset.env()
    run([console_script("nnUNetv2_predict"), "-i", imgs, "-o", preds, "-d", str(nnunet_dataset.dataset_id), "-c",
         "3d_fullres", "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    assert sorted(f for f in os.listdir(preds) if f.endswith(".nii.gz")) == sorted(f"{c}.nii.gz" for c in cases)
    run([console_script("nnUNetv2_evaluate_simple"), refs, preds, "-l", "1", "2", "-np", "1"], env)
    summary = json.load(open(preds / "summary.json"))
    assert set(summary["mean"]) == {"1", "2"}
    assert all(0.0 <= summary["mean"][k]["Dice"] <= 1.0 for k in ("1", "2"))


def test_a_segmentation_checkpoint_is_refused_in_one_line(finetune_run, nnunet_dataset, tmp_path):
    _, folder = finetune_run
    env = nnunet_dataset.env(nnUNet_results=str(tmp_path))  # keep the finished run untouched
    res = train(nnunet_dataset, TRAINER, env=env, check=False,
                extra_args=["-pretrained_weights", os.path.join(folder, "checkpoint_final.pth")])
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    assert "is not an nnunet-topomae pretraining checkpoint" in res.stderr.strip().splitlines()[-1]


def test_find_best_configuration_and_ensemble(finetune_run, nnunet_dataset, tmp_path):
    """nnU-Net's model selection reads the hybrid's cross-validation results, and nnUNetv2_ensemble
    averages its saved probabilities (here: with and without test-time mirroring)."""
    _, folder = finetune_run
    env = nnunet_dataset.env()
    did = str(nnunet_dataset.dataset_id)
    if not os.path.isfile(os.path.join(folder, "validation", "summary.json")):
        train(nnunet_dataset, TRAINER, extra_args=["--val"])
    run([console_script("nnUNetv2_find_best_configuration"), did, "-c", "3d_fullres", "-tr", TRAINER, "-f", "0",
         "-np", "1", "--disable_ensembling"], env)
    dataset_results = os.path.dirname(os.path.dirname(folder))
    instructions = open(os.path.join(dataset_results, "inference_instructions.txt")).read()
    assert TRAINER in instructions and "nnUNetv2_predict" in instructions

    splits = json.load(open(os.path.join(nnunet_dataset.preprocessed_dataset, "splits_final.json")))
    case = splits[0]["val"][0]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(os.path.join(nnunet_dataset.raw, nnunet_dataset.dataset_name, "imagesTr", f"{case}_0000.nii.gz"), imgs)
    outs = []
    for name, extra in (("tta", []), ("notta", ["--disable_tta"])):
        out = tmp_path / name
        run([console_script("nnUNetv2_predict"), "-i", imgs, "-o", out, "-d", did, "-c", "3d_fullres", "-tr", TRAINER,
             "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"] + extra, env)
        assert (out / f"{case}.npz").is_file()
        outs.append(str(out))
    run([console_script("nnUNetv2_ensemble"), "-i", *outs, "-o", tmp_path / "ens", "-np", "1"], env)
    assert (tmp_path / "ens" / f"{case}.nii.gz").is_file()


def test_continue_after_an_interruption_keeps_the_pretrained_record(nnunet_dataset, topomae_pretrain_run):
    """Killed after epoch 0 (os._exit, like a cancelled job), ``--c`` resumes at epoch 1 from
    checkpoint_latest.pth with the optimiser and the record of which pretraining it started from."""
    results = nnunet_dataset.fresh_results("finetune_continue")
    fold = output_folder(results, nnunet_dataset.dataset_name, TRAINER)
    first = train(nnunet_dataset, TRAINER, env=nnunet_dataset.env(nnUNet_results=results, **{INTERRUPT_ENV: "0"}),
                  extra_args=["-pretrained_weights", topomae_pretrain_run.checkpoint_final],
                  check=False, check_leftovers=False)
    assert first.returncode == INTERRUPT_EXIT_CODE, first.stderr[-2000:]
    latest = _load(os.path.join(fold, "checkpoint_latest.pth"))
    assert latest["current_epoch"] == 1 and not os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    train(nnunet_dataset, TRAINER, extra_args=["--c"], env=nnunet_dataset.env(nnUNet_results=results))
    final = _load(os.path.join(fold, "checkpoint_final.pth"))
    assert final["current_epoch"] == 2
    assert final["pretrained_from"]["trainer"] == topomae_pretrain_run.trainer
    assert any(not torch.equal(final["network_weights"][k], latest["network_weights"][k])
               for k in latest["network_weights"])
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
