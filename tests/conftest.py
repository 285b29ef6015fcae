"""Shared pytest configuration and fixtures.

Markers
  integration: end-to-end tests through nnU-Net's real commands in subprocesses (slow; deselect with
  ``-m "not integration"``).

Fixtures
  single_threaded_torch (module scoped): torch on one thread for the module's tests.

Session-scoped fixtures (built lazily: unit-test-only runs never pay for them)
  nnunet_dataset: a temporary nnU-Net root with the synthetic dataset 901 (6 cases of 40^3, from
      tests/synthetic.py), planned and preprocessed once for 3d_fullres (the plans also hold a 2d
      configuration, not preprocessed). An ``integration.helpers.NNUNetTestDataset``: paths
      (root, raw, preprocessed, results, plans_file, ...) and ``env(**extra)``, the environment for
      training subprocesses. See tests/integration/helpers.py for ``run``, ``train``,
      ``output_folder``.
  topomae_pretrain_run: one finished ``nnUNetv2_train 901 3d_fullres 0 -tr
      nnUNetTrainerTopoMAEPretrain_test -device cpu`` in ``nnunet_dataset.results`` (e.g. the
      pretrained checkpoint for finetuning tests). Treat its folder as read-only; copy it if a
      test needs to modify it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:  # also with --import-mode=importlib
    sys.path.insert(0, TESTS_DIR)

from integration.helpers import (  # noqa: E402
    NNUNetTestDataset,
    output_folder,
    prepare_nnunet_dataset,
    train,
)


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: end-to-end test through nnU-Net's real commands "
                                       "(subprocesses, about a minute of shared setup)")


@pytest.fixture(scope="module")
def single_threaded_torch():
    """Small CPU networks run fastest (and most robustly on a shared 2-core box) single-threaded; a module
    opts in with ``pytestmark = pytest.mark.usefixtures("single_threaded_torch")``."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def nnunet_dataset(tmp_path_factory) -> NNUNetTestDataset:
    root = str(tmp_path_factory.mktemp("nnunet_root"))
    return prepare_nnunet_dataset(root)


@dataclass
class TrainingRun:
    trainer: str
    output_folder: str
    stdout: str
    stderr: str
    seconds: float

    @property
    def checkpoint_final(self) -> str:
        return os.path.join(self.output_folder, "checkpoint_final.pth")


@pytest.fixture(scope="session")
def topomae_pretrain_run(nnunet_dataset) -> TrainingRun:
    trainer = "nnUNetTrainerTopoMAEPretrain_test"
    res = train(nnunet_dataset, trainer)
    return TrainingRun(trainer, output_folder(nnunet_dataset.results, nnunet_dataset.dataset_name, trainer),
                       res.stdout, res.stderr, res.duration)
