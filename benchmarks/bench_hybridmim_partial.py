"""Step time of HybridMIM's partial region prediction against decoding the whole patch (_noPartial).

Times the trainers' own ``train_step`` (two-level masking, forward through nnU-Net's CNN and the
HybridMIM heads, the contrastive second view, the loss, backward, gradient clipping, AdamW step) of
``nnUNetTrainerHybridMIMPretrain`` and ``nnUNetTrainerHybridMIMPretrain_noPartial`` on random input
of the plan's patch and batch size. Steps of the two trainers alternate (A B A B ...) so that load
from other processes on a shared machine hits both alike; the median over ``--steps`` timed steps
after ``--warmup`` untimed ones is reported.

Plans: a real plans file (``--plans nnUNetPlans.json --configuration 3d_fullres``) or the
synthetic presets (default ``hippocampus ct96``):

* ``hippocampus``: like nnU-Net's Hippocampus 3d_fullres plan: patch 40x56x40, strides 1,2,2,2,
  widths 32-256, batch 9;
* ``ct96`` / ``ct128``: patch 96^3 / 128^3, five stride-2 stages (the released HybridMIM layout on
  96^3: a 3^3 bottleneck, 2^3 sub-volumes decoded = the central 64^3), widths 32-320, batch 2.

    python benchmarks/bench_hybridmim_partial.py --steps 5 --device cpu
    python benchmarks/bench_hybridmim_partial.py --presets ct128 --device cuda --steps 20
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

from nnunet_topomae.utils.synthetic_plans import PLAIN, plans


def synthetic_plans(patch, strides, features, batch_size, channels: int = 1) -> dict:
    """nnU-Net-shaped plans (two convolutions per stage, as nnU-Net plans them)."""
    return plans(patch, strides, features, PLAIN, batch_size, channels, dataset_name="Dataset999_HybridMIMBench",
                 n_conv=2, n_conv_decoder=2)


PRESETS = {
    "hippocampus": dict(patch=(40, 56, 40), strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
                        features=[32, 64, 128, 256], batch_size=9),
    "ct96": dict(patch=(96, 96, 96), strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
                 features=[32, 64, 128, 256, 320, 320], batch_size=2),
    "ct128": dict(patch=(128, 128, 128), strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
                  features=[32, 64, 128, 256, 320, 320], batch_size=2),
}


def make_trainer(cls, plans: dict, configuration: str, dataset_json: dict, device: torch.device,
                 batch_size: Optional[int]):
    """The trainer as nnU-Net builds it, minus the data (initialize() would need preprocessed cases)."""
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    tr = cls(plans, configuration, 0, dataset_json, device)
    if batch_size is not None:
        tr.configuration_manager.configuration["batch_size"] = batch_size
    n_in = len(dataset_json["channel_names"])
    tr.num_input_channels = n_in
    tr.network = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, n_in,
                                               tr.label_manager.num_segmentation_heads, True).to(device)
    tr.optimizer, tr.lr_scheduler = tr.configure_optimizers()
    tr.loss = tr._build_loss()
    tr.set_deep_supervision_enabled(True)
    tr.network.train()
    return tr


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_plan(name: str, plans: dict, configuration: str, dataset_json: dict, device: torch.device,
               steps: int, warmup: int, batch_size: Optional[int]) -> Dict[str, object]:
    from nnunet_topomae.trainers.hybridmim_pretrain import nnUNetTrainerHybridMIMPretrain
    from nnunet_topomae.trainers.hybridmim_variants import nnUNetTrainerHybridMIMPretrain_noPartial

    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's banner; stdout is the table
        trainers = {
            "partial": make_trainer(nnUNetTrainerHybridMIMPretrain, plans, configuration, dataset_json, device,
                                    batch_size),
            "noPartial": make_trainer(nnUNetTrainerHybridMIMPretrain_noPartial, plans, configuration, dataset_json,
                                      device, batch_size),
        }
    cm = trainers["partial"].configuration_manager
    bs = batch_size or cm.batch_size
    patch = [int(p) for p in cm.patch_size]
    n_in = len(dataset_json["channel_names"])
    x = torch.randn(bs, n_in, *patch, device=device)
    batch = {"data": x}
    times: Dict[str, List[float]] = {k: [] for k in trainers}
    for i in range(warmup + steps):
        for key, tr in trainers.items():
            _sync(device)
            t0 = time.perf_counter()
            tr.train_step(batch)
            _sync(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - t0)
    geom = trainers["partial"].geometry
    box_sub = [min(g, max(1, int(round(g * trainers["partial"].box_fraction)))) for g in geom.subvolume_grid]
    frac = math.prod(box_sub) / geom.n_subvolumes
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "plan": name, "patch": "x".join(map(str, patch)), "batch": bs,
        "bottleneck": "x".join(map(str, geom.subvolume_grid)), "box": "x".join(map(str, box_sub)),
        "box_fraction": frac, "partial_s": med["partial"], "noPartial_s": med["noPartial"],
        "speedup": med["noPartial"] / med["partial"], "times": times,
    }


def markdown(rows: List[Dict[str, object]], device: str, steps: int, threads: int) -> str:
    out = [f"HybridMIM train_step, median of {steps} steps after warm-up, device {device}"
           + (f", {threads} CPU threads" if device == "cpu" else ""),
           "",
           "| plan | patch | batch | bottleneck | decoded box (sub-volumes) | decoded voxels | partial (s/step) "
           "| _noPartial (s/step) | speed-up (_noPartial / partial) |",
           "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['plan']} | {r['patch']} | {r['batch']} | {r['bottleneck']} | {r['box']} | "
                   f"{100 * r['box_fraction']:.0f} % | {r['partial_s']:.2f} | {r['noPartial_s']:.2f} | "
                   f"{r['speedup']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plans", help="an nnU-Net plans file (default: the synthetic presets)")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--dataset-json", help="dataset.json next to the plans (default: 1 channel, 2 labels)")
    p.add_argument("--presets", nargs="+", default=["hippocampus", "ct96"], choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=5, help="timed steps per trainer (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer first")
    p.add_argument("--batch-size", type=int, default=None, help="override the plan's batch size")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", help="also write the raw timings here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="bench_hybridmim_")
    os.environ.setdefault("nnUNet_results", os.path.join(tmp, "results"))  # nnU-Net writes its log there
    os.environ.setdefault("nnUNet_preprocessed", os.path.join(tmp, "preprocessed"))

    jobs = []
    if args.plans:
        with open(args.plans) as f:
            plans = json.load(f)
        if args.dataset_json:
            with open(args.dataset_json) as f:
                dj = json.load(f)
        else:
            dj = {"channel_names": {"0": "image"}, "labels": {"background": 0, "fg": 1}}
        jobs.append((f"{plans.get('dataset_name', 'plans')} {args.configuration}", plans, args.configuration, dj))
    else:
        dj = {"channel_names": {"0": "image"}, "labels": {"background": 0, "fg": 1}}
        for name in args.presets:
            jobs.append((name, synthetic_plans(**PRESETS[name]), "3d_fullres", dj))

    rows = []
    for name, plans, conf, dj in jobs:
        t0 = time.time()
        rows.append(bench_plan(name, plans, conf, dj, device, args.steps, args.warmup, args.batch_size))
        print(f"[{name}: {time.time() - t0:.0f} s] partial {['%.2f' % t for t in rows[-1]['times']['partial']]}, "
              f"noPartial {['%.2f' % t for t in rows[-1]['times']['noPartial']]}", file=sys.stderr)
    print(markdown(rows, args.device, args.steps, torch.get_num_threads()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
