"""Checkpoints are data, not code: safe loading, plain contents, atomic writes.

A ``.pth`` file is a pickle, and a pickle can run any code when it is loaded. A "pretrained TopoMAE
checkpoint" from a colleague or a forum is the natural attack on a machine that holds patient data,
so every load in this package goes through ``safe_load``: ``torch.load(weights_only=True)``, which
builds tensors, plain containers, numbers and strings and refuses everything else. There is no
fallback to an unsafe load.

What this package writes holds only what that allows (``to_plain`` turns the numpy scalars that
nnU-Net's logger and EMA keep into Python numbers). nnU-Net's own checkpoints (the stock
``nnUNetTrainer``'s) hold numpy scalars; ``safe_load`` accepts numpy scalars and dtypes as numbers
(rebuilding one runs no code beyond numpy's constructor), nothing else.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import uuid
import zipfile
from typing import Dict, List

import numpy as np
import torch

from nnunet_topomae.errors import UserInputError

TMP_PATTERN = ".tmp_*.pth"


def state_dict_to_cpu(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # CPU tensors: the checkpoint then loads on CPU-only machines, also through nnU-Net's
    # load_pretrained_weights, which calls torch.load without map_location.
    return {k: v.detach().cpu() for k, v in sd.items()}


def to_plain(obj):
    """numpy scalars and arrays -> Python numbers and lists, recursively through dicts, lists and tuples
    (tensors and everything else untouched), so that ``weights_only=True`` loads the result."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    return obj


def _numpy_number_globals() -> list:
    """What rebuilding numpy scalars needs: the scalar constructor and dtypes (data, no code)."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    dtypes = [np.dtype]
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_):
        dtypes.append(type(np.dtype(t)))
    return [scalar] + dtypes


def unsafe_globals_in(fname: str) -> List[str]:
    """The importable names (module.attribute) a pickled checkpoint refers to, read from its opcodes
    without running anything: for a message naming what the file would have run."""
    import pickletools
    names = []
    try:
        with zipfile.ZipFile(fname) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            data = z.read(pkl) if pkl else b""
    except (zipfile.BadZipFile, OSError):
        with open(fname, "rb") as f:
            data = f.read()
    strings: List[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings = (strings + [arg])[-2:]
            elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                names.append(".".join(strings))
    except Exception:  # a broken pickle: the names found so far
        pass
    allowed = ("torch.", "collections.OrderedDict", "numpy.")
    return sorted({n for n in names if not n.startswith(allowed)})


def safe_load(fname: str, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(fname, weights_only=True)``; one clear line instead of a traceback when the file is
    missing, broken, or holds anything but weights (then it is refused, never loaded another way)."""
    if not os.path.isfile(fname):
        raise UserInputError(f"{what} {fname} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_number_globals()):
            return torch.load(fname, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e) and "Unsupported" not in str(e):
            raise UserInputError(f"cannot read {what} {fname} ({str(e).splitlines()[0][:120]}); is the file complete?")
        found = unsafe_globals_in(fname) or re.findall(r"GLOBAL ([\w.]+)", str(e))[:3]
        raise UserInputError(
            f"refused {what} {fname}: it contains code or objects that are not weights ({', '.join(found[:4]) or 'see torch'}); "
            f"nnunet-topomae loads only tensors, numbers and strings (torch.load weights_only=True). Do not load it with "
            f"nnU-Net's stock loader either; use a checkpoint written by nnunet-topomae or nnU-Net")
    except UserInputError:
        raise
    except Exception as e:
        raise UserInputError(f"cannot read {what} {fname} as a PyTorch checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:100] if str(e) else ''}); is the file complete?")


def atomic_torch_save(obj, filename: str) -> None:
    """Write to a temporary file in the same folder, then rename: an interrupted save never leaves
    a truncated checkpoint behind (a killed process can leave the temporary file: see
    ``remove_stale_temporaries``)."""
    folder = os.path.dirname(os.path.abspath(filename))
    # open(..., "xb") honours the umask (mkstemp would make the checkpoint 0600, unlike nnU-Net's files)
    tmp = os.path.join(folder, f".tmp_{uuid.uuid4().hex}.pth")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(folder: str) -> List[str]:
    """Delete the partial ``.tmp_*.pth`` files a killed save left in ``folder`` (call it when a run of
    that fold starts, before it writes anything: then no save of this fold is under way)."""
    removed = []
    for path in glob.glob(os.path.join(folder, TMP_PATTERN)):
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed
