#!/usr/bin/env python
"""How faithful is the topological loss the trainer optimises to the paper's L_topo, and at what cost?

    python benchmarks/topo_fidelity.py -d DATASET [-c 3d_fullres] [-p PLANS] [--checkpoint CKPT]
        [--batches 2] [--settings NAME ...] [--setting NAME=key=value,key=value ...]
        [--reconstruction raw composed] [--branches vit cnn] [--json OUT]

Real preprocessed patches (fold 0's validation cases, nnU-Net's own loader as TopoMAE pretraining
cuts them, no augmentation) and real reconstructions: the ViT's and the CNN's output of a
TopoMAE pretraining checkpoint (``--checkpoint``; without one a Gaussian-blurred copy of the input,
sigma 1 voxel, stands in for the reconstruction, and the report says so). Every reconstruction is
scored both ways the trainer can score it (``topo_reconstruction``): ``raw`` (the network's output
everywhere) and ``composed`` (``m * recon + (1 - m) * input``: the input on the visible voxels).

For each volume and reconstruction the EXACT L_topo = 1/2 sum_d W_2(D_d(I), D_d(I'))^2 is computed
once: full-resolution cubical persistence (gudhi, ``vertices=``), every diagram point, an exact
assignment (``wasserstein2_matching``: the dense augmented assignment restricted to the edges that
can be optimal, exact) and its gradient w.r.t. the full-resolution reconstruction. With
``--check-hera`` the exact values are also checked against gudhi.hera (an independent auction
solver, distance only, relative error 1e-6).

Then every setting (reduction, pair budget, tail, backend) is scored with the product's own
``TopologicalLoss.per_volume`` + backward, as the training step computes it:
``ratio`` = configured value / exact value, ``cosine`` = cosine similarity of the two gradients voxel
by voxel at full resolution (for ``composed``, the gradient w.r.t. the network's output, zero on
visible voxels), and the time per volume: the input's persistence (``InputPersistence``, in
nnU-Net's data-loading workers during training) and the step's part (reduction, the
reconstruction's persistence, matching, gather and backward; serial, one process).

nnUNet_raw / nnUNet_preprocessed / nnUNet_results as for nnUNetv2_train; everything runs in this one
process (nnUNet_n_proc_DA is set to 0 here, no persistence pool).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

# name -> TopologicalLoss settings. max_size/max_voxels None: full resolution; max_pairs/pair_mass None: every point
SETTINGS = {
    # the trainer's default: average-pooled to <= 32 voxels per axis and 12288 in all, 64 points per dimension
    "default": dict(max_size=32, max_voxels=12288, max_pairs=64, tail="drop"),
    "reduced_allpoints": dict(max_size=32, max_voxels=None, max_pairs=None, tail="drop"),
    "full_top64": dict(max_size=None, max_voxels=None, max_pairs=64, tail="drop"),
    "full_top64_diag": dict(max_size=None, max_voxels=None, max_pairs=64, tail="diagonal"),
    "full_top256_diag": dict(max_size=None, max_voxels=None, max_pairs=256, tail="diagonal"),
    "full_top1024_diag": dict(max_size=None, max_voxels=None, max_pairs=1024, tail="diagonal"),
    "full_mass90_diag": dict(max_size=None, max_voxels=None, max_pairs=None, pair_mass=0.9, tail="diagonal"),
    "full_top1024_diag_cripser": dict(max_size=None, max_voxels=None, max_pairs=1024, tail="diagonal", backend="cripser"),
    # the exact loss through the product's code, with the faster backend: its cost per volume
    "exact_cripser": dict(max_size=None, max_voxels=None, max_pairs=None, tail="drop", backend="cripser"),
}
DEFAULT_SETTINGS = list(SETTINGS)
KEYS = {"max_size": int, "max_voxels": int, "max_pairs": int, "pair_mass": float, "tail": str, "backend": str}


def parse_setting(text: str):
    name, _, rest = text.partition("=")
    out = dict(max_size=None, max_voxels=None, max_pairs=None, tail="drop")
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in KEYS:
            raise SystemExit(f"--setting {text!r}: unknown key {k!r}; keys: {', '.join(KEYS)}")
        out[k] = None if v.lower() in ("none", "0", "") and k not in ("tail", "backend") else KEYS[k](v)
    return name, out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a.ravel() @ b.ravel() / (na * nb)) if na > 0 and nb > 0 else float("nan")


def real_volumes(args):
    """[(name, input (X, Y, Z) float32, {'vit': recon, 'cnn': recon}, voxel mask)] from the validation loader."""
    os.environ["nnUNet_n_proc_DA"] = "0"
    from nnunet_topomae.utils.ext_trainer import ext_trainer_value
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from scipy.ndimage import gaussian_filter
    from nnunet_topomae.utils.checkpoint import safe_load

    trainer = get_trainer_from_args(args.dataset, args.configuration, 0, args.trainer, args.plans,
                                    device=torch.device("cpu"))
    trainer.initialize()
    if trainer.loss.topo_loss is not None:
        trainer.loss.topo_loss.workers = 0
    if args.checkpoint:
        trainer.network.load_state_dict(safe_load(args.checkpoint)["network_weights"])
    trainer.network.eval()
    _, val = trainer.get_dataloaders()
    out = []
    with torch.no_grad():
        for i in range(args.batches):
            batch = next(val)
            x = batch["data"].float()
            torch.manual_seed(i)  # the same token masks on every run
            o = trainer.network(x)
            cnn = o.get("cnn_recon")
            cnn = cnn[0] if isinstance(cnn, (list, tuple)) else cnn
            for s in range(x.shape[0]):
                img = x[s, 0].numpy()
                if args.checkpoint:
                    recons = {"vit": o["vit_recon"][s, 0].numpy()}
                    if cnn is not None:
                        recons["cnn"] = cnn[s, 0].numpy()
                else:
                    recons = {"blur": gaussian_filter(img.astype(np.float64), 1.0).astype(np.float32)}
                out.append((f"{batch['keys'][s]}#{i}.{s}", img, recons, o["voxel_mask"][s, 0].numpy()))
                if len(out) >= args.max_volumes:
                    break
            if len(out) >= args.max_volumes:
                break
    shape = tuple(int(p) for p in trainer.configuration_manager.patch_size)
    info = {"trainer": args.trainer, "patch_size": list(shape),
            "spacing": [float(v) for v in trainer.configuration_manager.spacing],
            "batch_size": int(trainer.batch_size), "mask_ratio": float(getattr(trainer, "mask_ratio", 0.75))}
    for dl in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
        if hasattr(dl, "_finish"):
            dl._finish()
    return out, info


def scored(img, recon, mask, kind, settings, dims=(0, 1, 2)):
    """value (float), gradient w.r.t. the network output (full-res numpy), times (s) of one setting."""
    import torch
    from nnunet_topomae.losses.topological import TopologicalLoss, compose_reconstruction
    loss = TopologicalLoss(dims=dims, workers=0, **settings)
    image = torch.from_numpy(img)[None, None].float()
    leaf = torch.from_numpy(recon)[None, None].float().requires_grad_(True)
    t0 = time.perf_counter()
    target_pairs = [loss.input_persistence()(image[0].numpy())]
    t_input = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = compose_reconstruction(leaf, image, torch.from_numpy(mask)[None, None]) if kind == "composed" else leaf
    value = loss.per_volume(r, image, target_pairs)[0, 0]
    value.backward()
    t_step = time.perf_counter() - t0
    return float(value), leaf.grad[0, 0].double().numpy(), t_input, t_step


def hera_check(img, recon, dims=(0, 1, 2)):
    """The exact value from gudhi's own diagrams and gudhi.hera's auction solver (distance only)."""
    from gudhi import CubicalComplex
    from gudhi.hera import wasserstein_distance

    def diagrams(v):
        cc = CubicalComplex(vertices=np.asarray(v, np.float64))
        cc.compute_persistence()
        return {d: cc.persistence_intervals_in_dimension(d).reshape(-1, 2) for d in dims}

    a, b = diagrams(recon), diagrams(img)
    total = 0.0
    for d in dims:
        total += wasserstein_distance(a[d], b[d], order=2, internal_p=2, delta=1e-6) ** 2
    return 0.5 * total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerTopoMAEPretrain",
                   help="the pretraining trainer whose network the checkpoint holds (default nnUNetTrainerTopoMAEPretrain)")
    p.add_argument("--checkpoint", help="TopoMAE pretraining checkpoint (without: a blurred copy stands in)")
    p.add_argument("--batches", type=int, default=2, help="validation batches (default 2)")
    p.add_argument("--max-volumes", type=int, default=4, help="patches at most (default 4)")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS), metavar="NAME",
                   help=f"named settings (default: all): {', '.join(SETTINGS)}")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=key=value,...",
                   help=f"an extra setting; keys {', '.join(KEYS)} (unset: full resolution, every point, tail drop)")
    p.add_argument("--reconstruction", nargs="+", default=["raw", "composed"], choices=["raw", "composed"])
    p.add_argument("--branches", nargs="+", default=["vit", "cnn"], help="network outputs scored (default vit cnn)")
    p.add_argument("--check-hera", action="store_true", help="check every exact value against gudhi.hera")
    p.add_argument("--crop", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="score a central crop of each patch (input, reconstruction and mask alike): where the exact "
                        "assignment of a whole patch takes too long (noisy reconstructions of ACDC's 10x96x80 patch "
                        "give 6-9 million candidate pairs per dimension)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    settings = {n: SETTINGS[n] for n in args.settings}
    settings.update(parse_setting(t) for t in args.setting)
    from nnunet_topomae.losses.topological import available_backends
    settings = {n: s for n, s in settings.items() if s.get("backend", "gudhi") in available_backends()}

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    volumes, info = real_volumes(args)
    if args.crop:
        def crop(v):
            lo = [max(0, (s - c) // 2) for s, c in zip(v.shape, args.crop)]
            return np.ascontiguousarray(v[tuple(slice(a, a + c) for a, c in zip(lo, args.crop))])
        volumes = [(n, crop(i), {k: crop(r) for k, r in rec.items()}, crop(m)) for n, i, rec, m in volumes]
        info["crop"] = list(volumes[0][1].shape)
    stand_in = None if args.checkpoint else "Gaussian-blurred copy of the input (sigma 1 voxel)"
    rows = []
    for name, img, recons, mask in volumes:
        for branch, recon in recons.items():
            if args.checkpoint and branch not in args.branches:
                continue
            for kind in args.reconstruction:
                t0 = time.perf_counter()
                exact, g_exact, _, _ = scored(img, recon, mask, kind, dict(max_size=None, max_voxels=None,
                                                                          max_pairs=None, tail="drop"))
                row = {"volume": name, "branch": branch, "reconstruction": kind, "exact": exact,
                       "exact_s": time.perf_counter() - t0, "settings": {}}
                if args.check_hera:
                    import torch
                    from nnunet_topomae.losses.topological import compose_reconstruction
                    r = recon if kind == "raw" else compose_reconstruction(
                        torch.from_numpy(recon), torch.from_numpy(img), torch.from_numpy(mask)).numpy()
                    row["hera"] = hera_check(img, r)
                for sname, s in settings.items():
                    value, g, t_in, t_step = scored(img, recon, mask, kind, s)
                    row["settings"][sname] = {"value": value, "ratio": value / exact if exact else float("nan"),
                                              "cosine": cosine(g, g_exact), "input_s": t_in, "step_s": t_step}
                rows.append(row)
                if args.json:  # after every row, so that a run cut short keeps what it measured
                    with open(args.json + ".partial", "w") as f:
                        json.dump({"rows": rows}, f)
                print(f"{name} {branch} {kind}: exact {exact:.4f} ({row['exact_s']:.1f} s)"
                      + (f", hera {row['hera']:.4f}" if "hera" in row else "") + "; "
                      + ", ".join(f"{k} {v['ratio']:.2f}/{v['cosine']:.2f}" for k, v in row["settings"].items()),
                      flush=True)

    summary = {}
    for kind in args.reconstruction:
        for sname in settings:
            sel = [r["settings"][sname] for r in rows if r["reconstruction"] == kind]
            if not sel:
                continue
            ratio = np.array([x["ratio"] for x in sel])
            cos = np.array([x["cosine"] for x in sel])
            summary[f"{kind}/{sname}"] = {
                "reconstruction": kind, "setting": sname, "n": len(sel),
                "ratio_median": float(np.median(ratio)), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
                "cosine_median": float(np.nanmedian(cos)), "cosine_min": float(np.nanmin(cos)),
                "input_s_median": float(np.median([x["input_s"] for x in sel])),
                "step_s_median": float(np.median([x["step_s"] for x in sel])),
                "meets_0.8": bool(ratio.min() >= 0.8 and np.nanmin(cos) >= 0.8),
            }
    print(f"\n{len(volumes)} patches of {args.dataset} ({'x'.join(map(str, info['patch_size']))}"
          + (f", central crops {'x'.join(map(str, info['crop']))}" if args.crop else "") + ", spacing "
          f"{info['spacing']}), reconstructions: {stand_in or 'checkpoint ' + args.checkpoint}\n")
    print("| reconstruction | setting | ratio median (min-max) | cosine median (min) | input s/vol | step s/vol |")
    print("| --- | --- | --- | --- | --- | --- |")
    for v in summary.values():
        print(f"| {v['reconstruction']} | {v['setting']} | {v['ratio_median']:.2f} ({v['ratio_min']:.2f}-{v['ratio_max']:.2f}) "
              f"| {v['cosine_median']:.2f} ({v['cosine_min']:.2f}) | {v['input_s_median']:.2f} | {v['step_s_median']:.2f} |")
    report = {
        "benchmark": "topo_fidelity", "dataset": args.dataset, "configuration": args.configuration, "plans": args.plans,
        "checkpoint": args.checkpoint, "stand_in": stand_in, **info, "settings": settings,
        "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "summary": summary, "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
