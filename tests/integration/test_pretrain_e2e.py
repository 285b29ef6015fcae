"""End-to-end pretraining through nnU-Net's real commands: nnUNetv2_train with the short-schedule
test trainers, ``--c`` after an interruption, the 2D-configuration error, and the env/doctor CLI."""
from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from nnunet_topomae.utils.checkpoint import safe_load

from integration.helpers import (
    INTERRUPT_ENV,
    INTERRUPT_EXIT_CODE,
    TEST_EXT_TRAINER_DIR,
    clean_base_env,
    console_script,
    describe,
    is_png,
    leftover_message,
    output_folder,
    parse_env_output,
    run,
    train,
)
from nnunet_topomae.architectures.vit3d import ViTConfig, ViTEncoder3D, token_size_from_plan
from nnunet_topomae.cli import EXT_TRAINER_DIR
from nnunet_topomae.losses.topological import default_pool_workers

pytestmark = pytest.mark.integration

TOPOMAE_TERMS = ["rec_vit", "rec_cnn", "topo_vit", "topo_cnn", "spatial_vit", "spatial_cnn",
                 "rec_consistency", "spatial_consistency"]
EPOCHS = 2  # ShortScheduleMixin.pretrain_epochs


def _load(path):
    return safe_load(path)  # our checkpoints must load with weights_only=True


def _logged_epochs(log_text: str):
    return [int(e) for e in re.findall(r": Epoch (\d+)\s*$", log_text, flags=re.M)]


def _read(path):
    with open(path) as f:
        return f.read()


# ----------------------------------------------------------------------------- one full run

def test_run_writes_every_output(topomae_pretrain_run):
    fold = topomae_pretrain_run.output_folder
    files = os.listdir(fold)
    assert "checkpoint_final.pth" in files and "checkpoint_best.pth" in files, files
    # the test trainer writes checkpoint_latest.pth after epoch 0; the finished run must remove it
    assert "checkpoint_latest.pth" not in files, files
    assert not [f for f in files if f.startswith(".tmp_")], f"temporary files left behind: {files}"
    for png in ("progress.png", "loss_terms.png", "reconstruction_preview.png", "persistence_diagrams.png"):
        assert is_png(os.path.join(fold, png)), f"{png} missing, empty or not a PNG in {fold}: {files}"
    assert glob.glob(os.path.join(fold, "training_log_*.txt"))
    assert "Traceback" not in topomae_pretrain_run.stderr, topomae_pretrain_run.stderr[-3000:]


def test_checkpoint_contents(topomae_pretrain_run, nnunet_dataset):
    ckpt = _load(topomae_pretrain_run.checkpoint_final)
    assert ckpt["trainer_name"] == "nnUNetTrainerTopoMAEPretrain_test"
    assert ckpt["current_epoch"] == EPOCHS

    rec = ckpt["pretraining"]
    plans = nnunet_dataset.load_plans()
    conf = plans["configurations"]["3d_fullres"]
    assert rec["configuration"] == "3d_fullres"
    assert rec["plans_name"] == "nnUNetPlans"
    assert rec["dataset_name"] == nnunet_dataset.dataset_name
    assert rec["patch_size"] == conf["patch_size"]
    expected_token, _ = token_size_from_plan(conf["patch_size"], conf["architecture"]["arch_kwargs"]["strides"])
    assert tuple(rec["token_size"]) == expected_token
    cfg = ViTConfig.from_dict(rec["vit_config"])
    assert cfg.token_size == expected_token and list(cfg.patch_size) == conf["patch_size"]
    assert cfg.in_channels == rec["num_input_channels"] == 1

    weights = ckpt["network_weights"]
    assert any(k.startswith("vit_encoder.") for k in weights)
    assert any(k.startswith("cnn.encoder.") for k in weights)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in weights.values())
    # the record is enough to rebuild the ViT encoder and load its weights strictly
    enc_sd = {k[len("vit_encoder."):]: v for k, v in weights.items() if k.startswith("vit_encoder.")}
    ViTEncoder3D(cfg).load_state_dict(enc_sd, strict=True)

    hist = ckpt["term_history"]
    for split in ("train", "val"):
        assert set(hist[split]) == set(TOPOMAE_TERMS) | {"loss"}, hist[split].keys()
        assert all(len(v) == EPOCHS for v in hist[split].values())
    best = _load(os.path.join(topomae_pretrain_run.output_folder, "checkpoint_best.pth"))
    assert "pretraining" in best and best["current_epoch"] <= EPOCHS


def test_training_log_mentions_every_loss_term(topomae_pretrain_run, nnunet_dataset):
    logs = glob.glob(os.path.join(topomae_pretrain_run.output_folder, "training_log_*.txt"))
    text = "\n".join(_read(p) for p in logs)
    for term in TOPOMAE_TERMS + ["train_loss", "val_loss"]:
        assert re.search(rf"\b{term}\b", text), f"'{term}' not in the training log"
    assert _logged_epochs(text) == list(range(EPOCHS))
    # the trainer's malloc setting took effect in the real training process (glibc on Linux)
    if sys.platform.startswith("linux"):
        assert "glibc malloc keeps freed memory (malloc_keep_freed): True" in text
    # the persistence pool's default size, from the plan's batch (x 2 branches) and this machine's cores
    batch = nnunet_dataset.load_plans()["configurations"]["3d_fullres"]["batch_size"]
    assert f"reconstructions' persistence in {default_pool_workers(batch * 2)} processes" in text


def test_checkpoints_are_readable_like_other_outputs(topomae_pretrain_run):
    """Checkpoints should get the same permission bits as nnU-Net's other outputs (umask), so that
    colleagues/groups can read pretrained weights on shared machines."""
    fold = topomae_pretrain_run.output_folder
    reference = stat.S_IMODE(os.stat(os.path.join(fold, "progress.png")).st_mode)
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        mode = stat.S_IMODE(os.stat(os.path.join(fold, name)).st_mode)
        assert mode == reference, (
            f"{name} has mode {oct(mode)}, nnU-Net's other outputs {oct(reference)}: "
            f"nnunet_topomae/utils/checkpoint.py atomic_torch_save keeps tempfile.mkstemp's 0600")


# ----------------------------------------------------------------------------- MAE baseline

def test_mae_baseline_run(nnunet_dataset):
    trainer = "nnUNetTrainerMAEPretrain_test"
    results = nnunet_dataset.fresh_results("mae")
    train(nnunet_dataset, trainer, env=nnunet_dataset.env(nnUNet_results=results))
    fold = output_folder(results, nnunet_dataset.dataset_name, trainer)
    ckpt = _load(os.path.join(fold, "checkpoint_final.pth"))
    keys = ckpt["network_weights"].keys()
    assert any(k.startswith("vit_encoder.") for k in keys)
    assert not [k for k in keys if not k.startswith(("vit_encoder.", "vit_decoder."))]
    assert ckpt["pretraining"]["has_cnn"] is False
    assert set(ckpt["term_history"]["train"]) == {"rec_vit", "loss"}
    assert is_png(os.path.join(fold, "reconstruction_preview.png"))
    assert is_png(os.path.join(fold, "persistence_diagrams.png"))  # input against the ViT's reconstruction


# ----------------------------------------------------------------------------- --c

@pytest.fixture(scope="module")
def interrupted_and_continued(nnunet_dataset):
    """Run 1 is killed (os._exit, no clean-up, like a cancelled or crashed job) right after epoch 0,
    when checkpoint_latest.pth has been written; run 2 is the same command with ``--c``.
    Returns a dict with both results and what was on disk in between."""
    trainer = "nnUNetTrainerTopoMAEPretrain_test"
    results = nnunet_dataset.fresh_results("continue")
    fold = output_folder(results, nnunet_dataset.dataset_name, trainer)
    first = train(nnunet_dataset, trainer, env=nnunet_dataset.env(nnUNet_results=results, **{INTERRUPT_ENV: "0"}),
                  check=False, check_leftovers=False)
    assert first.returncode == INTERRUPT_EXIT_CODE, describe(first)
    files_between = os.listdir(fold)
    latest = _load(os.path.join(fold, "checkpoint_latest.pth")) if "checkpoint_latest.pth" in files_between else None
    logs_before = set(glob.glob(os.path.join(fold, "training_log_*.txt")))
    second = train(nnunet_dataset, trainer, extra_args=["--c"], env=nnunet_dataset.env(nnUNet_results=results),
                   check=False, check_leftovers=False)
    new_logs = set(glob.glob(os.path.join(fold, "training_log_*.txt"))) - logs_before
    return dict(fold=fold, first=first, second=second, files_between=files_between, latest=latest,
                new_logs=sorted(new_logs))


def test_continue_resumes_from_the_saved_epoch(interrupted_and_continued):
    """``--c`` must load checkpoint_latest.pth, train epoch 1 only and carry the history of epoch 0."""
    r = interrupted_and_continued
    assert "checkpoint_latest.pth" in r["files_between"], r["files_between"]
    assert "checkpoint_final.pth" not in r["files_between"], r["files_between"]
    latest = r["latest"]
    assert latest["current_epoch"] == 1
    assert len(latest["term_history"]["train"]["loss"]) == 1

    second = r["second"]
    assert second.returncode == 0, describe(second)
    assert len(r["new_logs"]) == 1, "the continued run should write its own training log"
    assert _logged_epochs(_read(r["new_logs"][0])) == [1], "the continued run must start at epoch 1, not 0"
    assert _logged_epochs(second.stdout) == [1], describe(second)

    files = os.listdir(r["fold"])
    assert "checkpoint_final.pth" in files and "checkpoint_latest.pth" not in files, files
    assert not [f for f in files if f.startswith(".tmp_")], files
    final = _load(os.path.join(r["fold"], "checkpoint_final.pth"))
    assert final["current_epoch"] == EPOCHS
    for split in ("train", "val"):
        hist = final["term_history"][split]
        assert all(len(v) == EPOCHS for v in hist.values()), {k: len(v) for k, v in hist.items()}
        assert hist["loss"][0] == latest["term_history"][split]["loss"][0], "epoch 0 history was not carried over"
    assert len(final["logging"]["train_losses"]) == EPOCHS
    assert final["logging"]["train_losses"][0] == latest["logging"]["train_losses"][0]


def test_continue_keeps_the_validation_moving_average(interrupted_and_continued):
    """The moving average of the validation loss (momentum 0.9) and the best-checkpoint tracking must
    continue as in an uninterrupted run, so checkpoint_latest.pth has to hold the state *after* its epoch."""
    r = interrupted_and_continued
    assert r["second"].returncode == 0, describe(r["second"])
    final = _load(os.path.join(r["fold"], "checkpoint_final.pth"))
    v0, v1 = final["term_history"]["val"]["loss"]
    emas = [v0, 0.9 * v0 + 0.1 * v1]
    latest = r["latest"]
    assert latest["_val_ema"] is not None and latest["_val_ema"] == pytest.approx(v0, rel=1e-6), (
        f"checkpoint_latest.pth (written after epoch 0) holds _val_ema={latest['_val_ema']} and "
        f"_best_ema={latest['_best_ema']}, expected the epoch-0 validation loss {v0}: "
        f"nnUNetPretrainTrainerBase.on_epoch_end saves checkpoint_latest.pth before updating them")
    assert final["_val_ema"] == pytest.approx(emas[1], rel=1e-5)
    assert final["_best_ema"] == pytest.approx(min(emas), rel=1e-5)


def test_killed_training_leaves_no_processes_behind(interrupted_and_continued):
    """A training that is killed (OOM killer, scheduler, kill -9) must not leave worker processes
    running: they hold memory and the job's stdout/stderr (a caller waiting for the output hangs)."""
    for key in ("first", "second"):
        res = interrupted_and_continued[key]
        if res.leftovers:
            pytest.fail(leftover_message(res) + (
                "\nnnunet_topomae/losses/topological.py PersistencePool: its spawned ProcessPoolExecutor workers "
                "do not exit when the training process dies"))


# ----------------------------------------------------------------------------- 2D configuration

def _trainer_kwargs(ds, configuration):
    plans = ds.load_plans()
    plans["continue_training"] = False  # nnU-Net's run_training adds this before instantiating
    return dict(plans=plans, configuration=configuration, fold=0, dataset_json=ds.load_dataset_json(),
                device=torch.device("cpu"))


def test_2d_configuration_in_process_gives_user_error(nnunet_dataset, monkeypatch, tmp_path):
    from nnunet_topomae.errors import UserInputError
    from nnunet_topomae.trainers import nnUNetTrainerMAEPretrain, nnUNetTrainerTopoMAEPretrain

    assert "2d" in nnunet_dataset.load_plans()["configurations"]
    monkeypatch.setenv("nnUNet_preprocessed", nnunet_dataset.preprocessed)
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    for cls in (nnUNetTrainerTopoMAEPretrain, nnUNetTrainerMAEPretrain):
        with pytest.raises(UserInputError) as exc:
            cls(**_trainer_kwargs(nnunet_dataset, "2d"))
        msg = str(exc.value)
        assert "\n" not in msg and "3D configuration" in msg and "'2d'" in msg, msg
    # the 3D configuration of the same plans is accepted
    cls(**_trainer_kwargs(nnunet_dataset, "3d_fullres"))


def test_2d_configuration_through_nnunetv2_train_is_one_line(nnunet_dataset):
    results = nnunet_dataset.fresh_results("2d")
    res = train(nnunet_dataset, "nnUNetTrainerTopoMAEPretrain_test", configuration="2d",
                env=nnunet_dataset.env(nnUNet_results=results), check=False, timeout=300)
    assert res.returncode == 1, describe(res)
    assert "Traceback" not in res.stderr, describe(res)
    last = [ln for ln in res.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("nnunet-topomae: ") and "3D configuration" in last, describe(res)


# ----------------------------------------------------------------------------- env / doctor

def _env_value(extra_env):
    env = clean_base_env()
    env.update(extra_env)
    return parse_env_output(run([console_script("nnunet-topomae"), "env"], env, timeout=120).stdout)


def test_env_keeps_existing_folders_once():
    parts = _env_value({"nnUNet_extTrainer": os.pathsep.join(["/a", "/b"])}).split(os.pathsep)
    assert parts == [EXT_TRAINER_DIR, "/a", "/b"]
    # idempotent: our folder already present (also in non-normalised form), duplicates dropped
    current = os.pathsep.join(["/a", EXT_TRAINER_DIR + os.sep, "/b", "/a"])
    parts = _env_value({"nnUNet_extTrainer": current}).split(os.pathsep)
    assert parts == [EXT_TRAINER_DIR, "/a", "/b"], parts
    # unset -> our folder only
    assert _env_value({}) == EXT_TRAINER_DIR


def test_env_module_and_console_script_agree():
    env = clean_base_env()
    env["nnUNet_extTrainer"] = "/a"
    a = run([console_script("nnunet-topomae"), "env"], env, timeout=120).stdout
    b = run([sys.executable, "-m", "nnunet_topomae.cli", "env"], env, timeout=120).stdout
    assert a == b


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_env_output_evaluates_in_shell(shell, tmp_path):
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    odd = str(tmp_path / "my trainers $HOME")  # a space and a $ must survive the quoting
    env = clean_base_env()
    env["nnUNet_extTrainer"] = os.pathsep.join(["/a", odd, "/b"])
    cli = console_script("nnunet-topomae")
    script = f'eval "$({cli} env)"; eval "$({cli} env)"; printf "%s" "$nnUNet_extTrainer"'
    out = subprocess.run([exe, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    parts = out.stdout.split(os.pathsep)
    assert parts == [EXT_TRAINER_DIR, "/a", odd, "/b"], parts


def test_doctor_passes_in_the_integration_env(nnunet_dataset):
    res = run([console_script("nnunet-topomae"), "doctor"], nnunet_dataset.env(), timeout=300)
    assert "All checks passed" in res.stdout, describe(res)


def test_doctor_fails_clearly_without_our_trainer_folder(nnunet_dataset):
    for ext in (TEST_EXT_TRAINER_DIR, None):  # another folder only / variable unset
        res = run([console_script("nnunet-topomae"), "doctor"], nnunet_dataset.env(nnUNet_extTrainer=ext),
                  timeout=300, check=False)
        assert res.returncode == 1, describe(res)
        assert "nnUNet_extTrainer does not contain this package's trainer folder" in res.stdout, describe(res)
        assert 'eval "$(nnunet-topomae env)"' in res.stdout, describe(res)
        assert "Traceback" not in res.stderr, describe(res)


def test_interrupt_constants_match_the_shim_module():
    text = _read(os.path.join(TEST_EXT_TRAINER_DIR, "nnunet_topomae_test_trainers.py"))
    assert f'INTERRUPT_ENV = "{INTERRUPT_ENV}"' in text
    assert f"INTERRUPT_EXIT_CODE = {INTERRUPT_EXIT_CODE}" in text
