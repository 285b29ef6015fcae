#!/usr/bin/env python
"""Which of two arms is better? Paired per seed, and over all seeds at once, from the runner's result files.

    python benchmarks/compare_arms.py RESULTS.json [RESULTS.json ...] --arm topomae_faithfultopo --against topomae
        [--labelled 5] [--metric dice|hd95] [--json OUT]

Reads the records of ``benchmarks/run.py`` (``results.json`` of a run, or a copy under
``benchmarks/results/``), keeps those of the two arms with the labelled count, and pairs the runs of the
same seed (the same fold, hence the same validation cases) case by case. When a seed was run more than
once (a rerun in another sitting), the last record read wins: list the files oldest first.

Per seed: the mean Dice difference (arm minus against) with a 95 % bootstrap interval over cases. Over
seeds: the mean of the per-seed differences, and a bootstrap that resamples cases within every seed
together (the validation cases are the same in every seed), so the interval says how much the verdict
depends on the cases, not on the seeds: with three seeds the seed-to-seed spread is reported, not modelled.

``--metric hd95`` pairs each case's HD95 (mm, averaged over its classes; lower is better, so "cases better" counts
the cases where the arm's is lower) from the records' ``per_case_hd95``, which runs evaluated since it exists carry
(the runner adds it to older records whose validation folder is still on disk).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import paired_difference  # noqa: E402


# metric: (record field with the per-case values, record field with the run's mean, unit shown, scale to it,
# whether higher is better)
METRICS = {"dice": ("per_case", "mean_dice", "Dice points", 100.0, True),
           "hd95": ("per_case_hd95", "mean_hd95", "HD95 mm", 1.0, False)}


def runs_by_seed(records: List[dict], arm: str, labelled: int, field: str = "per_case") -> Dict[int, dict]:
    out = {}
    for r in records:
        if r.get("arm") == arm and r.get("labelled_cases") == labelled and r.get(field):
            out[r["seed"]] = r
    return out


def pooled_difference(pairs: List[tuple], n_boot: int = 5000) -> dict:
    """Mean over seeds of the per-seed mean difference b - a; 95 % interval from resampling the common cases
    (one draw of case indices applied to every seed)."""
    keys = sorted(set.intersection(*[{k for k in a if k in b and a[k] == a[k] and b[k] == b[k]} for a, b in pairs]))
    d = np.array([[b[k] - a[k] for k in keys] for a, b in pairs])  # seeds x cases
    idx = np.random.default_rng(0).integers(0, len(keys), (n_boot, len(keys)))
    boot = d[:, idx].mean(2).mean(0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(mean=float(d.mean()), lo=float(lo), hi=float(hi), cases=len(keys), seeds=len(pairs),
                seed_means=[float(x) for x in d.mean(1)])


def compare(records: List[dict], arm: str, against: str, labelled: int, metric: str = "dice") -> dict:
    field, mean_field, _, _, higher_is_better = METRICS[metric]
    a_runs, b_runs = runs_by_seed(records, against, labelled, field), runs_by_seed(records, arm, labelled, field)
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        what = "Dice" if metric == "dice" else "HD95 (per_case_hd95: rerun the runner where the predictions are kept)"
        raise SystemExit(f"compare_arms: no seed has per-case {what} for both {arm!r} and {against!r} with "
                         f"{labelled} labelled cases in the files given; run both arms, or check --labelled")
    per_seed = []
    for s in seeds:
        p = paired_difference(a_runs[s][field], b_runs[s][field], higher_is_better=higher_is_better)
        per_seed.append(dict(seed=s, arm_value=b_runs[s][mean_field], against_value=a_runs[s][mean_field], **p))
    pooled = pooled_difference([(a_runs[s][field], b_runs[s][field]) for s in seeds])
    return dict(arm=arm, against=against, labelled=labelled, metric=metric, per_seed=per_seed, pooled=pooled,
                arm_mean=float(np.mean([b_runs[s][mean_field] for s in seeds])),
                against_mean=float(np.mean([a_runs[s][mean_field] for s in seeds])))


def lines(c: dict) -> List[str]:
    _, _, unit, k, higher_is_better = METRICS[c.get("metric", "dice")]
    better, f = ("cases better", ".4f") if higher_is_better else ("cases lower", ".2f")
    out = [f"| seed | {c['arm']} | {c['against']} | difference ({unit}) | 95 % interval over cases | {better} |",
           "| --- | --- | --- | --- | --- | --- |"]
    for p in c["per_seed"]:
        out.append(f"| {p['seed']} | {p['arm_value']:{f}} | {p['against_value']:{f}} | {k * p['mean']:+.2f} | "
                   f"{k * p['lo']:+.2f} to {k * p['hi']:+.2f} | {p['better']} of {p['cases']} |")
    q = c["pooled"]
    out.append(f"| all {q['seeds']} | {c['arm_mean']:{f}} | {c['against_mean']:{f}} | {k * q['mean']:+.2f} | "
               f"{k * q['lo']:+.2f} to {k * q['hi']:+.2f} | - |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of benchmarks/run.py, oldest first")
    p.add_argument("--arm", required=True)
    p.add_argument("--against", required=True)
    p.add_argument("--labelled", type=int, default=5, help="labelled cases of the runs to compare (default 5)")
    p.add_argument("--metric", choices=sorted(METRICS), default="dice",
                   help="dice (default; higher is better) or hd95 (mm, lower is better; needs per_case_hd95)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    records = []
    for f in args.results:
        with open(f) as fh:
            records += json.load(fh)
    c = compare(records, args.arm, args.against, args.labelled, args.metric)
    print("\n".join(lines(c)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(c, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
