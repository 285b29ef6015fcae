"""Weight transfer from a pretraining checkpoint into the finetuning network.

nnU-Net's ``-pretrained_weights`` calls ``nnunetv2.run.run_training.load_pretrained_weights``, which
requires every non-``.seg_layers.`` key of the target network in the checkpoint. The hybrid network
has new layers (fusion), and a plain-MAE checkpoint has no CNN, so that strict rule cannot hold.
``install_pretrained_weights_hook`` therefore wraps nnU-Net's function once: a network that carries
a ``pretrained_loader`` callable (set by our finetuning trainer) is loaded by it; every other network
goes to nnU-Net's own function unchanged (so the stock ``nnUNetTrainer`` still loads HybridMIM
weights the stock way, and unsafely: nnU-Net unpickles them with ``weights_only=False``).

Every load here is ``safe_load`` (``weights_only=True``): a file that holds code is refused.
``load_with_stock_rules`` is nnU-Net's key rule on a safely loaded file, for
``nnUNetTrainerHybridMIMFinetune``. The hook also wraps nnU-Net's ``maybe_load_checkpoint`` so that a
trainer with ``resolve_start`` (``PretrainedStartMixin``) decides what ``--c`` and
``-pretrained_weights`` mean together.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_topomae.errors import UserInputError
from nnunet_topomae.utils.checkpoint import safe_load

# (prefix in the finetuning network, human name); prefixes are shared with TopoMAENetwork
PRETRAINED_PARTS = [("vit_encoder.", "ViT encoder"), ("cnn.encoder.", "CNN encoder"), ("cnn.decoder.", "CNN decoder")]


def pretrained_part(key: str) -> Optional[str]:
    """The pretrained part a finetuning-network key belongs to, or None for what starts fresh (fusion
    layers, segmentation/reconstruction heads ``.seg_layers.``)."""
    if ".seg_layers." in key:
        return None
    if key.startswith("cnn.decoder.encoder."):
        # dynamic-network-architectures' decoder keeps a reference to the encoder, so the encoder's
        # tensors are in the state dict twice; both names belong to the encoder
        return "CNN encoder"
    return next((name for prefix, name in PRETRAINED_PARTS if key.startswith(prefix)), None)


def read_pretraining_checkpoint(fname: str) -> dict:
    """Load on the CPU whatever device wrote it; one clear line if it is not a pretraining checkpoint."""
    ckpt = safe_load(fname, map_location="cpu", what="pretrained weights file")
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise UserInputError(f"{fname} is not an nnU-Net checkpoint (no 'network_weights')")
    if "pretraining" not in ckpt:
        raise UserInputError(f"{fname} is not an nnunet-topomae pretraining checkpoint (written by "
                             f"{ckpt.get('trainer_name', 'an unknown trainer')}); pass checkpoint_final.pth of "
                             f"nnUNetTrainerTopoMAEPretrain or one of its variants")
    return ckpt


# what the plans decide and the transfer depends on; spacing, normalisation and the CNN are recorded by
# checkpoints written since issue 25 (older ones are checked on the rest)
PLAN_KEYS = ("configuration", "num_input_channels", "patch_size", "spacing", "normalization_schemes", "architecture")


def plan_fingerprint(configuration_manager) -> dict:
    """What of a configuration the transfer depends on beyond the patch: voxel spacing, normalisation,
    and the CNN (class and constructor arguments), as plain data."""
    arch = configuration_manager.configuration.get("architecture", {})
    return {"spacing": [float(x) for x in configuration_manager.spacing],
            "normalization_schemes": list(configuration_manager.normalization_schemes),
            "architecture": json.loads(json.dumps({"network_class_name": arch.get("network_class_name"),
                                                   "arch_kwargs": arch.get("arch_kwargs")}))}


def check_compatibility(record: dict, expected: dict, fname: str) -> None:
    """``expected`` holds what the finetuning run uses: dataset_name, plans_name, configuration,
    patch_size, num_input_channels, vit_config (dict), and where known spacing, normalization_schemes,
    architecture.

    Pretraining on another dataset is fine (pretrain once on an archive, finetune many) as long as the
    plans agree: nnU-Net's ``nnUNetv2_move_plans_between_datasets`` gives the target the source's plans.
    The dataset and plans names are therefore not compared, the plans' contents are."""
    if "vit_config" not in record:
        raise UserInputError(f"{fname} was written by {record.get('trainer')}, which has no ViT; the hybrid "
                             f"finetuning needs a TopoMAE or MAE pretraining checkpoint "
                             f"(HybridMIM weights go to the stock nnUNetTrainer)")
    norm = lambda v: [list(x) if isinstance(x, (list, tuple)) else x for x in v] if isinstance(v, (list, tuple)) else v
    mismatches = []
    for key in PLAN_KEYS:
        if key in record and key in expected and norm(record[key]) != norm(expected[key]):
            mismatches.append(f"{key} {record[key]} (checkpoint) vs {expected[key]} (this run)")
    if not mismatches and record["vit_config"] != expected["vit_config"]:
        diff = {k: (record["vit_config"].get(k), v) for k, v in expected["vit_config"].items()
                if record["vit_config"].get(k) != v}
        mismatches.append(f"ViT configuration {diff} (checkpoint, this run): use the finetuning variant "
                          f"with the same ViT preset and token size as the pretraining (e.g. "
                          f"nnUNetTrainerTopoMAEFinetune_token8 after nnUNetTrainerTopoMAEPretrain_token8)")
    if not mismatches:
        return
    src, dst = record.get("dataset_name"), expected.get("dataset_name")
    hint = ""
    if src is not None and dst is not None and src != dst:
        p = record.get("plans_name", "nnUNetPlans")
        hint = (f". It was pretrained on {src}: give {dst} the same plans with nnUNetv2_move_plans_between_datasets "
                f"-s {src} -t {dst} -sp {p} -tp {p}_from_{src.split('_')[0]}, preprocess with them (nnUNetv2_preprocess "
                f"-d {dst} -plans_name {p}_from_{src.split('_')[0]} -c {record.get('configuration')}) and finetune with "
                f"-p {p}_from_{src.split('_')[0]}")
    elif record.get("plans_name") not in (None, expected.get("plans_name")):
        hint = f"; pretrain with -p {expected.get('plans_name')}, or finetune with -p {record.get('plans_name')}"
    raise UserInputError(f"{fname} does not fit this run: " + "; ".join(mismatches) + hint)


def select_transfer(model_state: Dict[str, torch.Tensor], pretrained: Dict[str, torch.Tensor],
                    parts: Optional[Sequence[str]] = None
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, List[str]], List[str]]:
    """Returns (tensors to load, loaded key names per part, keys that start fresh).

    A key is taken when it belongs to a pretrained part named in ``parts`` (default: all of
    ``PRETRAINED_PARTS``), is not a segmentation/reconstruction head (``.seg_layers.``) and has the
    same shape; ViT-encoder keys must all be present (a checkpoint missing them is broken), CNN keys
    may be absent as a whole (plain-MAE pretraining has no CNN). Parts left out of ``parts`` start
    fresh whatever the checkpoint holds."""
    names = [name for _, name in PRETRAINED_PARTS]
    parts = names if parts is None else list(parts)
    unknown = sorted(set(parts) - set(names))
    if unknown or "ViT encoder" not in parts:
        raise UserInputError(f"transfer parts {parts}: each must be one of {names}, and 'ViT encoder' is always "
                             f"transferred (it is what the pretraining is for)")
    load, per_part, fresh = {}, {name: [] for name in names}, []
    for key, value in model_state.items():
        part = pretrained_part(key)
        if part is None or part not in parts:
            fresh.append(key)
            continue
        src = pretrained.get(key)
        if src is None:
            if part == "ViT encoder":
                raise UserInputError(f"the checkpoint lacks the ViT encoder tensor {key}; it was not written by a "
                                     f"compatible nnunet-topomae pretraining")
            fresh.append(key)
            continue
        if tuple(src.shape) != tuple(value.shape):
            raise UserInputError(f"tensor {key} has shape {tuple(src.shape)} in the checkpoint but "
                                 f"{tuple(value.shape)} in this network: the checkpoint comes from other plans")
        load[key] = src
        per_part[part].append(key)
    # all or nothing within the CNN parts asked for: part of them means another architecture
    cnn_parts = set(parts) - {"ViT encoder"}
    cnn_keys = [k for k in model_state if pretrained_part(k) in cnn_parts]
    got_cnn = [k for k in cnn_keys if k in load]
    if got_cnn and len(got_cnn) != len(cnn_keys):
        missing = sorted(set(cnn_keys) - set(got_cnn))
        raise UserInputError(f"the checkpoint holds only part of the CNN ({len(missing)} tensors missing, e.g. "
                             f"{missing[0]}): it comes from another network architecture")
    return load, per_part, fresh


def load_with_stock_rules(network: torch.nn.Module, fname: str) -> int:
    """nnU-Net's ``load_pretrained_weights`` rule (every key but ``.seg_layers.`` present with the same
    shape), on a safely loaded file, with one line instead of an AssertionError; returns the count."""
    ckpt = safe_load(fname, map_location="cpu", what="pretrained weights file")
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise UserInputError(f"{fname} is not an nnU-Net checkpoint (no 'network_weights')")
    pretrained = ckpt["network_weights"]
    own = network.state_dict()
    wanted = [k for k in own if ".seg_layers." not in k]
    missing = [k for k in wanted if k not in pretrained]
    if missing:
        hint = (" (it is a TopoMAE/MAE pretraining checkpoint: finetune it with -tr nnUNetTrainerTopoMAEFinetune)"
                if any(k.startswith("vit_encoder.") for k in pretrained) else "")
        raise UserInputError(f"{fname} does not fit this network: {len(missing)} tensors missing, e.g. {missing[0]}{hint}")
    bad = [k for k in wanted if tuple(pretrained[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UserInputError(f"{fname} does not fit this network: tensor {bad[0]} has shape "
                             f"{tuple(pretrained[bad[0]].shape)} there, {tuple(own[bad[0]].shape)} here (other plans?)")
    own.update({k: pretrained[k].to(own[k].device, own[k].dtype) for k in wanted})
    network.load_state_dict(own)
    return len(wanted)


def _unwrap(network):
    mod = network.module if hasattr(network, "module") and isinstance(network.module, torch.nn.Module) else network
    return getattr(mod, "_orig_mod", mod)


_original_loader = None
_original_maybe_load = None


def install_pretrained_weights_hook() -> None:
    global _original_loader, _original_maybe_load
    import nnunetv2.run.run_training as run_training
    if _original_loader is not None:
        return
    _original_loader = run_training.load_pretrained_weights
    _original_maybe_load = run_training.maybe_load_checkpoint

    def load_pretrained_weights(network, fname, verbose=False):
        loader = getattr(_unwrap(network), "pretrained_loader", None)
        if callable(loader):
            return loader(fname)
        return _original_loader(network, fname, verbose)

    def maybe_load_checkpoint(nnunet_trainer, continue_training, validation_only, pretrained_weights_file=None):
        resolve = getattr(nnunet_trainer, "resolve_start", None)
        if callable(resolve):
            continue_training, pretrained_weights_file = resolve(continue_training, validation_only,
                                                                 pretrained_weights_file)
        return _original_maybe_load(nnunet_trainer, continue_training, validation_only, pretrained_weights_file)

    run_training.load_pretrained_weights = load_pretrained_weights
    run_training.maybe_load_checkpoint = maybe_load_checkpoint
