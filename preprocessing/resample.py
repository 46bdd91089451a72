"""Separable resampling of volumes between axis-aligned grids: one resampler for every wing.

Every resampling in this project maps a grid onto one whose axes are those of the input,
permuted, flipped or scaled (the DeepLesion sub-volumes to 1 mm; a labelled case, once
reoriented, to the pretraining spacing; a prediction back onto its image's grid). Such a
resampling separates: it is a one-dimensional resampling along each axis in turn. Done so, a
cubic B-spline costs a prefilter and 4 taps per axis and output voxel (instead of the 64 taps
and the dense coordinate grid of a general 3-D interpolation), and the memory is a few
float32 copies of a block of the volume.

Values are those of scipy.ndimage.map_coordinates at the same positions, to float32 rounding:
- order 3, the cubic B-spline, with its prefilter; `mode` says how the volume extends beyond
  its edges: "mirror" (d c b | a b c d | c b a, ITK's and skimage's boundary, used for the
  DeepLesion script) or "nearest" (edge values, what MONAI's Spacing gives with its default
  "border" padding, used downstream); for "nearest", as scipy does, the volume is padded with
  12 edge samples before the prefilter;
- order 1, linear; order 0, nearest neighbour (rounding half to even; positions beyond the
  edges take the edge sample), for label maps: a label map keeps its label set.

    out = resample_axes(volume, [positions_0, positions_1, positions_2], order=3, mode="mirror")
    out = resample_to_grid(volume, src_affine, dst_affine, dst_shape, order=0)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse

NEAREST_PAD = 12  # edge samples scipy adds before the prefilter in mode "nearest"
BLOCK_VOXELS = 1 << 23  # about 32 MB of float32 per block of the temporaries


def edge_aligned_positions(n_in: int, n_out: int) -> np.ndarray:
    """Input index sampled by each of `n_out` outputs that cover the `n_in` inputs' extent:
    (i + 0.5) * n_in / n_out - 0.5 (skimage's resize)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * n_in / n_out - 0.5


def _extend(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Indices beyond [0, n) folded back: mirrored without repeating the edge, or clamped."""
    if mode == "nearest" or n == 1:
        return np.clip(index, 0, n - 1)
    period = 2 * n - 2
    index = np.mod(index, period)
    return np.where(index >= n, period - index, index)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(len(t), 4) weights of the taps floor(x) - 1 ... floor(x) + 2 of a cubic B-spline at x,
    t = x - floor(x)."""
    t2, t3 = t * t, t * t * t
    return np.stack([(1 - t) ** 3, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], axis=1) / 6.0


def interpolation_matrix(positions: np.ndarray, n: int, order: int, mode: str) -> sparse.csr_matrix:
    """(len(positions), n) sparse matrix whose rows interpolate samples (order 1) or spline
    coefficients (order 3) at `positions`: 2 or 4 taps per row, folded at the edges by `mode`."""
    positions = np.asarray(positions, dtype=np.float64)
    rows = np.arange(len(positions))
    floor = np.floor(positions)
    t = positions - floor
    if order == 1:
        taps, weights = floor[:, None] + np.arange(2), np.stack([1 - t, t], axis=1)
    elif order == 3:
        taps, weights = floor[:, None] + np.arange(-1, 3), _cubic_weights(t)
    else:
        raise ValueError(f"interpolation order {order} is not 1 or 3 (order 0 is a gather: resample_axis)")
    index = _extend(taps.astype(np.int64), n, mode)
    m = sparse.coo_matrix((weights.ravel(), (np.repeat(rows, taps.shape[1]), index.ravel())), shape=(len(positions), n))
    return m.tocsr()  # taps folded onto one sample are summed


def resample_axis(volume: np.ndarray, axis: int, positions, order: int = 3, mode: str = "nearest") -> np.ndarray:
    """`volume` resampled along `axis` at `positions` (input indices), in float32 for orders 1
    and 3 (the input's dtype for order 0); the other axes are untouched. Works in blocks of the
    other axes, so the temporaries stay a few tens of MB whatever the volume."""
    if mode not in ("mirror", "nearest"):
        raise ValueError(f"mode {mode!r} is not 'mirror' or 'nearest'")
    positions = np.asarray(positions, dtype=np.float64)
    n = volume.shape[axis]
    if order == 0:
        return np.take(volume, _extend(np.rint(positions).astype(np.int64), n, "nearest"), axis=axis)
    pad = NEAREST_PAD if order == 3 and mode == "nearest" else 0
    weights = interpolation_matrix(positions + pad, n + 2 * pad, order, "mirror" if pad else mode).astype(np.float32)
    shape, m = volume.shape, len(positions)
    pre, post = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1 :]))
    v = np.ascontiguousarray(volume).reshape(pre, n, post)
    out = np.empty((pre, m, post), dtype=np.float32)
    columns = max(1, BLOCK_VOXELS // (n + 2 * pad))  # lines along `axis` per block
    c_post = min(post, columns)
    c_pre = max(1, columns // c_post) if c_post == post else 1
    for p0 in range(0, pre, c_pre):
        p1 = min(p0 + c_pre, pre)
        for q0 in range(0, post, c_post):
            q1 = min(q0 + c_post, post)
            # the lines along `axis` made contiguous for the prefilter, then as columns for the taps
            block = np.array(v[p0:p1, :, q0:q1].transpose(0, 2, 1), dtype=np.float32, order="C").reshape(-1, n)  # a copy: filtered in place
            if pad:
                block = np.pad(block, ((0, 0), (pad, pad)), mode="edge")
            if order == 3:
                ndimage.spline_filter1d(block, 3, axis=1, output=block, mode="mirror")
            taps = weights @ np.ascontiguousarray(block.T)  # (m, lines)
            out[p0:p1, :, q0:q1] = taps.reshape(m, p1 - p0, q1 - q0).transpose(1, 0, 2)
    return out.reshape(*shape[:axis], m, *shape[axis + 1 :])


def resample_axes(volume: np.ndarray, positions: list, order: int = 3, mode: str = "nearest") -> np.ndarray:
    """`volume` sampled at the tensor grid of per-axis `positions` (input indices, one array per
    axis), axis by axis, the axes that shrink the most first (the least work for the rest).
    The result is laid out in memory as the input is (a NIfTI volume read in Fortran order
    gives a Fortran-order result), so that no transposing copy of a whole volume is made."""
    if len(positions) != volume.ndim:
        raise ValueError(f"{len(positions)} position arrays for a {volume.ndim}-D volume")
    order_in_memory = sorted(range(volume.ndim), key=lambda a: -abs(volume.strides[a]))  # slowest axis first
    out = volume.transpose(order_in_memory)
    positions = [np.asarray(positions[a], dtype=np.float64) for a in order_in_memory]
    ratio = [len(p) / n for p, n in zip(positions, out.shape)]
    for axis in sorted(range(out.ndim), key=lambda a: ratio[a]):
        if not _is_identity(positions[axis], out.shape[axis]):  # every order reproduces the samples at integer positions
            out = resample_axis(out, axis, positions[axis], order, mode)
    out = np.ascontiguousarray(out if order == 0 else out.astype(np.float32, copy=False))
    return out.transpose(np.argsort(order_in_memory))


def _is_identity(positions: np.ndarray, n: int) -> bool:
    return len(positions) == n and np.allclose(positions, np.arange(n), rtol=0, atol=1e-6)


def axis_map(src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape, tol: float = 1e-4) -> tuple[list[int], list[np.ndarray]]:
    """How a destination grid reads a source grid when their axes are parallel: for each
    destination axis j, the source axis it runs along and the source index of each of its
    samples. Raises ValueError when the grids are oblique to each other."""
    m = np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    lin = m[:3, :3]
    src_axes = [int(np.argmax(np.abs(lin[:, j]))) for j in range(3)]
    scale = np.abs(lin).max(axis=0)
    off = np.abs(lin).copy()
    off[src_axes, range(3)] = 0
    if sorted(src_axes) != [0, 1, 2] or (off > tol * scale[None, :]).any():
        raise ValueError("the grids are not axis-aligned to each other (an oblique resampling does not separate)")
    positions = [lin[i, j] * np.arange(int(dst_shape[j])) + m[i, 3] for j, i in enumerate(src_axes)]
    return src_axes, positions


def resample_to_grid(volume: np.ndarray, src_affine, dst_affine, dst_shape, order: int = 3, mode: str = "nearest") -> np.ndarray:
    """`volume` (indexed as `src_affine` says) resampled onto the grid of `dst_affine` and
    `dst_shape`, whose axes must be parallel to the source's (any permutation or flip)."""
    src_axes, positions = axis_map(src_affine, dst_affine, dst_shape)
    per_src = [None] * 3
    for j, i in enumerate(src_axes):
        per_src[i] = positions[j]
    return np.transpose(resample_axes(volume, per_src, order, mode), src_axes)  # destination axis j is source axis src_axes[j]
