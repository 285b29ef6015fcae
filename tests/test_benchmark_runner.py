"""benchmarks/run.py: every arm trains into its own results folder (arms sharing a finetuning trainer
once found each other's finished runs and reported them as their own)."""
import ast
import json
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    """A script of benchmarks/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runner():
    return load_script("run")


@pytest.mark.parametrize("tier", ["quick", "cpu", "full"])
def test_every_arm_has_its_own_finetuning_class(runner, tier, tmp_path):
    names = runner.write_trainer_shims(str(tmp_path), runner.TIERS[tier])
    arms = {arm for arm, _, _ in runner.tier_runs(runner.TIERS[tier], extras=True)}
    fine = [names[("fine", arm)] for arm in arms]
    assert len(set(fine)) == len(fine), fine
    source = (tmp_path / "nnunet_topomae_bench_trainers.py").read_text()
    classes = [n.name for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    assert len(classes) == len(set(classes))
    assert set(fine) <= set(classes)
    # the budget is in the name, so that a run of another budget is never taken for a finished one
    steps = runner.TIERS[tier]["finetune_steps"]
    assert names[("fine", "scratch_nnunet")] == f"nnUNetTrainer_bench{steps}"
    if "topomae" in arms:
        assert names[("fine", "topomae")] == f"nnUNetTrainerTopoMAEFinetune_bench{steps}"
        assert names[("pre", "topomae")] == f"nnUNetTrainerTopoMAEPretrain_bench{runner.TIERS[tier]['pretrain_steps']}"


def test_a_longer_or_shorter_pretraining_gets_its_own_class_and_budget(runner, tmp_path):
    tier = runner.TIERS["cpu"]
    names = runner.write_trainer_shims(str(tmp_path), tier)
    steps = 3 * tier["pretrain_steps"]
    assert names[("pre", "topomae_longpre")] == f"nnUNetTrainerTopoMAEPretrain_bench{steps}"
    # arms of the same pretraining and length share its checkpoint
    assert names[("pre", "topomae_lowcnnlr")] == names[("pre", "topomae")] != names[("pre", "topomae_longpre")]
    tree = ast.parse((tmp_path / "nnunet_topomae_bench_trainers.py").read_text())
    long_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == names[("pre", "topomae_longpre")])
    epochs = next(a.value.value for a in long_cls.body if isinstance(a, ast.Assign) and a.targets[0].id == "pretrain_epochs")
    assert epochs * tier["iters"] == steps
    # and a shorter one too: a whole number of epochs, in the class name and the budget
    short = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == names[("pre", "topomae_shortpre")])
    assert names[("pre", "topomae_shortpre")] == f"nnUNetTrainerTopoMAEPretrain_bench{tier['pretrain_steps'] // 2}"
    short_epochs = next(a.value.value for a in short.body if isinstance(a, ast.Assign) and a.targets[0].id == "pretrain_epochs")
    assert short_epochs * tier["iters"] == runner.pretrain_steps("topomae_shortpre", tier) == tier["pretrain_steps"] // 2
    run = dict(arm="topomae_longpre", steps=tier["finetune_steps"], pretrain_steps=steps)
    assert runner.same_budget(run, tier)
    assert not runner.same_budget(dict(run, pretrain_steps=tier["pretrain_steps"]), tier)


def test_results_of_another_budget_are_neither_resumed_nor_reported(runner):
    tier = runner.TIERS["cpu"]
    same = dict(arm="topomae", steps=tier["finetune_steps"], pretrain_steps=tier["pretrain_steps"])
    assert runner.same_budget(same, tier)
    assert not runner.same_budget(dict(same, steps=tier["finetune_steps"] - 1), tier)
    assert not runner.same_budget(dict(same, pretrain_steps=tier["pretrain_steps"] + 1), tier)
    assert runner.same_budget(dict(arm="scratch_nnunet", steps=tier["finetune_steps"], pretrain_steps=0), tier)


def test_tiers_run_the_issues_protocol_and_the_extras_on_request(runner):
    six = {"scratch_nnunet", "scratch_hybrid", "mae", "topomae", "topomae_notopo", "hybridmim"}
    for name in ("cpu", "full"):
        tier = runner.TIERS[name]
        protocol = {(a, str(n)): s for a, n, s in runner.tier_runs(tier)}
        assert {a for a, _ in protocol} == six
        assert all(protocol[(a, "5")] >= (3 if a in ("scratch_nnunet", "topomae") else 1) for a in six)
        assert {k for k in protocol if k[1] != "5"} == {(a, n) for a in ("scratch_nnunet", "topomae") for n in ("20", "all")}
        both = {(a, str(n)): s for a, n, s in runner.tier_runs(tier, extras=True)}
        # every arm runs somewhere: on Hippocampus's cpu tier, or only on ACDC's where it differs there alone
        acdc_only = {a for a, _, _ in runner.ACDC_TIERS["cpu"]["extra_runs"]} - {a for a, _, _ in tier["extra_runs"]}
        assert acdc_only <= {"topomae_token8"}
        assert {a for a, _ in both} | acdc_only == set(runner.ARMS) - (set(runner.PRETRAIN_SCALE) if name == "full" else set())
        assert all(both[k] >= s for k, s in protocol.items())  # extras add seeds, never remove any
        assert len(both) == len(set(both))
    assert {(a, str(n)): s for a, n, s in runner.tier_runs(runner.TIERS["cpu"], extras=True)}[("topomae_notopo", "5")] == 3


def test_run_order_measures_every_arm_once_before_repeating_seeds(runner):
    runs = runner.tier_runs(runner.TIERS["cpu"], extras=True)
    order = runner.run_order(runs)
    expected = sum(s for _, _, s in runs)
    assert len(order) == len(set(order)) == expected
    first_repeat = next(i for i, r in enumerate(order) if r[2] > 0)
    assert {a for a, _, _ in order[:first_repeat]} == set(runner.ARMS) - {"topomae_token8"}
    assert all(r[2] == 0 for r in order[:first_repeat])


def test_inspect_transfer_measures_relative_change_per_part():
    mod = load_script("inspect_transfer")
    import torch
    pre = {"vit_encoder.blocks.0.w": torch.ones(4, 4), "cnn.encoder.stages.0.w": torch.ones(2, 3),
           "cnn.decoder.stages.0.w": torch.ones(5), "cnn.decoder.seg_layers.0.weight": torch.ones(3)}
    fine = {"vit_encoder.blocks.0.w": torch.ones(4, 4), "cnn.encoder.stages.0.w": 1.5 * torch.ones(2, 3),
            "cnn.decoder.stages.0.w": -torch.ones(5), "cnn.decoder.seg_layers.0.weight": 9 * torch.ones(3)}
    r = mod.moved(pre, fine)
    assert r == pytest.approx({"ViT encoder": 0.0, "CNN encoder": 0.5, "CNN decoder": 2.0})
    assert mod.part_of("cnn.decoder.seg_layers.0.weight") is None  # fresh heads are not a transferred part


def test_topo_distance_rejects_a_checkpoint_argument_it_cannot_use(tmp_path, capsys):
    mod = load_script("topo_distance")
    for bad in ("noTopo", f"noTopo={tmp_path / 'missing.pth'}"):
        with pytest.raises(SystemExit) as e:
            mod.main(["-d", "901", bad])
        assert e.value.code == 2
        assert "expected NAME=CHECKPOINT with an existing checkpoint file" in capsys.readouterr().err


def test_report_table_has_mean_and_spread_per_arm_and_subset(runner, tmp_path):
    results = [dict(arm="topomae", labelled_cases=5, mean_dice=d) for d in (0.80, 0.84)] + \
              [dict(arm="scratch_nnunet", labelled_cases=5, mean_dice=0.78),
               dict(arm="scratch_nnunet", labelled_cases=20, mean_dice=0.85)]
    runner.write_report(results, str(tmp_path), quiet=True)
    rows = [r for r in (tmp_path / "results.md").read_text().splitlines() if r.startswith("| topomae")]
    assert rows == ["| topomae | 5 | 2 | 0.8200 | 0.0400 | 0.8000, 0.8400 |"]
    assert "| scratch_nnunet | 20 | 1 | 0.8500 | - | 0.8500 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_paired_difference_pairs_cases_and_reports_interval(runner, tmp_path):
    case = lambda name, d1, d2: {"reference_file": f"/x/{name}.nii.gz",
                                 "metrics": {"1": {"Dice": d1}, "2": {"Dice": d2}}}
    summary = {"metric_per_case": [case("a", 0.8, 0.6), case("b", 0.9, float("nan")), case("c", 0.5, 0.7)]}
    assert runner.per_case_mean(summary) == pytest.approx({"a.nii.gz": 0.7, "b.nii.gz": 0.9, "c.nii.gz": 0.6})
    scratch = {"a": 0.70, "b": 0.80, "c": 0.60, "d": 0.50}
    better = {"a": 0.72, "b": 0.83, "c": 0.61}  # "d" missing: only shared cases are paired
    p = runner.paired_difference(scratch, better)
    assert p["cases"] == 3 and p["better"] == 3
    assert p["mean"] == pytest.approx(0.02) and 0.01 <= p["lo"] <= p["mean"] <= p["hi"] <= 0.03
    results = [dict(arm="scratch_nnunet", labelled_cases=5, seed=0, mean_dice=0.7, per_case=scratch),
               dict(arm="topomae", labelled_cases=5, seed=0, mean_dice=0.72, per_case=better),
               dict(arm="topomae", labelled_cases=5, seed=1, mean_dice=0.9, per_case=better)]  # no anchor for seed 1
    runner.write_report(results, str(tmp_path), quiet=True)
    rows = [r for r in (tmp_path / "results.md").read_text().splitlines() if r.startswith("| topomae | 5 | 0 |")]
    assert len(rows) == 1
    assert rows[0].split(" | ")[3] == "+2.00" and rows[0].endswith("| 3 of 3 |")
    assert not any(r.startswith("| topomae | 5 | 1 |") for r in (tmp_path / "results.md").read_text().splitlines())
    # a last table pairs every other arm with the product, TopoMAE (what an ablation changes)
    text = (tmp_path / "results.md").read_text()
    against_topomae = text[text.index("Paired with topomae"):].splitlines()
    assert [r for r in against_topomae if r.startswith("| scratch_nnunet | 5 | 0 |")][0].split(" | ")[3] == "-2.00"


# --- ACDC: labelled subsets by patient, the CPU plans' target spacing ------------------------------------------

def _acdc_like_cases(n_patients=30):
    # two frames per patient with ACDC's names; frame numbers differ between patients
    return [f"patient{p:03d}_frame{f:02d}" for p in range(1, n_patients + 1) for f in (1, 7 + p % 9)]


def test_acdc_subsets_are_drawn_by_patient_nested_and_deterministic(runner):
    cases = _acdc_like_cases()
    subsets, patients = runner.grouped_subsets(cases, runner.GROUP_REGEX)
    assert [len(patients[k]) for k in ("5", "20", "all")] == [5, 20, 30]
    assert [len(subsets[k]) for k in ("5", "20", "all")] == [10, 40, 60]  # both frames of every patient
    for k in ("5", "20"):
        assert {runner.group_of(c, runner.GROUP_REGEX) for c in subsets[k]} == set(patients[k])
        assert all(f"{p}_frame01" in subsets[k] for p in patients[k])
    assert set(subsets["5"]) < set(subsets["20"]) < set(subsets["all"]) == set(cases)  # nested
    assert set(patients["5"]) < set(patients["20"])
    again = runner.grouped_subsets(list(reversed(cases)), runner.GROUP_REGEX)  # seeded, order-independent
    assert again == (subsets, patients)
    assert runner.grouped_subsets(cases, runner.GROUP_REGEX, seed=1)[1]["5"] != patients["5"]
    # a case the pattern does not match is its own patient
    assert runner.group_of("hippocampus_023", runner.GROUP_REGEX) == "hippocampus_023"


def test_grouped_splits_file_becomes_splits_final_with_patient_subset_folds(runner, tmp_path):
    import json
    cases = _acdc_like_cases(25)
    pats = sorted({c.split("_")[0] for c in cases})
    folds = [pats[i::5] for i in range(5)]
    grouped = [{"train": sorted(c for c in cases if c.split("_")[0] not in f),
                "val": sorted(c for c in cases if c.split("_")[0] in f)} for f in folds]
    src = tmp_path / "splits_final_patientgrouped.json"
    src.write_text(json.dumps(grouped))
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:40], "val": cases[40:]}] * 5))  # nnU-Net's
    info = runner.write_splits(str(pre), 3, source=str(src))
    splits = json.loads((pre / "splits_final.json").read_text())
    assert splits[:5] == grouped  # the grouped folds replace nnU-Net's split
    assert len(splits) == 5 + 3 * 3
    for (label, seed), fold in info["fold_of"].items():
        assert splits[fold]["val"] == grouped[0]["val"]
        assert splits[fold]["train"] == info["subsets"][label]
    assert [len(info["patients"][k]) for k in ("5", "20", "all")] == [5, 20, 20]
    assert info["n_train_patients"] == 20 and info["n_train"] == 40
    # the same fold numbers as Hippocampus's layout (5 + 3 per seed), and the same subsets on every call
    assert info["fold_of"][("5", 0)] == 5 and info["fold_of"][("all", 2)] == 13
    assert runner.write_splits(str(pre), 3, source=str(src))["subsets"] == info["subsets"]


def test_hippocampus_splits_and_subsets_are_unchanged(runner, tmp_path):
    import json
    import numpy as np
    cases = [f"hippocampus_{i:03d}" for i in range(50)]
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": cases[:40], "val": cases[40:]}] * 5))
    info = runner.write_splits(str(tmp_path), 2)
    order = list(np.random.default_rng(0).permutation(sorted(cases[:40])))
    assert info["subsets"]["5"] == sorted(order[:5]) and info["subsets"]["20"] == sorted(order[:20])
    assert "patients" not in info and info["fold_of"][("5", 0)] == 5


def _fake_plans(spacing, median, patch):
    return {"configurations": {"3d_fullres": {"spacing": spacing, "median_image_size_in_voxels": median,
                                              "patch_size": patch}}}


def test_cpu_plans_coarsen_a_large_patch_to_the_budget_fine_axes_first():
    import numpy as np
    from nnunet_topomae.workflow import CPU_PATCH_VOXELS, cpu_target_spacing, nnunet_patch_size
    # thick-slice cardiac MRI as nnU-Net plans it: 10 x 1.56 x 1.56 mm, patch 10x256x224 (6.4x the budget)
    cfg = _fake_plans([10.0, 1.5625, 1.5625], [9.0, 256.0, 216.0], [10, 256, 224])["configurations"]["3d_fullres"]
    spacing, patch, changed = cpu_target_spacing(cfg["spacing"], cfg["median_image_size_in_voxels"], cfg["patch_size"])
    assert changed
    assert 0.6 * CPU_PATCH_VOXELS <= np.prod(patch) <= CPU_PATCH_VOXELS
    assert spacing[0] == 10.0 and spacing[1] == spacing[2] > 1.5625  # the fine (in-plane) axes only
    median_there = np.array(cfg["median_image_size_in_voxels"]) * np.array(cfg["spacing"]) / np.array(spacing)
    assert patch == nnunet_patch_size(spacing, median_there) == [10, 96, 80]  # what nnU-Net's planner gave ACDC
    # an isotropic CT-like dataset: every axis coarsened alike
    spacing, patch, changed = cpu_target_spacing([1.0, 1.0, 1.0], [200.0, 300.0, 300.0], [128, 128, 128])
    assert changed and spacing[0] == spacing[1] == spacing[2] > 1.0
    assert 0.5 * CPU_PATCH_VOXELS <= np.prod(patch) <= CPU_PATCH_VOXELS


def test_cpu_plans_leave_a_hippocampus_sized_patch_alone():
    from nnunet_topomae.workflow import cpu_target_spacing
    spacing, patch, changed = cpu_target_spacing([1.0, 1.0, 1.0], [36.0, 50.0, 35.0], [40, 56, 40])
    assert (spacing, patch, changed) == ([1.0, 1.0, 1.0], [40, 56, 40], False)


def test_acdc_protocol_runs_calibration_first_and_the_issues_seeds(runner):
    tier = runner.BENCHMARKS["acdc"]["tiers"]["cpu"]
    assert runner.BENCHMARKS["acdc"]["dataset_id"] != runner.BENCHMARKS["hippocampus"]["dataset_id"] == 950
    assert runner.BENCHMARKS["hippocampus"]["tiers"] is runner.TIERS
    runs = {(a, str(n)): s for a, n, s in runner.tier_runs(tier)}
    assert {a for a, _ in runs} == {"scratch_nnunet", "scratch_hybrid", "mae", "topomae", "topomae_notopo", "hybridmim"}
    assert all(runs[(a, "5")] == 3 for a in ("scratch_nnunet", "scratch_hybrid", "topomae"))
    assert all(runs[(a, "5")] == 1 for a in ("mae", "topomae_notopo", "hybridmim"))
    assert all(runs[(a, n)] == 1 for a in ("scratch_nnunet", "scratch_hybrid", "topomae") for n in ("20", "all"))
    order = runner.run_order(runner.tier_runs(tier))
    assert order[0] == ("scratch_nnunet", "all", 0)
    assert [a for a, n, s in order[1:7]] == ["scratch_nnunet", "topomae", "scratch_hybrid", "topomae_notopo", "mae",
                                             "hybridmim"]
    assert all(n == 5 for _, n, _ in order[1:7])


def test_topo_metrics_become_record_fields(runner):
    m = lambda h, n, b0, b1, b2: {"Dice": 0.9, "HD95": h, "NSD": n, "betti_b0_error": b0, "betti_b1_error": b1,
                                  "betti_b2_error": b2}
    summary = {"mean": {"1": m(4.0, 0.9, 0.5, 0.0, 0.0), "2": m(6.0, 0.8, 0.25, 1.0, 0.0)},
               "foreground_mean": m(5.0, 0.85, 0.375, 0.5, 0.0)}
    r = runner.topo_metric_fields(summary)
    assert r["mean_hd95"] == 5.0 and r["mean_nsd"] == 0.85 and r["mean_betti_error"] == 0.875
    assert r["betti_error"] == {"1": 0.5, "2": 1.25} and r["hd95"]["2"] == 6.0
    assert r["betti_errors"]["2"] == {"b0": 0.25, "b1": 1.0, "b2": 0.0}
    assert "mean_betti_slice_error" not in r  # a summary written before the slice-wise errors
    assert "per_case_hd95" not in r  # a summary without metric_per_case
    case = lambda f, h1, h2: {"reference_file": f"/gt/{f}", "metrics": {"1": m(h1, 0.9, 0, 0, 0), "2": m(h2, 0.9, 0, 0, 0)}}
    r = runner.topo_metric_fields(dict(summary, metric_per_case=[case("a.nii.gz", 2.0, 4.0), case("b.nii.gz", 1.0, 1.0)]))
    assert r["per_case_hd95"] == {"a.nii.gz": 3.0, "b.nii.gz": 1.0}
    sl = lambda e, b0, b1: dict(e, betti_slice_b0_error=b0, betti_slice_b1_error=b1)
    summary = {"mean": {"1": sl(summary["mean"]["1"], 0.0, 0.0), "2": sl(summary["mean"]["2"], 0.1, 0.2)},
               "foreground_mean": sl(summary["foreground_mean"], 0.05, 0.1)}
    r = runner.topo_metric_fields(summary)
    assert r["mean_betti_slice_error"] == pytest.approx(0.15) and r["betti_slice_error"] == {"1": 0.0, "2": pytest.approx(0.3)}


def test_cached_summaries_without_slice_betti_are_evaluated_again(runner, monkeypatch, tmp_path):
    m = {"Dice": 0.9, "HD95": 1.0, "NSD": 0.9, "betti_b0_error": 0.0, "betti_b1_error": 1.0, "betti_b2_error": 0.0}
    (tmp_path / runner.TOPO_SUMMARY).write_text(json.dumps({"mean": {"1": m}, "foreground_mean": m}))
    calls = []
    new = dict(m, betti_slice_b0_error=0.0, betti_slice_b1_error=0.5)
    import nnunet_topomae.evaluation.evaluate as ev
    monkeypatch.setattr(ev, "evaluate_folders", lambda *a, **k: calls.append(k["output_file"]) or
                        {"mean": {1: new}, "foreground_mean": new})
    r = runner.evaluate_topo(str(tmp_path), str(tmp_path), "nnUNetPlans")
    assert calls == [str(tmp_path / runner.TOPO_SUMMARY)] and r["mean_betti_slice_error"] == 0.5
    (tmp_path / runner.TOPO_SUMMARY).write_text(json.dumps({"mean": {"1": new}, "foreground_mean": new}))
    assert runner.evaluate_topo(str(tmp_path), str(tmp_path), "nnUNetPlans")["mean_betti_slice_error"] == 0.5
    assert len(calls) == 1  # a summary that has them is read, not recomputed


def test_backfill_adds_per_case_hd95_from_a_kept_summary(runner, monkeypatch, tmp_path):
    """A record evaluated before per_case_hd95 existed gains it from its summary_topology.json, read, not recomputed;
    a record whose run folder is gone is left as it is."""
    m = lambda h: {"Dice": 0.9, "HD95": h, "NSD": 0.9, "betti_b0_error": 0.0, "betti_b1_error": 1.0,
                   "betti_b2_error": 0.0, "betti_slice_b0_error": 0.0, "betti_slice_b1_error": 0.5}
    val = tmp_path / "res" / "Tr__P__3d_fullres" / "fold_5" / "validation"
    val.mkdir(parents=True)
    (val / "summary.json").write_text("{}")
    (val / runner.TOPO_SUMMARY).write_text(json.dumps({"mean": {"1": m(3.0)}, "foreground_mean": m(3.0), "metric_per_case": [
        {"reference_file": "/gt/a.nii.gz", "metrics": {"1": m(2.0)}}, {"reference_file": "/gt/b.nii.gz", "metrics": {"1": m(4.0)}}]}))
    import nnunet_topomae.evaluation.evaluate as ev
    monkeypatch.setattr(ev, "evaluate_folders", lambda *a, **k: pytest.fail("must read the kept summary"))
    kept = dict(arm="topomae", fold=5, mean_hd95=3.0, mean_betti_slice_error=0.5)
    gone = dict(arm="topomae", fold=8, mean_hd95=3.0, mean_betti_slice_error=0.5)
    assert runner.backfill_topo([kept, gone], str(tmp_path / "res"), {("fine", "topomae"): "Tr"}, "P", str(tmp_path)) == 1
    assert kept["per_case_hd95"] == {"a.nii.gz": 2.0, "b.nii.gz": 4.0} and "per_case_hd95" not in gone


def test_a_fresh_evaluation_reports_beside_records_read_back(runner, tmp_path):
    """evaluate_folders' summary in memory has int labels, one read back from results.json str ones; a new record
    next to old ones once stopped the report with a TypeError (sorting 1 against '1')."""
    m = lambda h: {"Dice": 0.9, "HD95": h, "NSD": 0.9, "betti_b0_error": 0.0, "betti_b1_error": 1.0, "betti_b2_error": 0.0}
    fresh = runner.topo_metric_fields({"mean": {1: m(4.0), 2: m(6.0)}, "foreground_mean": m(5.0)})
    assert set(fresh["hd95"]) == {"1", "2"}
    old = json.loads(json.dumps(dict(arm="topomae", labelled_cases=5, mean_dice=0.83, seed=0, **fresh)))
    new = dict(arm="topomae_faithfultopo", labelled_cases=5, mean_dice=0.84, seed=0, **fresh)
    runner.write_report([old, new], str(tmp_path), quiet=True)
    assert "| topomae_faithfultopo | 5 | 1 | 4.00 | 6.00 | 1.00 | 1.00 |" in (tmp_path / "results.md").read_text()


def test_report_names_patients_and_adds_topo_columns_when_present(runner, tmp_path):
    results = [dict(arm="topomae", labelled_cases=10, labelled_patients=5, mean_dice=0.8, seed=0,
                    mean_hd95=3.0, mean_nsd=0.9, mean_betti_error=0.5),
               dict(arm="topomae", labelled_cases=10, labelled_patients=5, mean_dice=0.82, seed=1)]
    runner.write_report(results, str(tmp_path), quiet=True)
    text = (tmp_path / "results.md").read_text()
    assert "| arm | labelled patients (cases) |" in text and "mean HD95 mm | mean NSD | mean Betti error |" in text
    assert "| topomae | 5 (10) | 2 | 0.8100 | 0.0200 | 0.8000, 0.8200 | 3.00 (1 runs) | 0.900 (1 runs) | 0.500 (1 runs) |" in text


def test_report_has_hd95_and_betti_error_per_class(runner, tmp_path):
    rec = lambda arm, seed, h1, b3: dict(arm=arm, labelled_cases=10, labelled_patients=5, mean_dice=0.8, seed=seed,
                                         mean_hd95=h1, mean_nsd=0.9, mean_betti_error=b3,
                                         hd95={"1": h1, "2": 2.0, "3": 1.0}, betti_error={"1": 0.0, "2": 6.0, "3": b3})
    runner.write_report([rec("topomae", 0, 4.0, 1.0), rec("topomae", 1, 6.0, 2.0), rec("scratch_nnunet", 0, 8.0, 0.5)],
                        str(tmp_path), quiet=True)
    text = (tmp_path / "results.md").read_text()
    assert "| arm | labelled | runs | HD95 1 | HD95 2 | HD95 3 | Betti 1 | Betti 2 | Betti 3 |" in text
    assert "| topomae | 5 (10) | 2 | 5.00 | 2.00 | 1.00 | 0.00 | 6.00 | 1.50 |" in text
    assert "| scratch_nnunet | 5 (10) | 1 | 8.00 | 2.00 | 1.00 | 0.00 | 6.00 | 0.50 |" in text
    # slice-wise Betti errors: their own columns once a run has them, "-" for runs without
    slice_rec = dict(rec("topomae", 2, 4.0, 1.0), betti_slice_error={"1": 0.5, "2": 0.25, "3": 0.0},
                     mean_betti_slice_error=0.25)
    runner.write_report([rec("scratch_nnunet", 0, 8.0, 0.5), slice_rec], str(tmp_path), quiet=True)
    text = (tmp_path / "results.md").read_text()
    assert "| Betti 3 | slice Betti 1 | slice Betti 2 | slice Betti 3 |" in text
    assert "| topomae | 5 (10) | 1 | 4.00 | 2.00 | 1.00 | 0.00 | 6.00 | 1.00 | 0.500 | 0.250 | 0.000 |" in text
    assert "| scratch_nnunet | 5 (10) | 1 | 8.00 | 2.00 | 1.00 | 0.00 | 6.00 | 0.50 | - | - | - |" in text
    assert "mean Betti error | mean slice Betti error |" in text and "| 0.250 |" in text


# ------------------------------------------------------------ benchmarks/unlabelled_protocol.py (issue 25)
def test_unlabelled_protocol_images_are_the_other_training_cases_nested_and_fixed():
    proto = load_script("unlabelled_protocol")
    train = [f"case_{i:03d}" for i in range(30)]
    labelled = ["case_004", "case_011"]
    order = proto.unlabelled_order(train, labelled)
    assert sorted(order) == sorted(set(train) - set(labelled))  # every other training case, none labelled
    assert order == proto.unlabelled_order(list(reversed(train)), labelled)  # fixed whatever the input order
    assert order != sorted(order)  # a permutation, so the first N are not the lowest ids
    # one dataset id per count, the counts' datasets nested (the first 40 of the same order)
    assert [proto.dataset_id(n) for n in proto.COUNTS] == [960, 961, 962]


def test_unlabelled_protocol_repeats_one_pretraining_and_has_a_fold_for_every_run():
    """Issue 25's gap to label hiding: seeds 0-2 with 155 images finetune one pretraining, seed 3 another one
    (the pretraining trainer's fold 1); every fold number used exists in the dataset's split."""
    proto = load_script("unlabelled_protocol")
    at155 = {(s, p) for a, n, seeds, p in proto.RUNS if a == "topomae" and n == 155 for s in seeds}
    assert at155 == {(0, 0), (1, 0), (2, 0), (3, 1)}
    assert proto.split_folds(155) == 4 and proto.split_folds(0) == 1 and proto.split_folds(40) == 1


def test_unlabelled_protocol_report_pairs_each_run_with_nnunet(tmp_path):
    proto = load_script("unlabelled_protocol")
    cases = {f"c{i}.nii.gz": 0.80 + 0.01 * (i % 3) for i in range(8)}
    rec = lambda arm, n, seed, shift: dict(arm=arm, unlabelled=n, seed=seed, mean_dice=0.8 + shift,
                                           per_case={k: v + shift for k, v in cases.items()})
    results = [rec("scratch_nnunet", 0, 0, 0.0), rec("topomae", 155, 0, 0.02), rec("topomae", 0, 0, -0.01)]
    reference = [dict(rec("topomae", None, 0, 0.03), subset="5")]
    text = proto.write_report(results, reference, str(tmp_path))
    assert "| topomae | 155 | 5 + 155 | 1 | 0.8200 |" in text
    assert "| topomae, label hiding (run.py) |" in text
    assert "| topomae | 155 | 0 | 0 | +2.00 |" in text and "| topomae | 0 | 0 | 0 | -1.00 |" in text
    assert open(tmp_path / "unlabelled_protocol.md").read() == text
    assert not (tmp_path / "results.md").exists()  # run.py's file names stay run.py's
    # only label-hiding anchors: paired with the first that has per-case Dice (older records have none)
    old = [dict(arm="scratch_nnunet", unlabelled=None, seed=0, mean_dice=0.8, subset="5")]
    text = proto.write_report([rec("topomae", 155, 0, 0.02)], old + [dict(rec("scratch_nnunet", None, 1, 0.0),
                                                                        source="label-hiding benchmark")], str(tmp_path))
    assert "(label-hiding benchmark, seed 1)" in text and "| topomae | 155 | 0 | 0 | +2.00 |" in text


def test_pretrain_once_and_finetune_once_resume_the_nnunet_way(runner, tmp_path, monkeypatch):
    """One piece of run.py drives both benchmark scripts: pretraining only without a final checkpoint (--c after a
    stop), finetuning from the weights, --c after a stop, only --val after a finished training, nothing when done."""
    calls = []
    monkeypatch.setattr(runner, "run", lambda cmd, env, log, echo=None: calls.append(cmd))
    train = lambda tr, fold: [tr, str(fold)]
    pre = tmp_path / "pre"
    extra, _ = runner.pretrain_once(train, "P", str(pre), {}, "log", "pretraining")
    assert calls.pop() == ["P", "0"] and extra == ["-pretrained_weights", str(pre / "fold_0" / "checkpoint_final.pth")]
    (pre / "fold_0").mkdir(parents=True)
    (pre / "fold_0" / "checkpoint_latest.pth").write_bytes(b"")
    runner.pretrain_once(train, "P", str(pre), {}, "log", "pretraining")
    assert calls.pop() == ["P", "0", "--c"]
    (pre / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    assert runner.pretrain_once(train, "P", str(pre), {}, "log", "pretraining")[1] == 0.0 and not calls
    # a second, independent pretraining is another fold of the same trainer, with its own checkpoint
    extra1, _ = runner.pretrain_once(train, "P", str(pre), {}, "log", "pretraining", fold=1)
    assert calls.pop() == ["P", "1"] and extra1 == ["-pretrained_weights", str(pre / "fold_1" / "checkpoint_final.pth")]

    fold = tmp_path / "fine" / "fold_5"
    summary = runner.finetune_once(train, "F", 5, str(fold), extra, {}, "log")
    assert calls.pop() == ["F", "5"] + extra and summary == str(fold / "validation" / "summary.json")
    fold.mkdir(parents=True)
    (fold / "checkpoint_latest.pth").write_bytes(b"")
    runner.finetune_once(train, "F", 5, str(fold), extra, {}, "log")
    assert calls.pop() == ["F", "5", "--c"]
    (fold / "checkpoint_final.pth").write_bytes(b"")
    runner.finetune_once(train, "F", 5, str(fold), extra, {}, "log")
    assert calls.pop() == ["F", "5", "--val"]
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text("{}")
    runner.finetune_once(train, "F", 5, str(fold), extra, {}, "log")
    assert not calls


def test_unlabelled_protocol_compares_the_preprocessed_cases_with_label_hiding(tmp_path):
    """The check behind "the two protocols read the same data": equal arrays and properties count as identical,
    one changed voxel is found and measured, class_locations (labelled cases only) is not compared."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    proto = load_script("unlabelled_protocol")
    src, unl = tmp_path / "src", tmp_path / "unl"
    src.mkdir(), unl.mkdir()
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        img = rng.normal(size=(1, 6, 7, 8)).astype(np.float32)
        props = dict(spacing=[1.0, 1.0, 1.0], shape_before_cropping=(6, 7, 8))
        seg = np.zeros((1, 6, 7, 8), np.int8)
        nnUNetDatasetBlosc2.save_case(img, seg, dict(props, class_locations={1: []}), str(src / case))
        if case == "b":
            img = img.copy()
            img[0, 1, 2, 3] += 0.25
        nnUNetDatasetBlosc2.save_case(img, seg, props, str(unl / case))
    r = proto.same_as_label_hiding(str(src), str(unl))
    assert r["cases"] == 2 and r["identical_images"] == 1 and r["identical_properties"] == 2
    assert r["max_abs_diff"] == pytest.approx(0.25)


def test_topo_distance_exact_scores_with_the_exact_loss():
    """--exact (issue 24): the scoring trainer's loss and its loader's input persistence lose pooling and pair
    budget, and the loss then equals the exact reference on a volume the default would pool and cut."""
    import torch
    from nnunet_topomae.losses.topological import topological_loss_single
    from nnunet_topomae.trainers.topomae_pretrain import nnUNetTrainerTopoMAEPretrain
    mod = load_script("topo_distance")
    trainer = object.__new__(nnUNetTrainerTopoMAEPretrain)
    trainer.topo_workers = 0
    mod.score_with_exact_loss(trainer)
    loss = nnUNetTrainerTopoMAEPretrain._build_loss(trainer).topo_loss
    assert (loss.max_size, loss.max_voxels, loss.max_pairs, loss.pair_mass) == (None, None, None, None)
    pfn = loss.input_persistence()
    assert (pfn.max_size, pfn.max_voxels, pfn.max_pairs, pfn.pair_mass) == (None, None, None, None)
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter
    image = gaussian_filter(rng.random((40, 8, 8)), 1.5).astype(np.float32)  # > 32 voxels on one axis: pooled by default
    recon = (image + 0.02 * rng.standard_normal(image.shape)).astype(np.float32)
    value = loss.per_volume(torch.from_numpy(recon)[None, None], torch.from_numpy(image)[None, None])[0, 0].item()
    exact = topological_loss_single(torch.from_numpy(recon).double(), image.astype(np.float64)).item()
    assert value == pytest.approx(exact, rel=1e-4)
    default = object.__new__(nnUNetTrainerTopoMAEPretrain)
    default.topo_workers = 0
    pooled = nnUNetTrainerTopoMAEPretrain._build_loss(default).topo_loss
    assert pooled.per_volume(torch.from_numpy(recon)[None, None],
                             torch.from_numpy(image)[None, None])[0, 0].item() != pytest.approx(exact, rel=0.05)
    # --backend only changes the solver: it reaches the loss, the exact settings stay
    other = object.__new__(nnUNetTrainerTopoMAEPretrain)
    mod.score_with_exact_loss(other, "cripser")
    assert other.topo_backend == "cripser" and other.topo_max_pairs is None and other.topo_max_size is None


def test_compare_arms_pairs_by_seed_and_pools_over_seeds(tmp_path, capsys):
    """compare_arms (issue 24's decision): per-seed paired differences on the same cases, the pooled mean is the
    mean of the seeds', a later record of a seed replaces an earlier one, and no common seed is a clear error."""
    mod = load_script("compare_arms")
    cases = [f"c{i}.nii.gz" for i in range(8)]

    def rec(arm, seed, values):
        return dict(arm=arm, labelled_cases=5, seed=seed, mean_dice=float(np.mean(values)),
                    per_case=dict(zip(cases, values)))
    base = [0.80, 0.82, 0.78, 0.85, 0.81, 0.79, 0.83, 0.84]
    old = [rec("a", 0, base), rec("b", 0, [v - 0.05 for v in base])]          # replaced below
    new = [rec("b", 0, [v + 0.01 for v in base]), rec("a", 1, base), rec("b", 1, [v + 0.03 for v in base]),
           rec("b", 2, base), rec("c", 0, base)]
    f1, f2 = tmp_path / "old.json", tmp_path / "new.json"
    f1.write_text(json.dumps(old))
    f2.write_text(json.dumps(new))
    assert mod.main([str(f1), str(f2), "--arm", "b", "--against", "a", "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert [p["seed"] for p in c["per_seed"]] == [0, 1]           # seed 2 has no 'a' run
    assert [round(p["mean"], 6) for p in c["per_seed"]] == [0.01, 0.03]
    assert c["pooled"]["mean"] == pytest.approx(0.02) and c["pooled"]["cases"] == 8
    assert c["pooled"]["lo"] == pytest.approx(0.02) and c["pooled"]["hi"] == pytest.approx(0.02)  # constant shifts
    assert "| all 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no seed has per-case Dice"):
        mod.main([str(f1), "--arm", "b", "--against", "c"])


def test_compare_arms_pairs_hd95_where_lower_is_better(tmp_path, capsys):
    """--metric hd95 pairs the records' per_case_hd95 in mm; "cases lower" counts where the arm's HD95 is lower."""
    mod = load_script("compare_arms")
    cases = [f"c{i}.nii.gz" for i in range(4)]
    rec = lambda arm, hd: dict(arm=arm, labelled_cases=10, seed=0, mean_dice=0.8, per_case=dict.fromkeys(cases, 0.8),
                               mean_hd95=float(np.mean(hd)), per_case_hd95=dict(zip(cases, hd)))
    f = tmp_path / "r.json"
    f.write_text(json.dumps([rec("a", [6.0, 8.0, 5.0, 9.0]), rec("b", [5.0, 7.0, 5.5, 8.0])]))
    assert mod.main([str(f), "--arm", "b", "--against", "a", "--labelled", "10", "--metric", "hd95",
                     "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["per_seed"][0]["mean"] == pytest.approx(-0.625) and c["per_seed"][0]["better"] == 3
    assert c["per_seed"][0]["arm_value"] == pytest.approx(6.375)
    out = capsys.readouterr().out
    assert "difference (HD95 mm)" in out and "| 0 | 6.38 | 7.00 | -0.62 |" in out and "3 of 4" in out
    f.write_text(json.dumps([{k: v for k, v in rec(a, [1.0] * 4).items() if k != "per_case_hd95"} for a in "ab"]))
    with pytest.raises(SystemExit, match="per-case HD95"):
        mod.main([str(f), "--arm", "b", "--against", "a", "--labelled", "10", "--metric", "hd95"])


def test_reference_topology_counts_3d_tunnels_and_rings_per_slice(tmp_path):
    import SimpleITK as sitk
    ref_top = load_script("reference_topology")
    ring = np.zeros((12, 16), np.uint8)
    ring[1:8, 1:8] = 1
    ring[2:7, 2:7] = 0
    shifted = np.roll(ring, 5, axis=1)  # touches the ring's right side only
    for name, vol in [("a", np.stack([ring] * 4)), ("b", np.stack([ring, shifted, ring, shifted]))]:
        img = sitk.GetImageFromArray(vol)
        img.SetSpacing((1.5, 1.5, 10.0))  # x, y, z: the slices are across numpy axis 0
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
    res = ref_top.reference_topology(str(tmp_path), [1])[1]
    assert res["cases"] == 2 and res["mean_3d"] == [1.0, 2.5, 0.0] and res["max_3d"][1] == 4  # tube 1, zigzag 4
    assert res["slices"] == 8 and res["mean_2d"] == [1.0, 1.0] and res["ring_fraction_2d"] == 1.0
    assert ref_top.reference_topology(str(tmp_path), [1], cases=["a"])[1]["mean_3d"] == [1.0, 1.0, 0.0]
