#!/usr/bin/env python
"""Does self-pretraining beat nnU-Net from scratch? One entry point for every arm and tier.

    python benchmarks/run.py --raw ../shared/data/Task04_Hippocampus --tier quick --out /tmp/bench

Converts an MSD task folder (or takes an nnU-Net raw dataset folder), plans and preprocesses with
nnU-Net, then runs each arm through the real ``nnUNetv2_train`` commands, on fold 0's validation
cases, with the same finetuning step budget for every arm. Labelled subsets (5, 20, all of fold 0's
training cases) are fixed, nested and written to ``labelled_subsets.json``; they are extra folds in
nnU-Net's ``splits_final.json`` (same validation cases), which is nnU-Net's own mechanism for custom
splits. Repeated seeds are repeated runs under other fold numbers. Evaluation is nnU-Net's own final
validation (``fold_X/validation/summary.json``).

Resumable: a run whose ``summary.json`` exists is not rerun; trained models stay in the results
folder. Writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import numpy as np

from nnunet_topomae.workflow import epoch_echo, make_plans_variant, nnunet_command, nnunet_env, run

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
                            ("topomae_latetopo", 5, 3)]),
    "full": dict(pretrain_steps=250 * 1000, finetune_steps=250 * 1000, iters=250, plans="default", runs=PROTOCOL,
                 extra_runs=[(a, 5, 1) for a in ARMS if a not in {r[0] for r in PROTOCOL} | set(PRETRAIN_SCALE)]),
}


def tier_runs(tier: dict, extras: bool = False) -> List[tuple]:
    """(arm, labelled, seeds) of a tier: the protocol's, and with ``extras`` the further runs too (an
    (arm, labelled) in both gets the larger number of seeds, in the protocol's place)."""
    seeds = {}
    for arm, labelled, n in tier["runs"] + (tier["extra_runs"] if extras else []):
        seeds[(arm, labelled)] = max(n, seeds.get((arm, labelled), 0))
    return [(arm, labelled, n) for (arm, labelled), n in seeds.items()]


CPU_PLANS = dict(batch_size=2, features=[16, 32, 64, 128])
DATASET_ID = 950


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
    for arm, (pre, fine) in ARMS.items():
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


def prepare(args, env, log) -> str:
    """Raw dataset in place, planned and preprocessed; returns the dataset name."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    raw_root = env["nnUNet_raw"]
    existing = [d for d in os.listdir(raw_root) if d.startswith(f"Dataset{DATASET_ID:03d}_")]
    if not existing:
        if os.path.isfile(os.path.join(args.raw, "dataset.json")) and "channel_names" in load_json(
                os.path.join(args.raw, "dataset.json")):
            os.symlink(os.path.abspath(args.raw), os.path.join(raw_root, f"Dataset{DATASET_ID:03d}_Bench"))
        else:
            if not os.path.isdir(os.path.join(args.raw, "imagesTs")):
                sys.exit(f"benchmark: {args.raw} has no imagesTs folder; nnU-Net's MSD converter needs one (it may be empty)")
            run([nnunet_command("nnUNetv2_convert_MSD_dataset"), "-i", os.path.abspath(args.raw), "-overwrite_id",
                 str(DATASET_ID), "-np", "1"], env, log)
        existing = [d for d in os.listdir(raw_root) if d.startswith(f"Dataset{DATASET_ID:03d}_")]
    name = existing[0]
    if not os.path.isfile(os.path.join(env["nnUNet_preprocessed"], name, "nnUNetPlans.json")):
        print("planning and preprocessing ...", flush=True)
        run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"],
            env, log)
    return name


def write_splits(pre_dir: str, seeds: int) -> Dict:
    """Fold 0 as nnU-Net made it, plus folds with nested labelled subsets of its training cases."""
    path = os.path.join(pre_dir, "splits_final.json")
    if not os.path.isfile(path):
        # exactly what nnUNetTrainer.do_split does when the file is missing
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        data = os.path.join(pre_dir, "nnUNetPlans_3d_fullres")
        keys = sorted(infer_dataset_class(data).get_identifiers(data))
        with open(path, "w") as f:
            json.dump(generate_crossval_split(keys, seed=12345, n_splits=5), f)
    with open(path) as f:
        splits = json.load(f)
    base = splits[0]
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
    return {"subsets": subsets, "folds": {f"{k[0]}_seed{k[1]}": v for k, v in folds.items()},
            "fold_of": folds, "n_train": len(base["train"]), "val": base["val"]}


def per_case_dice(summary: dict) -> Dict[str, float]:
    """Each validation case's Dice averaged over the foreground classes, from nnU-Net's summary.json
    (keyed by the case's file name; a class absent from both reference and prediction is left out, as
    nnU-Net's own mean leaves out its NaN)."""
    out = {}
    for c in summary["metric_per_case"]:
        d = [m["Dice"] for m in c["metrics"].values() if m["Dice"] == m["Dice"]]
        out[os.path.basename(c["reference_file"])] = float(np.mean(d)) if d else float("nan")
    return out


def paired_difference(a: Dict[str, float], b: Dict[str, float], n_boot: int = 5000) -> dict:
    """Mean of b - a over the cases both were evaluated on, with a 95 % bootstrap interval over cases.

    One run per arm says nothing about seed-to-seed spread; pairing the two runs case by case at least says
    whether the difference is larger than what resampling the validation cases would give."""
    keys = sorted(k for k in a if k in b and a[k] == a[k] and b[k] == b[k])
    d = np.array([b[k] - a[k] for k in keys])
    boot = d[np.random.default_rng(0).integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(mean=float(d.mean()), lo=float(lo), hi=float(hi), cases=len(d), better=int((d > 0).sum()))


def backfill_per_case(results: List[dict], res_root: str, names: Dict, plans: str) -> int:
    """Per-case Dice for runs recorded before results.json kept it, read from their summary.json if present;
    returns how many runs gained it."""
    n = 0
    for r in results:
        if "per_case" in r or r["arm"] not in ARMS:
            continue
        summary = os.path.join(res_root, f"{names[('fine', r['arm'])]}__{plans}__3d_fullres", f"fold_{r['fold']}",
                               "validation", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                r["per_case"] = per_case_dice(json.load(f))
            n += 1
    return n


def _continue(fold_dir: str) -> List[str]:
    """``--c`` if an interrupted training left a checkpoint_latest.pth in ``fold_dir``."""
    return ["--c"] if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")) else []


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
    args = ap.parse_args()
    tier = TIERS[args.tier]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "benchmark_log.txt")
    shim_dir = os.path.join(out, "ext_trainers")
    names = write_trainer_shims(shim_dir, tier)
    env = nnunet_env(out, extra_ext=[shim_dir], n_proc_da=1)
    name = prepare(args, env, log)
    pre_dir = os.path.join(env["nnUNet_preprocessed"], name)
    plans = "nnUNetPlans"
    if tier["plans"] == "cpu":
        plans = "nnUNetPlansCPU"
        make_plans_variant(pre_dir, plans, **CPU_PLANS)
    runs = tier_runs(tier, args.extras)
    max_seeds = max(s for _, _, s in tier_runs(tier, extras=True))  # the same fold numbers with or without --extras
    split_info = write_splits(pre_dir, max_seeds)
    with open(os.path.join(out, "labelled_subsets.json"), "w") as f:
        json.dump({k: v for k, v in split_info.items() if k != "fold_of"}, f, indent=1)

    results_path = os.path.join(out, "results.json")
    results: List[dict] = json.load(open(results_path)) if os.path.isfile(results_path) else []
    current = lambda: [r for r in results if same_budget(r, tier)]  # the runs this tier resumes and reports
    done = {(r["arm"], str(r.get("subset", r["labelled_cases"])), r["seed"]) for r in current()}
    res_root = os.path.join(env["nnUNet_results"], name)
    if backfill_per_case(current(), res_root, names, plans):
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    train = lambda tr, fold: [nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", str(fold), "-p", plans,
                              "-tr", tr, "-device", args.device]
    t_all = time.time()
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
        extra, t_pre = [], 0.0
        if pre is not None:
            ckpt = os.path.join(res_root, f"{names[('pre', arm)]}__{plans}__3d_fullres", "fold_0", "checkpoint_final.pth")
            if not os.path.isfile(ckpt):
                print(f"[{time.time() - t_all:6.0f} s] pretraining {names[('pre', arm)]} on fold 0's training images", flush=True)
                t_pre = time.time()
                run(train(names[('pre', arm)], 0) + _continue(os.path.dirname(ckpt)), env, log, echo=epoch_echo())
                t_pre = time.time() - t_pre
            extra = ["-pretrained_weights", ckpt]
        fold = split_info["fold_of"][(str(labelled), seed)]
        print(f"[{time.time() - t_all:6.0f} s] {arm}: {names[('fine', arm)]}, {labelled} labelled cases, seed {seed} (fold {fold})",
              flush=True)
        t0 = time.time()
        folder = os.path.join(res_root, f"{names[('fine', arm)]}__{plans}__3d_fullres", f"fold_{fold}")
        summary = os.path.join(folder, "validation", "summary.json")
        if not os.path.isfile(summary):
            if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
                run(train(names[('fine', arm)], fold) + ["--val"], env, log)
            else:  # a run stopped half-way continues from its checkpoint_latest.pth (nnU-Net's --c)
                resume = _continue(folder)
                run(train(names[('fine', arm)], fold) + (resume or extra), env, log, echo=epoch_echo())
        t_train = time.time() - t0
        with open(summary) as f:
            m = json.load(f)
        dice = {k: v["Dice"] for k, v in m["mean"].items()}
        n_lab = len(split_info["subsets"][str(labelled)])
        results.append(dict(arm=arm, subset=str(labelled), labelled_cases=n_lab, labels_fraction=round(n_lab / split_info["n_train"], 4),
                            seed=seed, dice=dice, mean_dice=float(m["foreground_mean"]["Dice"]), per_case=per_case_dice(m),
                            steps=tier["finetune_steps"], pretrain_steps=pretrain_steps(arm, tier),
                            train_seconds=round(t_train, 1),
                            pretrain_seconds=round(t_pre, 1), fold=fold, tier=args.tier, device=args.device))
        done.add(key)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"    mean Dice {results[-1]['mean_dice']:.4f} {dice}", flush=True)
        write_report(current(), out, quiet=True)  # partial tables while a long benchmark runs
    write_report(current(), out)
    return 0


def write_report(results: List[dict], out: str, quiet: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups: Dict = {}
    for r in results:
        groups.setdefault((r["arm"], r["labelled_cases"]), []).append(r["mean_dice"])
    lines = ["| arm | labelled cases | runs | mean Dice (mean over seeds) | spread (max - min) | per seed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (arm, n), v in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        spread = f"{max(v) - min(v):.4f}" if len(v) > 1 else "-"
        lines.append(f"| {arm} | {n} | {len(v)} | {np.mean(v):.4f} | {spread} | {', '.join(f'{x:.4f}' for x in v)} |")
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
        ax.set_title(f"{n} labelled cases", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean Dice (fold 0 validation)")
    fig.suptitle("one point per seed; dash = mean over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "results.png"), dpi=90)
    plt.close(fig)
    if not quiet:
        print("\n".join(lines))


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
