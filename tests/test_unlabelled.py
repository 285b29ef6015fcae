"""Unit tests of the unlabelled-archive parts (issue 25): discovery and its refusals, what counts as a
complete case, the combined dataset, the checks before any preprocessing. End to end through
nnU-Net's commands: tests/integration/test_unlabelled_e2e.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nnunet_topomae.add_unlabelled import add_unlabelled, discover, labelled_cases
from nnunet_topomae.data.unlabelled import CombinedDataset, complete_cases, unlabelled_counts, unlabelled_folder
from nnunet_topomae.errors import UserInputError
from nnunet_topomae.utils.files import file_sha256


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_file_sha256_is_hashlib_s_over_several_blocks(tmp_path):
    import hashlib
    data = np.random.default_rng(0).bytes((1 << 20) * 2 + 17)  # three reads of 1 MiB, the last short
    _touch(str(tmp_path / "a.bin"), data)
    assert file_sha256(str(tmp_path / "a.bin")) == hashlib.sha256(data).hexdigest()
    _touch(str(tmp_path / "b.bin"), data[:-1] + bytes([data[-1] ^ 1]))
    assert file_sha256(str(tmp_path / "b.bin")) != file_sha256(str(tmp_path / "a.bin"))


def test_discover_groups_channels_and_names_what_does_not_fit(tmp_path):
    for name in ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c_0001.nii.gz", "c_0000.nii.gz",
                 "notes.txt", "d_000.nii.gz", "e_0000.mha"]:
        _touch(str(tmp_path / name))
    cases, refused = discover(str(tmp_path), ".nii.gz", 2)
    assert cases == {"a": [str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz")],
                     "c": [str(tmp_path / "c_0000.nii.gz"), str(tmp_path / "c_0001.nii.gz")]}
    text = "\n".join(refused)
    assert "b_*.nii.gz: has channels _0000 but the dataset needs 2 (_0000, _0001)" in text
    for bad in ("notes.txt", "d_000.nii.gz", "e_0000.mha"):
        assert f"{bad}: not named CASE_XXXX.nii.gz" in text
    assert all("\n" not in r for r in refused)


def test_a_case_is_complete_only_with_its_pkl(tmp_path):
    _touch(str(tmp_path / "x.b2nd"))
    _touch(str(tmp_path / "x_seg.b2nd"))
    assert complete_cases(str(tmp_path)) == []  # killed before the .pkl was moved in
    _touch(str(tmp_path / "x.pkl"))
    _touch(str(tmp_path / "y.pkl"))  # a .pkl without data is not a case
    assert complete_cases(str(tmp_path)) == ["x"]
    base = tmp_path / "pre"
    _touch(os.path.join(unlabelled_folder(str(base), "nnUNetPlans_3d_fullres"), "u.b2nd"))
    _touch(os.path.join(unlabelled_folder(str(base), "nnUNetPlans_3d_fullres"), "u.pkl"))
    assert unlabelled_counts(str(base)) == {"nnUNetPlans_3d_fullres": 1}


class _DS:
    def __init__(self, keys, tag):
        self.identifiers, self.tag = list(keys), tag

    def load_case(self, k):
        return (np.zeros(1), None, None, {"from": self.tag, "key": k})


def test_combined_dataset_dispatches_and_refuses_overlaps():
    ds = CombinedDataset([_DS(["a", "b"], "fold"), _DS(["u1"], "unlabelled")])
    assert ds.identifiers == ["a", "b", "u1"]
    assert ds.load_case("u1")[3] == {"from": "unlabelled", "key": "u1"}
    assert ds.load_case("a")[3]["from"] == "fold"
    with pytest.raises(ValueError, match="in two"):
        CombinedDataset([_DS(["a"], "x"), _DS(["a"], "y")])


def test_labelled_cases_from_raw_and_preprocessed(tmp_path):
    _touch(str(tmp_path / "raw" / "imagesTr" / "case_1_0000.nii.gz"), b"one")
    _touch(str(tmp_path / "pre" / "case_2.pkl"))
    ids, hashes = labelled_cases(str(tmp_path / "raw"), str(tmp_path / "pre"), ".nii.gz")
    assert ids == {"case_1", "case_2"} and list(hashes.values()) == ["case_1"]


def test_refusals_before_any_preprocessing(tmp_path, monkeypatch):
    pre = tmp_path / "pre"
    (pre / "Dataset123_X").mkdir(parents=True)
    monkeypatch.setattr("nnunetv2.paths.nnUNet_preprocessed", str(pre))
    monkeypatch.setattr("nnunetv2.paths.nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setattr("nnunetv2.utilities.dataset_name_id_conversion.nnUNet_preprocessed", str(pre))
    monkeypatch.setattr("nnunetv2.utilities.dataset_name_id_conversion.nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setattr("nnunetv2.utilities.dataset_name_id_conversion.nnUNet_results", None)
    with pytest.raises(UserInputError, match="has no plans nnUNetPlans for 3d_fullres yet; run "
                                             "nnUNetv2_plan_and_preprocess -d 123 -c 3d_fullres first"):
        add_unlabelled("Dataset123_X", str(tmp_path), "3d_fullres")
    (pre / "Dataset123_X" / "nnUNetPlans.json").write_text(json.dumps({"configurations": {"2d": {}}}))
    with pytest.raises(UserInputError, match="have no configuration 3d_fullres"):
        add_unlabelled("Dataset123_X", str(tmp_path), "3d_fullres")
    with pytest.raises(UserInputError, match="neither nnUNet_raw nor nnUNet_preprocessed"):
        add_unlabelled("777", str(tmp_path), "3d_fullres")
