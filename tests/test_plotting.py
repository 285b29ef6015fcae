"""nnunet_topomae.utils.plotting: the pictures written next to nnU-Net's progress.png."""
import numpy as np
import pytest

from nnunet_topomae.utils.plotting import plot_loss_terms, save_persistence_diagrams, save_volume_preview


def _png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_persistence_diagrams_png_with_an_empty_dimension(tmp_path):
    rng = np.random.default_rng(0)
    births = rng.random((5, 1))
    diag = {0: np.hstack([births, births + 0.5]), 1: np.zeros((0, 2)), 2: np.array([[0.2, 0.3]])}
    other = {0: diag[0][:3] + 0.1, 1: np.array([[0.4, 0.9]]), 2: np.zeros((0, 2))}
    path = tmp_path / "persistence_diagrams.png"
    save_persistence_diagrams({"input": (diag, 0.0), "reconstruction": (other, 1.25)}, str(path), title="t")
    assert _png(path)


def test_persistence_diagrams_png_without_any_point(tmp_path):
    # a constant reconstruction early in training has no finite point in any dimension
    empty = {d: np.zeros((0, 2)) for d in (0, 1, 2)}
    path = tmp_path / "p.png"
    save_persistence_diagrams({"input": (empty, 0.0), "reconstruction": (empty, 0.0)}, str(path))
    assert _png(path)


def test_volume_preview_and_loss_terms_png(tmp_path):
    vol = np.random.default_rng(1).random((8, 10, 6))
    save_volume_preview({"input": vol, "reconstruction": vol * 0.5}, str(tmp_path / "r.png"), title="t")
    plot_loss_terms({"train": {"loss": [3.0, 2.0], "rec": [1.0, 0.5]}, "val": {"loss": [3.5, 2.5]}},
                    str(tmp_path / "l.png"))
    assert _png(tmp_path / "r.png") and _png(tmp_path / "l.png")


def test_volume_preview_draws_with_the_voxel_spacing(tmp_path):
    # 16 slices of 3 mm under 64 x 64 voxels of 0.8 mm: 48 mm x 51 mm, nearly square in mm; drawn per voxel
    # (spacing ignored) the same slices would be 4x wider than high
    import matplotlib.image as mpimg
    from nnunet_topomae.utils.plotting import save_volume_preview
    vol = np.random.default_rng(0).random((16, 64, 64)).astype(np.float32)
    save_volume_preview({"a": vol, "b": vol}, str(tmp_path / "aniso.png"), spacing=[3.0, 0.8, 0.8])
    save_volume_preview({"a": vol, "b": vol}, str(tmp_path / "voxels.png"), spacing=[1.0, 1.0, 1.0])
    h_aniso, w_aniso = mpimg.imread(tmp_path / "aniso.png").shape[:2]
    h_vox, w_vox = mpimg.imread(tmp_path / "voxels.png").shape[:2]
    assert w_aniso == w_vox
    # rows in mm: 64x64 (1) + two of 48x51 (0.94 each) vs in voxels 1 + two of 16x64 (0.25 each)
    assert h_aniso / w_aniso == pytest.approx((2.4 * (1 + 2 * 48 / 51.2) + 0.3) / 4.8, rel=0.05)
    assert h_vox / w_vox == pytest.approx((2.4 * 1.5 + 0.3) / 4.8, rel=0.05)
