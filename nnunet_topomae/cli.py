"""The ``nnunet-topomae`` command: env, doctor, inspect, evaluate, demo, bench."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
from importlib import metadata
from typing import List, Optional

from nnunet_topomae.utils.ext_trainer import EXT_TRAINER_DIR, ext_trainer_value  # noqa: F401 (re-exported)

# (package, minimum, exclusive maximum) as tested; see setup.py
TESTED_VERSIONS = [("nnunetv2", "2.8.1", "2.9"), ("torch", "2.4.1", "2.14.2"), ("gudhi", "3.11", "3.14")]


def cmd_env(args) -> int:
    print(f"export nnUNet_extTrainer={shlex.quote(ext_trainer_value(os.environ.get('nnUNet_extTrainer')))}")
    return 0


def _version_tuple(v: str):
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def doctor_problems() -> List[str]:
    """Every problem found, each as 'what is wrong -> how to fix it'."""
    problems = []
    for pkg, lo, hi in TESTED_VERSIONS:
        try:
            v = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            problems.append(f"{pkg} is not installed -> pip install 'nnunet-topomae' (brings {pkg}>={lo},<{hi})")
            continue
        if not (_version_tuple(lo) <= _version_tuple(v) < _version_tuple(hi)):
            problems.append(f"{pkg} {v} is outside the tested range >={lo},<{hi} -> pip install '{pkg}>={lo},<{hi}'")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        val = os.environ.get(var)
        if not val:
            problems.append(f"{var} is not set -> export {var}=/path/to/{var} (see nnU-Net's setting_up_paths.md)")
        elif not os.path.isdir(val):
            problems.append(f"{var}={val} does not exist -> mkdir -p {shlex.quote(val)}")
        elif not os.access(val, os.W_OK):
            problems.append(f"{var}={val} is not writable -> fix its permissions or point {var} elsewhere")
    ext = os.environ.get("nnUNet_extTrainer", "")
    if EXT_TRAINER_DIR not in [os.path.abspath(p) for p in ext.split(os.pathsep) if p]:
        problems.append('nnUNet_extTrainer does not contain this package\'s trainer folder -> eval "$(nnunet-topomae env)"')
    else:
        problems.extend(_lookup_problems())
    return problems


def _lookup_problems() -> List[str]:
    from nnunet_topomae.trainers import PUBLIC_TRAINERS
    problems = []
    try:
        # nnunetv2.paths reads the variable at import time; a fresh interpreter sees the current value
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    except Exception as e:  # pragma: no cover - broken nnU-Net install
        return [f"nnU-Net cannot be imported ({e}) -> pip install --force-reinstall 'nnunetv2>=2.8.1,<2.9'"]
    for name in PUBLIC_TRAINERS:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cls = recursive_find_trainer_class_by_name(name)
            if cls.__module__.split(".")[0] != "nnunet_topomae":
                problems.append(f"nnU-Net resolves {name} to {cls.__module__}, not this package -> "
                                f"remove the other definition from nnUNet_extTrainer")
        except Exception as e:
            problems.append(f"nnU-Net's trainer lookup cannot find {name} ({str(e).splitlines()[0][:120]}) -> "
                            f'eval "$(nnunet-topomae env)" in this shell')
    return problems


def dataset_problems(dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans") -> List[str]:
    """Whether ``nnUNetv2_train dataset configuration FOLD -p plans`` would find its preprocessed data."""
    pre = os.environ.get("nnUNet_preprocessed")
    if not pre or not os.path.isdir(pre):
        return []  # reported above
    try:
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        name = maybe_convert_to_dataset_name(dataset)
    except Exception:
        return [f"dataset {dataset} is in neither nnUNet_raw nor nnUNet_preprocessed -> check the id, or put the raw "
                f"dataset into $nnUNet_raw and run nnUNetv2_plan_and_preprocess -d {dataset} -c {configuration}"]
    ident = name.split("_")[0].replace("Dataset", "").lstrip("0") or "0"
    plans_file = os.path.join(pre, name, plans + ".json")
    if not os.path.isfile(plans_file):
        return [f"{name} has no plans {plans} in nnUNet_preprocessed -> nnUNetv2_plan_and_preprocess -d {ident} -c {configuration}"]
    import json
    with open(plans_file) as f:
        cfgs = json.load(f).get("configurations", {})
    if configuration not in cfgs:
        return [f"plans {plans} of {name} have no configuration {configuration} (they have {', '.join(cfgs)}) -> "
                f"pick one of those"]
    data_id = cfgs[configuration].get("data_identifier", f"{plans}_{configuration}")
    folder = os.path.join(pre, name, data_id)
    if not os.path.isdir(folder) or not any(f.endswith((".b2nd", ".npz", ".npy")) for f in os.listdir(folder)):
        cmd = (f"nnUNetv2_preprocess -d {ident} -plans_name {plans} -c {configuration}" if plans != "nnUNetPlans"
               else f"nnUNetv2_plan_and_preprocess -d {ident} -c {configuration}")
        return [f"{name} is not preprocessed for {configuration} with {plans} ({folder} missing or empty) -> {cmd}"]
    return []


def unlabelled_report() -> List[str]:
    """One line per dataset with unlabelled cases of ``add-unlabelled``, per configuration folder."""
    pre = os.environ.get("nnUNet_preprocessed")
    if not pre or not os.path.isdir(pre):
        return []
    from nnunet_topomae.data.unlabelled import unlabelled_counts
    lines = []
    for name in sorted(os.listdir(pre)):
        counts = unlabelled_counts(os.path.join(pre, name))
        if counts:
            lines.append(f"{name}: unlabelled cases for pretraining: " +
                         ", ".join(f"{n} in {ident}" for ident, n in counts.items()))
    return lines


def cmd_doctor(args) -> int:
    problems = doctor_problems()
    for line in unlabelled_report():
        print(line)
    if getattr(args, "dataset", None):
        problems += dataset_problems(args.dataset, args.configuration, args.plans)
    for path in getattr(args, "checkpoint", None) or []:
        from nnunet_topomae.inspect_checkpoint import format_info, inspect_file
        info = inspect_file(path)
        print("\n".join(format_info(info)) + "\n")
        if not info["safe"]:
            problems.append(f"{path} contains code or objects that are not weights -> do not use it; ask for a "
                            f"checkpoint written by nnunet-topomae or nnU-Net")
    for pkg, _, _ in TESTED_VERSIONS:
        try:
            print(f"{pkg:10s} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            print(f"{pkg:10s} missing")
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nAll checks passed: nnU-Net finds every nnunet-topomae trainer.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunet-topomae",
                                     description="Masked-autoencoder self-pretraining for nnU-Net v2")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help='print the nnUNet_extTrainer export line: eval "$(nnunet-topomae env)"')
    doc = sub.add_parser("doctor", help="check versions, nnUNet_* folders and that nnU-Net finds every trainer; with -d, "
                                        "that the dataset is preprocessed; with --checkpoint, what a checkpoint is")
    doc.add_argument("-d", dest="dataset", default=None, help="dataset name or id to check")
    doc.add_argument("-c", dest="configuration", default="3d_fullres")
    doc.add_argument("-p", dest="plans", default="nnUNetPlans")
    doc.add_argument("--checkpoint", nargs="*", default=None, help="checkpoint files to inspect (nnunet-topomae inspect)")
    for register in _optional_commands():
        register(sub)
    args = parser.parse_args(argv)
    handlers = {"env": cmd_env, "doctor": cmd_doctor}
    return handlers.get(args.command, getattr(args, "handler", None))(args)


def _optional_commands():
    from nnunet_topomae import add_unlabelled, bench, demo, inspect_checkpoint
    from nnunet_topomae.evaluation import evaluate
    return [demo.add_parser, bench.add_parser, inspect_checkpoint.add_parser, evaluate.add_parser, add_unlabelled.add_parser]


if __name__ == "__main__":
    sys.exit(main())
