"""Unlabelled images for self-pretraining: where they live and how the pretraining loader sees them.

A hospital has a few labelled scans and an archive of unlabelled ones. nnU-Net's preprocessing
refuses a case without a label, and nnU-Net must never see these cases (its splits, training,
validation, ``--val``, ``find_best_configuration`` and ensembling read the dataset's own
``<data_identifier>`` folder and ``splits_final.json``). So ``nnunet-topomae add-unlabelled``
preprocesses them with nnU-Net's own preprocessor of the plans (``run_case_save``: the same cropping,
normalisation, resampling and storage as a training case) into

    $nnUNet_preprocessed/DatasetXXX_Name/nnunet_topomae_unlabelled/<data_identifier>/

a folder no nnU-Net command reads. Each case there is ``CASE.b2nd``, ``CASE_seg.b2nd`` (nnU-Net's
nonzero mask of the crop, -1 outside, 0 inside: a placeholder, never a label) and ``CASE.pkl``; the
``.pkl`` is moved in last, so a case is complete exactly when its ``.pkl`` is there.

Every pretraining trainer trains on the fold's training cases plus all complete unlabelled cases
(``CombinedDataset``) and validates on the fold's validation cases only.
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

UNLABELLED_DIR = "nnunet_topomae_unlabelled"


def unlabelled_folder(preprocessed_dataset_folder_base: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder_base, UNLABELLED_DIR, data_identifier)


def complete_cases(folder: str) -> List[str]:
    """Case ids in ``folder`` whose three files are all there (the ``.pkl`` is written last)."""
    if not os.path.isdir(folder):
        return []
    names = set(os.listdir(folder))
    out = []
    for n in names:
        if n.endswith(".pkl"):
            case = n[:-4]
            if any(f"{case}{ext}" in names for ext in (".b2nd", ".npz", ".npy")):
                out.append(case)
    return sorted(out)


def unlabelled_counts(preprocessed_dataset_folder_base: str) -> Dict[str, int]:
    """data_identifier -> complete unlabelled cases (for ``doctor``)."""
    root = os.path.join(preprocessed_dataset_folder_base, UNLABELLED_DIR)
    if not os.path.isdir(root):
        return {}
    return {d: len(complete_cases(os.path.join(root, d))) for d in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, d))}


class CombinedDataset:
    """The part of nnU-Net's dataset interface the loaders use (``identifiers``, ``load_case``) over
    several nnU-Net datasets whose identifiers do not overlap (``add-unlabelled`` refuses collisions)."""

    def __init__(self, datasets: Sequence):
        self.datasets = list(datasets)
        self._owner = {}
        for ds in self.datasets:
            for k in ds.identifiers:
                if k in self._owner:
                    raise ValueError(f"case {k} is in two of the combined datasets")
                self._owner[k] = ds
        self.identifiers = [k for ds in self.datasets for k in ds.identifiers]

    def load_case(self, identifier):
        return self._owner[identifier].load_case(identifier)

    def __getitem__(self, identifier):
        return self.load_case(identifier)
