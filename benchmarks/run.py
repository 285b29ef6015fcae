#!/usr/bin/env python
r"""Does self-pretraining beat nnU-Net from scratch? One entry point for every arm and tier.

    python benchmarks/run.py --raw ../shared/data/Task04_Hippocampus --tier quick --out /tmp/bench
    python benchmarks/run.py --benchmark acdc --raw RAW/Dataset101_ACDC --tier cpu --out /work/bench_acdc

Converts an MSD task folder (or takes an nnU-Net raw dataset folder), plans and preprocesses with
nnU-Net, then runs each arm through the real ``nnUNetv2_train`` commands, on fold 0's validation
cases, with the same finetuning step budget for every arm. Labelled subsets (5, 20, all of fold 0's
training cases) are fixed, nested and written to ``labelled_subsets.json``; they are extra folds in
nnU-Net's ``splits_final.json`` (same validation cases), which is nnU-Net's own mechanism for custom
splits. Repeated seeds are repeated runs under other fold numbers. Evaluation is nnU-Net's own final
validation (``fold_X/validation/summary.json``), plus HD95, NSD and Betti-number errors from
``nnunet_topomae.evaluation.evaluate`` when that module is installed (its output goes to
``fold_X/validation/summary_topology.json``; records written before are backfilled from the kept predictions), with
each case's HD95 (``per_case_hd95``) for ``compare_arms.py --metric hd95`` as ``per_case`` is for Dice.

Benchmarks (``--benchmark``): ``hippocampus`` (default; dataset id 950, the MSD task folder, subsets of
cases) and ``acdc`` (dataset id 951, the nnU-Net raw dataset Dataset101_ACDC made by
``../shared/data/ACDC/get.sh``, its own protocol and budgets, ``ACDC_TIERS``).

Grouped folds: when the raw folder holds ``splits_final_patientgrouped.json`` (or ``--splits FILE`` is
given), that file becomes nnU-Net's ``splits_final.json`` (its folds 0-4, fold 0 used), and the labelled
subsets are drawn by patient: cases are grouped by ``--group-regex`` (first group of the match; default
``^(.+?)_frame\d+$``, ACDC's ``patientNNN_frameMM``; a case that does not match is its own group), 5 and 20
patients are taken from a seeded permutation of fold 0's training patients (nested: the 5 are the first 5
of the 20) with all frames of each, and "all" is every training case. Records then carry
``labelled_patients`` beside ``labelled_cases``.

CPU plans (tiers with ``plans="cpu"``): nnU-Net's own 3d_fullres plans with batch size 2 and CNN widths
16-32-64-128 (``CPU_PLANS``). Rule for the patch: if the default 3d_fullres patch has at most
``CPU_PATCH_TOLERANCE`` (1.5) x ``CPU_PATCH_VOXELS`` voxels (the budget, 40x56x40 = 89,600, Hippocampus's own
patch, which keeps the quick tier under an hour on 2 cores), the plans are nnU-Net's default with only the
batch size and widths changed (``nnUNetPlansCPU`` shares nnUNetPlans' preprocessed data; Hippocampus: no
change). Otherwise the target spacing is coarsened the way nnU-Net coarsens for its 3d_lowres configuration,
in steps of 3 %: first the fine axes (those more than 2x finer than the coarsest, e.g. the in-plane axes of
thick-slice MRI), all axes once they are within 2x, until the patch nnU-Net's planner gives at that spacing
has at most the budget's voxels (``nnunet_topomae.workflow.cpu_target_spacing``). That spacing is handed to
nnU-Net the nnU-Net way, ``nnUNetv2_plan_experiment -d ID -overwrite_target_spacing ... -overwrite_plans_name
nnUNetPlansCPU`` then ``nnUNetv2_preprocess -d ID -plans_name nnUNetPlansCPU -c 3d_fullres``, and batch size and
widths are set in that plans file. The chosen spacing and patch (and the defaults) are printed and recorded
in every result record (``plans``).

Resumable: a run whose ``summary.json`` exists is not rerun; trained models stay in the results
folder. Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional

import numpy as np

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.workflow import (CPU_PATCH_TOLERANCE, CPU_PATCH_VOXELS, cpu_target_spacing, epoch_echo,
                                     make_plans_variant, median_shape_from_fingerprint, nnunet_command,
                                     nnunet_env, run)

ARMS = {  # arm -> (pretraining trainer or None, finetuning trainer)
    "scratch_nnunet": (None, "nnUNetTrainer"),
    "scratch_hybrid": (None, "nnUNetTrainerTopoMAEFinetune"),
    "mae": ("nnUNetTrainerMAEPretrain", "nnUNetTrainerTopoMAEFinetune"),
    "topomae": ("nnUNetTrainerTopoMAEPretrain", "nnUNetTrainerTopoMAEFinetune"),
    "topomae_notopo": ("nnUNetTrainerTopoMAEPretrain_noTopo", "nnUNetTrainerTopoMAEFinetune"),
    "hybridmim": ("nnUNetTrainerHybridMIMPretrain", "nnUNetTrainer"),
    # not one of the six arms: nnU-Net's warm-up trainer on the same HybridMIM weights
    "hybridmim_warmup": ("nnUNetTrainerHybridMIMPretrain", "nnUNetTrainerHybridMIMFinetune"),
    # transfer-recipe attempt (docs/BENCHMARKS.md): TopoMAE weights, pretrained CNN at 0.3x the learning rate
    "topomae_lowcnnlr": ("nnUNetTrainerTopoMAEPretrain", "nnUNetTrainerTopoMAEFinetune_lowCNNlr"),
    "topomae_lowtopo": ("nnUNetTrainerTopoMAEPretrain_lowTopo", "nnUNetTrainerTopoMAEFinetune"),
    # transfer-recipe attempt: the same TopoMAE pretraining, three times as long (PRETRAIN_SCALE)
    "topomae_longpre": ("nnUNetTrainerTopoMAEPretrain", "nnUNetTrainerTopoMAEFinetune"),
    # transfer-recipe attempt: the same TopoMAE weights, CNN decoder fresh (encoders only)
    "topomae_encoderonly": ("nnUNetTrainerTopoMAEPretrain", "nnUNetTrainerTopoMAEFinetune_encoderOnly"),
    # transfer-recipe attempt: the same TopoMAE pretraining, half as long (PRETRAIN_SCALE)
    "topomae_shortpre": ("nnUNetTrainerTopoMAEPretrain", "nnUNetTrainerTopoMAEFinetune"),
    # transfer-recipe attempt: the topological term only in the second half of pretraining
    "topomae_latetopo": ("nnUNetTrainerTopoMAEPretrain_lateTopo", "nnUNetTrainerTopoMAEFinetune"),
    # issue 24: the topological loss close to the paper's (full resolution, 1024 points, tail to the diagonal),
    # with cripser: the same loss as _faithfulTopo, persistence 4-6x faster (docs/BENCHMARKS.md, fidelity)
    "topomae_faithfultopo": ("nnUNetTrainerTopoMAEPretrain_faithfulTopoCripser", "nnUNetTrainerTopoMAEFinetune"),
    # ACDC only: a 2 x 8 x 8 token instead of 2 x 16 x 16 (20 x 68 x 68 mm, about a left ventricle) on its CPU plans;
    # on Hippocampus's plans both give 8 x 8 x 8, the default itself
    "topomae_token8": ("nnUNetTrainerTopoMAEPretrain_token8", "nnUNetTrainerTopoMAEFinetune_token8"),
}
# arm -> multiple of its tier's pretraining steps (default 1)
PRETRAIN_SCALE = {"topomae_longpre": 3, "topomae_shortpre": 0.5}

# the protocol: its six arms; 3 seeds of the anchor and the product with 5 labelled cases, one of
# the others; 20 and all labels for the anchor and the product
PROTOCOL = [("scratch_nnunet", 5, 3), ("topomae", 5, 3), ("scratch_hybrid", 5, 1), ("mae", 5, 1),
            ("topomae_notopo", 5, 1), ("hybridmim", 5, 1),
            ("scratch_nnunet", 20, 1), ("topomae", 20, 1), ("scratch_nnunet", "all", 1), ("topomae", "all", 1)]
# tier -> schedule, the protocol's runs and the further runs of docs/BENCHMARKS.md (--extras): more seeds,
# the transfer-recipe attempts, and the hybrid network from scratch with more labels, which separates what
# pretraining adds from what the network adds where labels are not scarce
TIERS = {
    "quick": dict(pretrain_steps=1000, finetune_steps=1000, iters=50, plans="cpu",
                  runs=[("scratch_nnunet", 5, 1), ("topomae", 5, 1)], extra_runs=[]),
    "cpu": dict(pretrain_steps=1000, finetune_steps=2500, iters=50, plans="cpu", runs=PROTOCOL,
                extra_runs=[("scratch_hybrid", 5, 2), ("mae", 5, 3), ("topomae_notopo", 5, 3),
                            ("topomae_lowcnnlr", 5, 1), ("topomae_lowtopo", 5, 1), ("hybridmim_warmup", 5, 1),
                            ("topomae_longpre", 5, 1), ("scratch_nnunet", 20, 2), ("topomae", 20, 2),
                            ("scratch_hybrid", 20, 2), ("scratch_hybrid", "all", 2), ("topomae_encoderonly", 5, 3),
                            ("scratch_nnunet", "all", 2), ("topomae", "all", 2), ("topomae_shortpre", 5, 3),
                            ("topomae_latetopo", 5, 3), ("topomae_faithfultopo", 5, 3)]),
    "full": dict(pretrain_steps=250 * 1000, finetune_steps=250 * 1000, iters=250, plans="default", runs=PROTOCOL,
                 extra_runs=[(a, 5, 1) for a in ARMS
                             if a not in {r[0] for r in PROTOCOL} | set(PRETRAIN_SCALE) | {"topomae_token8"}]),
}


def tier_runs(tier: dict, extras: bool = False) -> List[tuple]:
    """(arm, labelled, seeds) of a tier: the protocol's, and with ``extras`` the further runs too (an
    (arm, labelled) in both gets the larger number of seeds, in the protocol's place)."""
    seeds = {}
    for arm, labelled, n in tier["runs"] + (tier["extra_runs"] if extras else []):
        seeds[(arm, labelled)] = max(n, seeds.get((arm, labelled), 0))
    return [(arm, labelled, n) for (arm, labelled), n in seeds.items()]


CPU_PLANS = dict(batch_size=2, features=[16, 32, 64, 128])
DATASET_ID = 950  # Hippocampus's (the default benchmark's)

# ACDC (issue 23): the calibration run first (nnU-Net from scratch with all labelled patients), then every
# arm with 5 labelled patients (3 seeds of the anchor, the hybrid from scratch and the product, one of the
# others), 20 and all patients for the anchor, the hybrid from scratch and the product. run_order keeps this
# order within a seed, so seed 0 of everything comes before seeds 1 and 2 of the 5-patient arms.
ACDC_PROTOCOL = [("scratch_nnunet", "all", 1), ("scratch_nnunet", 5, 3), ("topomae", 5, 3), ("scratch_hybrid", 5, 3),
                 ("topomae_notopo", 5, 1), ("mae", 5, 1), ("hybridmim", 5, 1),
                 ("scratch_nnunet", 20, 1), ("topomae", 20, 1), ("scratch_hybrid", 20, 1),
                 ("topomae", "all", 1), ("scratch_hybrid", "all", 1)]
ACDC_TIERS = {
    "quick": dict(TIERS["quick"]),
    # nnU-Net's step on the CPU plans (patch 10x96x80) measured 0.44 s, the hybrid's 0.54 s, TopoMAE pretraining's
    # 0.51 s (2 idle cores), so 1500 finetuning steps would have fit the protocol in about 5 h; but nnU-Net from
    # scratch with all 80 patients reached only 0.778 mean Dice at 1500 steps and 0.832 at 3000 (calibration,
    # docs/BENCHMARKS.md), so the budget is 6000 steps (about 16 h for the protocol on 2 idle cores; resumable)
    # extras: issue 24's decision (faithful topological loss against the default) on ACDC, and a finer ViT token
    # (2 x 8 x 8; the default's 2 x 16 x 16 covers about a left ventricle), after the protocol
    "cpu": dict(pretrain_steps=1000, finetune_steps=6000, iters=50, plans="cpu", runs=ACDC_PROTOCOL,
                extra_runs=[("topomae_faithfultopo", 5, 1), ("topomae_token8", 5, 1)]),
    "full": dict(TIERS["full"], runs=ACDC_PROTOCOL, extra_runs=[]),
}
# --benchmark NAME -> dataset id (in the --out folder's nnUNet_raw), tiers, and how cases group into patients
BENCHMARKS = {
    "hippocampus": dict(dataset_id=DATASET_ID, tiers=TIERS),
    "acdc": dict(dataset_id=951, tiers=ACDC_TIERS),
}
GROUP_REGEX = r"^(.+?)_frame\d+$"  # ACDC: patient001_frame01 and patient001_frame12 -> patient001


def run_order(runs) -> List[tuple]:
    """(arm, labelled, seed) breadth first: every arm's seed 0 before any second seed, so a benchmark
    stopped part-way has already measured every arm once (the order of `runs` is kept within a seed)."""
    flat = [(arm, labelled, seed) for arm, labelled, seeds in runs for seed in range(seeds)]
    return sorted(flat, key=lambda r: r[2])


def finetune_name(arm: str, fine: str, steps: int) -> str:
    # the step budget is part of the name (hence of the results folder), so that a run trained under
    # another budget is never mistaken for a finished one; arms that share a finetuning trainer get
    # their own class by the arm suffix (the anchor and the product have their trainer to themselves)
    return f"{fine}_bench{steps}" if arm in ("scratch_nnunet", "topomae") else f"{fine}_bench{steps}_{arm}"


def pretrain_name(pre: str, steps: int) -> str:
    return f"{pre}_bench{steps}"


def pretrain_steps(arm: str, tier: dict) -> int:
    """How long ``arm`` pretrains under ``tier`` (0 for the arms without pretraining)."""
    return int(tier["pretrain_steps"] * PRETRAIN_SCALE.get(arm, 1)) if ARMS[arm][0] else 0


def same_budget(r: dict, tier: dict) -> bool:
    """Whether result ``r`` was trained under ``tier``'s budgets (results of other budgets stay in the
    file but are neither resumed nor reported)."""
    if r["arm"] not in ARMS:
        return False
    return r["steps"] == tier["finetune_steps"] and r.get("pretrain_steps", 0) == pretrain_steps(r["arm"], tier)


def write_trainer_shims(folder: str, tier: dict) -> Dict:
    """Budgeted subclasses of every trainer, as a module nnU-Net imports (an nnUNet_extTrainer folder)."""
    os.makedirs(folder, exist_ok=True)
    fe, it = tier["finetune_steps"] // tier["iters"], tier["iters"]
    save_every = 5  # checkpoint_latest.pth every 5 epochs, so that a stopped benchmark loses little (--c)
    names, written, lines = {}, set(), ["import torch", "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer",
                        "from nnunet_topomae.trainers import *", ""]
    # only the arms this tier can run (with --extras): a class per arm of ARMS would make the whole module fail to
    # import while one arm's trainer is not there (an arm added before its trainer is committed)
    used = {arm for arm, _, _ in tier_runs(tier, extras=True)}
    for arm, (pre, fine) in ARMS.items():
        if arm not in used:
            continue
        if pre:
            # arms of the same pretraining trainer and length share one class, hence one checkpoint
            names[("pre", arm)] = pretrain_name(pre, pretrain_steps(arm, tier))
        if pre and names[("pre", arm)] not in written:
            pe = pretrain_steps(arm, tier) // it
            written.add(names[("pre", arm)])
            lines += [f"class {names[('pre', arm)]}({pre}):", f"    pretrain_epochs = {pe}",
                      f"    pretrain_iterations_per_epoch = {it}", "    pretrain_val_iterations_per_epoch = 5",
                      f"    warmup_epochs = {max(1, pe // 20)}", f"    preview_every = {max(1, pe // 5)}",
                      "    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):",
                      "        super().__init__(plans, configuration, fold, dataset_json, device)",
                      f"        self.save_every = {save_every}", ""]
        # one finetuning class (hence one results folder) per arm: arms sharing a finetuning trainer
        # (scratch_hybrid, mae, topomae, topomae_notopo) must not find each other's runs
        names[("fine", arm)] = finetune_name(arm, fine, tier["finetune_steps"])
        lines += [f"class {names[('fine', arm)]}({fine}):",
                  "    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):",
                  "        super().__init__(plans, configuration, fold, dataset_json, device)",
                  f"        self.num_epochs = {fe}", f"        self.num_iterations_per_epoch = {it}",
                  "        self.num_val_iterations_per_epoch = 5", f"        self.save_every = {save_every}", ""]
    with open(os.path.join(folder, "nnunet_topomae_bench_trainers.py"), "w") as f:
        f.write("\n".join(lines))
    return names


def prepare(args, env, log, dataset_id: int = DATASET_ID) -> str:
    """Raw dataset in place, planned (nnU-Net's default plans) and, unless the CPU plans replace them,
    preprocessed; returns the dataset name."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    raw_root = env["nnUNet_raw"]
    prefix = f"Dataset{dataset_id:03d}_"
    existing = [d for d in os.listdir(raw_root) if d.startswith(prefix)]
    is_nnunet_raw = os.path.isfile(os.path.join(args.raw, "dataset.json")) and "channel_names" in load_json(
        os.path.join(args.raw, "dataset.json"))
    if existing and is_nnunet_raw and os.path.islink(os.path.join(raw_root, existing[0])) and \
            os.path.realpath(os.path.join(raw_root, existing[0])) != os.path.realpath(args.raw):
        sys.exit(f"benchmark: {os.path.join(raw_root, existing[0])} points at "
                 f"{os.path.realpath(os.path.join(raw_root, existing[0]))}, not at {args.raw}; use another --out or "
                 f"--dataset-id")
    if not existing:
        if is_nnunet_raw:
            # keep the raw dataset's own name (Dataset101_ACDC -> Dataset951_ACDC), else "Bench"
            m = re.match(r"^Dataset\d+_(.+)$", os.path.basename(os.path.normpath(args.raw)))
            os.symlink(os.path.abspath(args.raw), os.path.join(raw_root, prefix + (m.group(1) if m else "Bench")))
        else:
            if not os.path.isdir(os.path.join(args.raw, "imagesTs")):
                sys.exit(f"benchmark: {args.raw} has no imagesTs folder; nnU-Net's MSD converter needs one (it may be empty)")
            run([nnunet_command("nnUNetv2_convert_MSD_dataset"), "-i", os.path.abspath(args.raw), "-overwrite_id",
                 str(dataset_id), "-np", "1"], env, log)
        existing = [d for d in os.listdir(raw_root) if d.startswith(prefix)]
    name = existing[0]
    if not os.path.isfile(os.path.join(env["nnUNet_preprocessed"], name, "nnUNetPlans.json")):
        print("planning ...", flush=True)
        run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1",
             "--no_pp"], env, log)
    return name


def preprocessed_complete(env, name: str, plans: str) -> bool:
    """Whether ``plans``' 3d_fullres data and the ground truth copy are there for every labelled raw case."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    pre = os.path.join(env["nnUNet_preprocessed"], name)
    if not os.path.isfile(os.path.join(pre, plans + ".json")):
        return False
    ident = load_json(os.path.join(pre, plans + ".json"))["configurations"]["3d_fullres"]["data_identifier"]
    ending = load_json(os.path.join(env["nnUNet_raw"], name, "dataset.json"))["file_ending"]
    n = len([f for f in os.listdir(os.path.join(env["nnUNet_raw"], name, "labelsTr")) if f.endswith(ending)])
    data, gt = os.path.join(pre, ident), os.path.join(pre, "gt_segmentations")
    return (os.path.isdir(data) and os.path.isdir(gt) and len([f for f in os.listdir(gt) if f.endswith(ending)]) == n
            and len([f for f in os.listdir(data) if f.endswith(".pkl")]) == n)


def preprocess_default(env, log, name: str, dataset_id: int) -> None:
    """nnU-Net's default 3d_fullres preprocessing (what ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` does after
    planning), unless it is complete."""
    if not preprocessed_complete(env, name, "nnUNetPlans"):
        print("preprocessing (nnUNetPlans, 3d_fullres) ...", flush=True)
        run([nnunet_command("nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1"], env, log)


def plans_summary(pre_dir: str, plans: str) -> dict:
    """Spacing, patch, batch size and widths of ``plans``' 3d_fullres configuration, and nnUNetPlans' defaults."""
    cfg = lambda p: json.load(open(os.path.join(pre_dir, p + ".json")))["configurations"]["3d_fullres"]
    c, d = cfg(plans), cfg("nnUNetPlans")
    return dict(name=plans, spacing=[float(x) for x in c["spacing"]], patch_size=[int(x) for x in c["patch_size"]],
                patch_voxels=int(np.prod(c["patch_size"])), batch_size=int(c["batch_size"]),
                features=list(c["architecture"]["arch_kwargs"]["features_per_stage"]),
                default_spacing=[float(x) for x in d["spacing"]], default_patch_size=[int(x) for x in d["patch_size"]],
                coarsened=[float(x) for x in c["spacing"]] != [float(x) for x in d["spacing"]])


def make_cpu_plans(env, log, name: str, dataset_id: int, budget: int = CPU_PATCH_VOXELS, plans: str = "nnUNetPlansCPU") -> dict:
    """The CPU plans variant of the module docstring (batch 2, widths 16-128; coarser target spacing if nnU-Net's
    default patch is much larger than ``budget`` voxels), planned and preprocessed; returns ``plans_summary``."""
    pre_dir = os.path.join(env["nnUNet_preprocessed"], name)
    default = json.load(open(os.path.join(pre_dir, "nnUNetPlans.json")))
    cfg = default["configurations"]["3d_fullres"]
    fingerprint = json.load(open(os.path.join(pre_dir, "dataset_fingerprint.json")))
    spacing, patch, changed = cpu_target_spacing(
        cfg["spacing"], cfg["median_image_size_in_voxels"], cfg["patch_size"], budget=budget,
        median_shape_at=median_shape_from_fingerprint(fingerprint, default["transpose_forward"]))
    if not changed:
        preprocess_default(env, log, name, dataset_id)
        make_plans_variant(pre_dir, plans, **CPU_PLANS)
    else:
        # -overwrite_target_spacing takes the axes in the images' own order (the planner transposes it)
        original_order = [spacing[i] for i in np.argsort(default["transpose_forward"])]
        path = os.path.join(pre_dir, plans + ".json")
        planned = os.path.isfile(path) and np.allclose(
            json.load(open(path))["configurations"]["3d_fullres"]["spacing"], spacing)
        if not planned:
            print(f"CPU plans: default patch {cfg['patch_size']} ({int(np.prod(cfg['patch_size']))} voxels) at spacing "
                  f"{cfg['spacing']} exceeds {CPU_PATCH_TOLERANCE} x {budget} voxels: target spacing {spacing} "
                  f"(expected patch {patch})", flush=True)
            run([nnunet_command("nnUNetv2_plan_experiment"), "-d", str(dataset_id), "-overwrite_target_spacing",
                 *[str(x) for x in original_order], "-overwrite_plans_name", plans], env, log)
        make_plans_variant(pre_dir, plans, source=plans, **CPU_PLANS)  # batch size and widths, in place
        if not preprocessed_complete(env, name, plans):
            print(f"preprocessing ({plans}, 3d_fullres) ...", flush=True)
            run([nnunet_command("nnUNetv2_preprocess"), "-d", str(dataset_id), "-plans_name", plans, "-c", "3d_fullres",
                 "-np", "1"], env, log)
    info = plans_summary(pre_dir, plans)
    info["patch_voxel_budget"] = budget
    print(f"CPU plans {plans}: spacing {info['spacing']}, patch {info['patch_size']} ({info['patch_voxels']} voxels), "
          f"batch {info['batch_size']}, widths {info['features']} (nnU-Net's default: spacing {info['default_spacing']}, "
          f"patch {info['default_patch_size']})", flush=True)
    return info


def group_of(case: str, regex: Optional[str]) -> str:
    """The patient (group) a case belongs to: the first group of ``regex``'s match (the whole match if it has
    none); a case that does not match is its own group."""
    m = re.match(regex, case) if regex else None
    if m is None:
        return case
    return m.group(1) if m.groups() else m.group(0)


def grouped_subsets(train: List[str], regex: str, sizes=(5, 20), seed: int = 0):
    """Nested labelled subsets drawn by patient: ``sizes`` patients from a seeded permutation of the patients of
    ``train`` (every case of each), and "all". Returns (subsets of cases, subsets of patients)."""
    groups: Dict[str, List[str]] = {}
    for c in sorted(train):
        groups.setdefault(group_of(c, regex), []).append(c)
    order = [str(g) for g in np.random.default_rng(seed).permutation(sorted(groups))]
    patients = {str(n): sorted(order[:n]) for n in sizes}
    patients["all"] = sorted(groups)
    subsets = {k: sorted(c for g in v for c in groups[g]) for k, v in patients.items()}
    return subsets, patients


def write_splits(pre_dir: str, seeds: int, source: Optional[str] = None, group_regex: Optional[str] = None,
                 data_identifier: str = "nnUNetPlans_3d_fullres") -> Dict:
    """Fold 0 as nnU-Net made it (or as ``source``, a splits file with patient-grouped folds, has it), plus folds
    with nested labelled subsets of its training cases (by patient when ``source`` or ``group_regex`` is given)."""
    path = os.path.join(pre_dir, "splits_final.json")
    if source is not None:
        with open(source) as f:
            splits = json.load(f)
    else:
        if not os.path.isfile(path):
            # exactly what nnUNetTrainer.do_split does when the file is missing
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            from nnunetv2.utilities.crossval_split import generate_crossval_split
            data = os.path.join(pre_dir, data_identifier)
            keys = sorted(infer_dataset_class(data).get_identifiers(data))
            with open(path, "w") as f:
                json.dump(generate_crossval_split(keys, seed=12345, n_splits=5), f)
        with open(path) as f:
            splits = json.load(f)
    base = splits[0]
    patients = None
    if source is not None or group_regex is not None:
        regex = group_regex or GROUP_REGEX
        subsets, patients = grouped_subsets(base["train"], regex)
        both = {group_of(c, regex) for c in base["train"]} & {group_of(c, regex) for c in base["val"]}
        if both:
            sys.exit(f"benchmark: patients on both sides of fold 0 (grouped by {regex!r}): {sorted(both)[:5]} ...")
    else:
        order = list(np.random.default_rng(0).permutation(sorted(base["train"])))
        subsets = {"5": sorted(order[:5]), "20": sorted(order[:20]), "all": sorted(base["train"])}
    folds = {}
    splits = splits[:5]
    for seed in range(seeds):
        for label in ("5", "20", "all"):
            folds[(label, seed)] = len(splits)
            splits.append({"train": subsets[label], "val": base["val"]})
    with open(path, "w") as f:
        json.dump(splits, f, indent=1)
    info = {"subsets": subsets, "folds": {f"{k[0]}_seed{k[1]}": v for k, v in folds.items()},
            "fold_of": folds, "n_train": len(base["train"]), "val": base["val"]}
    if patients is not None:
        info.update(patients=patients, group_regex=group_regex or GROUP_REGEX, splits_source=os.path.abspath(source)
                    if source else None, n_train_patients=len(patients["all"]))
    return info


def per_case_mean(summary: dict, metric: str = "Dice") -> Dict[str, float]:
    """Each validation case's ``metric`` (Dice; HD95 from ``evaluate_folders``' summary) averaged over the
    foreground classes, from nnU-Net's summary.json layout (keyed by the case's file name; a class whose value is
    NaN, Dice where the class is in neither reference nor prediction, is left out, as nnU-Net's own mean does)."""
    out = {}
    for c in summary["metric_per_case"]:
        d = [m[metric] for m in c["metrics"].values() if m[metric] == m[metric]]
        out[os.path.basename(c["reference_file"])] = float(np.mean(d)) if d else float("nan")
    return out


def paired_difference(a: Dict[str, float], b: Dict[str, float], n_boot: int = 5000,
                      higher_is_better: bool = True) -> dict:
    """Mean of b - a over the cases both were evaluated on, with a 95 % bootstrap interval over cases, and the
    cases where b is better (higher; lower with ``higher_is_better=False``, as for HD95).

    One run per arm says nothing about seed-to-seed spread; pairing the two runs case by case at least says
    whether the difference is larger than what resampling the validation cases would give."""
    keys = sorted(k for k in a if k in b and a[k] == a[k] and b[k] == b[k])
    d = np.array([b[k] - a[k] for k in keys])
    boot = d[np.random.default_rng(0).integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(mean=float(d.mean()), lo=float(lo), hi=float(hi), cases=len(d),
                better=int((d > 0).sum() if higher_is_better else (d < 0).sum()))


def backfill_per_case(results: List[dict], res_root: str, names: Dict, plans: str) -> int:
    """Per-case Dice for runs recorded before results.json kept it, read from their summary.json if present;
    returns how many runs gained it."""
    n = 0
    for r in results:
        if "per_case" in r or ("fine", r["arm"]) not in names:
            continue
        summary = os.path.join(res_root, f"{names[('fine', r['arm'])]}__{plans}__3d_fullres", f"fold_{r['fold']}",
                               "validation", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                r["per_case"] = per_case_mean(json.load(f))
            n += 1
    return n


TOPO_SUMMARY = "summary_topology.json"  # evaluate_folders' default name, beside nnU-Net's summary.json


def topo_available() -> bool:
    """Whether ``nnunet_topomae.evaluation.evaluate`` (HD95, NSD, Betti errors) is installed."""
    import importlib.util
    try:
        return importlib.util.find_spec("nnunet_topomae.evaluation.evaluate") is not None
    except ImportError:  # no nnunet_topomae.evaluation package
        return False


def topo_metric_fields(summary: dict) -> dict:
    """Record fields from ``evaluate_folders``' output (nnU-Net's summary.json layout with HD95, NSD and
    betti_b0/b1/b2_error per label): means over foreground classes and cases, and per class. The Betti error of
    a class is b0 + b1 + b2 error (averaged over cases); the slice-wise one (summaries written since the slice-wise
    errors exist) b0 + b1 of the 2D slices across the coarsest axis."""
    betti = lambda m: float(m["betti_b0_error"] + m["betti_b1_error"] + m["betti_b2_error"])
    slice_betti = lambda m: float(m["betti_slice_b0_error"] + m["betti_slice_b1_error"])
    # str keys: a summary read back from JSON has them, one fresh from evaluate_folders has the labels' ints, and
    # the report sorts the classes of old and new records together
    per_class = {str(k): v for k, v in summary["mean"].items()}
    fm = summary["foreground_mean"]
    fields = dict(mean_hd95=float(fm["HD95"]), mean_nsd=float(fm["NSD"]), mean_betti_error=betti(fm),
                hd95={k: float(v["HD95"]) for k, v in per_class.items()},
                nsd={k: float(v["NSD"]) for k, v in per_class.items()},
                betti_error={k: betti(v) for k, v in per_class.items()},
                betti_errors={k: {b: float(v[f"betti_{b}_error"]) for b in ("b0", "b1", "b2")} for k, v in per_class.items()})
    if "metric_per_case" in summary:  # for compare_arms.py --metric hd95 (paired by case, as Dice)
        fields["per_case_hd95"] = per_case_mean(summary, "HD95")
    if has_slice_betti(summary):
        fields.update(mean_betti_slice_error=slice_betti(fm), betti_slice_error={k: slice_betti(v) for k, v in per_class.items()})
    return fields


def has_slice_betti(summary: dict) -> bool:
    """Whether an ``evaluate_folders`` summary has the slice-wise Betti errors (older ones do not)."""
    return "betti_slice_b1_error" in summary["foreground_mean"]


def evaluate_topo(validation_dir: str, pre_dir: str, plans: str, num_processes: int = 2) -> Optional[dict]:
    """HD95, NSD and Betti errors of a finished run's validation predictions with
    ``nnunet_topomae.evaluation.evaluate.evaluate_folders`` (against nnU-Net's gt_segmentations, which hold every
    case: ``chill`` evaluates the validation cases that have a prediction, as nnU-Net's own validation does), as record
    fields; None while that module is not installed, or if the evaluation fails (the benchmark goes on)."""
    if not topo_available():
        return None
    from nnunet_topomae.evaluation.evaluate import evaluate_folders
    out = os.path.join(validation_dir, TOPO_SUMMARY)
    try:
        summary = None
        if os.path.isfile(out):
            with open(out) as f:
                summary = json.load(f)
            if not has_slice_betti(summary):  # written before the slice-wise errors: evaluate again
                summary = None
        if summary is None:
            summary = evaluate_folders(os.path.join(pre_dir, "gt_segmentations"), validation_dir,
                                       os.path.join(pre_dir, "dataset.json"), os.path.join(pre_dir, plans + ".json"),
                                       output_file=out, num_processes=num_processes, chill=True)
        return topo_metric_fields(summary)
    except (Exception, SystemExit) as e:  # (UserInputError is a SystemExit) a metric problem must not stop a
        # benchmark of hours; the predictions stay on disk and the next sitting backfills
        print(f"    evaluate_folders failed on {validation_dir}: {type(e).__name__}: {e}", flush=True)
        return None


def backfill_topo(results: List[dict], res_root: str, names: Dict, plans: str, pre_dir: str) -> int:
    """HD95 / NSD / Betti errors (3D and slice-wise) and per-case HD95 for runs recorded without them, from their kept
    validation predictions (or the summary_topology.json beside them); returns how many runs gained them."""
    n = 0
    if not topo_available():
        return 0
    for r in results:
        if ("mean_betti_slice_error" in r and "per_case_hd95" in r) or ("fine", r["arm"]) not in names:
            continue
        val = os.path.join(res_root, f"{names[('fine', r['arm'])]}__{plans}__3d_fullres", f"fold_{r['fold']}", "validation")
        if os.path.isfile(os.path.join(val, "summary.json")):
            extra = evaluate_topo(val, pre_dir, plans)
            if extra is not None:
                r.update(extra)
                n += 1
    return n


def _continue(fold_dir: str) -> List[str]:
    """``--c`` if an interrupted training left a checkpoint_latest.pth in ``fold_dir``."""
    return ["--c"] if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")) else []


def pretrain_once(train, pre_name: str, folder: str, env, log, say: str, fold: int = 0) -> tuple:
    """The pretraining of ``fold`` (0; another fold with the same split is an independent repeat) into ``folder``
    (the trainer's results folder) unless its checkpoint_final.pth is there (a stopped one continues with --c);
    returns (the finetuning's ``-pretrained_weights`` arguments, seconds spent). ``say`` is printed before a
    pretraining starts."""
    ckpt = os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth")
    t_pre = 0.0
    if not os.path.isfile(ckpt):
        print(say, flush=True)
        t0 = time.time()
        run(train(pre_name, fold) + _continue(os.path.dirname(ckpt)), env, log, echo=epoch_echo())
        t_pre = time.time() - t0
    return ["-pretrained_weights", ckpt], t_pre


def finetune_once(train, fine_name: str, fold: int, folder: str, extra: List[str], env, log) -> str:
    """The finetuning of ``fold`` into ``folder`` (its fold_X) up to nnU-Net's final validation, unless that is
    there: only ``--val`` after a finished training, ``--c`` after a stopped one, else a start with ``extra``.
    Returns the path of the validation's summary.json."""
    summary = os.path.join(folder, "validation", "summary.json")
    if not os.path.isfile(summary):
        if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
            run(train(fine_name, fold) + ["--val"], env, log)
        else:  # a run stopped half-way continues from its checkpoint_latest.pth (nnU-Net's --c)
            run(train(fine_name, fold) + (_continue(folder) or extra), env, log, echo=epoch_echo())
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True, help="MSD task folder (imagesTr, labelsTr, dataset.json) or nnU-Net raw dataset")
    ap.add_argument("--tier", choices=list(TIERS), default="quick")
    ap.add_argument("--out", required=True, help="work and result folder (reuse it to resume)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="restrict to these arms")
    ap.add_argument("--labelled", nargs="*", default=None,
                    help="restrict to these labelled subsets (5, 20, all), e.g. to repeat seeds with 5 cases first")
    ap.add_argument("--extras", action="store_true",
                    help="also the further runs of docs/BENCHMARKS.md (more seeds, transfer-recipe attempts, the hybrid "
                         "network from scratch with 20 and all labels); without it, the issue's protocol only")
    ap.add_argument("--seeds", nargs="*", type=int, default=None,
                    help="restrict to these seeds (0, 1, ...), e.g. every arm's seed 0 in one sitting")
    ap.add_argument("--benchmark", choices=list(BENCHMARKS), default="hippocampus",
                    help="which protocol and budgets (TIERS or ACDC_TIERS) and which dataset id (950, 951)")
    ap.add_argument("--dataset-id", type=int, default=None, help="nnU-Net dataset id in --out (default: the benchmark's)")
    ap.add_argument("--splits", default=None,
                    help="splits file with patient-grouped folds to use as splits_final.json (default: the raw "
                         "folder's splits_final_patientgrouped.json if there is one, else nnU-Net's split)")
    ap.add_argument("--group-regex", default=None,
                    help=f"how case names group into patients for the labelled subsets (first group of the match; "
                         f"default with grouped splits: {GROUP_REGEX!r})")
    ap.add_argument("--cpu-patch-voxels", type=int, default=CPU_PATCH_VOXELS,
                    help="voxel budget of the CPU plans' patch (module docstring)")
    ap.add_argument("--keep-going", action="store_true",
                    help="a run that fails is reported and skipped (the others still run); exit status 1 at the end")
    ap.add_argument("--prepare-only", action="store_true",
                    help="plan, preprocess and write the splits, print the CPU plans, then stop")
    args = ap.parse_args()
    bench = BENCHMARKS[args.benchmark]
    tier = bench["tiers"][args.tier]
    dataset_id = args.dataset_id if args.dataset_id is not None else bench["dataset_id"]
    splits_source = args.splits
    if splits_source is None and os.path.isfile(os.path.join(args.raw, "splits_final_patientgrouped.json")):
        splits_source = os.path.join(args.raw, "splits_final_patientgrouped.json")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "benchmark_log.txt")
    shim_dir = os.path.join(out, "ext_trainers")
    names = write_trainer_shims(shim_dir, tier)
    env = nnunet_env(out, extra_ext=[shim_dir], n_proc_da=1)
    name = prepare(args, env, log, dataset_id)
    pre_dir = os.path.join(env["nnUNet_preprocessed"], name)
    plans = "nnUNetPlans"
    if tier["plans"] == "cpu":
        plans = "nnUNetPlansCPU"
        plans_info = make_cpu_plans(env, log, name, dataset_id, budget=args.cpu_patch_voxels, plans=plans)
    else:
        preprocess_default(env, log, name, dataset_id)
        plans_info = plans_summary(pre_dir, plans)
    runs = tier_runs(tier, args.extras)
    max_seeds = max(s for _, _, s in tier_runs(tier, extras=True))  # the same fold numbers with or without --extras
    data_identifier = json.load(open(os.path.join(pre_dir, plans + ".json")))["configurations"]["3d_fullres"]["data_identifier"]
    split_info = write_splits(pre_dir, max_seeds, source=splits_source, group_regex=args.group_regex,
                              data_identifier=data_identifier)
    with open(os.path.join(out, "labelled_subsets.json"), "w") as f:
        json.dump({k: v for k, v in split_info.items() if k != "fold_of"}, f, indent=1)
    if "patients" in split_info:
        print(f"labelled subsets by patient ({split_info['group_regex']!r}): " + ", ".join(
            f"{k}: {len(v)} patients / {len(split_info['subsets'][k])} cases" for k, v in split_info["patients"].items()),
            flush=True)
    if args.prepare_only:
        return 0

    results_path = os.path.join(out, "results.json")
    results: List[dict] = json.load(open(results_path)) if os.path.isfile(results_path) else []
    current = lambda: [r for r in results if same_budget(r, tier)]  # the runs this tier resumes and reports
    done = {(r["arm"], str(r.get("subset", r["labelled_cases"])), r["seed"]) for r in current()}
    res_root = os.path.join(env["nnUNet_results"], name)
    if backfill_per_case(current(), res_root, names, plans) + backfill_topo(current(), res_root, names, plans, pre_dir):
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    train = lambda tr, fold: [nnunet_command("nnUNetv2_train"), str(dataset_id), "3d_fullres", str(fold), "-p", plans,
                              "-tr", tr, "-device", args.device]
    t_all = time.time()
    failed: List[tuple] = []
    for arm, labelled, seed in run_order(runs):
        if args.only and arm not in args.only:
            continue
        if args.labelled and str(labelled) not in args.labelled:
            continue
        if args.seeds is not None and seed not in args.seeds:
            continue
        pre, fine = ARMS[arm]
        key = (arm, str(labelled), seed)
        if key in done:
            continue
        try:
            extra, t_pre = [], 0.0
            if pre is not None:
                extra, t_pre = pretrain_once(
                    train, names[("pre", arm)], os.path.join(res_root, f"{names[('pre', arm)]}__{plans}__3d_fullres"), env,
                    log, f"[{time.time() - t_all:6.0f} s] pretraining {names[('pre', arm)]} on fold 0's training images")
            fold = split_info["fold_of"][(str(labelled), seed)]
            what = f"{labelled} labelled {'patients' if 'patients' in split_info else 'cases'}"
            print(f"[{time.time() - t_all:6.0f} s] {arm}: {names[('fine', arm)]}, {what}, seed {seed} (fold {fold})",
                  flush=True)
            t0 = time.time()
            folder = os.path.join(res_root, f"{names[('fine', arm)]}__{plans}__3d_fullres", f"fold_{fold}")
            summary = finetune_once(train, names[("fine", arm)], fold, folder, extra, env, log)
            t_train = time.time() - t0
        except UserInputError as e:
            if not args.keep_going:
                raise
            print(f"    FAILED ({arm}, {labelled}, seed {seed}), going on with the next run: {e}", flush=True)
            failed.append(key)
            continue
        with open(summary) as f:
            m = json.load(f)
        dice = {k: v["Dice"] for k, v in m["mean"].items()}
        n_lab = len(split_info["subsets"][str(labelled)])
        results.append(dict(arm=arm, subset=str(labelled), labelled_cases=n_lab, labels_fraction=round(n_lab / split_info["n_train"], 4),
                            seed=seed, dice=dice, mean_dice=float(m["foreground_mean"]["Dice"]), per_case=per_case_mean(m),
                            steps=tier["finetune_steps"], pretrain_steps=pretrain_steps(arm, tier),
                            train_seconds=round(t_train, 1),
                            pretrain_seconds=round(t_pre, 1), fold=fold, tier=args.tier, device=args.device))
        if "patients" in split_info:
            results[-1]["labelled_patients"] = len(split_info["patients"][str(labelled)])
        results[-1].update(dataset=name, plans=plans_info)
        topo = evaluate_topo(os.path.dirname(summary), pre_dir, plans)
        if topo is not None:
            results[-1].update(topo)
        done.add(key)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"    mean Dice {results[-1]['mean_dice']:.4f} {dice}" + (
            f", HD95 {topo['mean_hd95']:.2f}, Betti error {topo['mean_betti_error']:.3f}" if topo else ""), flush=True)
        write_report(current(), out, quiet=True)  # partial tables while a long benchmark runs
    write_report(current(), out)
    if failed:
        print(f"failed runs (rerun to retry): {failed}", flush=True)
    return 1 if failed else 0


def write_report(results: List[dict], out: str, quiet: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups: Dict = {}
    for r in results:
        groups.setdefault((r["arm"], r["labelled_cases"]), []).append(r["mean_dice"])
    # grouped benchmarks (ACDC) say how many patients; HD95 / NSD / Betti columns once any run has them
    patients = {r["labelled_cases"]: r["labelled_patients"] for r in results if "labelled_patients" in r}
    label = lambda n: f"{patients[n]} ({n})" if n in patients else f"{n}"
    topo = any("mean_hd95" in r for r in results)
    titles = {"mean_hd95": "mean HD95 mm", "mean_nsd": "mean NSD", "mean_betti_error": "mean Betti error",
              "mean_betti_slice_error": "mean slice Betti error"}
    # the slice-wise column once any run has it; none of them before any run has HD95
    topo_keys = [k for k in titles if topo and (k != "mean_betti_slice_error" or any(k in r for r in results))]
    lines = [f"| arm | labelled {'patients (cases)' if patients else 'cases'} | runs | mean Dice (mean over seeds) | "
             f"spread (max - min) | per seed |" + "".join(f" {titles[k]} |" for k in topo_keys),
             "| --- | --- | --- | --- | --- | --- |" + " --- |" * len(topo_keys)]

    def topo_cells(arm, n):
        cells = []
        for key in topo_keys:
            v = [r[key] for r in results if r["arm"] == arm and r["labelled_cases"] == n and key in r]
            cells.append(f"{np.mean(v):.{2 if key == 'mean_hd95' else 3}f}" + (f" ({len(v)} runs)" if len(v) != len(
                groups[(arm, n)]) else "") if v else "-")
        return " " + " | ".join(cells) + " |"
    for (arm, n), v in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        spread = f"{max(v) - min(v):.4f}" if len(v) > 1 else "-"
        lines.append(f"| {arm} | {label(n)} | {len(v)} | {np.mean(v):.4f} | {spread} | {', '.join(f'{x:.4f}' for x in v)} |"
                     + (topo_cells(arm, n) if topo else ""))
    lines += per_class_lines(results, label)
    lines += paired_lines(results)
    lines += paired_lines(results, anchor="scratch_hybrid")  # what pretraining adds to the same network
    lines += paired_lines(results, anchor="mae")  # the goal: TopoMAE above plain MAE
    lines += paired_lines(results, anchor="topomae")  # each ablation or attempt against the product it changes
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    # one panel per labelled subset, arms side by side in the same order and colour in every panel
    counts = sorted({n for _, n in groups})
    arms = sorted({a for a, _ in groups}, key=lambda a: (list(ARMS).index(a) if a in ARMS else len(ARMS), a))
    colours = {a: f"C{i % 10}" for i, a in enumerate(arms)}
    widths = [max(1, len({a for a, m in groups if m == n})) for n in counts]
    fig, axes = plt.subplots(1, len(counts), figsize=(2.2 + 0.75 * sum(widths), 4.2), sharey=True, squeeze=False,
                             gridspec_kw=dict(width_ratios=widths))
    for ax, n in zip(axes[0], counts):
        present = [a for a in arms if (a, n) in groups]
        for x, arm in enumerate(present):
            v = groups[(arm, n)]
            ax.scatter([x] * len(v), v, color=colours[arm], s=22, zorder=3)
            ax.plot([x - 0.3, x + 0.3], [np.mean(v)] * 2, color=colours[arm], lw=2)  # mean over seeds
        ax.set_xticks(range(len(present)), present, rotation=60, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(present) - 0.4)
        # three lines: a one-arm panel is narrower than "80 labelled patients (160 cases)", and titles overlapped
        ax.set_title(f"{patients[n]} labelled\npatients\n({n} cases)" if n in patients else f"{n} labelled\ncases", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean Dice (fold 0 validation)")
    fig.suptitle("one point per seed; dash = mean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=90, bbox_inches="tight")  # a one-arm panel's title is wider than it
    plt.close(fig)
    if not quiet:
        print("\n".join(lines))


def per_class_lines(results: List[dict], label=str) -> List[str]:
    """HD95 and Betti error (b0 + b1 + b2) per class, means over the runs of each arm and labelled count that have
    them (a topology method is judged class by class: ACDC's myocardium is a ring, the ventricles are not)."""
    rs = [r for r in results if "hd95" in r and "betti_error" in r]
    if not rs:
        return []
    classes = sorted({k for r in rs for k in r["hd95"]}, key=lambda k: (len(k), k))
    slices = any("betti_slice_error" in r for r in rs)  # the slice-wise errors (b0 + b1 of 2D slices), where recorded
    lines = ["", "HD95 (mm) and Betti error (b0 + b1 + b2) per class, means over runs"
             + (" (slice Betti: b0 + b1 of the 2D slices across the coarsest axis, runs that have it)" if slices else "")
             + ":", "",
             "| arm | labelled | runs | " + " | ".join(f"HD95 {c}" for c in classes) + " | "
             + " | ".join(f"Betti {c}" for c in classes) + " |" + ("".join(f" slice Betti {c} |" for c in classes) if slices else ""),
             "| --- | --- | --- |" + " --- |" * ((3 if slices else 2) * len(classes))]
    groups: Dict = {}
    for r in rs:
        groups.setdefault((r["arm"], r["labelled_cases"]), []).append(r)
    for (arm, n), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mean = lambda key, c, p: f"{np.mean([r[key][c] for r in g if c in r[key]]):.{p}f}"
        with_slices = [r for r in g if "betti_slice_error" in r]
        slice_mean = lambda c: f"{np.mean([r['betti_slice_error'][c] for r in with_slices]):.3f}" if with_slices else "-"
        lines.append(f"| {arm} | {label(n)} | {len(g)} | " + " | ".join(mean("hd95", c, 2) for c in classes) + " | "
                     + " | ".join(mean("betti_error", c, 2) for c in classes) + " |"
                     + ("".join(f" {slice_mean(c)} |" for c in classes) if slices else ""))
    return lines


def paired_lines(results: List[dict], anchor: str = "scratch_nnunet") -> List[str]:
    """Each run against the anchor run on the same labelled subset and seed (same fold, same validation cases)."""
    results = [r for r in results if "per_case" in r]  # runs recorded before results.json kept per-case Dice
    ref = {(r["labelled_cases"], r["seed"]): r for r in results if r["arm"] == anchor}
    rows = []
    for r in sorted(results, key=lambda r: (r["labelled_cases"], r["seed"], list(ARMS).index(r["arm"])
                                             if r["arm"] in ARMS else len(ARMS))):
        a = ref.get((r["labelled_cases"], r["seed"]))
        if r["arm"] == anchor or a is None:
            continue
        p = paired_difference(a["per_case"], r["per_case"])
        rows.append(f"| {r['arm']} | {r['labelled_cases']} | {r['seed']} | {100 * p['mean']:+.2f} | "
                    f"{100 * p['lo']:+.2f} to {100 * p['hi']:+.2f} | {p['better']} of {p['cases']} |")
    if not rows:
        return []
    return ["", f"Paired with {anchor} of the same labelled subset and seed, case by case over the validation cases "
            "(Dice points; interval: 95 % bootstrap over cases, not over seeds):", "",
            f"| arm | labelled cases | seed | mean Dice difference to {anchor} | 95 % interval | cases better |",
            "| --- | --- | --- | --- | --- | --- |"] + rows


if __name__ == "__main__":
    sys.exit(main())
