#!/usr/bin/env python
"""How far did pretraining and finetuning move the weights? A diagnostic for transfers that underperform.

    python benchmarks/inspect_transfer.py PRETRAIN_CKPT [FINETUNE_CKPT ...] [--plans PLANS.json]

For every part of the network that finetuning takes over (ViT encoder, CNN encoder, CNN decoder):

- ``std / init std`` (with ``--plans``): the pretrained convolution weights' spread against a fresh
  nnU-Net initialisation of the same CNN (``InitWeights_He``); a ratio far from 1 means pretraining
  changed the weight scale, which nnU-Net's finetuning schedule is not tuned for (the fresh
  initialisation is random, so the ratios vary by about 0.01 between calls);
- ``moved``: ``||w_finetuned - w_pretrained|| / ||w_pretrained||`` per part, for each finetuning
  checkpoint (``checkpoint_latest.pth`` of a run in progress works too), i.e. how much of the
  pretrained features the labelled cases rewrote.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from nnunet_topomae.trainers.transfer import pretrained_part
from nnunet_topomae.utils.checkpoint import safe_load


def part_of(key: str):
    """Transferred part of ``key``; None for fresh layers and for nnU-Net's ``all_modules`` aliases
    (the same tensors as ``conv``/``norm``, which would count twice)."""
    return None if "all_modules" in key else pretrained_part(key)


def load(path: str) -> dict:
    return safe_load(path)["network_weights"]


def init_std_ratio(pre: dict, plans_file: str) -> dict:
    from nnunetv2.utilities.network_initialization import InitWeights_He
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_topomae.trainers.topomae_pretrain import build_plan_cnn
    cm = PlansManager(plans_file).get_configuration("3d_fullres")
    n_in = next(v for k, v in pre.items() if k.startswith("cnn.encoder.")).shape[1]
    net = build_plan_cnn(cm, n_in, 2, True)
    net.apply(InitWeights_He(1e-2))
    ratios = defaultdict(list)
    for k, v in net.state_dict().items():
        key = "cnn." + k
        part = part_of(key)
        if v.ndim == 5 and key in pre and part:
            ratios[part].append(float(pre[key].float().std() / v.float().std()))
    return {p: (min(r), sum(r) / len(r), max(r)) for p, r in ratios.items()}


def moved(pre: dict, fine: dict) -> dict:
    num, den = defaultdict(float), defaultdict(float)
    for k, w in pre.items():
        p = part_of(k)
        if p is None or k not in fine or fine[k].shape != w.shape:
            continue
        num[p] += float(((fine[k].float() - w.float()) ** 2).sum())
        den[p] += float((w.float() ** 2).sum())
    return {p: (num[p] / den[p]) ** 0.5 for p in num if den[p] > 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pretrain")
    ap.add_argument("finetune", nargs="*")
    ap.add_argument("--plans", help="the plans file, for the comparison with a fresh nnU-Net initialisation")
    args = ap.parse_args()
    pre = load(args.pretrain)
    if args.plans:
        print("pretrained conv weights, std / fresh-init std (min, mean, max over layers):")
        for p, (lo, mean, hi) in init_std_ratio(pre, args.plans).items():
            print(f"  {p:12s} {lo:.2f} {mean:.2f} {hi:.2f}")
    for f in args.finetune:
        print(f"moved by finetuning, ||w_ft - w_pre|| / ||w_pre||: {f}")
        for p, r in moved(pre, load(f)).items():
            print(f"  {p:12s} {r:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
