#!/usr/bin/env python
"""How far are a pretraining checkpoint's reconstructions from the inputs' topology? A diagnostic.

    python benchmarks/topo_distance.py -d DATASET [-c 3d_fullres] [-p PLANS] NAME=CHECKPOINT [NAME=CHECKPOINT ...]
        [--batches 20] [--exact] [--backend gudhi|cripser] [--json OUT]

Every checkpoint (of ``nnUNetTrainerTopoMAEPretrain`` or one of its variants, including ``_noTopo``,
whose training never computed the term) is scored with TopoMAE's own loss (``w_topo = 0.1``) on the
same validation batches (fold 0, nnU-Net's loader, no augmentation) and the same token masks. The
table gives the unweighted terms, mean and spread over batches: the topological terms (ViT and CNN
reconstructions) and the reconstruction terms. So one can tell whether training with the term
lowers it, or whether learning to reconstruct lowers it anyway.

``--exact`` scores with the exact loss instead of the trained default (issue 24): persistence at full
resolution and every diagram point matched (``EXACT``), so checkpoints pretrained with different loss
settings (the default, ``_faithfulTopo``) are compared on the paper's term. ``--backend cripser`` computes the
same diagrams faster (the optional extra). The seconds each checkpoint's scoring took are printed and recorded.

nnUNet_raw / nnUNet_preprocessed as for nnUNetv2_train (nnUNet_extTrainer is set here, and nnUNet_results is a
temporary folder: nothing is written beside the user's runs); the data loading runs in this process
(nnUNet_n_proc_DA is set to 0 here).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

TERMS = ("topo_vit", "topo_cnn", "rec_vit", "rec_cnn")
# the scoring trainer's topological settings for --exact: no pooling, no pair budget (every point matched)
EXACT = dict(topo_max_size=None, topo_max_voxels=None, topo_max_pairs=None, topo_pair_mass=None)


def score_with_exact_loss(trainer, backend: str = "gudhi") -> None:
    """Before ``initialize``: the trainer's loss (and its loader's input persistence, built from the same
    settings) becomes the exact one; ``backend`` only changes how fast the same diagrams are computed."""
    for k, v in EXACT.items():
        setattr(trainer, k, v)
    trainer.topo_backend = backend


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("checkpoints", nargs="+", help="NAME=path/to/checkpoint_final.pth")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--exact", action="store_true",
                   help="score with the exact topological loss (full resolution, every point) instead of the default")
    p.add_argument("--backend", choices=("gudhi", "cripser"), default="gudhi",
                   help="persistence backend of the scoring loss (same diagrams; cripser is the faster optional extra)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    named = []
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            p.error(f"{item!r}: expected NAME=CHECKPOINT with an existing checkpoint file")
        named.append((name, path))

    os.environ["nnUNet_n_proc_DA"] = "0"
    # the scoring trainer writes a training log into its output folder: keep it out of the user's results
    scratch = tempfile.TemporaryDirectory(prefix="topo_distance_")
    os.environ["nnUNet_results"] = scratch.name
    from nnunet_topomae.utils.ext_trainer import ext_trainer_value
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))  # nnU-Net finds our trainers
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunet_topomae.utils.checkpoint import safe_load

    trainer = get_trainer_from_args(args.dataset, args.configuration, 0, "nnUNetTrainerTopoMAEPretrain", args.plans,
                                    device=torch.device("cpu"))
    if args.exact:
        score_with_exact_loss(trainer, args.backend)
    else:
        trainer.topo_backend = args.backend
    trainer.initialize()
    trainer.loss.topo_loss.workers = 0  # persistence in this process: no pool for a few batches
    _, val = trainer.get_dataloaders()
    batches = [next(val) for _ in range(args.batches)]
    rows = {}
    for name, path in named:
        weights = safe_load(path)["network_weights"]
        trainer.network.load_state_dict(weights)
        trainer.network.eval()
        got = {t: [] for t in TERMS}
        start = time.perf_counter()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                torch.manual_seed(i)  # the same token masks for every checkpoint
                terms = trainer.compute_terms(batch)
                for t in TERMS:
                    got[t].append(float(terms[t]))
        rows[name] = {t: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for t, v in got.items()}
        rows[name]["checkpoint"] = path
        rows[name]["seconds"] = seconds = time.perf_counter() - start
        print(f"{name}: " + ", ".join(f"{t} {np.mean(v):.3f}" for t, v in got.items())
              + f" ({seconds:.0f} s for {len(batches)} batches)", flush=True)

    scored = "the exact loss" if args.exact else "the default loss"
    print(f"\n{args.batches} validation batches of fold 0, unweighted terms ({scored}), mean (std over batches):\n")
    print("| checkpoint | " + " | ".join(TERMS) + " |")
    print("| --- |" + " --- |" * len(TERMS))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[t]['mean']:.3f} ({r[t]['std']:.3f})" for t in TERMS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "plans": args.plans, "batches": args.batches, "exact": args.exact,
                       "checkpoints": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
