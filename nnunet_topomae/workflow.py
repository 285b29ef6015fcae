"""Running nnU-Net's own commands the way a user does: used by the demo and the benchmarks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

from nnunet_topomae.utils.ext_trainer import ext_trainer_value
from nnunet_topomae.errors import UserInputError


def nnunet_command(name: str) -> str:
    """Console script next to this interpreter (the venv's), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here):
        return here
    found = shutil.which(name)
    if found is None:
        raise UserInputError(f"{name} was not found; install nnU-Net (pip install 'nnunetv2>=2.8.1,<2.9')")
    return found


def nnunet_env(root: str, extra_ext: Optional[List[str]] = None, n_proc_da: int = 2) -> Dict[str, str]:
    """Environment for nnU-Net subprocesses with all three folders inside ``root``."""
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        env[var] = os.path.join(root, sub)
        os.makedirs(env[var], exist_ok=True)
    env["nnUNet_extTrainer"] = ext_trainer_value(os.pathsep.join([env.get("nnUNet_extTrainer", "")] + (extra_ext or [])))
    env.setdefault("nnUNet_def_n_proc", "1")
    env.setdefault("nnUNet_compile", "f")
    env["nnUNet_n_proc_DA"] = str(n_proc_da)
    env["PYTHONUNBUFFERED"] = "1"  # so progress lines arrive while training runs
    return env


def run(cmd: List[str], env: Dict[str, str], log_path: str,
        echo: Optional[Callable[[str], Optional[str]]] = None) -> float:
    """Run ``cmd``, append its output to ``log_path``, print lines ``echo`` maps to text; returns
    seconds. A failure raises UserInputError naming the log."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        tail: List[str] = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if echo is not None:
                shown = echo(line.rstrip())
                if shown:
                    print(shown, flush=True)
        rc = proc.wait()
    if rc != 0:
        last = " | ".join(l for l in tail if l.strip())[-600:]
        raise UserInputError(f"{os.path.basename(cmd[0])} failed (exit {rc}); full log: {log_path}; last lines: {last}")
    return time.time() - t0


def make_plans_variant(preprocessed_dataset_dir: str, name: str, configuration: str = "3d_fullres",
                       batch_size: Optional[int] = None, features: Optional[List[int]] = None,
                       source: str = "nnUNetPlans") -> str:
    """Copy ``source`` plans as ``name`` with another batch size / CNN widths for ``configuration``.
    The data identifier is kept, so the preprocessed data is shared (nnU-Net's plans-variant idiom)."""
    src = os.path.join(preprocessed_dataset_dir, source + ".json")
    with open(src) as f:
        plans = json.load(f)
    plans["plans_name"] = name
    cfg = plans["configurations"][configuration]
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    if features is not None:
        n = cfg["architecture"]["arch_kwargs"]["n_stages"]
        cfg["architecture"]["arch_kwargs"]["features_per_stage"] = [features[min(i, len(features) - 1)] for i in range(n)]
    dst = os.path.join(preprocessed_dataset_dir, name + ".json")
    with open(dst, "w") as f:
        json.dump(plans, f, indent=2)
    return dst


def epoch_echo(prefix: str = "    ") -> Callable[[str], Optional[str]]:
    """Shows nnU-Net's per-epoch lines, nothing else."""
    keys = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "Epoch time", "Mean Validation Dice",
            "Pretrained weights", "  ViT encoder", "  CNN encoder", "  CNN decoder", "  fresh")

    def f(line: str) -> Optional[str]:
        text = line.split(": ", 1)[-1] if line[:4].isdigit() else line
        return prefix + text if any(text.startswith(k) for k in keys) else None
    return f
