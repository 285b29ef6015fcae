#!/usr/bin/env python
r"""The hospital's protocol on Hippocampus dev-200 (issue 25): 5 labelled cases, the rest unlabelled.

    python benchmarks/unlabelled_protocol.py --raw ../shared/data/Task04_Hippocampus --out /work/bench_unl
    python benchmarks/unlabelled_protocol.py ... --counts 155 --seeds 0      # one sitting's share (resumes)

Where the label-hiding benchmark (benchmarks/run.py) pretrains on all 160 training cases of fold 0 with
their labels unused, this builds what a hospital has: an nnU-Net dataset holding only the 5 labelled
training cases and the 40 validation cases (fold 0 of the label-hiding benchmark, the same 5 cases:
``hippocampus_023, 091, 169, 336, 355``), planned with the benchmark's own CPU plans moved over with
``nnUNetv2_move_plans_between_datasets`` (so both protocols train on identical plans), and N of the other
155 training images added with ``nnunet-topomae add-unlabelled`` (N = 0, 40, 155; the first N of a
permutation seeded with 0, nested). One dataset per N (ids 960, 961, 962), because unlabelled cases belong
to a dataset. Per N: TopoMAE pretraining on fold 0 (5 labelled + N unlabelled images; validation on the 40),
then the hybrid finetuning on the 5 labelled cases, with the cpu tier's budgets of benchmarks/run.py
(pretraining 1000 steps, finetuning 2500). Seeds are repeated finetunings under other fold numbers with the
same split, as in run.py, from one pretraining per N (its fold 0); seed 3 with 155 is the exception: a second,
independent pretraining (the pretraining trainer's fold 1, same split) and its finetuning, which measures how
much one pretraining run differs from the next. nnU-Net from scratch on the same 5 cases (``scratch_nnunet``,
in the N = 0 dataset: it never reads unlabelled cases) anchors the gains.

Runs (``RUNS``): TopoMAE with 155 unlabelled, seeds 0-2 from one pretraining and seed 3 from another; with 0
and 40, one seed; nnU-Net from scratch, one seed (the label-hiding benchmark has three more of it on the same
cases). Resumable: a finished run is not
rerun, a stopped one continues with ``--c``. Writes ``unlabelled_protocol.json`` and ``unlabelled_protocol.md`` into
``--out`` (not run.py's ``results.*``: the two scripts can share an ``--out`` folder and its dataset 950, and run.py
would take these records for its own); the report also compares with the label-hiding protocol's TopoMAE runs
(``benchmarks/results/hippocampus_dev200_cpu.json``, same cases, same budgets).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (benchmarks/run.py: the label-hiding runner this protocol mirrors)

from nnunet_topomae.data.unlabelled import complete_cases, unlabelled_folder  # noqa: E402
from nnunet_topomae.errors import UserInputError  # noqa: E402
from nnunet_topomae.workflow import nnunet_command, nnunet_env, run  # noqa: E402

COUNTS = (0, 40, 155)
FIRST_ID = 960  # + index of the count in COUNTS
# (arm, unlabelled images, seeds, the pretraining's fold), breadth first by seed as in run.py
RUNS = [("topomae", 155, (0, 1, 2), 0), ("scratch_nnunet", 0, (0,), None), ("topomae", 0, (0,), 0),
        ("topomae", 40, (0,), 0), ("topomae", 155, (3,), 1)]
PLANS = "nnUNetPlansCPU"
RESULTS, REPORT = "unlabelled_protocol.json", "unlabelled_protocol.md"
HERE = os.path.dirname(os.path.abspath(__file__))


def dataset_id(count: int) -> int:
    return FIRST_ID + COUNTS.index(count)


def split_folds(count: int) -> int:
    """How many identical folds the split of the dataset with ``count`` unlabelled images needs: one per fold
    number that a finetuning seed or a pretraining repeat of ``RUNS`` uses."""
    return 1 + max(max(max(seeds), p or 0) for _, n, seeds, p in RUNS if n == count)


def unlabelled_order(train: List[str], labelled: List[str]) -> List[str]:
    """The training cases that are not labelled here, in the seeded order whose first N are added (nested)."""
    rest = sorted(set(train) - set(labelled))
    return [str(c) for c in np.random.default_rng(0).permutation(rest)]


def make_dataset(env, log, source_raw: str, source_id: int, count: int, labelled: List[str], val: List[str],
                 unlabelled: List[str], folds: int) -> str:
    """Raw dataset of the labelled + validation cases (links), the source's plans moved over, nnU-Net's
    preprocessing, a split with ``folds`` identical folds (5 train / 40 val), and ``count`` unlabelled images
    added with add-unlabelled. Idempotent; returns the dataset name."""
    did = dataset_id(count)
    name = f"Dataset{did:03d}_HippocampusUnl{count}"
    raw = os.path.join(env["nnUNet_raw"], name)
    ds = json.load(open(os.path.join(source_raw, "dataset.json")))
    ending = ds["file_ending"]
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(raw, sub), exist_ok=True)
        for case in labelled + val:
            for sub, suffix in (("imagesTr", "_0000"), ("labelsTr", "")):
                dst = os.path.join(raw, sub, case + suffix + ending)
                if not os.path.lexists(dst):
                    os.symlink(os.path.realpath(os.path.join(source_raw, sub, case + suffix + ending)), dst)
        ds["numTraining"] = len(labelled) + len(val)
        with open(os.path.join(raw, "dataset.json"), "w") as f:
            json.dump(ds, f, indent=1)
    pre = os.path.join(env["nnUNet_preprocessed"], name)
    if not os.path.isfile(os.path.join(pre, PLANS + ".json")):
        print(f"{name}: fingerprint, plans moved from dataset {source_id}, preprocessing ...", flush=True)
        run([nnunet_command("nnUNetv2_extract_fingerprint"), "-d", str(did), "-np", "1"], env, log)
        run([nnunet_command("nnUNetv2_move_plans_between_datasets"), "-s", str(source_id), "-t", str(did),
             "-sp", PLANS, "-tp", PLANS], env, log)
    if not os.path.isfile(os.path.join(pre, "dataset.json")):
        # nnUNetv2_preprocess reads dataset.json from the preprocessed folder, where nnU-Net's planner (not
        # run here: the plans come from the source dataset) would have copied it
        shutil.copy(os.path.join(raw, "dataset.json"), os.path.join(pre, "dataset.json"))
    if not bench.preprocessed_complete(env, name, PLANS):
        run([nnunet_command("nnUNetv2_preprocess"), "-d", str(did), "-plans_name", PLANS, "-c", "3d_fullres",
             "-np", "1"], env, log)
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump([{"train": sorted(labelled), "val": sorted(val)} for _ in range(max(folds, 1))], f, indent=1)
    if count:
        folder = os.path.join(os.path.dirname(env["nnUNet_raw"]), "unlabelled_images", str(count))
        os.makedirs(folder, exist_ok=True)
        for case in unlabelled[:count]:
            dst = os.path.join(folder, case + "_0000" + ending)
            if not os.path.lexists(dst):
                os.symlink(os.path.realpath(os.path.join(source_raw, "imagesTr", case + "_0000" + ending)), dst)
        run([nnunet_command("nnunet-topomae"), "add-unlabelled", "-d", str(did), "-i", folder, "-c", "3d_fullres",
             "-p", PLANS, "-np", "1", "--no-progress"], env, log)
    return name


def same_as_label_hiding(source_folder: str, unlabelled: str) -> dict:
    """Each unlabelled case of ``add-unlabelled`` against the same case as nnU-Net preprocessed it for the
    label-hiding benchmark (``source_folder``): how many have the same image array and the same properties
    (bar ``class_locations``, which only a labelled case has), and the largest absolute difference. The two
    protocols can only differ in the data if this finds a difference."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    ids = complete_cases(unlabelled)
    a = infer_dataset_class(source_folder)(source_folder, ids)
    b = infer_dataset_class(unlabelled)(unlabelled, ids)
    same, same_props, worst = 0, 0, 0.0
    for case in ids:
        x, _, _, px = a.load_case(case)
        y, _, _, py = b.load_case(case)
        x, y = np.asarray(x), np.asarray(y)
        d = float(np.abs(x.astype(np.float64) - y).max()) if x.shape == y.shape else float("inf")
        worst = max(worst, d)
        same += d == 0.0
        px = {k: v for k, v in px.items() if k != "class_locations"}
        same_props += repr(px) == repr({k: v for k, v in py.items() if k != "class_locations"})
    return dict(cases=len(ids), identical_images=int(same), identical_properties=int(same_props), max_abs_diff=worst)


def label_hiding_reference(path: str) -> List[dict]:
    """The label-hiding benchmark's TopoMAE and nnU-Net runs with 5 labelled cases at the same budgets."""
    if not os.path.isfile(path):
        return []
    tier = bench.TIERS["cpu"]
    return [r for r in json.load(open(path)) if r["subset"] == "5" and r["arm"] in ("topomae", "scratch_nnunet")
            and bench.same_budget(r, tier)]


def write_report(results: List[dict], reference: List[dict], out: str) -> str:
    lines = ["| arm | unlabelled images | pretraining images (labelled + unlabelled) | runs | mean Dice (mean over seeds) "
             "| per seed | mean HD95 mm | mean Betti error |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: Dict = {}
    for r in results:
        groups.setdefault((r["arm"], r["unlabelled"]), []).append(r)
    for (arm, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "scratch_nnunet", kv[0][1])):
        v = [r["mean_dice"] for r in rs]
        cell = lambda k, p: f"{np.mean([r[k] for r in rs if k in r]):.{p}f}" if any(k in r for r in rs) else "-"
        lines.append(f"| {arm} | {n} | {'-' if arm == 'scratch_nnunet' else f'5 + {n}'} | {len(v)} | {np.mean(v):.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in v)} | {cell('mean_hd95', 2)} | {cell('mean_betti_error', 3)} |")
    for arm in ("topomae", "scratch_nnunet"):
        v = [r["mean_dice"] for r in reference if r["arm"] == arm]
        if v:
            lines.append(f"| {arm}, label hiding (run.py) | - | {'5 + 155 (labels hidden)' if arm == 'topomae' else '-'} "
                         f"| {len(v)} | {np.mean(v):.4f} | {', '.join(f'{x:.4f}' for x in v)} | - | - |")
    # each TopoMAE run against nnU-Net from scratch (this protocol's seed 0 if there, else the label-hiding runs')
    # (records of the label-hiding file written before it kept per-case Dice cannot be paired)
    anchors = [r for r in results + reference if r["arm"] == "scratch_nnunet" and "per_case" in r]
    if anchors:
        a = anchors[0]
        lines += ["", f"Paired with nnU-Net from scratch on the same 5 cases ({a.get('source', 'this protocol')}, seed "
                      f"{a['seed']}), case by case over the 40 validation cases (Dice points, 95 % bootstrap interval):", "",
                  "| arm | unlabelled | seed | pretraining (fold) | difference | 95 % interval | cases better |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted(results, key=lambda r: (r["unlabelled"], r["seed"])):
            if r["arm"] == "scratch_nnunet":
                continue
            p = bench.paired_difference(a["per_case"], r["per_case"])
            lines.append(f"| {r['arm']} | {r['unlabelled']} | {r['seed']} | {r.get('pretrain_fold', 0)} | {100 * p['mean']:+.2f} | "
                         f"{100 * p['lo']:+.2f} to {100 * p['hi']:+.2f} | {p['better']} of {p['cases']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, REPORT), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", required=True, help="the MSD task folder of Hippocampus (Task04_Hippocampus)")
    ap.add_argument("--out", required=True, help="work and result folder (reuse it to resume)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--counts", nargs="*", type=int, default=None, help=f"restrict to these unlabelled counts {COUNTS}")
    ap.add_argument("--seeds", nargs="*", type=int, default=None, help="restrict to these seeds")
    ap.add_argument("--only", nargs="*", default=None, help="restrict to these arms (topomae, scratch_nnunet)")
    ap.add_argument("--prepare-only", action="store_true", help="build, plan, preprocess and add the images, then stop")
    ap.add_argument("--reference", default=os.path.join(HERE, "results", "hippocampus_dev200_cpu.json"),
                    help="the label-hiding benchmark's result file to compare with")
    args = ap.parse_args(argv)
    tier = bench.TIERS["cpu"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "benchmark_log.txt")
    shim_dir = os.path.join(out, "ext_trainers")
    names = bench.write_trainer_shims(shim_dir, tier)
    env = nnunet_env(out, extra_ext=[shim_dir], n_proc_da=1)
    # the label-hiding benchmark's own dataset, plans and fold 0 (run.py's functions, same seeds)
    source = bench.prepare(argparse.Namespace(raw=args.raw), env, log, bench.DATASET_ID)
    bench.make_cpu_plans(env, log, source, bench.DATASET_ID, plans=PLANS)
    source_pre = os.path.join(env["nnUNet_preprocessed"], source)
    ident = json.load(open(os.path.join(source_pre, PLANS + ".json")))["configurations"]["3d_fullres"]["data_identifier"]
    split = bench.write_splits(source_pre, 1, data_identifier=ident)
    labelled, val = split["subsets"]["5"], split["val"]
    published = os.path.join(HERE, "results", "hippocampus_dev200_cpu_labelled_subsets.json")
    if os.path.isfile(published) and json.load(open(published))["subsets"]["5"] != labelled:
        sys.exit(f"unlabelled protocol: the 5 labelled cases {labelled} differ from the label-hiding benchmark's "
                 f"({published}); the comparison would not be paired")
    order = unlabelled_order(list(split["subsets"]["all"]), labelled)
    runs = [(a, n, s, p) for a, n, seeds, p in RUNS for s in seeds
            if (args.counts is None or n in args.counts) and (args.only is None or a in args.only)
            and (args.seeds is None or s in args.seeds)]
    datasets = {n: make_dataset(env, log, os.path.join(env["nnUNet_raw"], source), bench.DATASET_ID, n, labelled, val,
                                order, split_folds(n)) for n in sorted({n for _, n, _, _ in runs})}
    info = dict(labelled=labelled, val=val, unlabelled_order=order, datasets={str(k): v for k, v in datasets.items()},
                budgets=dict(pretrain_steps=tier["pretrain_steps"], finetune_steps=tier["finetune_steps"]))
    largest = max(COUNTS)  # the counts' images are nested: its dataset holds every added case
    if largest in datasets:
        info["same_as_label_hiding"] = same_as_label_hiding(os.path.join(source_pre, ident), unlabelled_folder(
            os.path.join(env["nnUNet_preprocessed"], datasets[largest]), ident))
        print(f"add-unlabelled's cases against the label-hiding benchmark's: {info['same_as_label_hiding']}", flush=True)
    with open(os.path.join(out, "protocol.json"), "w") as f:
        json.dump(info, f, indent=1)
    if args.prepare_only:
        return 0
    results_path = os.path.join(out, RESULTS)
    results: List[dict] = json.load(open(results_path)) if os.path.isfile(results_path) else []
    done = {(r["arm"], r["unlabelled"], r["seed"]) for r in results}
    for arm, n, seed, pre_fold in sorted(runs, key=lambda r: r[2]):
        if (arm, n, seed) in done:
            continue
        did, name = dataset_id(n), datasets[n]
        res_root = os.path.join(env["nnUNet_results"], name)
        train = lambda tr, fold: [nnunet_command("nnUNetv2_train"), str(did), "3d_fullres", str(fold), "-p", PLANS,
                                  "-tr", tr, "-device", args.device]
        pre, _ = bench.ARMS[arm]
        extra, t_pre = [], 0.0
        if pre is not None:
            extra, t_pre = bench.pretrain_once(
                train, names[("pre", arm)], os.path.join(res_root, f"{names[('pre', arm)]}__{PLANS}__3d_fullres"), env, log,
                f"pretraining {names[('pre', arm)]} (fold {pre_fold}) on 5 labelled + {n} unlabelled images ({name})",
                fold=pre_fold)
        print(f"{arm}, {n} unlabelled, seed {seed} (fold {seed}): {names[('fine', arm)]}", flush=True)
        folder = os.path.join(res_root, f"{names[('fine', arm)]}__{PLANS}__3d_fullres", f"fold_{seed}")
        t0 = time.time()
        summary = bench.finetune_once(train, names[("fine", arm)], seed, folder, extra, env, log)
        m = json.load(open(summary))
        rec = dict(arm=arm, unlabelled=n, seed=seed, fold=seed, pretrain_fold=pre_fold, dataset=name,
                   labelled_cases=len(labelled),
                   mean_dice=float(m["foreground_mean"]["Dice"]), dice={k: v["Dice"] for k, v in m["mean"].items()},
                   per_case=bench.per_case_mean(m), steps=tier["finetune_steps"],
                   pretrain_steps=bench.pretrain_steps(arm, tier), train_seconds=round(time.time() - t0, 1),
                   pretrain_seconds=round(t_pre, 1), device=args.device)
        topo = bench.evaluate_topo(os.path.dirname(summary), os.path.join(env["nnUNet_preprocessed"], name), PLANS)
        if topo is not None:
            rec.update(topo)
        results.append(rec)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"    mean Dice {rec['mean_dice']:.4f}", flush=True)
    reference = label_hiding_reference(args.reference)
    for r in reference:
        r["source"] = "label-hiding benchmark"
    print(write_report(results, reference, out))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserInputError as e:
        sys.exit(f"unlabelled protocol: {e}")
