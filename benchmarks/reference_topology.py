"""Betti numbers of reference segmentations, in 3D and per 2D slice: what a topology metric compares against.

    python benchmarks/reference_topology.py GT_FOLDER -djfile dataset.json [--cases NAME ...] [--cases-from SUMMARY.json]

For each foreground label: the mean (median, max) of b0, b1, b2 over cases in 3D, and of b0, b1 over the 2D
slices with that label across the coarsest-spacing axis, with the share of slices that are exactly one component
with one hole (a ring, as a myocardium slice should be). Thick-slice annotations stacked in 3D can have many
tunnels where the anatomy has one (docs/BENCHMARKS.md, ACDC); this shows it on the data at hand. Betti numbers and
connectivity as in ``nnunet-topomae evaluate`` (``nnunet_topomae.evaluation.metrics``). ``--cases-from`` takes
the cases of an nnU-Net summary.json (e.g. a fold's validation cases).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import numpy as np


def reference_topology(gt_folder: str, labels: List[int], cases: Optional[List[str]] = None,
                       file_ending: str = ".nii.gz") -> Dict[int, dict]:
    import SimpleITK as sitk

    from nnunet_topomae.evaluation.metrics import betti_numbers, slices
    files = sorted(f for f in os.listdir(gt_folder) if f.endswith(file_ending))
    if cases is not None:
        wanted = {c[: -len(file_ending)] if c.endswith(file_ending) else c for c in cases}
        files = [f for f in files if f[: -len(file_ending)] in wanted]
    if not files:
        raise SystemExit(f"no {file_ending} files{' of the given cases' if cases else ''} in {gt_folder}")
    per3d = {lab: [] for lab in labels}
    per2d = {lab: [] for lab in labels}
    for f in files:
        img = sitk.ReadImage(os.path.join(gt_folder, f))
        seg = sitk.GetArrayFromImage(img)
        spacing = tuple(reversed(img.GetSpacing()))  # numpy axis order
        for lab in labels:
            mask = seg == lab
            per3d[lab].append(betti_numbers(mask))
            per2d[lab] += [betti_numbers(s)[:2] for s in slices(mask, spacing) if s.any()]
    out = {}
    for lab in labels:
        b3, b2 = np.array(per3d[lab]).reshape(-1, 3), np.array(per2d[lab]).reshape(-1, 2)
        out[lab] = {"cases": len(b3), "mean_3d": b3.mean(0).tolist(), "median_3d": np.median(b3, 0).tolist(),
                    "max_3d": b3.max(0).tolist(), "slices": len(b2),
                    "mean_2d": b2.mean(0).tolist() if len(b2) else [0.0, 0.0],
                    "ring_fraction_2d": float(np.mean((b2[:, 0] == 1) & (b2[:, 1] == 1))) if len(b2) else 0.0}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gt_folder")
    ap.add_argument("-djfile", required=True, help="dataset.json (labels, file ending)")
    ap.add_argument("--cases", nargs="*", default=None, help="case names (default: every file)")
    ap.add_argument("--cases-from", default=None, help="an nnU-Net summary.json: its cases")
    args = ap.parse_args(argv)
    with open(args.djfile) as f:
        dj = json.load(f)
    labels = sorted(int(v) for k, v in dj["labels"].items() if k != "background" and not isinstance(v, list))
    names = {int(v): k for k, v in dj["labels"].items() if not isinstance(v, list)}
    cases = args.cases
    if args.cases_from:
        with open(args.cases_from) as f:
            cases = [os.path.basename(c["reference_file"]) for c in json.load(f)["metric_per_case"]]
    res = reference_topology(args.gt_folder, labels, cases, dj.get("file_ending", ".nii.gz"))
    print("| label | cases | 3D b0 / b1 / b2 mean | 3D b1 median | 3D b1 max | slices | 2D b0 / b1 mean | slices that are one ring |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for lab, r in res.items():
        print(f"| {names.get(lab, lab)} ({lab}) | {r['cases']} | " + " / ".join(f"{x:.2f}" for x in r["mean_3d"])
              + f" | {r['median_3d'][1]:.1f} | {r['max_3d'][1]:.0f} | {r['slices']} | "
              + " / ".join(f"{x:.2f}" for x in r["mean_2d"]) + f" | {100 * r['ring_fraction_2d']:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
