"""Checkpoints are data, not code (issue 22): safe loading, plain contents, inspect, the --c rules of a
finetuning run started from pretrained weights, clean-up of partial files, workers that die with
their parent. End-to-end versions through nnUNetv2_train: tests/integration/test_faults_e2e.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from nnunet_topomae.trainers import transfer
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.inspect_checkpoint import describe, format_info, inspect_file
from nnunet_topomae.trainers.common import PRETRAINED_START_FILE, PretrainedStartMixin
from nnunet_topomae.utils.checkpoint import remove_stale_temporaries, safe_load, to_plain, unsafe_globals_in


class WritesMarker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def pretraining_like(method="topomae", has_cnn=True) -> dict:
    rec = {"format": 1, "trainer": "nnUNetTrainerTopoMAEPretrain", "dataset_name": "Dataset901_Synth",
           "plans_name": "nnUNetPlans", "configuration": "3d_fullres", "patch_size": [40, 40, 40],
           "num_input_channels": 1, "method": method, "has_cnn": has_cnn, "vit_config": {"embed_dim": 8}}
    return {"network_weights": {"vit_encoder.w": torch.zeros(2)}, "optimizer_state": {}, "current_epoch": 2,
            "num_epochs": 2, "init_args": {"plans": {"dataset_name": "Dataset901_Synth"}, "configuration": "3d_fullres",
                                           "fold": 0, "device": torch.device("cpu")},
            "trainer_name": rec["trainer"], "pretraining": rec, "_best_ema": 0.5, "logging": {"x": [1.0]}}


def test_a_file_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pth"
    torch.save({"network_weights": {}, "x": WritesMarker(marker)}, evil)
    with pytest.raises(UserInputError) as e:
        safe_load(str(evil))
    msg = str(e.value)
    assert "\n" not in msg and str(evil) in msg and "contains code or objects that are not weights" in msg
    assert "system" in msg  # names what it would have run
    assert not marker.exists()


def test_a_poisoned_genuine_pretraining_checkpoint_is_refused_by_the_transfer(tmp_path):
    marker = tmp_path / "MARKER"
    good = pretraining_like()
    torch.save(good, tmp_path / "good.pth")
    assert transfer.read_pretraining_checkpoint(str(tmp_path / "good.pth"))["pretraining"]["method"] == "topomae"
    torch.save(dict(good, extra=WritesMarker(marker)), tmp_path / "poisoned.pth")
    with pytest.raises(UserInputError, match="contains code"):
        transfer.read_pretraining_checkpoint(str(tmp_path / "poisoned.pth"))
    assert not marker.exists()
    assert "posix.system" in unsafe_globals_in(str(tmp_path / "poisoned.pth")) or \
        "os.system" in unsafe_globals_in(str(tmp_path / "poisoned.pth"))


def test_stock_loader_rule_refuses_code_and_names_the_topomae_trainer(tmp_path):
    marker = tmp_path / "MARKER"
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    torch.save({"network_weights": net.state_dict(), "x": WritesMarker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserInputError, match="contains code"):
        transfer.load_with_stock_rules(net, str(tmp_path / "evil.pth"))
    assert not marker.exists()
    torch.save(pretraining_like(), tmp_path / "topomae.pth")
    with pytest.raises(UserInputError, match="nnUNetTrainerTopoMAEFinetune"):
        transfer.load_with_stock_rules(net, str(tmp_path / "topomae.pth"))
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))
    torch.save({"network_weights": other.state_dict()}, tmp_path / "ok.pth")
    assert transfer.load_with_stock_rules(net, str(tmp_path / "ok.pth")) == 2
    assert torch.equal(net[0].weight, other[0].weight)


def test_numpy_numbers_load_safely_and_our_contents_are_plain(tmp_path):
    # nnU-Net's own checkpoints keep numpy scalars (logger, EMA): read as numbers, no code
    torch.save({"network_weights": {}, "_best_ema": np.float64(0.25), "l": [np.float32(1.5), np.int64(3)]},
               tmp_path / "stock.pth")
    got = safe_load(str(tmp_path / "stock.pth"))
    assert float(got["_best_ema"]) == 0.25 and float(got["l"][0]) == 1.5
    plain = to_plain({"a": np.float64(1.0), "b": (np.int64(2), [np.float32(3.0)]), "c": np.arange(3), "t": torch.ones(1)})
    assert plain["a"] == 1.0 and type(plain["a"]) is float and plain["b"] == (2, [3.0]) and plain["c"] == [0, 1, 2]
    assert isinstance(plain["t"], torch.Tensor)
    torch.save(plain, tmp_path / "plain.pth")
    torch.load(tmp_path / "plain.pth", weights_only=True)  # without any allowance


def test_missing_and_truncated_files_get_one_line(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        safe_load(str(tmp_path / "nope.pth"))
    torch.save(pretraining_like(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "half.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="is the file complete") as e:
        safe_load(str(tmp_path / "half.pth"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method,has_cnn,kind,taker", [
    ("topomae", True, "TopoMAE pretraining", "nnUNetTrainerTopoMAEFinetune"),
    ("topomae", False, "plain MAE pretraining", "nnUNetTrainerTopoMAEFinetune"),
    ("hybridmim", True, "HybridMIM pretraining", "nnUNetTrainerHybridMIMFinetune"),
])
def test_inspect_says_what_a_pretraining_checkpoint_is(tmp_path, method, has_cnn, kind, taker):
    ck = pretraining_like(method, has_cnn)
    ck["current_epoch"] = 1  # of 2: incomplete
    torch.save(ck, tmp_path / "c.pth")
    info = inspect_file(str(tmp_path / "c.pth"))
    assert kind in info["kind"] and taker in info["taken_by"] and info["complete"] is False and info["safe"]
    text = "\n".join(format_info(info))
    assert "Dataset901_Synth" in text and "3d_fullres" in text and "[40, 40, 40]" in text and "1 of 2" in text
    assert ("safe for nnU-Net:  yes" in text) == (method == "hybridmim")


def test_inspect_of_a_segmentation_checkpoint_and_of_a_refused_file(tmp_path):
    seg = {"network_weights": {"w": torch.zeros(1)}, "trainer_name": "nnUNetTrainer", "current_epoch": 3,
           "init_args": {"plans": {"dataset_name": "D", "plans_name": "nnUNetPlans",
                                   "configurations": {"3d_fullres": {"patch_size": [8, 8, 8]}}},
                         "configuration": "3d_fullres", "fold": 1}}
    info = describe(seg)
    assert info["kind"] == "nnU-Net segmentation checkpoint" and info["patch_size"] == [8, 8, 8]
    assert info["complete"] is None and "nnUNetv2_predict" in info["taken_by"]
    torch.save({"network_weights": {}, "x": WritesMarker(tmp_path / "M")}, tmp_path / "evil.pth")
    bad = inspect_file(str(tmp_path / "evil.pth"))
    assert bad["safe"] is False and "NOT SAFE" in format_info(bad)[0]
    assert not (tmp_path / "M").exists()
    from nnunet_topomae.cli import main
    assert main(["inspect", str(tmp_path / "evil.pth")]) == 2


def test_partial_checkpoint_files_are_removed(tmp_path):
    (tmp_path / ".tmp_abc.pth").write_bytes(b"x" * 100)
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"keep")
    removed = remove_stale_temporaries(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == [".tmp_abc.pth"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_latest.pth"]


class FakeFinetune(PretrainedStartMixin):
    class _PM:
        dataset_name, plans_name = "Dataset901_Synth", "nnUNetPlans"

    def __init__(self, folder):
        self.output_folder, self.local_rank, self.fold = str(folder), 0, 0
        self.configuration_name, self.plans_manager, self.log = "3d_fullres", self._PM(), []

    def print_to_log_file(self, *args):
        self.log.append(" ".join(map(str, args)))


def test_resume_rules_of_a_finetuning_run_started_from_pretrained_weights(tmp_path):
    weights = tmp_path / "pre.pth"
    torch.save(pretraining_like(), weights)
    tr = FakeFinetune(tmp_path / "fold_0")
    # a start from weights is remembered
    assert tr.resolve_start(False, False, str(weights)) == (False, str(weights))
    rec = json.loads((tmp_path / "fold_0" / PRETRAINED_START_FILE).read_text())
    assert rec["pretrained_weights"] == str(weights) and len(rec["sha256"]) == 64
    # killed before the first checkpoint, then --c alone: the same weights again, and it says so
    assert tr.resolve_start(True, False, None) == (False, str(weights))
    assert "starting again from the pretrained weights" in tr.log[-1]
    # --c with -pretrained_weights and a checkpoint: continue, weights not loaded again
    (tmp_path / "fold_0" / "checkpoint_latest.pth").write_bytes(b"x")
    assert tr.resolve_start(True, False, str(weights)) == (True, None)
    os.remove(tmp_path / "fold_0" / "checkpoint_latest.pth")
    # the weights file changed since: stop, naming the command
    torch.save(pretraining_like("mae", False), weights)
    with pytest.raises(UserInputError, match="changed since"):
        tr.resolve_start(True, False, None)
    # no record at all: stop with the command to run
    fresh = FakeFinetune(tmp_path / "fold_1")
    with pytest.raises(UserInputError, match="nnUNetv2_train Dataset901_Synth 3d_fullres 0 .*-pretrained_weights"):
        fresh.resolve_start(True, False, None)
    # a run started from scratch starts again from scratch on --c
    assert fresh.resolve_start(False, False, None) == (False, None)
    assert fresh.resolve_start(True, False, None) == (False, None)


@pytest.mark.parametrize("how", ["worker_asks", "at_fork_hook", "none"])
def test_a_forked_worker_dies_with_its_parent_after_kill_9(tmp_path, how):
    # the parent forks a worker, then waits; kill -9 the parent: the worker must be gone within seconds
    # (without either mechanism, "none", it sleeps on: the control that the test can fail)
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        from nnunet_topomae.utils.process import children_die_with_this_process, die_with_parent
        parent = os.getpid()
        if {how!r} == "at_fork_hook":
            children_die_with_this_process()
        pid = os.fork()
        if pid == 0:
            if {how!r} == "worker_asks":
                die_with_parent(parent)
            time.sleep(20)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(20)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while time.time() < deadline and os.path.exists(f"/proc/{worker}"):
        try:
            if open(f"/proc/{worker}/stat").read().split()[2] == "Z":
                break
        except OSError:
            break
        time.sleep(0.1)
    alive = os.path.exists(f"/proc/{worker}") and open(f"/proc/{worker}/stat").read().split()[2] != "Z"
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert alive == (how == "none"), "the worker outlived its killed parent" if alive else "control died too"
