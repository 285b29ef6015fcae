"""``nnunet-topomae add-unlabelled``: preprocess an archive of unlabelled images for pretraining.

    nnunet-topomae add-unlabelled -d DATASET -i /archive/images -c 3d_fullres [-p nnUNetPlans] [-np 8]

Each image (nnU-Net naming: ``CASE_XXXX`` + the dataset's file ending, one file per channel) is read by
the plans' reader and preprocessed by the plans' preprocessor class (``run_case_npy``: transpose, crop
to non-zero, normalisation, resampling) and stored by nnU-Net's ``save_case`` with nnU-Net's blosc2
parameters, exactly as ``nnUNetv2_plan_and_preprocess`` stores a training case, into the folder of
``nnunet_topomae.data.unlabelled`` that no nnU-Net command reads.

Archives: a progress bar; ``-np`` worker processes (spawned; each case is read, processed and written
by one worker, so memory does not grow with the number of cases); resumable (a case whose ``.pkl`` is
in place is skipped; a case half-written when the process was killed is redone: its files are written
to ``.partial/`` first and moved in with the ``.pkl`` last); one line per refused image, naming the file
and the fix, while the other cases carry on; a summary line at the end.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

from nnunet_topomae.data.unlabelled import complete_cases, unlabelled_folder
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.utils.files import file_sha256

_worker_cache: Dict[str, object] = {}


def discover(folder: str, file_ending: str, n_channels: int) -> Tuple[Dict[str, List[str]], List[str]]:
    """(case -> channel files in order, refusal lines for files or cases that do not fit)."""
    if not os.path.isdir(folder):
        raise UserInputError(f"add-unlabelled: image folder {folder} does not exist")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    channels: Dict[str, Dict[int, str]] = {}
    refused = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        m = pattern.match(name)
        if m is None:
            refused.append(f"{path}: not named CASE_XXXX{file_ending} (nnU-Net's naming, XXXX the channel); rename it")
            continue
        channels.setdefault(m.group(1), {})[int(m.group(2))] = path
    cases = {}
    for case, ch in sorted(channels.items()):
        if sorted(ch) != list(range(n_channels)):
            want = ", ".join(f"_{i:04d}" for i in range(n_channels))
            have = ", ".join(f"_{i:04d}" for i in sorted(ch))
            refused.append(f"{os.path.join(folder, case)}_*{file_ending}: has channels {have} but the dataset needs "
                           f"{n_channels} ({want}); add or remove files so that it has exactly those")
            continue
        cases[case] = [ch[i] for i in range(n_channels)]
    return cases, refused


def labelled_cases(raw_dataset_folder: Optional[str], preprocessed_data_folder: str, file_ending: str) -> Tuple[set, Dict[str, str]]:
    """(labelled case ids, sha256 of each labelled image's first channel -> case)."""
    ids = set()
    if os.path.isdir(preprocessed_data_folder):
        ids |= {f[:-4] for f in os.listdir(preprocessed_data_folder) if f.endswith(".pkl")}
    hashes = {}
    images = os.path.join(raw_dataset_folder, "imagesTr") if raw_dataset_folder else None
    if images and os.path.isdir(images):
        for f in os.listdir(images):
            if f.endswith("_0000" + file_ending):
                case = f[: -len("_0000" + file_ending)]
                ids.add(case)
                hashes[file_sha256(os.path.join(images, f))] = case
    return ids, hashes


def _context(plans_file: str, dataset_json_file: str, configuration: str):
    key = f"{plans_file}|{configuration}"
    if key not in _worker_cache:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        pm = PlansManager(plans_file)
        cm = pm.get_configuration(configuration)
        _worker_cache[key] = (pm, cm, load_json(dataset_json_file), cm.preprocessor_class(verbose=False))
    return _worker_cache[key]


def process_case(job: tuple) -> Tuple[str, str, str]:
    """(status 'added' | 'refused', case, message). Runs in a worker process."""
    case, files, out_folder, plans_file, dataset_json_file, configuration = job
    import numpy as np
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import comp_blosc2_params
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    pm, cm, dj, preprocessor = _context(plans_file, dataset_json_file, configuration)
    try:
        data, props = pm.image_reader_writer_class().read_images(files)
    except Exception as e:
        return "refused", case, (f"{files[0]}: cannot be read by {pm.image_reader_writer_class.__name__} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); fix or remove it")
    spacing = props.get("spacing", [])
    if len(cm.patch_size) == 3 and (data.shape[1] == 1 or (len(spacing) == 3 and spacing[0] == 999)):
        return "refused", case, (f"{files[0]}: a 2D image (shape {list(data.shape[1:])}) in a 3D configuration "
                                 f"({configuration}); leave it out, or add it to a 2D dataset")
    staging = os.path.join(out_folder, ".partial")
    os.makedirs(staging, exist_ok=True)
    try:
        data, seg, props = preprocessor.run_case_npy(data, None, props, pm, cm, dj)
        data = data.astype(np.float32, copy=False)
        seg = seg.astype(np.int16, copy=False)
        block_d, chunk_d = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
        block_s, chunk_s = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
        nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(staging, case), chunks=chunk_d, blocks=block_d,
                                      chunks_seg=chunk_s, blocks_seg=block_s)
    except Exception as e:
        return "refused", case, (f"{files[0]}: nnU-Net's preprocessing failed ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120] if str(e) else ''}); check the image")
    for suffix in (".b2nd", "_seg.b2nd", ".pkl"):  # the .pkl last: it marks the case complete
        os.replace(os.path.join(staging, case + suffix), os.path.join(out_folder, case + suffix))
    return "added", case, ""


def add_unlabelled(dataset: str, input_folder: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                   num_processes: int = 1, progress: bool = True) -> Dict[str, object]:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from batchgenerators.utilities.file_and_folder_operations import load_json
    if not nnUNet_preprocessed:
        raise UserInputError("add-unlabelled: nnUNet_preprocessed is not set; export it as for nnUNetv2_train")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except Exception:
        raise UserInputError(f"add-unlabelled: dataset {dataset} is in neither nnUNet_raw nor nnUNet_preprocessed")
    ident = name.split("_")[0].replace("Dataset", "").lstrip("0") or "0"
    base = os.path.join(nnUNet_preprocessed, name)
    plans_file = os.path.join(base, plans + ".json")
    first = f"nnUNetv2_plan_and_preprocess -d {ident} -c {configuration}"
    if not os.path.isfile(plans_file):
        raise UserInputError(f"add-unlabelled: {name} has no plans {plans} for {configuration} yet; run {first} first")
    plans_json = load_json(plans_file)
    if configuration not in plans_json.get("configurations", {}):
        raise UserInputError(f"add-unlabelled: plans {plans} of {name} have no configuration {configuration}; run {first} first")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    cm = PlansManager(plans_json).get_configuration(configuration)
    data_folder = os.path.join(base, cm.data_identifier)
    if not os.path.isdir(data_folder):
        raise UserInputError(f"add-unlabelled: {name} is not preprocessed for {configuration} yet; run {first} first")
    dataset_json_file = os.path.join(base, "dataset.json")
    dj = load_json(dataset_json_file)
    file_ending = dj["file_ending"]
    cases, refused = discover(input_folder, file_ending, len(dj["channel_names"]))
    raw_folder = os.path.join(nnUNet_raw, name) if nnUNet_raw else None
    labelled_ids, labelled_hashes = labelled_cases(raw_folder, data_folder, file_ending)
    out_folder = unlabelled_folder(base, cm.data_identifier)
    os.makedirs(out_folder, exist_ok=True)
    done = set(complete_cases(out_folder))
    jobs, skipped = [], 0
    for case, files in cases.items():
        if case in labelled_ids:
            refused.append(f"{files[0]}: its id {case} is a labelled case of {name}; rename the file "
                           f"(e.g. {case}_u_0000{file_ending})")
            continue
        dup = labelled_hashes.get(file_sha256(files[0])) if labelled_hashes else None
        if dup is not None:
            refused.append(f"{files[0]}: the same file as the labelled image of {dup}; leave it out (it is already "
                           f"pretrained on as a labelled case)")
            continue
        if case in done:
            skipped += 1
            continue
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):  # what a killed run left of this case
            for folder in (out_folder, os.path.join(out_folder, ".partial")):
                p = os.path.join(folder, case + suffix)
                if os.path.exists(p):
                    os.remove(p)
        jobs.append((case, files, out_folder, plans_file, dataset_json_file, configuration))
    for line in refused:
        print(f"refused: {line}", flush=True)
    added = 0
    if jobs:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="add-unlabelled", unit="case", disable=not progress)
        if num_processes <= 1:
            results = map(process_case, jobs)
            pool = None
        else:
            import multiprocessing as mp
            # a worker imports torch and nnU-Net once (seconds): restarting it often costs more than it saves
            pool = mp.get_context("spawn").Pool(num_processes, maxtasksperchild=1000)
            results = pool.imap_unordered(process_case, jobs)
        try:
            for status, case, msg in results:
                bar.update(1)
                if status == "added":
                    added += 1
                else:
                    refused.append(msg)
                    bar.write(f"refused: {msg}")
        finally:
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
    shutil.rmtree(os.path.join(out_folder, ".partial"), ignore_errors=True)
    total = len(complete_cases(out_folder))
    print(f"add-unlabelled: {added} added, {skipped} skipped (already there), {len(refused)} refused; {name} has "
          f"{total} unlabelled cases for {configuration} ({out_folder})", flush=True)
    return {"added": added, "skipped": skipped, "refused": refused, "total": total, "folder": out_folder}


def cmd_add_unlabelled(args) -> int:
    res = add_unlabelled(args.d, args.i, args.c, args.p, args.np, progress=not args.no_progress)
    return 1 if res["refused"] else 0


def add_parser(sub) -> None:
    from nnunetv2.configuration import default_num_processes
    p = sub.add_parser("add-unlabelled", help="preprocess unlabelled images (nnU-Net naming) for pretraining, "
                                              "where nnU-Net's own commands never read them")
    p.add_argument("-d", required=True, help="dataset name or id (planned and preprocessed for -c)")
    p.add_argument("-i", required=True, help="folder of images named CASE_XXXX<file ending>, one file per channel")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-np", type=int, default=default_num_processes, help=f"worker processes (default {default_num_processes})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_add_unlabelled)
