"""``nnunet-topomae demo``: the whole workflow on real MRI shipped with the package.

24 Hippocampus cases (MSD Task04, CC BY-SA 4.0, see demo_data/.../README.md) go through nnU-Net's
own commands: convert, plan and preprocess, TopoMAE pretraining, hybrid finetuning with the
pretrained weights, prediction of the cases fold 0 did not train on, and nnU-Net's evaluation.
Everything happens in a work folder (temporary unless given); the user's nnUNet_* folders are never
used. To fit in minutes on a CPU the demo trains a plans variant of nnU-Net's auto-configured plans
with batch size 2 and CNN widths 16-128 (``nnUNetPlansDemoCPU``), on short schedules.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

from nnunet_topomae.workflow import epoch_echo, make_plans_variant, nnunet_command, nnunet_env, run

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", "Task04_Hippocampus_sample")
DATASET_ID = 990
DATASET = "Dataset990_Hippocampus"
PLANS = "nnUNetPlansDemoCPU"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole workflow on built-in Hippocampus MRI (about 10 min on 2 CPU cores)")
    p.add_argument("--work-dir", default=None, help="work folder (default: a new temporary folder, kept at the end)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="training/inference device")
    p.add_argument("--long", action="store_true", help="4x longer pretraining and finetuning schedules")
    p.set_defaults(handler=main)


def _overlay(image_file: str, label_file: str, pred_file: str, out_png: str) -> None:
    import SimpleITK as sitk
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img = sitk.GetArrayFromImage(sitk.ReadImage(image_file))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
    pr = sitk.GetArrayFromImage(sitk.ReadImage(pred_file))
    z = int(np.argmax((gt > 0).sum((1, 2)))) if gt.any() else img.shape[0] // 2
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.5))
    for ax, seg, title in ((axes[0], gt, "reference"), (axes[1], pr, "prediction")):
        ax.imshow(img[z], cmap="gray")
        for lab, color in ((1, "tab:red"), (2, "tab:cyan")):
            if (seg[z] == lab).any():
                ax.contour(seg[z] == lab, levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(f"{os.path.basename(pred_file)}: red anterior, cyan posterior (slice {z})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def main(args) -> int:
    t_start = time.time()
    work = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="nnunet_topomae_demo_")
    os.makedirs(work, exist_ok=True)
    report = os.path.join(work, "report")
    os.makedirs(report, exist_ok=True)
    log = os.path.join(work, "demo_log.txt")
    env = nnunet_env(work, n_proc_da=1)
    suffix = "_demoLong" if args.long else "_demo"
    pre_tr, fine_tr = f"nnUNetTrainerTopoMAEPretrain{suffix}", f"nnUNetTrainerTopoMAEFinetune{suffix}"
    print(f"nnunet-topomae demo: work folder {work} (full log: {log})", flush=True)

    def step(n: int, text: str):
        print(f"[{n}/6] {text} (t = {time.time() - t_start:.0f} s)", flush=True)

    step(1, "convert the MSD sample to nnU-Net format")
    src = os.path.join(work, "source", "Task04_Hippocampus")
    if not os.path.isdir(src):
        shutil.copytree(SAMPLE, src)
        os.makedirs(os.path.join(src, "imagesTs"), exist_ok=True)
    raw_ds = os.path.join(env["nnUNet_raw"], DATASET)
    if not os.path.isdir(raw_ds):
        run([nnunet_command("nnUNetv2_convert_MSD_dataset"), "-i", src, "-overwrite_id", str(DATASET_ID), "-np", "1"],
            env, log)

    step(2, "plan and preprocess (nnU-Net's auto-configuration)")
    pre_ds = os.path.join(env["nnUNet_preprocessed"], DATASET)
    if not os.path.isfile(os.path.join(pre_ds, "nnUNetPlans.json")):
        run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"],
            env, log)
    make_plans_variant(pre_ds, PLANS, batch_size=2, features=[16, 32, 64, 128])

    train = [nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-p", PLANS, "-device", args.device]
    res_dir = lambda tr: os.path.join(env["nnUNet_results"], DATASET, f"{tr}__{PLANS}__3d_fullres", "fold_0")
    ckpt = os.path.join(res_dir(pre_tr), "checkpoint_final.pth")
    step(3, f"self-pretraining on the training images: {pre_tr}")
    if not os.path.isfile(ckpt):
        run(train + ["-tr", pre_tr], env, log, echo=epoch_echo())
    step(4, f"finetuning the hybrid ViT + nnU-Net with the pretrained weights: {fine_tr}")
    if not os.path.isfile(os.path.join(res_dir(fine_tr), "checkpoint_final.pth")):
        run(train + ["-tr", fine_tr, "-pretrained_weights", ckpt], env, log, echo=epoch_echo())

    step(5, "predict the cases fold 0 did not train on (nnUNetv2_predict)")
    with open(os.path.join(pre_ds, "splits_final.json")) as f:
        held_out = sorted(json.load(f)[0]["val"])
    inputs, refs = os.path.join(work, "heldout_images"), os.path.join(work, "heldout_labels")
    os.makedirs(inputs, exist_ok=True)
    os.makedirs(refs, exist_ok=True)
    for case in held_out:
        shutil.copy(os.path.join(raw_ds, "imagesTr", f"{case}_0000.nii.gz"), inputs)
        shutil.copy(os.path.join(raw_ds, "labelsTr", f"{case}.nii.gz"), refs)
    preds = os.path.join(report, "predictions")
    run([nnunet_command("nnUNetv2_predict"), "-i", inputs, "-o", preds, "-d", str(DATASET_ID), "-c", "3d_fullres",
         "-p", PLANS, "-tr", fine_tr, "-f", "0", "-device", args.device, "-npp", "1", "-nps", "1"], env, log)

    step(6, "evaluate with nnU-Net's evaluation and write the report")
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple
    summary = os.path.join(report, "summary.json")
    compute_metrics_on_folder_simple(refs, preds, [1, 2], output_file=summary, num_processes=1)
    with open(summary) as f:
        metrics = json.load(f)
    dice = {lab: metrics["mean"][str(lab)]["Dice"] for lab in (1, 2)}
    for name, folder in (("pretraining", res_dir(pre_tr)), ("finetuning", res_dir(fine_tr))):
        for png in ("progress.png", "loss_terms.png", "reconstruction_preview.png"):
            if os.path.isfile(os.path.join(folder, png)):
                shutil.copy(os.path.join(folder, png), os.path.join(report, f"{name}_{png}"))
    _overlay(os.path.join(inputs, f"{held_out[0]}_0000.nii.gz"), os.path.join(refs, f"{held_out[0]}.nii.gz"),
             os.path.join(preds, f"{held_out[0]}.nii.gz"), os.path.join(report, "prediction_overlay.png"))
    minutes = (time.time() - t_start) / 60
    lines = [f"# nnunet-topomae demo report", "",
             f"{len(held_out)} held-out Hippocampus cases (fold 0 validation), {fine_tr} after {pre_tr}, "
             f"plans {PLANS}, device {args.device}, {minutes:.1f} min in all.", "",
             "| label | Dice |", "| --- | --- |", f"| 1 anterior | {dice[1]:.3f} |", f"| 2 posterior | {dice[2]:.3f} |",
             f"| mean | {np.mean(list(dice.values())):.3f} |", "",
             "Pictures: pretraining_loss_terms.png, pretraining_reconstruction_preview.png, "
             "finetuning_progress.png, prediction_overlay.png. Metrics per case: summary.json."]
    with open(os.path.join(report, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"Dice on {len(held_out)} held-out cases: anterior {dice[1]:.3f}, posterior {dice[2]:.3f}, "
          f"mean {np.mean(list(dice.values())):.3f}")
    print(f"Report: {report}/report.md ({minutes:.1f} min)")
    return 0
