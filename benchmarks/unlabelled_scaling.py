#!/usr/bin/env python
"""Unlabelled archives at scale (issue 25): ``add-unlabelled`` throughput and peak memory, and
pretraining's peak memory against the number of unlabelled cases.

    python benchmarks/unlabelled_scaling.py --out /tmp/unl_bench [--cases 500] [--pretrain-unlabelled 20 2000]

On a synthetic 6-case 40^3 nnU-Net dataset (tests/synthetic.py, planned and preprocessed by nnU-Net):
1. ``nnunet-topomae add-unlabelled`` on ``--cases`` synthetic 40^3 images, once with -np 1 and once
   with -np 2 (each into a fresh copy of the preprocessed dataset): wall time, cases per minute, and
   the peak resident memory of the command's processes (the largest single process: ru_maxrss of the
   waited-for children, Linux).
2. ``nnUNetv2_train ... -tr nnUNetTrainerTopoMAEPretrain_unlScaling`` (3 epochs x 5 steps) with 20
   and with 2,000 unlabelled cases (the 2,000 are copies of the preprocessed unlabelled files under
   new case ids: memory depends on how many cases there are, not on their content): peak resident
   memory of the training process, and the log line saying how many cases it trained on.
Writes ``results.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

SHIM = '''import torch
from nnunet_topomae.trainers import nnUNetTrainerTopoMAEPretrain


class nnUNetTrainerTopoMAEPretrain_unlScaling(nnUNetTrainerTopoMAEPretrain):
    pretrain_epochs = 3
    pretrain_iterations_per_epoch = 5
    pretrain_val_iterations_per_epoch = 2
    preview_every = 100
'''


def run_measured(cmd, env) -> dict:
    """Wall time and peak RSS (the largest process) of a command run in a fresh child python that waits for it."""
    probe = ("import resource, subprocess, sys, time, json; t=time.time(); "
             "p=subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True); "
             "print(json.dumps({'rc': p.returncode, 'seconds': time.time()-t, "
             "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, 'tail': p.stdout[-3000:]}))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--pretrain-unlabelled", type=int, nargs="*", default=[20, 2000])
    args = ap.parse_args()
    from synthetic import make_dataset
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    bindir = os.path.dirname(sys.executable)
    root = os.path.join(out, "base")
    env = dict(os.environ, nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pre"),
               nnUNet_results=os.path.join(root, "res"), nnUNet_def_n_proc="1", nnUNet_compile="f")
    env.pop("nnUNet_n_proc_DA", None)
    if not os.path.isfile(os.path.join(root, "pre", "Dataset901_Synth", "nnUNetPlans.json")):
        for k in ("raw", "pre", "res"):
            os.makedirs(os.path.join(root, k), exist_ok=True)
        make_dataset(env["nnUNet_raw"], dataset_id=901, n_cases=6)
        subprocess.run([os.path.join(bindir, "nnUNetv2_plan_and_preprocess"), "-d", "901", "-c", "3d_fullres", "-np", "1"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    archive = os.path.join(out, "archive")
    if not os.path.isdir(archive) or len(os.listdir(archive)) < args.cases:
        tmp = os.path.join(out, "archive_src")
        shutil.rmtree(tmp, ignore_errors=True)
        make_dataset(tmp, dataset_id=990, n_cases=args.cases, seed=11)
        shutil.rmtree(archive, ignore_errors=True)
        shutil.move(os.path.join(tmp, "Dataset990_Synth", "imagesTr"), archive)
        for f in os.listdir(archive):
            os.rename(os.path.join(archive, f), os.path.join(archive, "u" + f))
        shutil.rmtree(tmp)
    results = {"cases": args.cases, "load_average_before": os.getloadavg(), "add_unlabelled": {}, "pretraining": {}}
    for np_ in (1, 2):
        run_root = os.path.join(out, f"np{np_}")
        shutil.rmtree(run_root, ignore_errors=True)
        shutil.copytree(root, run_root, symlinks=True)
        e = dict(env, nnUNet_raw=os.path.join(run_root, "raw"), nnUNet_preprocessed=os.path.join(run_root, "pre"),
                 nnUNet_results=os.path.join(run_root, "res"))
        r = run_measured([os.path.join(bindir, "nnunet-topomae"), "add-unlabelled", "-d", "901", "-i", archive,
                          "-np", str(np_), "--no-progress"], e)
        r["cases_per_minute"] = round(args.cases / r["seconds"] * 60, 1)
        r["load_average_after"] = os.getloadavg()
        results["add_unlabelled"][str(np_)] = r
        print(f"add-unlabelled -np {np_}: {r['seconds']:.0f} s, {r['cases_per_minute']} cases/min, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, load {r['load_average_after'][0]:.1f}", flush=True)
    # pretraining with 20 and with 2000 unlabelled cases
    shim = os.path.join(out, "shim")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "nnunet_topomae_unl_scaling.py"), "w") as f:
        f.write(SHIM)
    from nnunet_topomae.utils.ext_trainer import ext_trainer_value
    src_unl = os.path.join(out, "np1", "pre", "Dataset901_Synth", "nnunet_topomae_unlabelled", "nnUNetPlans_3d_fullres")
    src_cases = sorted(f[:-4] for f in os.listdir(src_unl) if f.endswith(".pkl"))
    for n in args.pretrain_unlabelled:
        run_root = os.path.join(out, f"pretrain{n}")
        shutil.rmtree(run_root, ignore_errors=True)
        shutil.copytree(root, run_root, symlinks=True)
        dst = os.path.join(run_root, "pre", "Dataset901_Synth", "nnunet_topomae_unlabelled", "nnUNetPlans_3d_fullres")
        os.makedirs(dst)
        for i in range(n):
            c = src_cases[i % len(src_cases)]
            for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
                os.link(os.path.join(src_unl, c + suffix), os.path.join(dst, f"u{i:05d}{suffix}"))
        e = dict(env, nnUNet_raw=os.path.join(run_root, "raw"), nnUNet_preprocessed=os.path.join(run_root, "pre"),
                 nnUNet_results=os.path.join(run_root, "res"), nnUNet_n_proc_DA="0",
                 nnUNet_extTrainer=ext_trainer_value(shim))
        r = run_measured([os.path.join(bindir, "nnUNetv2_train"), "901", "3d_fullres", "0", "-tr",
                          "nnUNetTrainerTopoMAEPretrain_unlScaling", "-device", "cpu"], e)
        log = [line for line in r["tail"].splitlines() if "unlabelled cases" in line]
        r["log_line"] = log[-1] if log else None
        logs = os.path.join(run_root, "res", "Dataset901_Synth", "nnUNetTrainerTopoMAEPretrain_unlScaling__nnUNetPlans__3d_fullres", "fold_0")
        for f in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
            if f.startswith("training_log"):
                r["log_line"] = next((l.strip() for l in open(os.path.join(logs, f)) if "unlabelled cases" in l), r["log_line"])
        r["load_average_after"] = os.getloadavg()
        results["pretraining"][str(n)] = r
        print(f"pretraining with {n} unlabelled cases: rc {r['rc']}, {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB; "
              f"{r['log_line']}", flush=True)
    for r in list(results["add_unlabelled"].values()) + list(results["pretraining"].values()):
        r.pop("tail", None)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
