"""End to end under torchrun on the CPU (gloo): ``python -m nnunet_topomae.distributed`` with two ranks on one
machine and two simulated nodes on localhost, short schedules (tests/ext_trainers, ``*_ddptest``: 2 epochs
x 2 steps), the synthetic dataset.

- TopoMAE, 2 ranks: rank 1 kill -9'd after epoch 0 ends the job (torchrun names rank 1); ``--c`` on 2 ranks
  continues from epoch 1; both ranks end with the same weights; the run folder holds what a single-process
  run writes (rank 0 writes).
- HybridMIM, 2 nodes x 1 rank, ``--max-restarts 1``: rank 1 dies after epoch 0, torchrun restarts both
  nodes, and the restarted ranks continue from the checkpoint by themselves.
- Finetuning on 2 ranks from the TopoMAE pretraining checkpoint, nnU-Net's distributed final validation,
  then ``nnUNetv2_predict`` (one process) with the result.
- One-line refusals.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import torch

from nnunet_topomae.utils.checkpoint import safe_load

from integration.helpers import RUN_MARKER_ENV, _reap_leftovers, console_script, describe, output_folder, run

pytestmark = pytest.mark.integration

DUMP_ENV = "NNUNET_TOPOMAE_TEST_DDP_DUMP"  # tests/ext_trainers: every rank's final weights go there
KILL_ENV = "NNUNET_TOPOMAE_TEST_DDP_KILL"  # "R:E": rank R kill -9s itself after epoch E, once
TIMEOUT = 420


def _torchrun(*args) -> list:
    return [console_script("torchrun"), *args]


def _train_args(trainer: str, *extra) -> list:
    return ["-m", "nnunet_topomae.distributed", "901", "3d_fullres", "0", "-tr", trainer, "-device", "cpu", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logs(folder):
    return sorted(glob.glob(os.path.join(folder, "training_log_*.txt")))


def _epochs_in(log_file):
    return re.findall(r": Epoch (\d+) *$", open(log_file).read(), flags=re.M)


def _same_weights_everywhere(dump, folder, ranks=2):
    final = safe_load(os.path.join(folder, "checkpoint_final.pth"))["network_weights"]
    assert not any(k.startswith("module.") for k in final) and all(v.device.type == "cpu" for v in final.values())
    for r in range(ranks):
        weights = torch.load(os.path.join(dump, f"rank{r}.pth"))
        assert weights.keys() == final.keys()
        assert all(torch.equal(weights[k], final[k]) for k in final), f"rank {r} ended with other weights"


@pytest.fixture
def dump(tmp_path):
    path = tmp_path / "dump"
    path.mkdir()
    return str(path)


def test_topomae_on_two_ranks_a_killed_rank_ends_the_job_and_continue_resumes(nnunet_dataset, topomae_pretrain_run,
                                                                             dump):
    trainer = "nnUNetTrainerTopoMAEPretrain_ddptest"
    results = nnunet_dataset.fresh_results("ddp_topomae")
    folder = output_folder(results, nnunet_dataset.dataset_name, trainer)
    cmd = _torchrun("--standalone", "--nproc_per_node", "2", *_train_args(trainer))

    first = run(cmd, nnunet_dataset.env(nnUNet_results=results, **{DUMP_ENV: dump, KILL_ENV: "1:0"}),
                timeout=TIMEOUT, check=False)
    assert first.returncode != 0, describe(first)
    # torchrun stops rank 0 and names the rank that failed first (no hang: run() would have timed out)
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", first.stderr, re.S), \
        describe(first)
    assert safe_load(os.path.join(folder, "checkpoint_latest.pth"))["current_epoch"] == 1

    second = run(cmd + ["--c"], nnunet_dataset.env(nnUNet_results=results, **{DUMP_ENV: dump}), timeout=TIMEOUT)
    final = safe_load(os.path.join(folder, "checkpoint_final.pth"))
    assert final["current_epoch"] == 2 and len(final["term_history"]["train"]["loss"]) == 2
    logs = _logs(folder)
    assert len(logs) == 2  # one per start, written by rank 0 only
    assert _epochs_in(logs[0]) == ["0", "1"] and _epochs_in(logs[1]) == ["1"], second.stdout[-3000:]
    assert "2 ranks (1 node(s) x 2), device cpu, backend gloo; global batch 2 split as [1, 1]" in open(logs[1]).read()
    _same_weights_everywhere(dump, folder)
    # the run folder holds what nnUNetv2_train writes in one process
    single = {f for f in os.listdir(topomae_pretrain_run.output_folder) if not f.startswith("training_log")}
    assert {f for f in os.listdir(folder) if not f.startswith("training_log")} == single
    assert not [f for f in os.listdir(folder) if f.startswith(".")]


def test_hybridmim_on_two_nodes_restarts_from_the_checkpoint_after_a_rank_dies(nnunet_dataset, dump):
    trainer = "nnUNetTrainerHybridMIMPretrain_ddptest"
    results = nnunet_dataset.fresh_results("ddp_hybridmim")
    folder = output_folder(results, nnunet_dataset.dataset_name, trainer)
    port = _free_port()
    marker = uuid.uuid4().hex
    env = nnunet_dataset.env(nnUNet_results=results, **{DUMP_ENV: dump, KILL_ENV: "1:0", RUN_MARKER_ENV: marker})
    procs, outs = [], []
    t0 = time.time()
    for node in (0, 1):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        cmd = _torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--rdzv_backend", "c10d",
                        "--rdzv_endpoint", f"127.0.0.1:{port}", "--max_restarts", "1", *_train_args(trainer))
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True))
        outs.append((cmd, out, err))
    try:
        codes = [p.wait(timeout=max(1.0, TIMEOUT - (time.time() - t0))) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
                _reap_leftovers(marker, 0)  # the killed agents' workers
    nodes = []
    for (cmd, out, err), code in zip(outs, codes):
        out.seek(0), err.seek(0)
        nodes.append(subprocess.CompletedProcess(cmd, code, out.read(), err.read()))
        out.close(), err.close()
    leftovers = _reap_leftovers(marker, 10.0)
    assert all(n.returncode == 0 for n in nodes), "\n".join(describe(n) for n in nodes)
    assert not leftovers, leftovers
    assert "exitcode: -9" in "".join(n.stderr for n in nodes)  # the agent of the killed rank saw it die
    first, restarted = _logs(folder)  # one per start of the processes
    assert "2 ranks (2 node(s) x 1)" in open(first).read()
    assert "torchrun restart 1: continuing from the last checkpoint" in open(restarted).read()
    assert _epochs_in(first) == ["0", "1"] and _epochs_in(restarted) == ["1"]  # epoch 1 again, not epoch 0
    assert safe_load(os.path.join(folder, "checkpoint_final.pth"))["current_epoch"] == 2
    _same_weights_everywhere(dump, folder)


def test_finetuning_on_two_ranks_then_predict(nnunet_dataset, topomae_pretrain_run, dump, tmp_path):
    trainer = "nnUNetTrainerTopoMAEFinetune_ddptest"
    results = nnunet_dataset.fresh_results("ddp_finetune")
    folder = output_folder(results, nnunet_dataset.dataset_name, trainer)
    env = nnunet_dataset.env(nnUNet_results=results, **{DUMP_ENV: dump})
    run(_torchrun("--standalone", "--nproc_per_node", "2",
                  *_train_args(trainer, "-pretrained_weights", topomae_pretrain_run.checkpoint_final)), env,
        timeout=TIMEOUT)
    log = open(_logs(folder)[0]).read()
    assert "ViT encoder: loaded" in log and "CNN decoder: loaded" in log
    _same_weights_everywhere(dump, folder)
    # nnU-Net's final validation: every rank predicted its share of the cases, rank 0 scored them
    splits = json.load(open(os.path.join(nnunet_dataset.preprocessed_dataset, "splits_final.json")))
    cases = splits[0]["val"]
    assert sorted(f for f in os.listdir(os.path.join(folder, "validation")) if f.endswith(".nii.gz")) == \
        sorted(f"{c}.nii.gz" for c in cases)
    summary = json.load(open(os.path.join(folder, "validation", "summary.json")))
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0

    imgs, preds = tmp_path / "imgs", tmp_path / "preds"
    imgs.mkdir()
    shutil.copy(os.path.join(nnunet_dataset.raw, nnunet_dataset.dataset_name, "imagesTr", f"{cases[0]}_0000.nii.gz"),
                imgs)
    run([console_script("nnUNetv2_predict"), "-i", imgs, "-o", preds, "-d", str(nnunet_dataset.dataset_id), "-c",
         "3d_fullres", "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    assert os.path.isfile(preds / f"{cases[0]}.nii.gz")


def _one_line(stderr: str, message: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("nnunet-topomae:")]
    assert len(lines) == 1 and message in lines[0], stderr[-3000:]


def test_refusals_are_one_line(nnunet_dataset):
    env = nnunet_dataset.env()
    res = run([sys.executable, *_train_args("nnUNetTrainerTopoMAEPretrain_ddptest")], env, check=False, timeout=120)
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0, describe(res)
    assert "must be started by torchrun" in res.stderr
    res = run(_torchrun("--standalone", "--nproc_per_node", "2",
                        *_train_args("nnUNetTrainerTopoMAEPretrain_ddptest", "-backend", "nccl")),
              env, check=False, timeout=180)
    assert res.returncode != 0
    _one_line(res.stderr, "-backend nccl needs GPUs, but this is a CPU run")
    res = run(_torchrun("--standalone", "--nproc_per_node", "3", *_train_args("nnUNetTrainerTopoMAEPretrain_ddptest")),
              nnunet_dataset.env(nnUNet_results=nnunet_dataset.fresh_results("ddp_batch")), check=False, timeout=240)
    assert res.returncode != 0
    _one_line(res.stderr, "the plan's batch size 2 (the global batch, split over the ranks) is smaller than the 3 ranks")
