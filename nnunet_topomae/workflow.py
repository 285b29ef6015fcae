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


# --- a CPU plans variant for any dataset: coarser target spacing where nnU-Net's patch is large -------------------

CPU_PATCH_VOXELS = 40 * 56 * 40  # Hippocampus's default 3d_fullres patch (89,600 voxels): the CPU budget
CPU_PATCH_TOLERANCE = 1.5  # a default patch up to 1.5x the budget is kept as nnU-Net planned it


def nnunet_patch_size(spacing, median_shape) -> List[int]:
    """The 3d patch nnU-Net's ExperimentPlanner gives a target ``spacing`` and the median image shape at that
    spacing, before its GPU-memory loop (which only ever shrinks it): the isotropic-in-mm start scaled to 256^3,
    clipped to the median shape, padded to what the pooling stages need (``get_pool_and_conv_props``)."""
    import numpy as np
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    tmp = 1 / np.array(spacing, dtype=float)
    initial = [round(i) for i in tmp * (256 ** 3 / np.prod(tmp)) ** (1 / 3)]
    initial = np.array([min(i, max(1, int(round(j)))) for i, j in zip(initial, median_shape)])
    patch = get_pool_and_conv_props(list(spacing), initial, 4, 999999)[3]
    return [int(i) for i in patch]


def cpu_target_spacing(spacing, median_shape, patch_size, budget: int = CPU_PATCH_VOXELS,
                       tolerance: float = CPU_PATCH_TOLERANCE, step: float = 1.03,
                       median_shape_at: Optional[Callable] = None, decimals: int = 4):
    """Target spacing (plans' axis order) whose nnU-Net patch fits ``budget`` voxels.

    Returns ``(spacing, patch, changed)``. A default patch (``patch_size`` at ``spacing``) of at most
    ``tolerance * budget`` voxels is kept (``changed`` False). Otherwise the spacing is coarsened the way
    nnU-Net's planner coarsens for its 3d_lowres configuration: by ``step`` at a time, first the fine axes
    (those more than 2x finer than the coarsest; e.g. the in-plane axes of thick-slice MRI), all axes once they
    are within 2x, until nnU-Net's patch at that spacing (``nnunet_patch_size``) has at most ``budget`` voxels.
    ``median_shape_at(spacing)`` gives the median image shape at a spacing (default: ``median_shape`` scaled)."""
    import numpy as np
    s0 = np.array(spacing, dtype=float)
    if np.prod(patch_size, dtype=np.float64) <= tolerance * budget:
        return [float(i) for i in s0], [int(i) for i in patch_size], False
    shape_at = median_shape_at or (lambda s: np.array(median_shape, dtype=float) * s0 / np.array(s))
    s = s0.copy()
    for _ in range(2000):
        fine = s.max() / s > 2
        s = np.where(fine, s * step, s) if fine.any() else s * step
        s_r = np.round(s, decimals)
        p = nnunet_patch_size(s_r, shape_at(s_r))
        if np.prod(p, dtype=np.float64) <= budget:
            return [float(i) for i in s_r], p, True
    raise RuntimeError(f"no target spacing gives a patch of at most {budget} voxels (last {list(s)})")


def median_shape_from_fingerprint(fingerprint: dict, transpose_forward: List[int]) -> Callable:
    """``median_shape_at(spacing)`` as nnU-Net's planner computes it: the median over cases of each case's
    cropped shape resampled to ``spacing`` (given in the plans' transposed axis order)."""
    import numpy as np
    shapes = np.array(fingerprint["shapes_after_crop"], dtype=float)
    spacings = np.array(fingerprint["spacings"], dtype=float)
    back = np.argsort(transpose_forward)

    def at(spacing_transposed):
        target = np.array(spacing_transposed, dtype=float)[back]
        new = np.round(shapes * spacings / target[None])
        return np.median(new, 0)[list(transpose_forward)]
    return at
