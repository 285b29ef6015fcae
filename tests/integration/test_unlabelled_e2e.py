"""Unlabelled archives (issue 25) through the real commands: ``nnunet-topomae add-unlabelled`` after
``nnUNetv2_plan_and_preprocess``, preprocessing identical to nnU-Net's for a training case, refusals
and resumption, pretraining that sees the unlabelled cases, nnU-Net's own trainer and splits that do
not, and pretraining on one dataset then finetuning on another through
``nnUNetv2_move_plans_between_datasets``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from integration.helpers import console_script, output_folder, run, train

pytestmark = pytest.mark.integration
UNL = "nnunet_topomae_unlabelled/nnUNetPlans_3d_fullres"


def _digest(folder: str) -> dict:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f))}


@pytest.fixture(scope="module")
def own_dataset(nnunet_dataset, tmp_path_factory):
    """A copy of the shared synthetic dataset (raw and preprocessed), so the unlabelled cases added here
    never reach the other tests' pretraining."""
    root = tmp_path_factory.mktemp("unlabelled_root")
    ds = type(nnunet_dataset)(root=str(root), raw=str(root / "raw"), preprocessed=str(root / "preprocessed"),
                              results=str(root / "results"), ext_trainer=nnunet_dataset.ext_trainer)
    shutil.copytree(nnunet_dataset.raw, ds.raw)
    shutil.copytree(nnunet_dataset.preprocessed, ds.preprocessed)
    os.makedirs(ds.results)
    return ds


@pytest.fixture(scope="module")
def archive(own_dataset, tmp_path_factory):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from synthetic import make_dataset
    src = tmp_path_factory.mktemp("archive_src")
    make_dataset(str(src), dataset_id=990, n_cases=4, seed=7)
    folder = tmp_path_factory.mktemp("archive")
    images = os.path.join(src, "Dataset990_Synth", "imagesTr")
    for f in os.listdir(images):
        shutil.copy(os.path.join(images, f), folder / ("arch" + f))
    # a labelled image re-saved (other bytes, same voxels): must come out exactly as nnU-Net preprocessed it
    orig = os.path.join(own_dataset.raw, own_dataset.dataset_name, "imagesTr", "case_000_0000.nii.gz")
    import gzip
    with open(orig, "rb") as f:
        raw_bytes = gzip.decompress(f.read())
    with open(folder / "copy000_0000.nii.gz", "wb") as f:  # the same NIfTI, gzipped otherwise: other bytes
        f.write(gzip.compress(raw_bytes, compresslevel=1, mtime=12345))
    assert open(folder / "copy000_0000.nii.gz", "rb").read() != open(orig, "rb").read()
    # the very same file as a labelled image, and a 2D image: refused, the others carry on
    shutil.copy(os.path.join(own_dataset.raw, own_dataset.dataset_name, "imagesTr", "case_001_0000.nii.gz"),
                folder / "dupe_0000.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(40, 40).astype(np.float32)), str(folder / "flat_0000.nii.gz"))
    return str(folder)


@pytest.fixture(scope="module")
def added(own_dataset, archive):
    pre = own_dataset.preprocessed_dataset
    before = {"data": _digest(os.path.join(pre, "nnUNetPlans_3d_fullres")),
              "splits": _digest(pre)["splits_final.json"] if os.path.isfile(os.path.join(pre, "splits_final.json")) else None}
    res = run([console_script("nnunet-topomae"), "add-unlabelled", "-d", "901", "-i", archive, "-np", "2"],
              own_dataset.env(), check=False)
    return res, before


def test_add_unlabelled_preprocesses_like_nnunet_and_refuses_bad_images(own_dataset, added):
    res, _ = added
    assert res.returncode == 1, res.stdout + res.stderr  # some refused
    out = res.stdout
    assert "add-unlabelled: 5 added, 0 skipped (already there), 2 refused" in out, out
    assert "dupe_0000.nii.gz: the same file as the labelled image of case_001" in out
    assert "flat_0000.nii.gz: a 2D image" in out
    import blosc2
    folder = os.path.join(own_dataset.preprocessed_dataset, UNL)
    ours = blosc2.open(os.path.join(folder, "copy000.b2nd"), mode="r")[:]
    nnunet = blosc2.open(os.path.join(own_dataset.preprocessed_dataset, "nnUNetPlans_3d_fullres", "case_000.b2nd"), mode="r")[:]
    np.testing.assert_array_equal(ours, nnunet)


def test_rerun_skips_and_redoes_a_half_written_case(own_dataset, archive, added):
    folder = os.path.join(own_dataset.preprocessed_dataset, UNL)
    os.remove(os.path.join(folder, "archcase_000.pkl"))  # killed before the .pkl was moved in
    os.makedirs(os.path.join(folder, ".partial"), exist_ok=True)
    open(os.path.join(folder, ".partial", "archcase_000.b2nd"), "wb").write(b"half")
    res = run([console_script("nnunet-topomae"), "add-unlabelled", "-d", "901", "-i", archive, "-np", "1",
               "--no-progress"], own_dataset.env(), check=False)
    assert "add-unlabelled: 1 added, 4 skipped (already there), 2 refused" in res.stdout, res.stdout
    assert not os.path.exists(os.path.join(folder, ".partial"))
    doctor = run([console_script("nnunet-topomae"), "doctor"], own_dataset.env(), check=False)
    assert "Dataset901_Synth: unlabelled cases for pretraining: 5 in nnUNetPlans_3d_fullres" in doctor.stdout


def test_pretraining_sees_the_unlabelled_cases_and_nnunet_does_not(own_dataset, added):
    _, before = added
    pre = own_dataset.preprocessed_dataset
    assert _digest(os.path.join(pre, "nnUNetPlans_3d_fullres")) == before["data"]  # nnU-Net's folder untouched
    trainer = "nnUNetTrainerTopoMAEPretrain_testKeys"
    train(own_dataset, trainer)
    folder = output_folder(own_dataset.results, own_dataset.dataset_name, trainer)
    splits = json.load(open(os.path.join(pre, "splits_final.json")))
    seen = json.load(open(os.path.join(folder, "seen_keys.json")))
    unlabelled = {"archcase_000", "archcase_001", "archcase_002", "archcase_003", "copy000"}
    assert set(seen["train"]) & unlabelled, seen["train"]
    assert set(seen["train"]) <= set(splits[0]["train"]) | unlabelled
    assert set(seen["val"]) <= set(splits[0]["val"])
    log = "".join(open(os.path.join(folder, f)).read() for f in os.listdir(folder) if f.startswith("training_log"))
    assert "Pretraining on 4 training cases of fold 0 + 5 unlabelled cases; validating on 2 validation cases" in log
    # nnU-Net's stock trainer on the same dataset: only the fold's own cases, same split file
    train(own_dataset, "nnUNetTrainer_testKeys")
    stock = json.load(open(os.path.join(output_folder(own_dataset.results, own_dataset.dataset_name,
                                                      "nnUNetTrainer_testKeys"), "seen_keys.json")))
    assert set(stock["train"]) <= set(splits[0]["train"]) and set(stock["val"]) <= set(splits[0]["val"])
    if before["splits"] is not None:
        assert _digest(pre)["splits_final.json"] == before["splits"]


def test_pretrain_on_one_dataset_finetune_on_another_via_move_plans(own_dataset, added):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from synthetic import make_dataset
    make_dataset(own_dataset.raw, dataset_id=902, name="Target", n_cases=5, shape=(32, 32, 32), seed=3)
    env = own_dataset.env()
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # 0 crashes nnU-Net's planning
    run([console_script("nnUNetv2_plan_and_preprocess"), "-d", "902", "-c", "3d_fullres", "-np", "1"], plan_env)
    pretrain = "nnUNetTrainerTopoMAEPretrain_testKeys"
    ckpt = os.path.join(output_folder(own_dataset.results, own_dataset.dataset_name, pretrain), "checkpoint_final.pth")
    if not os.path.isfile(ckpt):
        train(own_dataset, pretrain)
    fine = "nnUNetTrainerTopoMAEFinetune_test"
    cmd = [console_script("nnUNetv2_train"), "902", "3d_fullres", "0", "-tr", fine, "-device", "cpu",
           "-pretrained_weights", ckpt]
    # the target's own plans differ (32^3 patch): one line naming nnU-Net's command
    res = run(cmd, env, check=False)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "does not fit this run" in last and "nnUNetv2_move_plans_between_datasets -s Dataset901_Synth -t Dataset902_Target" in last
    plans = "nnUNetPlans_from_Dataset901"
    run([console_script("nnUNetv2_move_plans_between_datasets"), "-s", "901", "-t", "902", "-sp", "nnUNetPlans",
         "-tp", plans], plan_env)
    run([console_script("nnUNetv2_preprocess"), "-d", "902", "-plans_name", plans, "-c", "3d_fullres", "-np", "1"], plan_env)
    run(cmd + ["-p", plans], env)
    folder = os.path.join(own_dataset.results, "Dataset902_Target", f"{fine}__{plans}__3d_fullres", "fold_0")
    log = "".join(open(os.path.join(folder, f)).read() for f in os.listdir(folder) if f.startswith("training_log"))
    assert "on Dataset901_Synth" in log and "ViT encoder: loaded" in log
    assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
