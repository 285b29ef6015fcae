"""nnunet_topomae.evaluation: HD95, NSD and Betti-number errors against hand-built volumes with known
answers, and ``evaluate_folders`` / the ``evaluate`` subcommand end to end on synthetic .nii.gz cases,
with Dice checked against nnU-Net's own ``compute_metrics_on_folder``."""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.evaluation import metrics as M
from nnunet_topomae.evaluation.evaluate import DEFAULT_OUTPUT_NAME, EXTRA_METRICS, add_parser, evaluate_folders
from nnunet_topomae.utils.synthetic_plans import plans as synthetic_plans

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

NNUNET_KEYS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


# ====================================================================== hand-built volumes
def grid(n: int):
    return np.mgrid[:n, :n, :n].astype(np.float64) - (n - 1) / 2


def ball(n: int, radius: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    z, y, x = grid(n)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def torus(n: int = 24, major: float = 7.0, minor: float = 2.5) -> np.ndarray:
    z, y, x = grid(n)
    return (np.sqrt(y ** 2 + x ** 2) - major) ** 2 + z ** 2 <= minor ** 2


def two_blobs(n: int = 24) -> np.ndarray:
    return ball(n, 4, (0, 0, -6)) | ball(n, 4, (0, 0, 6))


def hollow_shell(n: int = 24) -> np.ndarray:
    return ball(n, 9) & ~ball(n, 6)


def cube(n: int, lo, side: int) -> np.ndarray:
    m = np.zeros((n, n, n), bool)
    m[tuple(slice(a, a + side) for a in lo)] = True
    return m


def euler_characteristic(mask: np.ndarray) -> int:
    """Euler characteristic of the union of the mask's closed voxel cubes, by counting its cells
    (independent of gudhi and cc3d): a cell is in the union if a voxel around it is foreground."""
    p = np.pad(mask.astype(bool), 1)
    chi = 0
    for spans in np.ndindex(*(2,) * p.ndim):  # per axis: 0 = the cell is a point there, 1 = it spans a voxel
        cells = p
        for ax, span in enumerate(spans):
            n = cells.shape[ax]
            lo, hi = [slice(None)] * p.ndim, [slice(None)] * p.ndim
            if span:
                lo[ax] = slice(1, n - 1)
                cells = cells[tuple(lo)]
            else:
                lo[ax], hi[ax] = slice(0, n - 1), slice(1, n)
                cells = cells[tuple(lo)] | cells[tuple(hi)]
        chi += (-1) ** sum(spans) * int(cells.sum())
    return chi


# ====================================================================== Betti numbers
@pytest.mark.parametrize("name, mask, expected", [
    ("ball", ball(20, 6), (1, 0, 0)),
    ("torus", torus(), (1, 1, 0)),
    ("two_blobs", two_blobs(), (2, 0, 0)),
    ("hollow_shell", hollow_shell(), (1, 0, 1)),
    ("empty", np.zeros((10, 10, 10), bool), (0, 0, 0)),
])
def test_betti_numbers_known_shapes(name, mask, expected):
    assert M.betti_numbers(mask) == expected
    b0, b1, b2 = expected
    assert euler_characteristic(mask) == b0 - b1 + b2


def test_betti_numbers_2d_ring_and_object_touching_the_border():
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    assert M.betti_numbers(ring) == (1, 1, 0)
    # crop + padding: an object filling the whole image still has a background around it
    assert M.betti_numbers(np.ones((6, 6, 6), bool)) == (1, 0, 0)
    full_ring = np.ones((5, 5, 3), bool)
    full_ring[2, 2, :] = False
    assert M.betti_numbers(full_ring) == (1, 1, 0)


def test_connectivity_foreground_26_background_6():
    corner = np.zeros((4, 4, 4), bool)
    corner[1, 1, 1] = corner[2, 2, 2] = True  # touch at one vertex only
    assert M.betti_numbers(corner) == (1, 0, 0)
    assert M.connected_components(corner) == M.cubical_betti_numbers(corner)[0] == 1
    shell = np.zeros((5, 5, 5), bool)
    shell[1:4, 1:4, 1:4] = True
    shell[2, 2, 2] = False
    assert M.betti_numbers(shell) == (1, 0, 1)
    edge_gap = shell.copy()
    edge_gap[3, 3, 2] = False  # touches the cavity along an edge only: the 6-connected cavity stays closed
    assert M.betti_numbers(edge_gap) == (1, 0, 1)
    face_gap = shell.copy()
    face_gap[3, 2, 2] = False  # a face neighbour of the cavity: it opens to the outside
    assert M.betti_numbers(face_gap) == (1, 0, 0)


def test_cc3d_b0_matches_gudhi_b0_and_euler_characteristic_on_random_masks():
    rng = np.random.default_rng(0)
    for i in range(12):
        shape = (10, 11, 9) if i % 3 else (14, 13)
        mask = rng.random(shape) < (0.2 + 0.05 * (i % 5))
        b0, b1, b2 = M.cubical_betti_numbers(mask)
        assert M.connected_components(mask) == b0
        assert M.betti_numbers(mask) == (b0, b1, b2)
        assert euler_characteristic(mask) == b0 - b1 + b2


def test_betti_errors():
    assert M.betti_errors(two_blobs(), ball(24, 6)) == {"betti_b0_error": 1, "betti_b1_error": 0, "betti_b2_error": 0}
    assert M.betti_errors(np.zeros((24,) * 3, bool), hollow_shell()) == \
        {"betti_b0_error": 1, "betti_b1_error": 0, "betti_b2_error": 1}
    assert M.betti_errors(torus(), torus()) == {"betti_b0_error": 0, "betti_b1_error": 0, "betti_b2_error": 0}
    empty = np.zeros((8, 8, 8), bool)
    assert M.betti_errors(empty, empty) == {"betti_b0_error": 0, "betti_b1_error": 0, "betti_b2_error": 0}


# ====================================================================== slice-wise Betti numbers
def _square_ring(x0: int) -> np.ndarray:
    """A 7 x 7 square ring (one component, one hole) starting at column ``x0`` of a 12 x 16 slice."""
    m = np.zeros((12, 16), bool)
    m[1:8, x0:x0 + 7] = True
    m[2:7, x0 + 1:x0 + 6] = False
    return m


def test_slice_betti_counts_the_rings_drawn_not_how_slices_touch():
    a, b = _square_ring(1), _square_ring(6)  # b overlaps a's right side only
    tube = np.stack([a, a, a, a])  # aligned rings: one tunnel, the loops of all slices are the same cycle
    zigzag = np.stack([a, b, a, b])  # each slice touches the next along one side: every ring keeps its loop
    assert M.betti_numbers(tube) == (1, 1, 0) and M.betti_numbers(zigzag) == (1, 4, 0)
    assert M.betti_errors(tube, zigzag)["betti_b1_error"] == 3  # 3D: the stacking, not a wrong ring
    assert M.slice_betti_errors(tube, zigzag, (10.0, 1.5, 1.5)) == \
        {"betti_slice_b0_error": 0.0, "betti_slice_b1_error": 0.0}  # every slice is one ring in both


def test_slice_betti_errors_known_values():
    a = _square_ring(1)
    tube = np.stack([a, a, a, a])
    broken = tube.copy()
    broken[2, 1, 3] = False  # one slice's ring opened: still one component, no hole
    assert M.slice_betti_errors(broken, tube, (10, 1, 1)) == {"betti_slice_b0_error": 0.0, "betti_slice_b1_error": 0.25}
    split = tube.copy()
    split[1, 1, 3] = split[1, 7, 3] = False  # one slice's ring cut twice: two pieces, no hole
    assert M.slice_betti_errors(split, tube, (10, 1, 1)) == {"betti_slice_b0_error": 0.25, "betti_slice_b1_error": 0.25}
    empty = np.zeros_like(tube)
    assert M.slice_betti_errors(empty, tube, (10, 1, 1)) == {"betti_slice_b0_error": 1.0, "betti_slice_b1_error": 1.0}
    assert M.slice_betti_errors(tube, empty, (10, 1, 1)) == {"betti_slice_b0_error": 1.0, "betti_slice_b1_error": 1.0}
    assert M.slice_betti_errors(empty, empty, (10, 1, 1)) == {"betti_slice_b0_error": 0.0, "betti_slice_b1_error": 0.0}
    # only slices with foreground count: empty slices around the object change nothing
    padded = lambda v: np.concatenate([np.zeros_like(v), v, np.zeros_like(v)])
    assert M.slice_betti_errors(padded(broken), padded(tube), (10, 1, 1))["betti_slice_b1_error"] == 0.25
    # 2D: the image is its one slice (ring against a filled square: the hole is missing)
    disk = np.zeros((12, 16), bool)
    disk[1:8, 1:8] = True
    assert M.slice_betti_errors(disk, a, (1, 1)) == {"betti_slice_b0_error": 0.0, "betti_slice_b1_error": 1.0}


def test_slices_are_taken_across_the_coarsest_axis():
    assert M.slice_axis((10.0, 1.56, 1.56)) == 0 and M.slice_axis((1.0, 1.0, 5.0)) == 2
    assert M.slice_axis((1.0, 1.0, 1.0)) == 0  # isotropic: the first axis
    a = _square_ring(1)
    tube, broken = np.stack([a] * 4), np.stack([a] * 4)
    broken[2, 1, 3] = False
    moved = lambda v: np.moveaxis(v, 0, 2)
    expected = M.slice_betti_errors(broken, tube, (10, 1, 1))
    assert M.slice_betti_errors(moved(broken), moved(tube), (1, 1, 10)) == expected
    # across another axis the slices cut the rings into bars: other values
    assert M.slice_betti_errors(moved(broken), moved(tube), (10, 1, 1)) != expected


# ====================================================================== HD95
def test_hd95_concentric_balls_and_identical_masks():
    outer, inner = ball(32, 10), ball(32, 7)
    assert abs(M.hd95(outer, inner, (1, 1, 1)) - 3.0) <= 1.0
    assert abs(M.hd95(inner, outer, (1, 1, 1)) - 3.0) <= 1.0
    assert M.hd95(outer, outer, (1, 1, 1)) == 0.0


def test_hd95_anisotropic_spacing():
    # two 4-voxel cubes 10 voxels apart along axis 0: every nearest boundary point lies straight along axis 0,
    # so the distances are 7, 8, 9, 10 voxels along axis 0 alone and their 95th percentile is 10
    ref, pred = cube(20, (2, 8, 8), 4), cube(20, (12, 8, 8), 4)
    assert M.hd95(pred, ref, (1, 1, 1)) == pytest.approx(10.0)
    assert M.hd95(pred, ref, (2.0, 1, 1)) == pytest.approx(20.0)
    assert M.hd95(pred, ref, (1, 2.0, 1)) == pytest.approx(10.0)
    assert M.hd95(pred, ref, (1, 1, 0.5)) == pytest.approx(10.0)


def test_hd95_empty_masks():
    empty, obj = np.zeros((10, 20, 30), bool), cube(10, (2, 2, 2), 3)
    obj = np.pad(obj, ((0, 0), (0, 10), (0, 20)))
    spacing = (2.0, 1.0, 0.5)
    diagonal = math.sqrt(20 ** 2 + 20 ** 2 + 15 ** 2)
    assert M.hd95(empty, empty, spacing) == 0.0
    assert M.hd95(empty, obj, spacing) == pytest.approx(diagonal)
    assert M.hd95(obj, empty, spacing) == pytest.approx(diagonal)
    # nnU-Net's 2D images: a (1, H, W) array with a dummy 999 mm first axis, which no distance uses
    flat = np.zeros((1, 10, 20), bool)
    assert M.hd95(flat, flat | (np.arange(20) < 3), (999.0, 1.0, 1.0)) == pytest.approx(math.sqrt(10 ** 2 + 20 ** 2))


# ====================================================================== NSD
def test_nsd_identical_shifted_and_missing_component():
    ref = cube(20, (5, 5, 5), 10)
    assert M.nsd(ref, ref, (1, 1, 1)) == 1.0
    shifted = np.roll(ref, 1, axis=0)
    side = 10
    # shift by one voxel, tolerance below one voxel: only boundary voxels that both boundaries share count,
    # the lateral rings of the 9 overlapping layers (4 (L-1)^2 per mask) out of 2 L^2 + 4 (L-1)(L-2) per mask
    expected = 4 * (side - 1) ** 2 / (2 * side ** 2 + 4 * (side - 1) * (side - 2))
    assert M.nsd(shifted, ref, (1, 1, 1), tolerance_mm=0.5) == pytest.approx(expected, abs=1e-6)
    assert M.nsd(shifted, ref, (1, 1, 1), tolerance_mm=1.0) == 1.0
    # the same one-voxel shift is 2 mm when axis 0 has 2 mm voxels
    assert M.nsd(shifted, ref, (2.0, 1, 1), tolerance_mm=1.0) < 1.0
    assert M.nsd(shifted, ref, (2.0, 1, 1), tolerance_mm=2.0) == 1.0
    # two equal cubes far apart in the reference, one predicted: (E + E) / (E + 2E)
    two = cube(24, (2, 2, 2), 5) | cube(24, (15, 15, 15), 5)
    assert M.nsd(cube(24, (2, 2, 2), 5), two, (1, 1, 1)) == pytest.approx(2 / 3)


def test_nsd_empty_masks():
    empty, obj = np.zeros((12, 12, 12), bool), cube(12, (3, 3, 3), 4)
    assert M.nsd(empty, empty, (1, 1, 1)) == 1.0
    assert M.nsd(empty, obj, (1, 1, 1)) == 0.0
    assert M.nsd(obj, empty, (1, 1, 1)) == 0.0
    with pytest.raises(ValueError):
        M.nsd(obj, obj, (1, 1, 1), tolerance_mm=-1)


# ====================================================================== end to end
SPACING_ZYX = (2.0, 1.0, 1.0)  # numpy axis order; SimpleITK gets it reversed
SHAPE = (20, 28, 28)
FILE_ENDING = ".nii.gz"


def _write(seg: np.ndarray, path: str) -> None:
    img = sitk.GetImageFromArray(seg.astype(np.uint8))
    img.SetSpacing(SPACING_ZYX[::-1])
    sitk.WriteImage(img, path)


def _labelmap(*masks) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    for label, m in enumerate(masks, start=1):
        seg[m] = label
    return seg


def _box(lo, hi) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def _cases():
    """(reference, prediction) label maps: a shifted box with a core, a missed core (label 2 empty in the
    prediction), and a case without label 2 at all (Dice NaN there, nnU-Net's convention)."""
    outer, core = _box((4, 6, 6), (16, 22, 22)), _box((8, 11, 11), (12, 17, 17))
    ring = _box((6, 4, 4), (14, 24, 24)) & ~_box((6, 10, 10), (14, 18, 18))
    return {
        "case_000": (_labelmap(outer, core), _labelmap(np.roll(outer, 1, axis=2), core)),
        "case_001": (_labelmap(outer, core), _labelmap(outer | core)),
        "case_002": (_labelmap(ring), _labelmap(_box((6, 4, 4), (14, 24, 24)))),
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    gt, pred = root / "gt", root / "pred"
    gt.mkdir()
    pred.mkdir()
    for name, (ref, prd) in _cases().items():
        _write(ref, str(gt / f"{name}{FILE_ENDING}"))
        _write(prd, str(pred / f"{name}{FILE_ENDING}"))
    dj, pj = root / "dataset.json", root / "plans.json"
    dj.write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "outer": 1, "core": 2},
                              "numTraining": 3, "file_ending": FILE_ENDING}))
    pj.write_text(json.dumps(synthetic_plans((16, 16, 16), [[1, 1, 1], [2, 2, 2]])))
    return {"root": root, "gt": str(gt), "pred": str(pred), "dj": str(dj), "pj": str(pj)}


@pytest.fixture(scope="module")
def summary(folders):
    return evaluate_folders(folders["gt"], folders["pred"], folders["dj"], folders["pj"], num_processes=1)


def _same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def test_evaluate_folders_layout_and_values(folders, summary):
    path = os.path.join(folders["pred"], DEFAULT_OUTPUT_NAME)
    with open(path) as f:
        on_disk = json.load(f)
    assert set(on_disk) == {"metric_per_case", "mean", "foreground_mean", "settings"}
    assert on_disk["settings"]["nsd_tolerance_mm"] == M.DEFAULT_NSD_TOLERANCE_MM
    assert len(on_disk["metric_per_case"]) == 3
    for case in on_disk["metric_per_case"]:
        assert os.path.basename(case["reference_file"]) == os.path.basename(case["prediction_file"])
        assert set(case["metrics"]) == {"1", "2"}
        for entry in case["metrics"].values():
            assert set(entry) == set(NNUNET_KEYS) | set(EXTRA_METRICS)
    assert set(on_disk["mean"]) == {"1", "2"}
    for values in list(on_disk["mean"].values()) + [on_disk["foreground_mean"]]:
        for key in EXTRA_METRICS:
            assert math.isfinite(values[key])

    per_case = {os.path.basename(c["prediction_file"]): c["metrics"] for c in summary["metric_per_case"]}
    cases = _cases()
    for name, metrics in per_case.items():
        ref, prd = cases[name[: -len(FILE_ENDING)]]
        for label in (1, 2):
            r, p = ref == label, prd == label
            assert metrics[label]["HD95"] == pytest.approx(M.hd95(p, r, SPACING_ZYX))  # spacing read from the image
            assert metrics[label]["NSD"] == pytest.approx(M.nsd(p, r, SPACING_ZYX))
            assert {k: metrics[label][k] for k in EXTRA_METRICS[2:5]} == M.betti_errors(p, r)
            # slices across the image's coarsest axis (z: 2 mm), as the reader gives the spacing
            assert {k: metrics[label][k] for k in EXTRA_METRICS[5:]} == M.slice_betti_errors(p, r, SPACING_ZYX)
    # the shift is along x (1 mm): HD95 is 1 mm, where 2 mm voxels along z would not fit
    assert per_case["case_000.nii.gz"][1]["HD95"] == pytest.approx(1.0)
    # core missed: prediction empty for label 2 -> HD95 = image diagonal in mm, NSD 0, one component missing
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING_ZYX)))
    missed = per_case["case_001.nii.gz"][2]
    assert (missed["HD95"], missed["NSD"], missed["betti_b0_error"]) == (pytest.approx(diagonal), 0.0, 1)
    assert missed["betti_slice_b0_error"] == 1.0  # every slice of the core lacks its one component
    # label 2 in neither mask: Dice NaN (nnU-Net), HD95 0, NSD 1, no Betti error
    absent = per_case["case_002.nii.gz"][2]
    assert math.isnan(absent["Dice"])
    assert (absent["HD95"], absent["NSD"], absent["betti_b1_error"]) == (0.0, 1.0, 0)
    assert per_case["case_002.nii.gz"][1]["betti_b1_error"] == 1  # ring predicted as a solid box
    # means: nanmean for Dice (nnU-Net), plain mean for ours
    assert summary["mean"][2]["Dice"] == pytest.approx(np.nanmean([per_case[c][2]["Dice"] for c in per_case]))
    assert summary["mean"][2]["HD95"] == pytest.approx(np.mean([per_case[c][2]["HD95"] for c in per_case]))
    assert summary["foreground_mean"]["NSD"] == pytest.approx((summary["mean"][1]["NSD"] + summary["mean"][2]["NSD"]) / 2)


def test_dice_equals_nnunet_compute_metrics_on_folder(folders, summary):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    theirs = compute_metrics_on_folder(folders["gt"], folders["pred"], None, SimpleITKIO(), FILE_ENDING, [1, 2],
                                       num_processes=1)
    ours_by_file = {c["prediction_file"]: c["metrics"] for c in summary["metric_per_case"]}
    assert set(ours_by_file) == {c["prediction_file"] for c in theirs["metric_per_case"]}
    for case in theirs["metric_per_case"]:
        for label in (1, 2):
            for key in NNUNET_KEYS:
                assert _same(ours_by_file[case["prediction_file"]][label][key], case["metrics"][label][key]), key
    for label in (1, 2):
        for key in NNUNET_KEYS:
            assert _same(summary["mean"][label][key], theirs["mean"][label][key]), key
    for key in NNUNET_KEYS:
        assert _same(summary["foreground_mean"][key], theirs["foreground_mean"][key]), key


def test_regions_follow_nnunet_label_manager(folders, tmp_path):
    dj = tmp_path / "dataset_regions.json"
    dj.write_text(json.dumps({"channel_names": {"0": "MR"}, "file_ending": FILE_ENDING, "numTraining": 3,
                              "labels": {"background": 0, "whole": [1, 2], "core": 2},
                              "regions_class_order": [1, 2]}))
    out = evaluate_folders(folders["gt"], folders["pred"], str(dj), folders["pj"], str(tmp_path / "r.json"),
                           num_processes=1)
    assert set(out["mean"]) == {(1, 2), 2}
    ref, prd = _cases()["case_002"]
    case = next(c for c in out["metric_per_case"] if c["prediction_file"].endswith("case_002.nii.gz"))
    whole_ref, whole_pred = ref > 0, prd > 0
    assert case["metrics"][(1, 2)]["betti_b1_error"] == M.betti_errors(whole_pred, whole_ref)["betti_b1_error"] == 1
    assert case["metrics"][(1, 2)]["HD95"] == pytest.approx(M.hd95(whole_pred, whole_ref, SPACING_ZYX))
    with open(tmp_path / "r.json") as f:
        assert set(json.load(f)["mean"]) == {"(1, 2)", "2"}


def test_cli_handler_with_worker_pool(folders, capsys):
    parser = argparse.ArgumentParser(prog="nnunet-topomae")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = os.path.join(str(folders["root"]), "cli_summary.json")
    args = parser.parse_args(["evaluate", folders["gt"], folders["pred"], "-djfile", folders["dj"], "-pfile",
                              folders["pj"], "-o", out, "-np", "2", "--nsd-tolerance", "2.5"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "foreground" in printed and out in printed
    with open(out) as f:
        result = json.load(f)
    assert result["settings"]["nsd_tolerance_mm"] == 2.5
    assert [os.path.basename(c["prediction_file"]) for c in result["metric_per_case"]] == \
        ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    # the one-voxel (1 mm) shift of case_000 is within 2.5 mm everywhere
    assert result["metric_per_case"][0]["metrics"]["1"]["NSD"] == 1.0
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "-h"])
    assert f"PRED_FOLDER/{DEFAULT_OUTPUT_NAME}" in capsys.readouterr().out


def test_bad_input_is_one_clear_line(folders, tmp_path):
    args = (folders["dj"], folders["pj"])

    def message(*call_args, **kwargs):
        with pytest.raises(UserInputError) as e:
            evaluate_folders(*call_args, num_processes=1, **kwargs)
        assert "\n" not in str(e.value) and "->" in str(e.value)
        return str(e.value)

    assert "does not exist" in message(str(tmp_path / "nope"), folders["pred"], *args)
    assert "does not exist" in message(folders["gt"], folders["pred"], str(tmp_path / "nope.json"), folders["pj"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no *.nii.gz files" in message(folders["gt"], str(empty), *args)
    partial = tmp_path / "partial"
    partial.mkdir()
    os.symlink(os.path.join(folders["pred"], "case_001.nii.gz"), partial / "case_001.nii.gz")
    assert "--chill" in message(folders["gt"], str(partial), *args)
    assert "does not end with .json" in message(folders["gt"], folders["pred"], *args, output_file=str(tmp_path / "x.txt"))
    assert "--nsd-tolerance" in message(folders["gt"], folders["pred"], *args, nsd_tolerance_mm=-1)
    chill = evaluate_folders(folders["gt"], str(partial), *args, num_processes=1, chill=True)
    assert [os.path.basename(c["prediction_file"]) for c in chill["metric_per_case"]] == ["case_001.nii.gz"]


def test_ignore_label_is_left_out_of_every_metric(folders, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    box, ignored = _box((4, 6, 6), (16, 22, 22)), _box((4, 6, 16), (16, 22, 28))
    ref = _labelmap(box & ~ignored)
    ref[ignored] = 2  # the ignore label (max label + 1)
    _write(ref, str(gt / f"c{FILE_ENDING}"))
    _write(_labelmap(box), str(pred / f"c{FILE_ENDING}"))  # differs from the reference only where it is ignored
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "obj": 1, "ignore": 2},
                              "numTraining": 1, "file_ending": FILE_ENDING}))
    out = evaluate_folders(str(gt), str(pred), str(dj), folders["pj"], num_processes=1)
    ours = out["metric_per_case"][0]["metrics"][1]
    theirs = compute_metrics(str(gt / f"c{FILE_ENDING}"), str(pred / f"c{FILE_ENDING}"), SimpleITKIO(), [1], 2)
    assert all(_same(ours[k], theirs["metrics"][1][k]) for k in NNUNET_KEYS)
    assert (ours["Dice"], ours["HD95"], ours["NSD"], ours["betti_b0_error"]) == (1.0, 0.0, 1.0, 0)
