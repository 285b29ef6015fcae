"""Tests of ``nnunet-topomae bench`` (nnunet_topomae/bench.py).

Fast and CPU-only: ``bench topo`` runs for real on a small patch; ``bench step`` is tested for its
argument checking, its subprocess environment, its report and its error channel (an unknown trainer),
never for a real measurement (the integration tests train through nnU-Net already)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nnunet_topomae import bench
from nnunet_topomae.cli import EXT_TRAINER_DIR, main
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.losses.topological import default_pool_workers

TOPO_PARTS = ["inputs_persistence_ms", "recon_persistence_serial_ms", "recon_persistence_pool_ms",
              "matching_backward_ms", "critical_path_ms", "critical_path_other_ms", "critical_path_serial_ms",
              "critical_path_inputs_on_step_ms"]


# ---------------------------------------------------------------------------------------- bench topo
def test_topo_json_has_every_part(capsys):
    rc = main(["bench", "topo", "--patch", "24", "24", "24", "--batch", "2", "--repeats", "2", "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # stdout is only the JSON (progress went to stderr)
    assert report["critical_path_ms_median"] > 0
    assert report["critical_path_ms_median"] == report["parts"]["critical_path_ms"]["median"]
    for part in TOPO_PARTS:
        assert part in report["parts"], part
        assert f"{part}_median" in report
        assert report["parts"][part]["n"] == 2
    for part in set(TOPO_PARTS) - {"critical_path_other_ms"}:  # a remainder can be negative with noise
        assert report["parts"][part]["median"] > 0, part
    assert report["pool_startup_ms"] > 0
    # the trainer's pool size by default (2 on a 2-core machine)
    assert report["volumes_per_step"] == 4 and report["branches"] == 2 and report["workers"] == default_pool_workers(4)
    # 24^3 = 13824 voxels is over the default budget (12288): a cubic patch is coarsened on every axis alike
    assert report["reduced_shape"] == [12, 12, 12] and report["max_voxels"] == 12288
    assert report["on_critical_path"]["inputs_persistence_ms"] == "no"
    assert report["malloc_keep_freed"] is sys.platform.startswith("linux")  # as the trainer: glibc keeps freed memory
    assert report["machine"]["cpu_count"] >= 1 and "torch" in report["machine"]


def test_topo_serial_table(capsys):
    rc = main(["bench", "topo", "--patch", "20", "16", "12", "--batch", "1", "--branches", "1", "--workers", "0",
               "--max-size", "8", "--repeats", "1", "--malloc-default"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "CRITICAL PATH" in out and "reduced 7x8x6" in out  # kernels 3, 2, 2 with ceil_mode
    assert "malloc keeps freed memory: False" in out
    assert "in the pool" not in out and "pool start-up" not in out  # no pool with --workers 0


def test_topo_sweep_small(capsys):
    rc = main(["bench", "topo", "--patch", "16", "16", "16", "--batch", "1", "--workers", "0", "--repeats", "1",
               "--sweep", "--sweep-sizes", "8", "12", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    sweep = report["sweep"]
    assert {r["size"] for r in sweep["ph_vs_resolution"]} == {8, 12}
    assert "gudhi" in {r["backend"] for r in sweep["ph_vs_resolution"]}
    assert [r["batch"] for r in sweep["critical_path_vs_batch"]] == [1, 2, 4, 8]
    assert all(r["critical_path_ms_median"] > 0 for r in sweep["critical_path_vs_batch"])


def test_topo_missing_backend_is_one_line_error(monkeypatch):
    import nnunet_topomae.losses.topological as topo
    monkeypatch.setattr(topo, "available_backends", lambda: ["gudhi"])
    with pytest.raises(UserInputError) as e:
        main(["bench", "topo", "--backend", "cripser", "--patch", "8", "8", "8", "--repeats", "1"])
    assert "cripser" in e.value.message and "\n" not in str(e.value)


def test_synthetic_volumes_reproducible():
    a, ra = bench.synthetic_volumes(2, (12, 10, 8), 2, seed=3)
    b, rb = bench.synthetic_volumes(2, (12, 10, 8), 2, seed=3)
    assert a.shape == (2, 1, 12, 10, 8) and len(ra) == 2
    assert (a == b).all() and all((x == y).all() for x, y in zip(ra, rb))
    assert not (ra[0] == ra[1]).all()  # each branch has its own perturbation


# ---------------------------------------------------------------------------------------- bench step: arguments
def _fake_preprocessed(root, name="Dataset901_Synth", preprocessed=True):
    """A preprocessed-folder layout just deep enough for the argument checks (no real data)."""
    ds = root / name
    ds.mkdir(parents=True)
    plans = {"dataset_name": name, "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2},
                                "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres"},
                                "3d_cascade_fullres": {"inherits_from": "3d_fullres"}}}
    (ds / "nnUNetPlans.json").write_text(json.dumps(plans))
    (ds / "dataset.json").write_text("{}")
    if preprocessed:
        (ds / "nnUNetPlans_3d_fullres").mkdir()
    return ds


def _step(*extra):
    return ["bench", "step", *extra]


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    pre = tmp_path / "pre"
    pre.mkdir()
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    return pre


def _one_line_error(argv) -> str:
    with pytest.raises(UserInputError) as e:
        main(argv)
    msg = str(e.value)
    assert msg.startswith("nnunet-topomae: ") and "\n" not in msg, msg
    return e.value.message


def test_step_unknown_dataset_id(preprocessed):
    _fake_preprocessed(preprocessed, "Dataset902_Other")
    msg = _one_line_error(_step("-d", "901", "-c", "3d_fullres", "-tr", "nnUNetTrainer"))
    assert "ID 901" in msg and str(preprocessed) in msg and "Dataset902_Other" in msg
    assert "nnUNetv2_plan_and_preprocess -d 901" in msg


def test_step_unknown_dataset_name_and_bad_format(preprocessed):
    msg = _one_line_error(_step("-d", "Dataset901_Nope", "-c", "3d_fullres", "-tr", "nnUNetTrainer"))
    assert "Dataset901_Nope" in msg
    msg = _one_line_error(_step("-d", "hippocampus", "-c", "3d_fullres", "-tr", "nnUNetTrainer"))
    assert "'hippocampus'" in msg and "dataset ID" in msg


def test_step_ambiguous_dataset_id(preprocessed):
    _fake_preprocessed(preprocessed, "Dataset901_A")
    _fake_preprocessed(preprocessed, "Dataset901_B")
    msg = _one_line_error(_step("-d", "901", "-c", "3d_fullres", "-tr", "nnUNetTrainer"))
    assert "ambiguous" in msg and "Dataset901_A" in msg and "Dataset901_B" in msg


def test_step_preprocessed_unset_or_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert "nnUNet_preprocessed is not set" in _one_line_error(_step("-d", "901", "-c", "3d_fullres", "-tr", "X"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "nope"))
    assert "does not exist" in _one_line_error(_step("-d", "901", "-c", "3d_fullres", "-tr", "X"))


def test_step_bad_plans_and_configuration(preprocessed):
    _fake_preprocessed(preprocessed)
    msg = _one_line_error(_step("-d", "901", "-c", "3d_fullres", "-tr", "X", "-p", "nnUNetResEncUNetMPlans"))
    assert "nnUNetResEncUNetMPlans" in msg and "plans there: nnUNetPlans" in msg
    msg = _one_line_error(_step("-d", "901", "-c", "3d_highres", "-tr", "X"))
    assert "'3d_highres'" in msg and "3d_fullres" in msg and "3d_lowres" in msg
    # inherits its data identifier from 3d_fullres, which is preprocessed: passes this check (fails later on -tr)
    assert bench._config_value(json.loads((preprocessed / "Dataset901_Synth" / "nnUNetPlans.json").read_text())
                               ["configurations"], "3d_cascade_fullres", "data_identifier") == "nnUNetPlans_3d_fullres"
    msg = _one_line_error(_step("-d", "901", "-c", "3d_lowres", "-tr", "X"))
    assert "not preprocessed" in msg and "nnUNetv2_preprocess" in msg


def test_step_cuda_without_gpu(preprocessed):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _fake_preprocessed(preprocessed)
    assert "--device cpu" in _one_line_error(_step("-d", "901", "-c", "3d_fullres", "-tr", "X", "--device", "cuda"))


@pytest.mark.parametrize("extra", [["--steps", "0"], ["--warmup", "-1"], ["--device", "tpu"]])
def test_step_bad_numbers_are_argparse_errors(extra, capsys):
    with pytest.raises(SystemExit) as e:
        main(_step("-d", "901", "-c", "3d_fullres", "-tr", "X", *extra))
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bench_without_subcommand_prints_help(capsys):
    assert main(["bench"]) == 2
    assert "step" in capsys.readouterr().out


def test_step_bad_dataset_from_the_command_line(tmp_path):
    """As a user sees it: exit 1, one line on stderr, no traceback."""
    env = dict(os.environ, nnUNet_preprocessed=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", "nnunet_topomae.cli", "bench", "step", "-d", "999", "-c", "3d_fullres",
                          "-tr", "nnUNetTrainerTopoMAEPretrain"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("nnunet-topomae: no dataset with ID 999"), res.stderr


def test_step_unknown_trainer_reported_by_the_subprocess(preprocessed, capsys, monkeypatch, tmp_path):
    """The measuring subprocess checks every trainer name before it builds anything; the error comes
    back as one line naming the kept log; the temporary nnUNet_results is removed."""
    import tempfile
    _fake_preprocessed(preprocessed)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    msg = _one_line_error(_step("-d", "901", "-c", "3d_fullres", "-tr", "nnUNetTrainer",
                                "--compare", "nnUNetTrainerDoesNotExist", "--steps", "1"))
    assert "cannot find trainer 'nnUNetTrainerDoesNotExist'" in msg
    out = capsys.readouterr().out
    assert "step 1/1" not in out and "warm-up 1/" not in out and "building" not in out  # nothing was measured
    (kept,) = scratch.iterdir()
    assert sorted(os.listdir(kept)) == ["bench_step_log.txt", "result_0.json"]


# ---------------------------------------------------------------------------------------- bench step: pieces
def test_step_env_replaces_only_results(tmp_path):
    user = {"nnUNet_raw": "/data/raw", "nnUNet_preprocessed": "/data/pre", "nnUNet_results": "/data/results",
            "nnUNet_extTrainer": "/my/trainers", "nnUNet_compile": "f", "PATH": "/usr/bin"}
    env = bench.step_env(str(tmp_path), user)
    assert env["nnUNet_results"] == str(tmp_path)
    assert env["nnUNet_raw"] == "/data/raw" and env["nnUNet_preprocessed"] == "/data/pre"
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [EXT_TRAINER_DIR, "/my/trainers"]
    assert env["nnUNet_compile"] == "f" and env["PATH"] == "/usr/bin"
    assert "nnUNet_n_proc_DA" not in env  # nnU-Net's own default applies
    assert user["nnUNet_results"] == "/data/results"  # the caller's mapping is not modified
    assert bench.step_env(str(tmp_path), dict(user, nnUNet_n_proc_DA="5"))["nnUNet_n_proc_DA"] == "5"


def test_child_command_forwards_settings(preprocessed):
    _fake_preprocessed(preprocessed)
    import argparse
    args = argparse.Namespace(configuration="3d_fullres", plans="nnUNetPlans", steps=7, warmup=2)
    info = {"dataset": "Dataset901_Synth", "device": "cpu"}
    cmd = bench._child_cmd(args, info, "nnUNetTrainer", "/tmp/r.json", ["nnUNetTrainer", "B"])
    assert cmd[:4] == [sys.executable, "-m", "nnunet_topomae.bench", "_step"]
    joined = " ".join(cmd)
    for part in ("--dataset Dataset901_Synth", "--trainer nnUNetTrainer", "--steps 7", "--warmup 2",
                 "--device cpu", "--check-trainers nnUNetTrainer B"):
        assert part in joined


def _fake_result(trainer, step, wait=0.01, steps=5):
    r = {"benchmark": "step", "trainer": trainer, "dataset": "Dataset901_Synth", "configuration": "3d_fullres",
         "plans": "nnUNetPlans", "device": "cpu", "batch_size": 2, "patch_size": [40, 40, 40], "steps": steps,
         "warmup": 3, "n_proc_DA": 2, "peak_memory_mb": 1500.0, "peak_memory_kind": "ru_maxrss (RUSAGE_SELF)",
         "worker_peak_rss_mb": [900.0, 400.0], "machine": {"torch_threads": 2}}
    for key, v in (("step_s", step), ("data_wait_s", wait), ("total_s", step + wait)):
        for stat in ("median", "p10", "p90", "min", "max", "mean"):
            r[f"{key}_{stat}"] = v
    return r


def test_step_report_ratios_and_table():
    runs = [_fake_result("nnUNetTrainerTopoMAEPretrain", 2.0), _fake_result("nnUNetTrainerTopoMAEPretrain_noTopo", 1.5),
            _fake_result("nnUNetTrainer", 0.5), _fake_result("nnUNetTrainerMAEPretrain", 1.0)]
    report = bench.step_report(runs)
    assert report["step_s_median"] == 2.0 and report["trainer"] == "nnUNetTrainerTopoMAEPretrain"
    assert report["ratios_to_first"] == {"nnUNetTrainerTopoMAEPretrain_noTopo": 0.75, "nnUNetTrainer": 0.25,
                                         "nnUNetTrainerMAEPretrain": 0.5}
    assert report["ratio_matrix"]["nnUNetTrainerMAEPretrain"]["nnUNetTrainer"] == 2.0  # MAE vs stock
    # the totals count the data wait too: work moved into the loader cannot hide there
    assert report["total_ratios_to_first"]["nnUNetTrainer"] == pytest.approx(0.51 / 2.01)
    assert report["total_ratio_matrix"]["nnUNetTrainerMAEPretrain"]["nnUNetTrainer"] == pytest.approx(1.01 / 0.51)
    assert report["machine"]["torch_threads"] == 2  # the measuring process's settings win
    json.dumps(report)
    table = bench.format_step_table(report)
    for r in runs:
        assert r["trainer"] in table
    assert "min-max" in table and "0.25x" in table and "row / column" in table and "900, 400" in table
    assert "1.98" in table  # MAE / stock in the totals' matrix (1.01 / 0.51), not the train steps' 2.00


def test_stats():
    s = bench._stats([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4
    assert s["p10"] <= s["median"] <= s["p90"]


def test_bench_topo_refuses_a_patch_beyond_the_memory_in_one_line():
    from nnunet_topomae.bench import topo_memory_problem
    msg = topo_memory_problem([1024, 1024, 1024], 2, 2, available=16 * 2**30)
    assert msg and "needs about 288.0 GiB" in msg and "smaller --patch" in msg and "\n" not in msg
    assert topo_memory_problem([128, 128, 128], 2, 2, available=16 * 2**30) is None
    assert topo_memory_problem([1024, 1024, 1024], 2, 2, available=None) is None  # unknown: try
