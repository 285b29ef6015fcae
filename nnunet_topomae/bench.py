"""``nnunet-topomae bench``: measuring tools.

``bench step``  median and spread of one training step of any nnU-Net trainer (ours or nnU-Net's),
    on real batches from the trainer's own data loader, the data-loading wait and the train step
    reported separately, plus peak memory. Every trainer is measured in its own subprocess
    (``python -m nnunet_topomae.bench _step ...``) whose ``nnUNet_results`` is a temporary folder, so
    the user's results are never touched; ``nnUNet_raw``, ``nnUNet_preprocessed``,
    ``nnUNet_n_proc_DA`` and ``nnUNet_extTrainer`` are kept as the user has them (plus this package's
    trainer folder). ``--compare`` measures more trainers with the same settings in the same run and
    prints ratios.

``bench topo``  the topological loss's cost per training step on synthetic smooth volumes, through the
    real ``TopologicalLoss`` code paths, split into the inputs' persistence (data-loading workers, off
    the critical path), the reconstructions' persistence (serial and in the persistent process pool),
    matching + gather + backward, and what remains on the critical path. ``--sweep`` adds persistence
    time against resolution and critical path against batch size.

``--json`` prints one JSON object (headline keys ``step_s_median`` and ``critical_path_ms_median``);
progress then goes to stderr so that stdout is only the JSON.

This module is imported when the CLI's parser is built: keep heavy imports inside functions.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from nnunet_topomae.errors import UserInputError

CHILD_USER_ERROR = 3  # exit code of the measuring subprocess when it recorded a user error
DEFAULT_STEPS = 20
DEFAULT_WARMUP = 3
SWEEP_SIZES = (16, 24, 32, 48, 64, 96, 128)
SWEEP_BATCHES = (1, 2, 4, 8)


# ====================================================================== parser
def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure training step time and the topological loss's cost",
                       description="Measuring tools. 'bench step': a training step of nnU-Net trainers on "
                                   "real data; 'bench topo': the topological loss's cost per step.")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])
    bsub = p.add_subparsers(dest="bench_command")

    s = bsub.add_parser(
        "step", help="time a training step (data wait and train step separately) of one or more trainers",
        description="Times next(trainer.dataloader_train) and trainer.train_step(batch) separately for "
                    "--warmup + --steps steps of nnU-Net's fold 0, building the trainer exactly as "
                    "nnUNetv2_train does. Each trainer runs in its own subprocess with a temporary "
                    "nnUNet_results (your results folder is not touched; no checkpoint is written). "
                    "nnUNet_raw, nnUNet_preprocessed, nnUNet_n_proc_DA and nnUNet_extTrainer are used as "
                    "set in your shell (like nnUNetv2_train, nnU-Net writes splits_final.json into the "
                    "preprocessed dataset folder if it is missing). Timings on a shared machine are noisy: compare trainers measured in "
                    "the same run (--compare).")
    s.add_argument("-d", "--dataset", required=True, help="dataset name or ID, e.g. 901 or Dataset901_Synth")
    s.add_argument("-c", "--configuration", required=True, help="configuration, e.g. 3d_fullres")
    s.add_argument("-tr", "--trainer", required=True, help="trainer class name, e.g. nnUNetTrainerTopoMAEPretrain")
    s.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    s.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"measured steps (default {DEFAULT_STEPS})")
    s.add_argument("--warmup", type=_non_negative_int, default=DEFAULT_WARMUP,
                   help=f"untimed steps first (default {DEFAULT_WARMUP}; more with torch.compile, which nnU-Net "
                        f"enables on CUDA unless nnUNet_compile=f)")
    s.add_argument("--device", default=None, choices=["cpu", "cuda", "mps"],
                   help="device (default: cuda if available, else cpu)")
    s.add_argument("--compare", nargs="+", default=[], metavar="TRAINER",
                   help="more trainers, measured after the first one with the same settings; "
                        "ratios are printed relative to the first")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    s.add_argument("--keep", action="store_true",
                   help="keep the temporary folder (nnU-Net's output and the subprocess log)")
    s.set_defaults(handler=cmd_step)

    t = bsub.add_parser(
        "topo", help="the topological loss's cost per step, split into its parts",
        description="Times the topological loss's parts on synthetic smooth volumes (Gaussian-smoothed noise, "
                    "fixed seed) with the real TopologicalLoss code: the inputs' persistence (computed in "
                    "nnU-Net's data-loading workers during training, so not on the critical path), the "
                    "reconstructions' persistence (serial and in the persistent process pool), matching + "
                    "gather + backward, and the critical path: the wall time of per_volume + backward with "
                    "the inputs precomputed and the pool used, as the training step waits for it.")
    t.add_argument("--patch", nargs=3, type=_positive_int, default=[128, 128, 128], metavar=("Z", "Y", "X"),
                   help="patch size (default 128 128 128)")
    t.add_argument("--batch", type=_positive_int, default=2, help="batch size (default 2)")
    t.add_argument("--max-size", type=_positive_int, default=32,
                   help="volumes are average-pooled to at most this many voxels per axis (default 32)")
    t.add_argument("--max-voxels", type=_non_negative_int, default=12288,
                   help="voxel budget of the reduced volume (default 12288, the trainer's topo_max_voxels; 0: none)")
    t.add_argument("--max-pairs", type=_non_negative_int, default=64,
                   help="most persistent pairs per dimension kept (default 64; 0: all)")
    t.add_argument("--pair-mass", type=float, default=None,
                   help="pair budget by persistence mass: the fewest points carrying this fraction of the squared "
                        "persistence (default: none, the count --max-pairs only; the trainer's topo_pair_mass)")
    t.add_argument("--tail", default="drop", choices=["drop", "diagonal"],
                   help="points outside the pair budget dropped or matched to the diagonal (default drop; the "
                        "trainer's topo_tail)")
    t.add_argument("--backend", default="gudhi", choices=["gudhi", "cripser"],
                   help="persistence backend (default gudhi; cripser is an optional GPL-3.0 extra)")
    t.add_argument("--workers", type=_non_negative_int, default=None,
                   help="processes of the persistence pool (default: as the TopoMAE trainer, one per "
                        "reconstruction within half the cores, at least 2; 0: serial)")
    t.add_argument("--branches", type=_positive_int, default=2,
                   help="reconstructions per sample (default 2: ViT and CNN, as TopoMAE)")
    t.add_argument("--repeats", type=_positive_int, default=10, help="timed repeats (default 10)")
    t.add_argument("--seed", type=int, default=0, help="seed of the synthetic volumes (default 0)")
    t.add_argument("--malloc-default", action="store_true",
                   help="keep glibc's default malloc thresholds; without it the benchmark keeps freed memory, "
                        "as the TopoMAE trainer does (malloc_keep_freed)")
    t.add_argument("--sweep", action="store_true",
                   help=f"also: persistence time per volume against resolution {', '.join(f'{s}^3' for s in SWEEP_SIZES)} "
                        f"(no reduction, every available backend) and critical path against batch size "
                        f"{', '.join(map(str, SWEEP_BATCHES))} at --patch")
    t.add_argument("--sweep-sizes", nargs="+", type=_positive_int, default=list(SWEEP_SIZES), metavar="N",
                   help="resolutions of --sweep (edge length of a cube)")
    t.add_argument("--sweep-budget", type=float, default=20.0,
                   help="seconds per resolution and backend of --sweep: fewer repeats for large volumes (default 20)")
    t.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    t.set_defaults(handler=cmd_topo)


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


# ====================================================================== shared helpers
def _stats(values: Sequence[float]) -> Dict[str, float]:
    import numpy as np
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "p10": float(np.percentile(a, 10)), "p90": float(np.percentile(a, 90)),
            "min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "n": int(len(a))}


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    try:
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover
        pass
    from importlib import metadata
    for pkg in ("nnunetv2", "gudhi", "cripser"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return info


def _progress(args, text: str) -> None:
    """Progress lines: stdout for the table, stderr with --json (stdout is only the JSON)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


# ====================================================================== bench step (parent)
def resolve_dataset(value: str, preprocessed: str) -> str:
    """Dataset name in ``preprocessed`` for a name or ID, or a one-line UserInputError."""
    present = sorted(d for d in os.listdir(preprocessed)
                     if d.startswith("Dataset") and os.path.isdir(os.path.join(preprocessed, d)))
    hint = f"datasets there: {', '.join(present) if present else 'none'}"
    if value.startswith("Dataset"):
        if value in present:
            return value
        raise UserInputError(f"dataset {value} is not in nnUNet_preprocessed={preprocessed} ({hint}); "
                             f"preprocess it first: nnUNetv2_plan_and_preprocess -d <ID>")
    try:
        ident = int(value)
    except ValueError:
        raise UserInputError(f"-d must be a dataset ID (e.g. 901) or a name like Dataset901_Name, got {value!r}") from None
    found = [d for d in present if d.startswith(f"Dataset{ident:03d}_")]
    if not found:
        raise UserInputError(f"no dataset with ID {ident} in nnUNet_preprocessed={preprocessed} ({hint}); "
                             f"preprocess it first: nnUNetv2_plan_and_preprocess -d {ident}")
    if len(found) > 1:
        raise UserInputError(f"dataset ID {ident} is ambiguous in nnUNet_preprocessed={preprocessed}: "
                             f"{', '.join(found)}; pass the full name with -d")
    return found[0]


def validate_step_args(args, environ: Optional[Dict[str, str]] = None) -> dict:
    """Checks everything that can be checked without nnU-Net's trainer lookup; returns what it found.
    Each problem is a one-line UserInputError."""
    environ = os.environ if environ is None else environ
    pre = environ.get("nnUNet_preprocessed")
    if not pre:
        raise UserInputError("nnUNet_preprocessed is not set -> export nnUNet_preprocessed=/path/to/nnUNet_preprocessed")
    if not os.path.isdir(pre):
        raise UserInputError(f"nnUNet_preprocessed={pre} does not exist")
    dataset = resolve_dataset(str(args.dataset), pre)
    ds_dir = os.path.join(pre, dataset)
    plans_file = os.path.join(ds_dir, args.plans + ".json")
    if not os.path.isfile(plans_file):
        skip = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}
        plans = sorted(f[:-5] for f in os.listdir(ds_dir) if f.endswith(".json") and f not in skip)
        raise UserInputError(f"no plans {args.plans!r} for {dataset} (no {plans_file}); "
                             f"plans there: {', '.join(plans) if plans else 'none'}")
    try:
        with open(plans_file) as f:
            plans = json.load(f)
        configurations = plans["configurations"]
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"{plans_file} is not an nnU-Net plans file ({e})") from None
    if args.configuration not in configurations:
        raise UserInputError(f"configuration {args.configuration!r} is not in plans {args.plans} of {dataset}; "
                             f"available: {', '.join(configurations)}")
    data_dir = os.path.join(ds_dir, str(_config_value(configurations, args.configuration, "data_identifier")))
    if not os.path.isdir(data_dir):
        raise UserInputError(f"configuration {args.configuration} of {dataset} is not preprocessed (no {data_dir}); "
                             f"run nnUNetv2_preprocess -d {dataset} -c {args.configuration} -plans_name {args.plans}")
    device = args.device or _default_device()
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda, but torch sees no CUDA device; use --device cpu")
    elif device == "mps":
        import torch
        if not torch.backends.mps.is_available():
            raise UserInputError("--device mps, but torch reports MPS as unavailable; use --device cpu")
    return {"dataset": dataset, "plans_file": plans_file, "device": device, "preprocessed": pre}


def _config_value(configurations: dict, name: str, key: str):
    """``key`` of a configuration, following ``inherits_from`` as nnU-Net's PlansManager does."""
    seen = set()
    while name is not None and name not in seen and name in configurations:
        seen.add(name)
        if key in configurations[name]:
            return configurations[name][key]
        name = configurations[name].get("inherits_from")
    return None


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def step_env(results_dir: str, environ: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of the measuring subprocess: the user's, with nnUNet_results replaced by
    ``results_dir`` and this package's trainer folder added to nnUNet_extTrainer. nnUNet_raw,
    nnUNet_preprocessed, nnUNet_n_proc_DA (unset: nnU-Net's default) and nnUNet_compile are untouched."""
    from nnunet_topomae.utils.ext_trainer import ext_trainer_value
    env = dict(os.environ if environ is None else environ)
    env["nnUNet_results"] = results_dir
    env["nnUNet_extTrainer"] = ext_trainer_value(env.get("nnUNet_extTrainer"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _child_cmd(args, info: dict, trainer: str, result_file: str, check: Sequence[str]) -> List[str]:
    cmd = [sys.executable, "-m", "nnunet_topomae.bench", "_step", "--dataset", info["dataset"],
           "--configuration", args.configuration, "--trainer", trainer, "--plans", args.plans,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", info["device"],
           "--result", result_file]
    if check:
        cmd += ["--check-trainers", *check]
    return cmd


def _run_child(cmd: List[str], env: Dict[str, str], cwd: str, log_path: str, result_file: str, echo) -> dict:
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        tail: List[str] = []
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-12:]
            if line.startswith("bench: "):
                echo("    " + line[len("bench: "):].rstrip())
        rc = proc.wait()
    result = None
    if os.path.isfile(result_file):
        with open(result_file) as f:
            result = json.load(f)
    if result is not None and "error" in result:
        where = "" if rc == CHILD_USER_ERROR else f" (full log: {log_path})"
        raise UserInputError(f"bench step: {result['error']}{where}")
    if rc != 0 or result is None:
        last = " | ".join(l for l in tail if l.strip())[-600:]
        raise UserInputError(f"bench step: the measuring subprocess failed (exit {rc}); full log: {log_path}; "
                             f"last lines: {last}")
    return result


def cmd_step(args) -> int:
    info = validate_step_args(args)
    trainers = [args.trainer] + list(args.compare)
    tmp = tempfile.mkdtemp(prefix="nnunet_topomae_bench_")
    results_dir = os.path.join(tmp, "nnUNet_results")
    os.makedirs(results_dir)
    log_path = os.path.join(tmp, "bench_step_log.txt")
    env = step_env(results_dir)
    echo = lambda text: _progress(args, text)  # noqa: E731
    n_proc = env.get("nnUNet_n_proc_DA")
    echo(f"bench step: {info['dataset']} {args.configuration} (plans {args.plans}), device {info['device']}, "
         f"{args.warmup} warm-up + {args.steps} timed steps, nnUNet_n_proc_DA="
         f"{n_proc if n_proc is not None else 'unset (nnU-Net default)'}; temporary nnUNet_results {results_dir}")
    results = []
    ok = False
    try:
        for i, trainer in enumerate(trainers):
            echo(f"[{i + 1}/{len(trainers)}] {trainer}")
            result_file = os.path.join(tmp, f"result_{i}.json")
            # the first subprocess also checks that nnU-Net finds every trainer, before anything is measured
            cmd = _child_cmd(args, info, trainer, result_file, trainers if i == 0 else [])
            results.append(_run_child(cmd, env, tmp, log_path, result_file, echo))
        ok = True
    finally:
        if args.keep:
            echo(f"kept {tmp}")
        elif ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # keep the log for the error message, drop nnU-Net's output
            shutil.rmtree(results_dir, ignore_errors=True)
    report = step_report(results)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_step_table(report))
    return 0


def step_report(results: List[dict]) -> dict:
    """One JSON object: the first trainer's figures at the top level, every run under ``runs``, and the
    ratios of the train-step medians (``ratios_to_first``: other / first; ``ratio_matrix[a][b]``: a / b)
    and of the totals, data wait + train step (``total_ratios_to_first``, ``total_ratio_matrix``). A
    trainer that moves work into the data-loading workers can shorten its train step and make the
    step wait for data instead; the totals' ratios count both."""
    first = results[0]
    report = dict(first)
    report["runs"] = results
    for prefix, key in (("", "step_s_median"), ("total_", "total_s_median")):
        report[f"{prefix}ratios_to_first"] = {r["trainer"]: r[key] / first[key] for r in results[1:]}
        if len(results) > 1:
            report[f"{prefix}ratio_matrix"] = {a["trainer"]: {b["trainer"]: a[key] / b[key] for b in results}
                                               for a in results}
    report["machine"] = machine_info() | first.get("machine", {})
    return report


def _spread(prefix: str, r: dict) -> str:
    if r["steps"] >= 10:
        lo, hi = r[f"{prefix}_p10"], r[f"{prefix}_p90"]
    else:
        lo, hi = r[f"{prefix}_min"], r[f"{prefix}_max"]
    return f"{r[f'{prefix}_median']:.3f} [{lo:.3f}-{hi:.3f}]"


def format_step_table(report: dict) -> str:
    runs = report["runs"]
    first = runs[0]
    spread = "p10-p90" if first["steps"] >= 10 else "min-max"
    lines = [
        "",
        f"{first['dataset']} {first['configuration']} plans {first['plans']}, device {first['device']}, "
        f"batch {first['batch_size']}, patch {'x'.join(map(str, first['patch_size']))}, "
        f"{first['steps']} steps after {first['warmup']} warm-up, data-loading processes {first['n_proc_DA']}",
        f"seconds: median [{spread}]; train step = trainer.train_step(batch) (forward, loss, backward, optimiser); "
        f"data wait = next(dataloader_train); step CPU = median CPU time of the training process in train_step "
        f"(all its threads, not the worker processes)",
    ]
    w = max(len(r["trainer"]) for r in runs) + 2
    head = (f"{'trainer':{w}s}{'train step s':>24s}{'data wait s':>24s}{'total s':>24s}{'step CPU s':>12s}"
            f"{'peak MB':>10s}{'total x first':>15s}")
    lines += ["", head, "-" * len(head)]
    for r in runs:
        ratio = r["total_s_median"] / first["total_s_median"]
        lines.append(f"{r['trainer']:{w}s}{_spread('step_s', r):>24s}{_spread('data_wait_s', r):>24s}"
                     f"{_spread('total_s', r):>24s}{r.get('step_cpu_s_median', float('nan')):>12.3f}"
                     f"{r['peak_memory_mb']:>10.0f}{ratio:>14.2f}x")
    lines.append(f"peak MB: {first['peak_memory_kind']}. Worker processes' own peak RSS (VmHWM; forked "
                 f"data-loading workers share most pages with the training process, do not add up):")
    for r in runs:
        peaks = r.get("worker_peak_rss_mb") or []
        lines.append(f"  {r['trainer']}: " + (", ".join(f"{v:.0f}" for v in peaks) if peaks else "none / not on Linux"))
    if len(runs) > 2:
        names = [r["trainer"] for r in runs]
        short = [f"#{i + 1}" for i in range(len(runs))]
        lines += ["", "ratios of the totals, data wait + train step (row / column):",
                  " " * 6 + "".join(f"{s:>8s}" for s in short)]
        for i, a in enumerate(names):
            lines.append(f"{short[i]:6s}" + "".join(f"{report['total_ratio_matrix'][a][b]:>8.2f}" for b in names)
                         + f"   {a}")
    m = report["machine"]
    lines += ["", f"machine: {m.get('cpu_count')} CPUs ({m.get('cpu_model', 'unknown model')}), torch {m.get('torch')}, "
                  f"{m.get('torch_threads')} torch threads, load average {m.get('load_average_1min', '?')} "
                  f"(timings on a shared machine are noisy)"]
    return "\n".join(lines)


# ====================================================================== bench step (subprocess)
def _child_main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnunet_topomae.bench _step")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--configuration", required=True)
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--plans", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--check-trainers", nargs="*", default=[])
    args = ap.parse_args(argv)
    code = 0
    try:
        result = measure_steps(args)
    except UserInputError as e:
        result, code = {"error": e.message}, CHILD_USER_ERROR
    except BaseException as e:  # noqa: BLE001 - reported to the parent, traceback in the log
        import traceback
        traceback.print_exc()
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        result, code = {"error": f"{args.trainer}: {type(e).__name__}: {first_line}"}, 1
    with open(args.result, "w") as f:
        json.dump(result, f, indent=2)
    sys.stdout.flush()
    return code


def _find_trainer(name: str):
    import contextlib
    import io
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return recursive_find_trainer_class_by_name(name)
    except (RuntimeError, AssertionError) as e:
        first = (str(e).splitlines() or [""])[0]
        if "Could not find" in first:
            raise UserInputError(f"nnU-Net cannot find trainer {name!r}: check the name, or add its folder to "
                                 f"nnUNet_extTrainer (nnunet-topomae's own trainers are found automatically)") from None
        raise UserInputError(f"trainer {name!r}: {first[:200]}") from None


def _peak_rss_mb() -> float:
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0  # bytes on macOS, KiB elsewhere


def _worker_peaks_mb() -> List[float]:
    """Peak RSS (VmHWM, Linux) of each live worker process (data loading, persistence pool).
    Not RUSAGE_CHILDREN: Linux carries the parent's peak into a child at fork/exec, so it reports the
    training process's own peak again."""
    import multiprocessing
    out = []
    for proc in multiprocessing.active_children():
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            continue
        out.append(kb / 1024.0)
    return sorted(out, reverse=True)


def _shutdown(trainer) -> None:
    """Data loaders as nnUNetTrainer.on_train_end shuts them down (quietly), persistence pools; no checkpoint."""
    import contextlib
    import io
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    with contextlib.redirect_stdout(io.StringIO()):
        for dl in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
            if isinstance(dl, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
                dl._finish()
    import torch
    from nnunet_topomae.losses.topological import TopologicalLoss
    loss = getattr(trainer, "loss", None)
    if isinstance(loss, torch.nn.Module):
        for m in loss.modules():
            if isinstance(m, TopologicalLoss) and m._pool is not None:
                m._pool.executor.shutdown(wait=True, cancel_futures=True)
                m._pool = None


def measure_steps(args) -> dict:
    import multiprocessing

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    for name in args.check_trainers or [args.trainer]:
        _find_trainer(name)
    # thread settings of nnUNetv2_train (run_training_entry)
    if args.device == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    print(f"bench: building {args.trainer} (nnU-Net's get_trainer_from_args, fold 0) and its data loaders", flush=True)
    t0 = time.perf_counter()
    trainer = get_trainer_from_args(args.dataset, args.configuration, 0, args.trainer, args.plans, device=device)
    trainer.on_train_start()
    setup_s = time.perf_counter() - t0
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if cuda:
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    waits, steps, cpus = [], [], []
    try:
        trainer.on_train_epoch_start()  # network.train(), learning rate of epoch 0
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            batch = next(trainer.dataloader_train)
            t1, c1 = time.perf_counter(), time.process_time()
            trainer.train_step(batch)
            sync()
            t2, c2 = time.perf_counter(), time.process_time()
            timed = i >= args.warmup
            if timed:
                waits.append(t1 - t0)
                steps.append(t2 - t1)
                cpus.append(c2 - c1)
            label = f"step {i - args.warmup + 1}/{args.steps}" if timed else f"warm-up {i + 1}/{args.warmup}"
            print(f"bench: {label}: data wait {t1 - t0:.3f} s, train step {t2 - t1:.3f} s", flush=True)
        n_proc = get_allowed_n_proc_DA()
        result = {
            "benchmark": "step",
            "trainer": args.trainer,
            "trainer_module": type(trainer).__module__,
            "dataset": args.dataset,
            "configuration": args.configuration,
            "plans": args.plans,
            "fold": 0,
            "device": args.device,
            "batch_size": int(trainer.batch_size),
            "patch_size": [int(s) for s in trainer.configuration_manager.patch_size],
            "steps": args.steps,
            "warmup": args.warmup,
            "n_proc_DA": n_proc,
            "data_loader": type(trainer.dataloader_train).__name__,
            "setup_s": setup_s,
        }
        totals = [a + b for a, b in zip(waits, steps)]
        # step_cpu_s: CPU time of the training process's threads during train_step (not its workers'):
        # less sensitive than wall time to other jobs on a shared machine
        for key, values in (("step_s", steps), ("data_wait_s", waits), ("total_s", totals), ("step_cpu_s", cpus)):
            for stat, v in _stats(values).items():
                if stat != "n":
                    result[f"{key}_{stat}"] = v
            result[key] = values
        result["peak_rss_mb"] = _peak_rss_mb()
        result["worker_peak_rss_mb"] = _worker_peaks_mb()
        if cuda:
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            result["peak_memory_kind"] = "torch.cuda.max_memory_allocated during the steps"
        else:
            result["peak_memory_mb"] = result["peak_rss_mb"]
            result["peak_memory_kind"] = "ru_maxrss (RUSAGE_SELF) of the training process"
    finally:
        _shutdown(trainer)
    result["machine"] = machine_info()
    return result


# ====================================================================== bench topo
def synthetic_volumes(batch: int, patch: Sequence[int], branches: int, seed: int = 0):
    """(image, [reconstruction per branch]) as float32 torch tensors (B, 1, *patch): smooth Gaussian
    noise, standardised; each reconstruction is the image plus its own smooth perturbation."""
    import numpy as np
    import torch
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    sigma = max(1.0, min(patch) / 16.0)

    def smooth(s):
        x = gaussian_filter(rng.standard_normal((batch, 1, *patch)).astype(np.float32), sigma=(0, 0, s, s, s))
        return (x - x.mean()) / (x.std() + 1e-8)

    image = smooth(sigma)
    recons = [torch.from_numpy(image + 0.3 * smooth(sigma / 2)) for _ in range(branches)]
    return torch.from_numpy(image), recons


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class _TopoBench:
    """Every part of the topological loss's cost for one (batch, patch) setting."""

    def __init__(self, args, batch: int, pool=None):
        import torch
        from nnunet_topomae.losses.topological import TopologicalLoss
        self.args, self.batch, self.dims = args, batch, (0, 1, 2)
        self.max_pairs = args.max_pairs or None
        self.max_voxels = args.max_voxels or None
        self.image, self.recons = synthetic_volumes(batch, args.patch, args.branches, args.seed)
        self.n = len(self.recons)
        self.reduced_shape = list(self._reduce(self.image[:1]).shape[2:])
        self.pool = pool
        kw = dict(max_size=args.max_size, max_voxels=self.max_voxels, dims=self.dims, max_pairs=self.max_pairs,
                  backend=args.backend, pair_mass=getattr(args, "pair_mass", None), tail=getattr(args, "tail", "drop"))
        self.loss_pool = TopologicalLoss(workers=args.workers, **kw)
        self.loss_pool._pool = pool  # share the started pool: its start-up is timed separately
        self.loss_serial = TopologicalLoss(workers=0, **kw)
        self.leaves = [r.clone().requires_grad_(True) for r in self.recons]
        self.input_fn = None
        self.target_pairs = None
        self.recon_volumes = None
        self.recon_pairs = None
        self._torch = torch

    def _reduce(self, x):
        """The reduced copy the loss computes persistence on (same settings as the loss itself)."""
        from nnunet_topomae.losses.topological import reduce_volume
        return reduce_volume(x, self.args.max_size, self.max_voxels)

    # (a) inputs' persistence: InputPersistence per sample, as in the data-loading workers
    def inputs(self) -> float:
        fn = self.loss_serial.input_persistence()
        t0 = time.perf_counter()
        self.target_pairs = [fn(self.image[i].numpy()) for i in range(self.batch)]
        return _ms(t0)

    def _recon_volumes(self):
        import numpy as np
        recon = self._reduce(self._torch.cat(self.recons).float())
        arr = recon.numpy().astype(np.float64)
        return [arr[i, j] for i in range(arr.shape[0]) for j in range(arr.shape[1])]

    # (b) reconstructions' persistence, serial and in the pool
    def recon_serial(self) -> float:
        from nnunet_topomae.losses.topological import persistence_pairs
        vols = self.recon_volumes = self.recon_volumes or self._recon_volumes()
        t0 = time.perf_counter()
        self.recon_pairs = [persistence_pairs(v, self.dims, self.max_pairs, self.args.backend,
                                              getattr(self.args, "pair_mass", None)) for v in vols]
        return _ms(t0)

    def recon_pool(self) -> Optional[float]:
        if self.pool is None:
            return None
        vols = self.recon_volumes = self.recon_volumes or self._recon_volumes()
        t0 = time.perf_counter()
        self.pool.map(vols)
        return _ms(t0)

    # (c) matching + gather + backward with both pair sets given
    def matching(self) -> float:
        import numpy as np
        from nnunet_topomae.losses.topological import topological_loss_batch
        torch = self._torch
        recon = self._reduce(torch.cat(self.recons).float()).requires_grad_(True)
        target = self._reduce(torch.cat([self.image] * self.n)).numpy().astype(np.float64)
        t_pairs = list(self.target_pairs) * self.n
        b, c = recon.shape[:2]
        t0 = time.perf_counter()
        loss = topological_loss_batch(recon.reshape(b * c, *recon.shape[2:]), target.reshape(b * c, *target.shape[2:]),
                                      self.recon_pairs, [t_pairs[i][j] for i in range(b) for j in range(c)], self.dims,
                                      getattr(self.args, "tail", "drop"))
        loss.mean().backward()
        return _ms(t0)

    # (d) the critical path: what TopoMAELoss does on the training step, + backward
    def critical(self, loss, precomputed: bool = True) -> float:
        torch = self._torch
        for leaf in self.leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        per = loss.per_volume(torch.cat(self.leaves), torch.cat([self.image] * self.n),
                              list(self.target_pairs) * self.n if precomputed else None)
        per.mean().backward()
        return _ms(t0)

    def run(self, repeats: int, full: bool = True) -> Dict[str, List[float]]:
        """One untimed round, then ``repeats`` rounds; parts interleaved so that noise hits them alike."""
        parts: Dict[str, List[float]] = {}
        for r in range(repeats + 1):
            got = {"critical_path_ms": None}
            got["inputs_persistence_ms"] = self.inputs()
            if full:
                got["recon_persistence_serial_ms"] = self.recon_serial()
                got["recon_persistence_pool_ms"] = self.recon_pool()
                got["matching_backward_ms"] = self.matching()
                got["critical_path_serial_ms"] = self.critical(self.loss_serial)
                got["critical_path_inputs_on_step_ms"] = self.critical(self.loss_pool, precomputed=False)
            got["critical_path_ms"] = self.critical(self.loss_pool)
            if full:  # per round, so that the remainder's spread is its own
                ph = got["recon_persistence_pool_ms"] or got["recon_persistence_serial_ms"]
                got["critical_path_other_ms"] = got["critical_path_ms"] - ph - got["matching_backward_ms"]
            if r == 0:
                continue
            for k, v in got.items():
                if v is not None:
                    parts.setdefault(k, []).append(v)
        return parts


def _start_pool(args):
    """A started PersistencePool (None with --workers 0) and its start-up time in ms: spawning the
    processes and their imports, forced by one tiny task per worker."""
    if args.workers == 0:
        return None, None
    import numpy as np
    from nnunet_topomae.losses.topological import PersistencePool
    t0 = time.perf_counter()
    pool = PersistencePool(args.workers, (0, 1, 2), args.max_pairs or None, args.backend, getattr(args, "pair_mass", None))
    pool.map([np.zeros((2, 2, 2))] * args.workers)
    return pool, _ms(t0)


PART_LABELS = [
    ("inputs_persistence_ms", "inputs' persistence (data-loading workers, B samples)", "no"),
    ("recon_persistence_serial_ms", "reconstructions' persistence, serial", "(reference)"),
    ("recon_persistence_pool_ms", "reconstructions' persistence, in the pool", "yes"),
    ("matching_backward_ms", "matching + gather + backward, serial (pool: in its workers)", "yes"),
    ("critical_path_ms", "CRITICAL PATH: per_volume + backward (pool, inputs given)", "= total"),
    ("critical_path_other_ms", "  remainder: reduce, copies, overhead (per-round difference)", "yes"),
    ("critical_path_serial_ms", "critical path without the pool (workers=0)", "(reference)"),
    ("critical_path_inputs_on_step_ms", "critical path if the inputs' persistence were on the step", "(reference)"),
]


def measure_topo(args) -> dict:
    from nnunet_topomae.losses.topological import require_backend
    from nnunet_topomae.utils.memory import keep_freed_memory
    require_backend(args.backend)
    kept = False if args.malloc_default else keep_freed_memory()
    pool, startup = _start_pool(args)
    try:
        bench = _TopoBench(args, args.batch, pool)
        parts = bench.run(args.repeats)
        report = {
            "benchmark": "topo",
            "patch": list(args.patch), "batch": args.batch, "branches": args.branches,
            "volumes_per_step": args.batch * args.branches, "reduced_shape": bench.reduced_shape,
            "max_size": args.max_size, "max_voxels": args.max_voxels, "max_pairs": args.max_pairs, "backend": args.backend,
            "pair_mass": getattr(args, "pair_mass", None), "tail": getattr(args, "tail", "drop"),
            "workers": args.workers, "repeats": args.repeats, "seed": args.seed,
            "malloc_keep_freed": kept, "pool_startup_ms": startup,
            "parts": {k: _stats(v) for k, v in parts.items()},
        }
        for k, v in report["parts"].items():
            report[f"{k}_median"] = v["median"]
        report["on_critical_path"] = {k: lab for k, _, lab in PART_LABELS}
        if args.sweep:
            report["sweep"] = topo_sweep(args, pool)
    finally:
        if pool is not None:
            pool.executor.shutdown(wait=True, cancel_futures=True)
    report["machine"] = machine_info()
    return report


def topo_sweep(args, pool) -> dict:
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from nnunet_topomae.losses.topological import available_backends, persistence_pairs
    res = []
    for size in args.sweep_sizes:
        rng = np.random.default_rng(args.seed)
        vol = gaussian_filter(rng.standard_normal((size,) * 3), sigma=max(1.0, size / 16.0))
        for backend in available_backends():
            times = []
            spent = time.perf_counter()
            while len(times) < args.repeats and (not times or time.perf_counter() - spent < args.sweep_budget):
                t0 = time.perf_counter()
                persistence_pairs(vol, (0, 1, 2), args.max_pairs or None, backend)
                times.append(_ms(t0))
            res.append({"size": size, "backend": backend, "voxels": size ** 3, **{f"ms_{k}": v for k, v in _stats(times).items()}})
            _progress(args, f"  sweep: {size}^3 {backend}: {np.median(times):.1f} ms per volume ({len(times)} runs)")
    batches = sorted(set(SWEEP_BATCHES) | {args.batch})
    crit = []
    for b in batches:
        stats = _stats(_TopoBench(args, b, pool).run(args.repeats, full=False)["critical_path_ms"])
        crit.append({"batch": b, "volumes": b * args.branches, **{f"critical_path_ms_{k}": v for k, v in stats.items()}})
        _progress(args, f"  sweep: batch {b}: critical path {stats['median']:.1f} ms")
    return {"ph_vs_resolution": res, "critical_path_vs_batch": crit}


def format_topo_table(report: dict) -> str:
    p = report["parts"]
    lines = [
        "",
        f"topological loss per step: batch {report['batch']} x {report['branches']} branches = "
        f"{report['volumes_per_step']} reconstructions, patch {'x'.join(map(str, report['patch']))} -> reduced "
        f"{'x'.join(map(str, report['reduced_shape']))} (max_size {report['max_size']}, max_voxels "
        f"{report['max_voxels'] or 'none'}), max_pairs {report['max_pairs']}, backend {report['backend']}, "
        f"{report['workers']} pool workers, {report['repeats']} repeats, "
        f"malloc keeps freed memory: {report['malloc_keep_freed']}",
    ]
    head = f"{'part':62s}{'median ms':>11s}{'p10-p90 ms':>18s}  on critical path"
    lines += ["", head, "-" * (len(head) + 2)]
    for key, label, crit in PART_LABELS:
        if key not in p:
            continue
        s = p[key]
        rng = f"{s['p10']:.1f}-{s['p90']:.1f}" if "p10" in s else ""
        lines.append(f"{label:62s}{s['median']:>11.1f}{rng:>18s}  {crit}")
    if report["pool_startup_ms"] is not None:
        lines.append(f"{'pool start-up (once per training, not per step)':62s}{report['pool_startup_ms']:>11.1f}")
    lines.append("critical path = what the training step waits for (the network's own backward not included)")
    sweep = report.get("sweep")
    if sweep:
        backends = sorted({r["backend"] for r in sweep["ph_vs_resolution"]})
        lines += ["", "persistence of one volume, no reduction (ms, median):",
                  f"{'size':>8s}" + "".join(f"{b:>12s}" for b in backends)]
        for size in sorted({r["size"] for r in sweep["ph_vs_resolution"]}):
            row = {r["backend"]: r["ms_median"] for r in sweep["ph_vs_resolution"] if r["size"] == size}
            lines.append(f"{f'{size}^3':>8s}" + "".join(f"{row[b]:>12.1f}" if b in row else f"{'-':>12s}" for b in backends))
        lines += ["", f"critical path against batch size at patch {'x'.join(map(str, report['patch']))} (ms):",
                  f"{'batch':>8s}{'volumes':>9s}{'median':>10s}{'p10-p90':>16s}"]
        for r in sweep["critical_path_vs_batch"]:
            spread = f"{r['critical_path_ms_p10']:.1f}-{r['critical_path_ms_p90']:.1f}"
            lines.append(f"{r['batch']:>8d}{r['volumes']:>9d}{r['critical_path_ms_median']:>10.1f}{spread:>16s}")
    m = report["machine"]
    lines += ["", f"machine: {m.get('cpu_count')} CPUs, torch {m.get('torch')}, gudhi {m.get('gudhi')}, "
                  f"load average {m.get('load_average_1min', '?')} (timings on a shared machine are noisy)"]
    return "\n".join(lines)


# bytes per voxel of each synthetic volume (float32 volume, float64 smoothing buffers, autograd copies);
# a round upper bound, so that a patch far beyond the machine is refused before it is allocated
TOPO_BYTES_PER_VOXEL = 48


def available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def topo_memory_problem(patch, batch: int, branches: int, available: Optional[int]) -> Optional[str]:
    need = math.prod(int(p) for p in patch) * batch * (branches + 1) * TOPO_BYTES_PER_VOXEL
    if available is None or need <= 0.8 * available:
        return None
    return (f"bench topo: --patch {' '.join(map(str, patch))} with --batch {batch} needs about {need / 2**30:.1f} GiB, "
            f"this machine has {available / 2**30:.1f} GiB available; use a smaller --patch or --batch")


def cmd_topo(args) -> int:
    problem = topo_memory_problem(args.patch, args.batch, args.branches, available_memory_bytes())
    if problem:
        raise UserInputError(problem)
    if args.workers is None:
        from nnunet_topomae.losses.topological import default_pool_workers
        args.workers = default_pool_workers(args.batch * args.branches)
    _progress(args, f"bench topo: {args.repeats} repeats after one untimed round"
                    + (f"; starting a pool of {args.workers} persistence processes" if args.workers else ""))
    try:
        report = measure_topo(args)
    except MemoryError:
        raise UserInputError(f"bench topo: out of memory at --patch {' '.join(map(str, args.patch))} --batch {args.batch}; "
                             f"use a smaller --patch or --batch")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_topo_table(report))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        sys.exit(_child_main(sys.argv[2:]))
    from nnunet_topomae.cli import main
    sys.exit(main(["bench", *sys.argv[1:]]))
