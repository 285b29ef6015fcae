"""The fault matrix of issue 22 through nnU-Net's real commands (docs/FAULTS.md lists every case with
its expected message): a checkpoint that holds code, kill -9 during finetuning before its first
checkpoint and during pretraining followed by ``--c``, ``--c`` together with ``-pretrained_weights``,
``--c`` with nothing to continue, partial checkpoint files, workers outliving a killed run, a dataset
not preprocessed, and ``inspect`` on real checkpoints."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
import torch

from integration.helpers import (RUN_MARKER_ENV, console_script, output_folder, processes_with_marker, run,
                                 train)
from nnunet_topomae.utils.checkpoint import safe_load

pytestmark = pytest.mark.integration
FINETUNE = "nnUNetTrainerTopoMAEFinetune_test"
PRETRAIN = "nnUNetTrainerTopoMAEPretrain_test"
SIGKILL_ENV = "NNUNET_TOPOMAE_TEST_SIGKILL_AT"


class WritesMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _log(folder: str) -> str:
    return "".join(open(p).read() for p in sorted(glob.glob(os.path.join(folder, "training_log*.txt"))))


@pytest.mark.parametrize("poisoned", [False, True], ids=["malicious", "poisoned_genuine"])
def test_finetuning_refuses_a_checkpoint_that_runs_code(nnunet_dataset, topomae_pretrain_run, tmp_path, poisoned):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    if poisoned:  # a real pretraining checkpoint with one extra entry
        ckpt = safe_load(topomae_pretrain_run.checkpoint_final)
        ckpt["extra"] = WritesMarker(marker)
        torch.save(ckpt, evil)
    else:
        torch.save({"network_weights": {}, "x": WritesMarker(marker)}, evil)
    env = nnunet_dataset.env(nnUNet_results=nnunet_dataset.fresh_results("evil"))
    res = train(nnunet_dataset, FINETUNE, extra_args=["-pretrained_weights", str(evil)], env=env, check=False)
    assert res.returncode == 1
    assert not marker.exists(), "the checkpoint's code ran"
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("nnunet-topomae: refused pretrained weights file") and str(evil) in last
    assert "Traceback" not in res.stderr
    # inspect says the same without running it
    out = run([console_script("nnunet-topomae"), "inspect", str(evil)], env, check=False)
    assert out.returncode == 2 and "NOT SAFE" in out.stdout and not marker.exists()


def test_kill_9_before_the_first_checkpoint_then_c_keeps_the_pretrained_weights(nnunet_dataset, topomae_pretrain_run):
    results = nnunet_dataset.fresh_results("killed_finetune")
    env = nnunet_dataset.env(nnUNet_results=results)
    weights = topomae_pretrain_run.checkpoint_final
    res = train(nnunet_dataset, FINETUNE, extra_args=["-pretrained_weights", weights],
                env=dict(env, **{SIGKILL_ENV: "train_start"}), check=False)
    assert res.returncode == -signal.SIGKILL, res.returncode
    folder = output_folder(results, nnunet_dataset.dataset_name, FINETUNE)
    assert not os.path.exists(os.path.join(folder, "checkpoint_latest.pth"))
    # a partial file as a kill during torch.save leaves it
    open(os.path.join(folder, ".tmp_deadbeef.pth"), "wb").write(b"\0" * 4096)
    res = train(nnunet_dataset, FINETUNE, extra_args=["--c"], env=env)
    assert "starting again from the pretrained weights" in _log(folder)
    final = safe_load(os.path.join(folder, "checkpoint_final.pth"))
    assert final["pretrained_from"]["file"] == os.path.abspath(weights)
    assert final["current_epoch"] == final["num_epochs"]
    assert not glob.glob(os.path.join(folder, ".tmp_*")), os.listdir(folder)
    assert "Removed 1 partial checkpoint file" in _log(folder)


def test_c_with_pretrained_weights_starts_from_them_then_continues(nnunet_dataset, topomae_pretrain_run):
    results = nnunet_dataset.fresh_results("c_and_weights")
    env = nnunet_dataset.env(nnUNet_results=results)
    args = ["--c", "-pretrained_weights", topomae_pretrain_run.checkpoint_final]
    train(nnunet_dataset, FINETUNE, extra_args=args, env=env)  # nnU-Net alone: RuntimeError
    folder = output_folder(results, nnunet_dataset.dataset_name, FINETUNE)
    assert safe_load(os.path.join(folder, "checkpoint_final.pth"))["pretrained_from"] is not None
    res = train(nnunet_dataset, FINETUNE, extra_args=args, env=env)  # finished: continues (nothing left to do)
    assert "-pretrained_weights is not needed" in _log(folder)
    assert "Traceback" not in res.stderr


def test_c_with_nothing_to_continue_names_the_command(nnunet_dataset):
    env = nnunet_dataset.env(nnUNet_results=nnunet_dataset.fresh_results("c_nothing"))
    res = train(nnunet_dataset, FINETUNE, extra_args=["--c"], env=env, check=False)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "--c found no checkpoint" in last and "-pretrained_weights" in last and "nnUNetv2_train" in last


@pytest.mark.parametrize("trainer", [PRETRAIN, FINETUNE])
def test_kill_9_during_training_leaves_no_process_and_c_finishes(nnunet_dataset, topomae_pretrain_run, trainer):
    """A real SIGKILL from outside while epoch 1 runs, with 2 data-loading workers (and, pretraining, the
    persistence pool) alive: every process of the run must be gone within 10 s; then --c finishes."""
    results = nnunet_dataset.fresh_results("killed_" + trainer)
    marker = uuid.uuid4().hex
    env = dict(nnunet_dataset.env(nnUNet_results=results, nnUNet_n_proc_DA="2"), **{RUN_MARKER_ENV: marker})
    cmd = [console_script("nnUNetv2_train"), str(nnunet_dataset.dataset_id), "3d_fullres", "0", "-tr", trainer,
           "-device", "cpu"]
    if trainer == FINETUNE:
        cmd += ["-pretrained_weights", topomae_pretrain_run.checkpoint_final]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "Epoch 1" in line:
                break
        children = [p for p, _ in processes_with_marker(marker) if p != proc.pid]
        assert children, "expected data-loading workers and persistence processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and processes_with_marker(marker):
            time.sleep(0.2)
        left = processes_with_marker(marker)
    finally:
        for pid, _ in processes_with_marker(marker):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(children)} processes outlived the killed training: {left}"
    folder = output_folder(results, nnunet_dataset.dataset_name, trainer)
    assert os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")), "".join(seen[-20:])
    train(nnunet_dataset, trainer, extra_args=["--c"], env=nnunet_dataset.env(nnUNet_results=results))
    final = safe_load(os.path.join(folder, "checkpoint_final.pth"))
    assert final["current_epoch"] == final["num_epochs"] == 2
    assert not glob.glob(os.path.join(folder, ".tmp_*"))


def test_a_configuration_not_preprocessed_gets_one_line(nnunet_dataset):
    # a plans variant whose data was never preprocessed (nnU-Net's idiom: another data_identifier)
    plans = nnunet_dataset.load_plans()
    plans["plans_name"] = "nnUNetPlansNotPre"
    plans["configurations"]["3d_fullres"]["data_identifier"] = "nnUNetPlansNotPre_3d_fullres"
    path = os.path.join(nnunet_dataset.preprocessed_dataset, "nnUNetPlansNotPre.json")
    with open(path, "w") as f:
        json.dump(plans, f)
    try:
        env = nnunet_dataset.env(nnUNet_results=nnunet_dataset.fresh_results("not_pre"))
        res = train(nnunet_dataset, "nnUNetTrainerTopoMAEFinetune", extra_args=["-p", "nnUNetPlansNotPre"], env=env,
                    check=False)
        assert res.returncode == 1
        last = res.stderr.strip().splitlines()[-1]
        assert last == (f"nnunet-topomae: {nnunet_dataset.dataset_name} is not preprocessed for configuration 3d_fullres "
                        f"({os.path.join(nnunet_dataset.preprocessed_dataset, 'nnUNetPlansNotPre_3d_fullres')} is missing "
                        f"or empty): run nnUNetv2_preprocess -d 901 -plans_name nnUNetPlansNotPre -c 3d_fullres"), last
        doc = run([console_script("nnunet-topomae"), "doctor", "-d", "901", "-p", "nnUNetPlansNotPre"], env, check=False)
        assert "is not preprocessed for 3d_fullres with nnUNetPlansNotPre" in doc.stdout, doc.stdout
    finally:
        os.remove(path)


def test_inspect_and_doctor_on_real_checkpoints(nnunet_dataset, topomae_pretrain_run):
    env = nnunet_dataset.env()
    out = run([console_script("nnunet-topomae"), "inspect", topomae_pretrain_run.checkpoint_final], env)
    assert "TopoMAE pretraining checkpoint" in out.stdout and nnunet_dataset.dataset_name in out.stdout
    assert "complete:          yes" in out.stdout and "nnUNetTrainerTopoMAEFinetune" in out.stdout
    # the plans hold a 2d configuration that was never preprocessed
    doc = run([console_script("nnunet-topomae"), "doctor", "-d", str(nnunet_dataset.dataset_id), "-c", "2d",
               "--checkpoint", topomae_pretrain_run.checkpoint_final], env, check=False)
    assert "is not preprocessed for 2d" in doc.stdout and "nnUNetv2_plan_and_preprocess -d 901 -c 2d" in doc.stdout
    assert "TopoMAE pretraining checkpoint" in doc.stdout
