"""``nnunet-topomae inspect CHECKPOINT``: what a checkpoint is, read safely.

Loads the file with ``weights_only=True`` (``nnunet_topomae.utils.checkpoint.safe_load``), so looking
at a file from elsewhere never runs what is pickled inside it, and says: what wrote it (method,
trainer), for which dataset, plans, configuration and patch, how many epochs of how many, which
trainer takes it, whether it is complete, and whether it is safe to hand to nnU-Net's own loaders
(``-pretrained_weights`` of the stock trainer, ``--c``, ``nnUNetv2_predict``), which unpickle anything.
"""
from __future__ import annotations

import os
from typing import Dict, List

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.utils.checkpoint import safe_load


def describe(ckpt: dict) -> Dict[str, object]:
    """Facts about a safely loaded checkpoint dict (no file access)."""
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        return {"kind": "not an nnU-Net checkpoint", "detail": f"no 'network_weights' (holds {keys})"}
    init = ckpt.get("init_args") or {}
    plans = init.get("plans") or {}
    configuration = init.get("configuration")
    patch = (plans.get("configurations", {}).get(configuration, {}) or {}).get("patch_size")
    rec = ckpt.get("pretraining")
    trainer = ckpt.get("trainer_name", "unknown trainer")
    info: Dict[str, object] = {
        "trainer": trainer, "dataset": plans.get("dataset_name"), "plans": plans.get("plans_name"),
        "configuration": configuration, "fold": init.get("fold"), "patch_size": patch,
        "epochs_done": ckpt.get("current_epoch"), "epochs_planned": ckpt.get("num_epochs"),
        "tensors": len(ckpt["network_weights"]),
    }
    if rec is not None:
        method = rec.get("method", "unknown")
        if method == "topomae" and not rec.get("has_cnn", True):
            method = "mae"
        info.update(dataset=rec.get("dataset_name", info["dataset"]), plans=rec.get("plans_name", info["plans"]),
                    configuration=rec.get("configuration", configuration), patch_size=rec.get("patch_size", patch))
        names = {"topomae": "TopoMAE pretraining", "mae": "plain MAE pretraining", "hybridmim": "HybridMIM pretraining"}
        info["kind"] = f"nnunet-topomae {names.get(method, method + ' pretraining')} checkpoint"
        info["method"] = method
        if method == "hybridmim":
            info["taken_by"] = ("nnUNetTrainer or nnUNetTrainerHybridMIMFinetune -pretrained_weights (same dataset, "
                                "plans and configuration)")
        else:
            info["taken_by"] = "nnUNetTrainerTopoMAEFinetune -pretrained_weights (same dataset, plans and configuration)"
    else:
        info["kind"] = "nnU-Net segmentation checkpoint"
        info["method"] = "segmentation"
        info["taken_by"] = (f"nnUNetv2_predict -tr {trainer} (from its results folder), or --c to continue its training")
        if ckpt.get("pretrained_from"):
            info["pretrained_from"] = ckpt["pretrained_from"].get("file")
    done, planned = info["epochs_done"], info["epochs_planned"]
    if planned is not None and done is not None:
        info["complete"] = done >= planned
    else:
        info["complete"] = None  # nnU-Net's own checkpoints do not store the planned epochs
    return info


def inspect_file(path: str) -> Dict[str, object]:
    try:
        ckpt = safe_load(path, map_location="cpu")
    except UserInputError as e:
        if "refused" in e.message:
            return {"file": path, "kind": "REFUSED", "safe": False, "detail": e.message}
        raise
    info = describe(ckpt)
    info["file"] = path
    info["safe"] = True
    if info.get("complete") is None and os.path.basename(path) == "checkpoint_final.pth":
        info["complete"] = True
    return info


def format_info(info: Dict[str, object]) -> List[str]:
    if info["kind"] == "REFUSED":
        return [f"{info['file']}: NOT SAFE: {info['detail']}",
                "Do not pass it to nnUNetv2_train -pretrained_weights, --c or nnUNetv2_predict: nnU-Net's loaders "
                "would run what it contains."]
    lines = [f"{info['file']}: {info['kind']}"]
    for key, label in (("trainer", "written by"), ("dataset", "dataset"), ("plans", "plans"),
                       ("configuration", "configuration"), ("patch_size", "patch"), ("fold", "fold"),
                       ("tensors", "network tensors"), ("pretrained_from", "finetuned from")):
        if info.get(key) is not None:
            lines.append(f"  {label + ':':19s}{info[key]}")
    done, planned = info.get("epochs_done"), info.get("epochs_planned")
    if done is not None:
        lines.append(f"  {'epochs:':19s}{done}" + (f" of {planned}" if planned is not None else ""))
    complete = info.get("complete")
    lines.append(f"  {'complete:':19s}" + ("yes" if complete else "no (continue it with --c)" if complete is False
                                            else "unknown (nnU-Net's own checkpoints do not say)"))
    if "taken_by" in info:
        lines.append(f"  {'use it with:':19s}{info['taken_by']}")
    if info.get("method") in ("topomae", "mae"):
        stock = "no: it holds no nnU-Net CNN under nnU-Net's key names; the stock trainer would stop with 'Key ... is missing'"
    elif info.get("method") == "hybridmim":
        stock = "yes (no code inside; the stock trainer takes it with -pretrained_weights)"
    elif info["kind"] == "nnU-Net segmentation checkpoint":
        stock = "yes (no code inside)"
    else:
        stock = "no: not an nnU-Net checkpoint"
    lines.append(f"  {'safe for nnU-Net:':19s}{stock}")
    return lines


def cmd_inspect(args) -> int:
    status = 0
    for path in args.checkpoint:
        info = inspect_file(path)
        print("\n".join(format_info(info)))
        status = max(status, 0 if info["safe"] else 2)
    return status


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="say safely what a checkpoint is (method, dataset, plans, epochs, which trainer "
                                       "takes it) and whether it is safe to hand to nnU-Net's own loaders")
    p.add_argument("checkpoint", nargs="+", help="a .pth file")
    p.set_defaults(handler=cmd_inspect)
