"""Pictures written next to nnU-Net's progress.png during pretraining."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _default_style(fn):
    # nnU-Net's progress plot calls seaborn.set(font_scale=2.5) globally; our pictures use their own style
    def wrapper(*args, **kwargs):
        with plt.style.context("default"):
            return fn(*args, **kwargs)
    return wrapper


@_default_style
def plot_loss_terms(history: Dict[str, Dict[str, List[float]]], path: str) -> None:
    """One panel per loss term, train (solid) and validation (dashed) per epoch."""
    names = sorted(set(history.get("train", {})) | set(history.get("val", {})))
    if not names:
        return
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        for split, style in (("train", "-"), ("val", "--")):
            values = history.get(split, {}).get(name)
            if values:
                ax.plot(range(len(values)), values, style, label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        if name != "loss" and all(v > 0 for v in history.get("train", {}).get(name, [1])):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@_default_style
def save_volume_preview(columns: Dict[str, np.ndarray], path: str, title: str = "",
                        spacing: Optional[Sequence[float]] = None) -> None:
    """columns: name -> 3D volume (X, Y, Z). Rows are the three mid slices (one per axis), drawn with
    the voxel spacing as aspect ratio (an anisotropic 3 x 0.8 x 0.8 mm plan would look squashed
    otherwise) and each row as high as its slices are in mm, so there is little empty space."""
    names = list(columns)
    ref = columns[names[0]]
    spacing = [1.0, 1.0, 1.0] if spacing is None else [float(x) for x in spacing]
    rows = []  # (row axis, column axis) of the slice through each axis
    for axis in range(3):
        r, c = [a for a in range(3) if a != axis]
        rows.append((r, c))
    # physical height / width of each row's slice
    ratios = [ref.shape[r] * spacing[r] / (ref.shape[c] * spacing[c]) for r, c in rows]
    col_w = 2.4
    fig, axes = plt.subplots(3, len(names), figsize=(col_w * len(names), col_w * sum(ratios) + (0.5 if title else 0.3)),
                             squeeze=False, gridspec_kw=dict(height_ratios=ratios, hspace=0.04, wspace=0.04))
    vmin, vmax = np.percentile(ref, 1), np.percentile(ref, 99)
    for c_i, name in enumerate(names):
        vol = columns[name]
        for axis, (r, c) in enumerate(rows):
            sl = np.take(vol, vol.shape[axis] // 2, axis=axis)
            axes[axis, c_i].imshow(sl, cmap="gray", vmin=vmin, vmax=vmax, aspect=spacing[r] / spacing[c],
                                   interpolation="nearest")
            axes[axis, c_i].set_xticks([])
            axes[axis, c_i].set_yticks([])
        axes[0, c_i].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (0.55 if title else 0.3) / fig.get_figheight(),
                        hspace=0.04, wspace=0.04)
    fig.savefig(path, dpi=80)
    plt.close(fig)


@_default_style
def save_persistence_diagrams(diagrams: Dict[str, tuple], path: str, title: str = "") -> None:
    """One panel per homology dimension, every volume's finite points (birth, death) overlaid.
    diagrams: name -> ({dim: (n, 2) array}, L_topo against the first volume), as from
    ``nnunet_topomae.losses.topological.reduced_diagrams``; the first volume is the reference."""
    names = list(diagrams)
    dims = sorted(diagrams[names[0]][0])
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 4.4), squeeze=False)
    points = [p for diag, _ in diagrams.values() for p in diag.values() if len(p)]
    lo, hi = (min(p.min() for p in points), max(p.max() for p in points)) if points else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    for ax, d in zip(axes[0], dims):
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1)  # the diagonal
        for i, name in enumerate(names):
            diag, loss = diagrams[name]
            label = name if i == 0 else f"{name} (L_topo {loss:.3g})"
            ax.scatter(diag[d][:, 0], diag[d][:, 1], s=12 if i == 0 else 9, color=f"C{i}",
                       marker="o" if i == 0 else "x", alpha=0.8, label=f"{label}: {len(diag[d])}")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_title(f"H{d}", fontsize=10)
        ax.set_xlabel("birth")
        ax.set_ylabel("death")
        ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
