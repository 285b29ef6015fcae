"""Two-level masking of HybridMIM (Xing et al., arXiv 2303.10333), laid on nnU-Net's grid.

Paper idea
----------
HybridMIM splits a training patch into *sub-volumes*; every sub-volume is split into a small
number of *cubes* (the released code: 96^3 patch, 32^3 sub-volumes, 16^3 cubes, i.e. 3x3x3
sub-volumes of 2x2x2 = 8 cubes each). A fraction of all cubes (``mask_ratio = 0.4`` in
``Pretrain/pretrain_models/deep_unet_v2.py``) is replaced by ``mask_value = 0``. Besides pixel
reconstruction, the network must then perceive the mask at the sub-volume level:

* *how many* cubes of every sub-volume are masked (classification into ``n_cubes + 1`` classes),
* *which* cubes of every sub-volume are masked (multi-label over ``n_cubes`` positions).

Our interpretation for nnU-Net's auto-configured CNN
----------------------------------------------------
* A sub-volume is exactly the receptive *tile* of one bottleneck position, i.e. its size per
  axis is the product of all stage strides of the plan (``subvolume_size``), and the
  sub-volume grid is the bottleneck grid (``patch_size // subvolume_size``). The perception
  heads are therefore 1x1x1 convolutions on the bottleneck. (The released code instead
  average-pools 4x4x4 bottleneck positions into one 32^3 region.)
* A sub-volume is split into cubes by the stride of the *last* stage: ``cubes_per_subvolume``
  per axis equals the last stride, so an isotropic plan gives 2x2x2 = 8 cubes (as in the
  paper), a plan whose last stride is ``[1, 2, 2]`` gives 1x2x2 = 4 cubes. Each cube is then
  exactly one position of the second-to-last encoder stage.
* Cube ``j`` of a sub-volume is the ``j``-th cube in C (raster) order of the *local* cube
  index inside that sub-volume, i.e. ``j = ravel_multi_index(local_cube_index,
  cubes_per_subvolume)``. NOTE: the released code (``get_mask_labels`` /
  ``get_mask_labelsv2`` in ``Pretrain/pretrain_models/utils.py``) groups 8 *consecutive raster
  indices of the global 6x6x6 cube grid* into one region; those 8 cubes form a 1x1x6 + 1x1x2
  strip along the last axis, which is not the region a bottleneck position (or the 32^3 region
  its pooled features describe) covers. We fix that: the cubes of sub-volume ``g`` are exactly
  the cubes whose voxels lie inside sub-volume ``g``.
* Number of masked cubes: exactly ``round(ratio * total_cubes)`` per sample (Python ``round``,
  i.e. round-half-to-even), chosen uniformly at random without replacement via an argsort of
  uniform noise. The released ``random_masking`` also masks an exact number per sample
  (``L - int(L * (1 - ratio))``, e.g. 87 of 216 cubes for ratio 0.4, we mask 86), not an
  independent per-cube Bernoulli draw.

Everything here is dimension-generic (2D or 3D plans); shapes are documented for 3D.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "MaskGeometry",
    "sample_cube_mask",
    "cube_mask_to_cube_grid",
    "cube_mask_to_voxels",
    "perception_targets",
    "apply_voxel_mask",
]


def _as_int_tuple(v: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(i) for i in v)


@dataclass(frozen=True)
class MaskGeometry:
    """Geometry of the two-level mask for one nnU-Net plan.

    Fields (all per-axis tuples unless stated otherwise):

    * ``patch_size`` -- the plan's patch size in voxels.
    * ``subvolume_size`` -- voxels covered by one bottleneck position (product of all strides).
    * ``subvolume_grid`` -- number of sub-volumes per axis == bottleneck spatial shape.
    * ``cubes_per_subvolume`` -- cubes per sub-volume per axis == last stage stride.
    * ``n_cubes`` (int) -- cubes per sub-volume (product of ``cubes_per_subvolume``).
    * ``cube_size`` -- voxels per cube per axis (``subvolume_size // cubes_per_subvolume``).
    * ``strides`` -- the per-stage strides the geometry was built from (needed to crop skips).
    """

    patch_size: Tuple[int, ...]
    subvolume_size: Tuple[int, ...]
    subvolume_grid: Tuple[int, ...]
    cubes_per_subvolume: Tuple[int, ...]
    n_cubes: int
    cube_size: Tuple[int, ...]
    strides: Tuple[Tuple[int, ...], ...] = ()

    @classmethod
    def from_plan(cls, patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> "MaskGeometry":
        """Build the geometry from a plan's ``patch_size`` and per-stage ``strides``.

        ``strides`` is the plan's ``architecture.arch_kwargs.strides`` list, e.g.
        ``[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]``. Scalars per stage are broadcast.
        """
        patch = _as_int_tuple(patch_size)
        ndim = len(patch)
        if ndim not in (2, 3):
            raise ValueError(f"patch_size must have 2 or 3 entries, got {patch_size!r}")
        if len(strides) < 2:
            raise ValueError(f"need at least two stages (got strides={strides!r})")
        st = []
        for s in strides:
            s = (int(s),) * ndim if isinstance(s, numbers.Integral) else _as_int_tuple(s)
            if len(s) != ndim:
                raise ValueError(f"stride {s} does not match the {ndim}-d patch_size {patch}")
            if any(i < 1 for i in s):
                raise ValueError(f"strides must be >= 1, got {strides!r}")
            st.append(s)
        sub = tuple(math.prod(s[a] for s in st) for a in range(ndim))
        bad = [a for a in range(ndim) if patch[a] % sub[a] != 0]
        if bad:
            raise ValueError(
                f"patch_size {patch} is not divisible by the total stride {sub} (product of the plan's "
                f"strides {[list(s) for s in st]}) along axis/axes {bad}; one bottleneck position must "
                f"cover a whole sub-volume"
            )
        last = st[-1]
        cube = tuple(sub[a] // last[a] for a in range(ndim))
        return cls(
            patch_size=patch,
            subvolume_size=sub,
            subvolume_grid=tuple(patch[a] // sub[a] for a in range(ndim)),
            cubes_per_subvolume=last,
            n_cubes=int(math.prod(last)),
            cube_size=cube,
            strides=tuple(st),
        )

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    @property
    def n_subvolumes(self) -> int:
        return int(math.prod(self.subvolume_grid))

    @property
    def total_cubes(self) -> int:
        """Cubes per sample (``n_subvolumes * n_cubes``)."""
        return self.n_subvolumes * self.n_cubes

    @property
    def cube_grid(self) -> Tuple[int, ...]:
        """Global cube grid per axis (``subvolume_grid * cubes_per_subvolume``)."""
        return tuple(g * c for g, c in zip(self.subvolume_grid, self.cubes_per_subvolume))

    def n_masked(self, ratio: float) -> int:
        """Exact number of masked cubes per sample for a mask ratio: ``round(ratio * total_cubes)``."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
        return int(round(ratio * self.total_cubes))


def sample_cube_mask(
    batch_size: int,
    geom: MaskGeometry,
    ratio: float = 0.4,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Sample the two-level cube mask.

    Returns a bool tensor ``(B, gx, gy, gz, n_cubes)`` (True = masked) with exactly
    ``round(ratio * total_cubes)`` masked cubes per sample, drawn uniformly without replacement
    (argsort of uniform noise, as the released ``random_masking``). Entry ``[b, g..., j]`` is cube
    ``j`` (C order of the local cube index) of sub-volume ``g``. Noise is drawn on the generator's
    device (CPU by default) and moved to ``device``.
    """
    n_mask = geom.n_masked(ratio)
    total = geom.total_cubes
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.rand(batch_size, total, generator=generator, device=gen_device)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch_size, total, dtype=torch.bool, device=gen_device)
    mask.scatter_(1, order[:, :n_mask], True)
    mask = mask.view(batch_size, *geom.subvolume_grid, geom.n_cubes)
    return mask if device is None else mask.to(device)


def cube_mask_to_cube_grid(cube_mask: torch.Tensor, geom: MaskGeometry) -> torch.Tensor:
    """``(B, *subvolume_grid, n_cubes)`` -> global cube grid ``(B, *cube_grid)`` (same dtype)."""
    b = cube_mask.shape[0]
    nd = geom.ndim
    expected = (b, *geom.subvolume_grid, geom.n_cubes)
    if tuple(cube_mask.shape) != expected:
        raise ValueError(f"cube_mask has shape {tuple(cube_mask.shape)}, expected {expected}")
    m = cube_mask.reshape(b, *geom.subvolume_grid, *geom.cubes_per_subvolume)
    # (B, g0, g1, g2, c0, c1, c2) -> (B, g0, c0, g1, c1, g2, c2)
    perm = [0]
    for a in range(nd):
        perm += [1 + a, 1 + nd + a]
    m = m.permute(*perm)
    return m.reshape(b, *geom.cube_grid)


def cube_mask_to_voxels(cube_mask: torch.Tensor, geom: MaskGeometry) -> torch.Tensor:
    """Expand the cube mask to a voxel mask ``(B, 1, X, Y, Z)`` float (1 = masked)."""
    grid = cube_mask_to_cube_grid(cube_mask, geom).float()
    b = grid.shape[0]
    nd = geom.ndim
    # (B, G0, G1, G2) -> (B, G0, 1, G1, 1, G2, 1) -> expand cube sizes -> (B, 1, X, Y, Z)
    shape = [b]
    for a in range(nd):
        shape += [geom.cube_grid[a], 1]
    v = grid.reshape(shape)
    exp = [b]
    for a in range(nd):
        exp += [geom.cube_grid[a], geom.cube_size[a]]
    v = v.expand(exp)
    return v.reshape(b, 1, *geom.patch_size)


def perception_targets(cube_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Targets of the patch-masking perception task.

    Returns ``count`` ``(B, gx, gy, gz)`` long in ``[0, n_cubes]`` (masked cubes per sub-volume)
    and ``position`` ``(B, gx, gy, gz, n_cubes)`` float (1 = that cube is masked).
    """
    cube_mask = cube_mask.bool()
    return cube_mask.sum(dim=-1).long(), cube_mask.float()


def apply_voxel_mask(x: torch.Tensor, voxel_mask: torch.Tensor, mask_value: float = 0.0) -> torch.Tensor:
    """Replace masked voxels (``voxel_mask == 1``, broadcast over channels) by ``mask_value``.

    ``mask_value = 0`` is the released code's choice; for z-score normalised nnU-Net images 0 is
    the (foreground) mean intensity.
    """
    m = voxel_mask.to(dtype=x.dtype, device=x.device)
    return x * (1.0 - m) + mask_value * m


# ---------------------------------------------------------------- partial-prediction box
Box = Tuple[Tuple[int, ...], Tuple[int, ...]]


def normalise_box(box: Box, geom: MaskGeometry) -> Box:
    lb, ub = box
    lb = tuple(int(i) for i in lb)
    ub = tuple(int(i) for i in ub)
    if len(lb) != geom.ndim or len(ub) != geom.ndim:
        raise ValueError(f"box {box} does not have {geom.ndim} entries per bound")
    for a in range(geom.ndim):
        if not (0 <= lb[a] < ub[a] <= geom.subvolume_grid[a]):
            raise ValueError(f"box {box} is empty or outside the bottleneck grid {geom.subvolume_grid}")
    return lb, ub


def sample_box(
    geom: MaskGeometry,
    fraction_per_axis: Union[float, Sequence[float]] = 2.0 / 3.0,
    generator: Optional[torch.Generator] = None,
) -> Box:
    """Random partial-prediction box ``(lb, ub)`` in bottleneck-grid coordinates (``ub`` exclusive).

    Box size per axis is ``max(1, round(grid * fraction))`` clamped to the grid; its position is
    uniform over all valid offsets.
    """
    if isinstance(fraction_per_axis, (int, float)):
        fraction_per_axis = [float(fraction_per_axis)] * geom.ndim
    if len(fraction_per_axis) != geom.ndim:
        raise ValueError(f"fraction_per_axis needs {geom.ndim} entries, got {fraction_per_axis!r}")
    lb, ub = [], []
    for g, f in zip(geom.subvolume_grid, fraction_per_axis):
        size = min(g, max(1, int(round(g * f))))
        start = int(torch.randint(0, g - size + 1, (1,), generator=generator).item())
        lb.append(start)
        ub.append(start + size)
    return tuple(lb), tuple(ub)


def box_to_voxel_slices(box: Box, geom: MaskGeometry) -> Tuple[slice, ...]:
    """Voxel slices (spatial axes only) covered by a bottleneck-grid box."""
    lb, ub = normalise_box(box, geom)
    return tuple(slice(l * s, u * s) for l, u, s in zip(lb, ub, geom.subvolume_size))
