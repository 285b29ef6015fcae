"""What `nnunet-topomae demo` relies on, checked without running it (the demo itself takes about ten
minutes, too long for CI; its timing is in README.md and docs/BENCHMARKS.md): the shipped MRI sample is
complete, consistent and carries its CC BY-SA 4.0 attribution, and the demo's schedules are the short
ones the README promises."""
import json
import os
import subprocess
import sys

import SimpleITK as sitk

from nnunet_topomae import demo
from nnunet_topomae.trainers import (nnUNetTrainerTopoMAEFinetune_demo, nnUNetTrainerTopoMAEFinetune_demoLong,
                                     nnUNetTrainerTopoMAEPretrain_demo, nnUNetTrainerTopoMAEPretrain_demoLong)


def test_sample_is_complete_and_attributed():
    with open(os.path.join(demo.SAMPLE, "dataset.json")) as f:
        ds = json.load(f)
    assert ds["numTraining"] == len(ds["training"]) == len(os.listdir(os.path.join(demo.SAMPLE, "imagesTr")))
    for entry in ds["training"]:
        img = sitk.ReadImage(os.path.join(demo.SAMPLE, entry["image"]))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(demo.SAMPLE, entry["label"])))
        assert img.GetSize() == lab.shape[::-1]
        assert set(map(int, set(lab.ravel().tolist()))) <= {0, 1, 2} and lab.max() == 2
    readme = open(os.path.join(demo.SAMPLE, "README.md")).read()
    assert "CC BY-SA 4.0" in readme and "Medical Segmentation Decathlon" in readme


def test_schedules():
    steps = lambda c, e, i: getattr(c, e) * getattr(c, i)
    pre = steps(nnUNetTrainerTopoMAEPretrain_demo, "pretrain_epochs", "pretrain_iterations_per_epoch")
    fine = steps(nnUNetTrainerTopoMAEFinetune_demo, "finetune_epochs", "finetune_iterations_per_epoch")
    assert (pre, fine) == (100, 180)
    assert steps(nnUNetTrainerTopoMAEPretrain_demoLong, "pretrain_epochs", "pretrain_iterations_per_epoch") == 4 * pre
    assert steps(nnUNetTrainerTopoMAEFinetune_demoLong, "finetune_epochs", "finetune_iterations_per_epoch") == 4 * fine


def test_demo_command_lists_its_options():
    out = subprocess.run([sys.executable, "-m", "nnunet_topomae.cli", "demo", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for option in ("--work-dir", "--device", "--long"):
        assert option in out
