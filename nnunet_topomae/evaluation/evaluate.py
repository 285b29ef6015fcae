"""``nnunet-topomae evaluate``: nnU-Net's folder evaluation plus HD95, NSD and Betti-number errors.

Same arguments as ``nnUNetv2_evaluate_folder`` (``GT_FOLDER PRED_FOLDER -djfile -pfile [-o] [-np]
[--chill]``) plus ``--nsd-tolerance MM``. Writes a JSON in the layout of nnU-Net's summary.json
(``metric_per_case[i]`` with ``reference_file``, ``prediction_file``, ``metrics[label]``;
``mean[label]``; ``foreground_mean``) plus a top-level ``settings`` entry that states the tolerance,
the libraries and the conventions. Default output: ``PRED_FOLDER/summary_topology.json``.

* Dice, IoU, FP, TP, FN, TN, n_pred, n_ref are nnU-Net's own ``compute_metrics`` on the very same
  reads, so they equal ``nnUNetv2_evaluate_folder``'s numbers exactly (Dice/IoU are NaN where a label
  is in neither mask: nnU-Net's convention).
* HD95 (mm), NSD, betti_b0_error, betti_b1_error, betti_b2_error: see ``metrics.py`` (MONAI for the
  surface metrics, cc3d and gudhi for the Betti numbers; connectivity, tolerance, empty-mask values).
* betti_slice_b0_error, betti_slice_b1_error: the same errors of the 2D slices across the coarsest-spacing
  axis, averaged over the slices with foreground: the topology that slice-by-slice annotation of
  thick-slice images draws, where 3D tunnels count how adjacent slices touch (``metrics.py``).
* Labels or regions as nnU-Net evaluates them (``LabelManager.foreground_regions`` when dataset.json
  defines regions, else ``foreground_labels``); a region's mask is the union of its labels. Voxels
  with the ignore label (if dataset.json has one) are left out of every metric: nnU-Net's counts skip
  them, and for our metrics both masks are restricted to the non-ignored voxels.
* Spacing (mm) comes from the reference image as read by the plans' reader
  (``PlansManager(pfile).image_reader_writer_class``); a prediction whose spacing or shape differs
  is refused.
* Means: per label over cases, and ``foreground_mean`` over labels, as nnU-Net does. For nnU-Net's
  keys nnU-Net's rule is kept (``nanmean`` over cases, so a case where the label is in neither mask
  does not count; a label absent from every case keeps a NaN Dice mean, as in nnU-Net's
  summary.json). Our keys are defined in every case (see the empty-mask conventions), so their means
  are plain means and never NaN.

This module is imported when the CLI's parser is built: heavy imports stay inside functions.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from nnunetv2.configuration import default_num_processes  # light: no torch, no nnU-Net internals

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM, HD_PERCENTILE

DEFAULT_OUTPUT_NAME = "summary_topology.json"
EXTRA_METRICS = ("HD95", "NSD", "betti_b0_error", "betti_b1_error", "betti_b2_error",
                 "betti_slice_b0_error", "betti_slice_b1_error")

LabelOrRegion = Union[int, Tuple[int, ...]]


# ====================================================================== one case (runs in a worker)
class CaseError(Exception):
    """A problem with one case's files; the parent turns it into a UserInputError (a SystemExit raised
    inside a pool worker would kill the worker instead of reaching the user)."""


class _RecordingReader:
    """Hands nnU-Net's ``compute_metrics`` the real reader and keeps what it read, so that our metrics
    use the same arrays and each file is read once."""

    def __init__(self, reader):
        self.reader = reader
        self.reads = {}

    def read_seg(self, seg_fname: str):
        out = self.reader.read_seg(seg_fname)
        self.reads[seg_fname] = out
        return out


def _region_mask(seg: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask
    return region_or_label_to_mask(seg, label_or_region)


def evaluate_case(reference_file: str, prediction_file: str, reader, labels_or_regions: Sequence[LabelOrRegion],
                  ignore_label: Optional[int] = None,
                  nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> dict:
    """nnU-Net's ``compute_metrics`` entry for one case, each label's metrics extended by ``EXTRA_METRICS``."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics

    from nnunet_topomae.evaluation import metrics as M

    recorder = _RecordingReader(reader)
    try:
        result = compute_metrics(reference_file, prediction_file, recorder, list(labels_or_regions), ignore_label)
    except Exception as e:
        # compute_metrics compares the arrays voxel by voxel: differing shapes fail there
        raise CaseError(f"cannot evaluate {os.path.basename(prediction_file)} against {reference_file} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) -> check that "
                        f"both are segmentations of the same image") from None
    seg_ref, props_ref = recorder.reads[reference_file]
    seg_pred, props_pred = recorder.reads[prediction_file]
    seg_ref, seg_pred = np.asarray(seg_ref)[0], np.asarray(seg_pred)[0]
    spacing = [float(s) for s in props_ref["spacing"]]
    if seg_ref.shape != seg_pred.shape:
        raise CaseError(f"{os.path.basename(prediction_file)} has shape {seg_pred.shape} but its reference "
                        f"{seg_ref.shape} -> predictions must be exported at the reference image's geometry")
    if not np.allclose(spacing, [float(s) for s in props_pred["spacing"]], rtol=1e-3, atol=1e-6):
        raise CaseError(f"{os.path.basename(prediction_file)} has spacing {list(props_pred['spacing'])} but its "
                        f"reference {spacing} -> predictions must be exported at the reference image's geometry")
    keep = None if ignore_label is None else seg_ref != ignore_label
    for r in labels_or_regions:
        mask_ref, mask_pred = _region_mask(seg_ref, r), _region_mask(seg_pred, r)
        if keep is not None:
            mask_ref, mask_pred = mask_ref & keep, mask_pred & keep
        entry = result["metrics"][r]
        entry["HD95"] = M.hd95(mask_pred, mask_ref, spacing)
        entry["NSD"] = M.nsd(mask_pred, mask_ref, spacing, nsd_tolerance_mm)
        entry.update(M.betti_errors(mask_pred, mask_ref))
        entry.update(M.slice_betti_errors(mask_pred, mask_ref, spacing))
    return result


# ====================================================================== folders
def _settings(nsd_tolerance_mm: float, reader_name: str, labels_or_regions) -> dict:
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            return "unknown"
    return {
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "hd_percentile": HD_PERCENTILE,
        "spacing": f"from the reference image read by {reader_name}, in mm",
        "labels_or_regions": [list(r) if isinstance(r, tuple) else r for r in labels_or_regions],
        "libraries": {"nnunetv2 (Dice, IoU, TP, FP, FN, TN, n_pred, n_ref)": version("nnunetv2"),
                      "monai (HD95, NSD)": version("monai"),
                      "connected-components-3d (betti b0)": version("connected-components-3d"),
                      "gudhi (betti b1, b2)": version("gudhi")},
        "slices": "betti_slice_*: 2D slices across the axis of the coarsest spacing (the first on ties), "
                  "errors averaged over the slices with foreground in either mask (0 if none)",
        "boundary": "mask voxels with a face neighbour outside the mask; Euclidean distances between "
                    "boundary voxel centres in mm",
        "connectivity": "foreground 26-connected (8 in 2D), background 6-connected (4 in 2D)",
        "empty_masks": "both empty: HD95 0, NSD 1, Dice/IoU NaN (nnU-Net); exactly one empty: HD95 = image "
                       "diagonal in mm, NSD 0; an empty mask has Betti numbers 0",
        "ignore_label": "voxels with the ignore label are left out of every metric",
        "mean_rule": "nnU-Net's keys: nanmean over cases (cases where the label is in neither mask are "
                     "skipped), NaN only if no case defines it; HD95, NSD, betti_*: mean over all cases; "
                     "foreground_mean: mean of the label means",
    }


def _load_inputs(gt_folder, pred_folder, dataset_json_file, plans_file):
    for what, path, fix in (("reference folder", gt_folder, "pass the folder with the ground-truth "
                             "segmentations, e.g. $nnUNet_raw/DatasetXXX_Name/labelsTr"),
                            ("prediction folder", pred_folder, "pass the folder nnUNetv2_predict wrote")):
        if not os.path.isdir(path):
            raise UserInputError(f"{what} {path} does not exist -> {fix}")
    for what, path, fix in (("dataset.json", dataset_json_file, "pass -djfile with the dataset's dataset.json"),
                            ("plans file", plans_file, "pass -pfile with the plans.json the model was trained with")):
        if not os.path.isfile(path):
            raise UserInputError(f"{what} {path} does not exist -> {fix}")
    try:
        with open(dataset_json_file) as f:
            dataset_json = json.load(f)
        with open(plans_file) as f:
            plans = json.load(f)
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read {e.filename if isinstance(e, OSError) else 'a JSON input'} ({e}) "
                             f"-> pass valid dataset.json and plans.json files") from None
    for key in ("file_ending", "labels"):
        if key not in dataset_json:
            raise UserInputError(f"{dataset_json_file} has no '{key}' entry -> pass the dataset's dataset.json "
                                 f"(-djfile), not another JSON file")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    try:
        pm = PlansManager(plans)
        reader_class = pm.image_reader_writer_class
        lm = pm.get_label_manager(dataset_json)
    except Exception as e:
        raise UserInputError(f"nnU-Net cannot use {plans_file} with {dataset_json_file} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) -> pass the "
                             f"plans.json and dataset.json of the same trained model") from None
    return dataset_json, reader_class, lm


def _match_files(gt_folder: str, pred_folder: str, file_ending: str, chill: bool) -> List[Tuple[str, str]]:
    def listing(folder):
        return sorted(f for f in os.listdir(folder) if f.endswith(file_ending) and
                      os.path.isfile(os.path.join(folder, f)))
    preds, refs = listing(pred_folder), listing(gt_folder)
    if not refs:
        raise UserInputError(f"no *{file_ending} files in the reference folder {gt_folder} -> pass the folder "
                             f"with the ground-truth segmentations (file_ending comes from dataset.json)")
    if not preds:
        raise UserInputError(f"no *{file_ending} files in the prediction folder {pred_folder} -> run "
                             f"nnUNetv2_predict into it first (file_ending comes from dataset.json)")
    ref_set, pred_set = set(refs), set(preds)
    orphans = [p for p in preds if p not in ref_set]
    if orphans:
        raise UserInputError(f"{len(orphans)} prediction(s) have no reference of the same name in {gt_folder} "
                             f"(e.g. {orphans[0]}) -> pass the matching reference folder or remove them")
    missing = [r for r in refs if r not in pred_set]
    if missing and not chill:
        raise UserInputError(f"{len(missing)} reference case(s) have no prediction in {pred_folder} "
                             f"(e.g. {missing[0]}) -> predict them, or pass --chill to evaluate only the "
                             f"predictions present")
    return [(os.path.join(gt_folder, p), os.path.join(pred_folder, p)) for p in preds]


def _means(results: List[dict], labels_or_regions) -> Tuple[dict, dict]:
    keys = list(results[0]["metrics"][labels_or_regions[0]].keys())
    means = {}
    with warnings.catch_warnings():
        # nanmean of an all-NaN column: nnU-Net's NaN mean for a label absent from every case, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        for r in labels_or_regions:
            means[r] = {}
            for m in keys:
                values = [res["metrics"][r][m] for res in results]
                means[r][m] = np.mean(values) if m in EXTRA_METRICS else np.nanmean(values)
        foreground_mean = {m: np.mean([means[r][m] for r in means if r != 0 and r != "0"]) for m in keys}
    return means, foreground_mean


def evaluate_folders(gt_folder: str, pred_folder: str, dataset_json_file: str, plans_file: str,
                     output_file: Optional[str] = None, num_processes: int = default_num_processes,
                     nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, chill: bool = False) -> dict:
    """Evaluate every prediction in ``pred_folder`` against the same-named file in ``gt_folder``.

    Returns (and writes to ``output_file``, default ``pred_folder/summary_topology.json``) a dict in
    the layout of nnU-Net's ``compute_metrics_on_folder`` result: ``metric_per_case`` (list of
    ``{"reference_file", "prediction_file", "metrics": {label_or_region: {...}}}``), ``mean``
    (``{label_or_region: {...}}``), ``foreground_mean`` and ``settings``. As in nnU-Net, the returned dict
    is keyed by label (int) or region (tuple); the file has them as strings (nnU-Net's
    ``save_summary_json``, readable with its ``load_summary_json``).

    ``num_processes`` defaults to nnU-Net's ``default_num_processes``; workers are spawned like
    nnU-Net's (at most one per case; a single process evaluates in this process). ``chill=False``
    requires a prediction for every reference, as ``nnUNetv2_evaluate_folder`` does.
    Bad input raises ``nnunet_topomae.errors.UserInputError`` (one line: problem -> fix).
    """
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    if num_processes is None:
        num_processes = default_num_processes
    if int(num_processes) < 1:
        raise UserInputError(f"-np {num_processes} is not a process count -> pass -np 1 or more")
    try:
        nsd_tolerance_mm = float(nsd_tolerance_mm)
    except (TypeError, ValueError):
        nsd_tolerance_mm = float("nan")
    if not (np.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise UserInputError(f"--nsd-tolerance {nsd_tolerance_mm} is not a distance -> pass a number of mm >= 0, "
                             f"e.g. --nsd-tolerance {DEFAULT_NSD_TOLERANCE_MM}")
    if output_file is None:
        output_file = os.path.join(pred_folder, DEFAULT_OUTPUT_NAME)
    if not output_file.endswith(".json"):
        raise UserInputError(f"output file {output_file} does not end with .json -> pass -o SOMETHING.json")
    out_dir = os.path.dirname(os.path.abspath(output_file))
    if not os.path.isdir(out_dir):
        raise UserInputError(f"the output folder {out_dir} does not exist -> create it or pass another -o")

    dataset_json, reader_class, lm = _load_inputs(gt_folder, pred_folder, dataset_json_file, plans_file)
    labels_or_regions = [tuple(int(i) for i in r) if isinstance(r, (tuple, list)) else int(r)
                         for r in (lm.foreground_regions if lm.has_regions else lm.foreground_labels)]
    if not labels_or_regions:
        raise UserInputError(f"{dataset_json_file} declares no foreground label -> add the labels to its 'labels'")
    cases = _match_files(gt_folder, pred_folder, dataset_json["file_ending"], chill)

    reader = reader_class()
    args = [(ref, pred, reader, labels_or_regions, lm.ignore_label, nsd_tolerance_mm) for ref, pred in cases]
    n_workers = min(int(num_processes), len(args))
    try:
        if n_workers == 1:
            results = [evaluate_case(*a) for a in args]
        else:
            with multiprocessing.get_context("spawn").Pool(n_workers) as pool:
                results = pool.starmap(evaluate_case, args)
    except CaseError as e:
        raise UserInputError(str(e)) from None

    means, foreground_mean = _means(results, labels_or_regions)
    for res in results:
        recursive_fix_for_json_export(res)
    recursive_fix_for_json_export(means)
    recursive_fix_for_json_export(foreground_mean)
    summary = {"metric_per_case": results, "mean": means, "foreground_mean": foreground_mean,
               "settings": _settings(nsd_tolerance_mm, reader_class.__name__, labels_or_regions)}
    save_summary_json(summary, output_file)
    return summary


# ====================================================================== CLI
def _print_summary(summary: dict, output_file: str) -> None:
    cols = ("Dice", "HD95", "NSD", "betti_b0_error", "betti_b1_error", "betti_b2_error", "betti_slice_b0_error",
            "betti_slice_b1_error")
    heads = ("Dice", "HD95 mm", "NSD", "b0 err", "b1 err", "b2 err", "2D b0", "2D b1")
    rows = [(str(list(k)) if isinstance(k, tuple) else str(k), v) for k, v in summary["mean"].items()]
    rows.append(("foreground", summary["foreground_mean"]))
    width = max(len(r[0]) for r in rows + [("label", None)])
    print(f"{'label':<{width}}  " + "  ".join(f"{h:>8}" for h in heads))
    for name, vals in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{vals[c]:8.3f}" for c in cols))
    print(f"{len(summary['metric_per_case'])} case(s), NSD tolerance "
          f"{summary['settings']['nsd_tolerance_mm']:g} mm; wrote {output_file}")


def cmd_evaluate(args) -> int:
    output = args.o if args.o is not None else os.path.join(args.pred_folder, DEFAULT_OUTPUT_NAME)
    summary = evaluate_folders(args.gt_folder, args.pred_folder, args.djfile, args.pfile, output_file=output,
                               num_processes=args.np, nsd_tolerance_mm=args.nsd_tolerance, chill=args.chill)
    _print_summary(summary, output)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an argparse subparsers object; the handler returns the exit code."""
    p = sub.add_parser(
        "evaluate", help="nnU-Net's folder evaluation plus HD95, NSD and Betti-number (topology) errors",
        description="Like nnUNetv2_evaluate_folder (same arguments; Dice, IoU, TP, FP, FN, TN from nnU-Net's own "
                    "code), plus per case and label: HD95 (mm, 95th-percentile symmetric Hausdorff distance), "
                    "NSD (normalised surface Dice at --nsd-tolerance mm), and the absolute errors of the Betti "
                    "numbers b0 (components), b1 (tunnels), b2 (cavities) with a 26-connected foreground, in 3D "
                    "and (b0, b1) in the 2D slices across the coarsest-spacing axis. "
                    "Spacing comes from the reference images. Empty masks: both empty gives HD95 0, NSD 1; "
                    "exactly one empty gives HD95 = the image diagonal in mm, NSD 0. Writes nnU-Net's "
                    "summary.json layout with a 'settings' entry.")
    p.add_argument("gt_folder", help="folder with the ground-truth segmentations")
    p.add_argument("pred_folder", help="folder with the predicted segmentations (same file names)")
    p.add_argument("-djfile", required=True, help="dataset.json file")
    p.add_argument("-pfile", required=True, help="plans.json file (its image_reader_writer reads the images)")
    p.add_argument("-o", default=None, help=f"output file (.json). Default: PRED_FOLDER/{DEFAULT_OUTPUT_NAME}")
    p.add_argument("-np", type=int, default=default_num_processes,
                   help=f"number of processes (default: nnU-Net's default_num_processes, here {default_num_processes})")
    p.add_argument("--chill", action="store_true",
                   help="do not fail if some references have no prediction (evaluate the predictions present)")
    p.add_argument("--nsd-tolerance", type=float, default=DEFAULT_NSD_TOLERANCE_MM, metavar="MM",
                   help=f"NSD tolerance in mm: boundary voxels within this distance of the other boundary count "
                        f"as correct (default {DEFAULT_NSD_TOLERANCE_MM}: one voxel at 1 mm resolution)")
    p.set_defaults(handler=cmd_evaluate)
    return p
