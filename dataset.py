"""The DeSD pretraining dataset: a list file of sub-volumes -> global and local views
(docs/method.md, section 3).

Orientation: patches are read with nibabel, whose array is (x, y, z), and depth is moved
first, so every view is (1, z, x, y) = (1, D, H, W) with H along x and W along y. This is the
reference's orientation, in which the released weights were trained; fine-tuning reads images
the same way (see finetune.py).

Randomness: each sample draws from a generator seeded by (seed, epoch, index), so the views of
a sample do not depend on the worker, the rank or the number of workers, and a resumed run
sees exactly the views an uninterrupted run would have.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import math
import os
import sys
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler, default_collate

from augment.intensity import BRIGHTNESS_ADD_SD, augment_intensity, probs_for_view, swap_in_plane
from preprocessing.network_input import HU_SCALE

BASE_SCALE = (1.4, 1.8)  # base crop side / global crop side
GLOBAL_SCALE = (0.8, 1.2)  # global view side / global crop side
LOCAL_SCALE = (1.5, 2.0)  # local view side / local crop side
TO_FILE_ORDER = (0, 2, 1)  # a view's axis (z, x, y) -> the same axis in the file's slice order (z, y, x)


OUTPUTS = ("views", "plain", "crops")


@dataclass(frozen=True)
class ViewConfig:
    global_size: int = 96
    local_size: int = 48
    depth: int = 16
    local_crops_number: int = 0
    per_slice: bool = True
    offset_sd: float = BRIGHTNESS_ADD_SD  # the additive brightness offset's sd
    # what the worker returns: "views" (augmented), "plain" (views without the intensity chain),
    # or "crops" (raw crops and their geometry; the training device makes the views, views_from_crops)
    output: str = "views"

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"ViewConfig.output must be one of {OUTPUTS}, got {self.output!r}")

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number


def read_list(data_path: str, list_path: str) -> list[str]:
    """Entries of a list file (one path relative to data_path a line), all checked to exist as
    files. Blank lines, `#` comments and a byte-order mark are skipped; an entry listed twice is
    kept (it is sampled twice as often) with a warning."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"data path {data_path!r} is not a directory")
    full = list_path if os.path.isabs(list_path) else os.path.join(data_path, list_path)
    if os.path.isdir(full):
        raise IsADirectoryError(f"--list_path {list_path!r}: {full!r} is a folder; expected the list file (one patch path a line)")
    if not os.path.isfile(full):
        raise FileNotFoundError(f"list file {full!r} does not exist (expected one patch path a line)")
    with open(full, encoding="utf-8-sig") as f:  # utf-8-sig: a byte-order mark is not part of the first entry
        numbered = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise ValueError(f"list file {full!r} is empty: run python preprocessing/splitting_to_patches.py first")
    for lineno, entry in numbered:
        path = os.path.join(data_path, entry)
        if os.path.isdir(path):
            raise IsADirectoryError(f"list file {full!r}, line {lineno}: {path!r} is a folder, not a patch file")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"list file {full!r}, line {lineno}: {path!r} does not exist")
    entries = [e for _, e in numbered]
    counts = collections.Counter(entries)
    repeated = len(entries) - len(counts)
    if repeated:
        first = next(e for e, n in counts.items() if n > 1)
        print(
            f"WARNING: list file {full!r} names {repeated} entr{'y' if repeated == 1 else 'ies'} more than once (e.g. {first!r}); "
            "each is sampled as often as it is listed"
        )
    return [os.path.join(data_path, e) for e in entries]


@functools.lru_cache(maxsize=1 << 16)
def _nii_layout(path: str, mtime_ns: int, size: int) -> tuple | None:
    """(dtype, data offset, shape) of an uncompressed `.nii` whose voxels are stored as they
    are (no intensity scaling), else None. Cached per file version (path, modification time,
    size): parsing the header costs more than reading a view's voxels through the memory map."""
    with open(path, "rb") as f:
        header = nib.Nifti1Header.from_fileobj(f)
    shape = header.get_data_shape()
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {shape}")
    slope, inter = header.get_slope_inter()
    if slope in (None, 1.0) and inter in (None, 0.0):
        return header.get_data_dtype(), int(header.get_data_offset()), shape
    return None


def open_volume(path: str) -> np.ndarray:
    """The patch as nibabel orders it, (x, y, z). An uncompressed `.nii` without intensity
    scaling comes back as a memory map, so only the voxels a crop touches are read."""
    if path.endswith(".nii"):
        st = os.stat(path)
        layout = _nii_layout(path, st.st_mtime_ns, st.st_size)
        if layout is not None:
            dtype, offset, shape = layout
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F")
    img = nib.load(path)
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {img.shape}")
    return np.asanyarray(img.dataobj)


def _inside(volume: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], depths: tuple[int, int]):
    """The part of volume[rows, cols, depths] (an (x, y, z) array) inside the volume, as a
    (z, y, x) view, and the (z, y, x) slices of the requested block where it belongs; None
    when the block lies wholly outside."""
    sx, sy, sz = volume.shape
    r0, r1 = max(rows[0], 0), min(rows[1], sx)
    c0, c1 = max(cols[0], 0), min(cols[1], sy)
    d0, d1 = max(depths[0], 0), min(depths[1], sz)
    if r0 >= r1 or c0 >= c1 or d0 >= d1:
        return None, None
    where = (slice(d0 - depths[0], d1 - depths[0]), slice(c0 - cols[0], c1 - cols[0]), slice(r0 - rows[0], r1 - rows[0]))
    block = np.asarray(volume[r0:r1, c0:c1, d0:d1]).T
    if block.dtype.kind == "f" and not np.isfinite(block).all():  # float patches only; int16 ones cannot hold NaN
        raise ValueError("non-finite values (NaN or inf) in the patch")
    return block, where


def read_slices(volume: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], depths: tuple[int, int], flips=()) -> np.ndarray:
    """volume[rows, cols, depths] of the zero-padded (x, y, z) volume as float32 / 1024 in
    (z, y, x) order, C-contiguous: each depth slice with its in-plane axes transposed, which
    is the file's own order (x varies fastest), so one sequential pass converts it. `flips`
    names axes of the result to reverse, read backwards at no extra cost. Indices outside
    the volume read as 0 HU."""
    shape = (depths[1] - depths[0], cols[1] - cols[0], rows[1] - rows[0])  # (z, y, x)
    scale = np.float32(1.0 / HU_SCALE)
    reverse = tuple(slice(None, None, -1) if a in flips else slice(None) for a in range(3))
    block, where = _inside(volume, rows, cols, depths)
    if block is not None and block.shape == shape:  # inside the volume: no padding
        return np.multiply(block[reverse], scale, dtype=np.float32, order="C")
    out = np.zeros(shape, np.float32)
    if block is not None:
        np.multiply(block, scale, out=out[where])
    return np.ascontiguousarray(out[reverse])


def read_crop(volume: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], depths: tuple[int, int], out: np.ndarray) -> None:
    """volume[rows, cols, depths] as stored (int16 HU, no scaling), in (z, y, x) order, into the
    corner of out (D, S, S) with S > both in-plane sides; 0 HU outside the volume. The row and
    column just past the block repeat its last ones, the edge that `views_from_crops`'s
    bilinear sampling reads when it enlarges a crop."""
    ny, nx = cols[1] - cols[0], rows[1] - rows[0]
    target = out[:, :ny, :nx]
    block, where = _inside(volume, rows, cols, depths)
    if block is None or block.shape != target.shape:
        target.fill(0)
    if block is not None:
        target[where] = block
    out[:, ny, :nx] = out[:, ny - 1, :nx]
    out[:, : ny + 1, nx] = out[:, : ny + 1, nx - 1]


def _side(size: int, scale: tuple[float, float], limit: int, rng: np.random.Generator) -> int:
    """int(size * U(scale)), or size itself when that reaches `limit`."""
    side = int(size * rng.uniform(*scale))
    return size if side >= limit else side


def crop_buffer_side(size: int, scale: tuple[float, float]) -> int:
    """In-plane side of the buffers that hold a view kind's raw crops (output "crops"): the
    largest crop side, plus one for the repeated edge."""
    return max(size, math.ceil(size * scale[1])) + 1


def make_views(path: str, cfg: ViewConfig, rng: np.random.Generator, g: torch.Generator):
    """docs/method.md, section 3, steps 1-6, for one patch: a list of (1, D, H, W) float32 views.

    The base crop (in-plane side 96 x U(1.4, 1.8) per axis, full depth, of the patch padded to
    at least 96 in-plane at the end and 16 slices symmetrically) is never materialised: each
    view's block is read straight from the file at the base crop's offset.

    With cfg.output "crops" the worker stops after reading: it returns the raw crops, one int16
    (n, D, S, S) tensor for the global views and one for the local ones (see `read_crop`),
    and an int64 (views, 5) geometry: side along H, side along W, and flips of D, H and W.
    `views_from_crops` makes the same views from them on the training device.
    """
    volume = open_volume(path)  # (x, y, z)
    sx, sy, sz = volume.shape
    ph, pw = max(sx, cfg.global_size), max(sy, cfg.global_size)
    pd = max(sz, cfg.depth)
    z_shift = (pd - sz) // 2  # symmetric depth padding
    base_h = _side(cfg.global_size, BASE_SCALE, ph, rng)
    base_w = _side(cfg.global_size, BASE_SCALE, pw, rng)
    h0 = int(rng.integers(0, ph - base_h + 1))
    w0 = int(rng.integers(0, pw - base_w + 1))
    groups = [(2, cfg.global_size, GLOBAL_SCALE)]
    if cfg.local_crops_number:
        groups.append((cfg.local_crops_number, cfg.local_size, LOCAL_SCALE))
    kinds = [(size, scale) for n, size, scale in groups for _ in range(n)]  # one a view, global first
    crops = cfg.output == "crops"
    if crops:
        out = [
            np.empty((n, cfg.depth, crop_buffer_side(size, scale), crop_buffer_side(size, scale)), np.int16) for n, size, scale in groups
        ]
        geometry = np.zeros((len(kinds), 5), np.int64)
    else:
        out = [torch.empty(n, cfg.depth, size, size) for n, size, _ in groups]
    for k, (size, scale) in enumerate(kinds):
        side_h, side_w = _side(size, scale, base_h, rng), _side(size, scale, base_w, rng)
        z0 = int(rng.integers(0, pd - cfg.depth + 1)) - z_shift
        y0 = h0 + int(rng.integers(0, base_h - side_h + 1))
        x0 = w0 + int(rng.integers(0, base_w - side_w + 1))
        flips = [axis for axis in range(3) if rng.random() < 0.8]
        block = ((y0, y0 + side_h), (x0, x0 + side_w), (z0, z0 + cfg.depth))
        target = out[0][k] if k < 2 else out[1][k - 2]
        if crops:
            read_crop(volume, *block, out=target)
            geometry[k] = (side_h, side_w, 0 in flips, 1 in flips, 2 in flips)
            continue
        # read in the file's in-plane order (D, W, H), flipped as it is read; resized straight
        # into the batch, which stays in that order (see below)
        view = torch.from_numpy(read_slices(volume, *block, [TO_FILE_ORDER[a] for a in flips]))
        if (side_h, side_w) != (size, size):
            torch.ops.aten.upsample_bilinear2d.out(view[None], [size, size], False, None, None, out=target[None])
        else:
            target.copy_(view)
    if crops:
        return [torch.from_numpy(part) for part in out], torch.from_numpy(geometry)
    # back to (D, H, W) on the way out of the chain, while the views are in the cache (every
    # step of the chain treats the two in-plane axes alike)
    probs = [[probs_for_view(0), probs_for_view(1)], probs_for_view(2)]
    for k, part in enumerate(out):
        out[k] = (
            augment_intensity(part, probs[k], g, cfg.per_slice, swap_hw=True, offset_sd=cfg.offset_sd)
            if cfg.output == "views"
            else swap_in_plane(part)
        )
    return [v[None] for part in out for v in part]


def _sample_grid(geometry: torch.Tensor, size: int, side: int) -> torch.Tensor:
    """grid_sample's grid (N, size, size, 2) that resizes each crop of a (N, D, side, side)
    (z, W, H) batch to (size, size) along (H, W), as F.interpolate(mode='bilinear',
    align_corners=False) does, flipped where geometry says so."""
    i = torch.arange(size, device=geometry.device, dtype=torch.float64)

    def coordinates(n: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:  # (N, size), normalised
        k = torch.where(flip.view(-1, 1).bool(), size - 1 - i, i)
        source = (k + 0.5) * (n.view(-1, 1).double() / size) - 0.5  # interpolate's source position
        return ((2 * source + 1) / side - 1).float()

    along_h = coordinates(geometry[:, 0], geometry[:, 3])  # reads the crop's last axis
    along_w = coordinates(geometry[:, 1], geometry[:, 4])
    return torch.stack((along_h[:, :, None].expand(-1, size, size), along_w[:, None, :].expand(-1, size, size)), dim=-1)


def views_from_crops(crops: list[torch.Tensor], geometry: torch.Tensor, cfg: ViewConfig) -> list[torch.Tensor]:
    """The views of a batch from the workers' raw crops (cfg.output "crops"): crops (B, n, D, S, S)
    per view group and geometry (B, views, 5), on any device -> a list of (B, 1, D, size,
    size) float32 views, global first, without the intensity chain.

    Scaling, resize, the transpose to (D, H, W) and the flips of H and W are one bilinear
    grid_sample per crop, equal to the worker's F.interpolate and flips up to float rounding
    (tests/test_dataset.py); the row and column past each crop repeat its edge, so the
    'border' padding reproduces interpolate's clamping at the far edge."""
    views, first = [], 0
    for part, size in zip(crops, (cfg.global_size, cfg.local_size)):
        b, n, d, side, _ = part.shape
        geo = geometry[:, first : first + n].reshape(b * n, 5)
        first += n
        x = part.reshape(b * n, d, side, side).float().div_(HU_SCALE)
        x = torch.where(geo[:, 2].view(-1, 1, 1, 1).bool(), x.flip(1), x)
        y = F.grid_sample(x, _sample_grid(geo, size, side), mode="bilinear", padding_mode="border", align_corners=False)
        views += list(y.view(b, n, 1, d, size, size).unbind(1))
    return views


def warn_about_small_patches(paths: list[str], cfg: ViewConfig, sample: int = 32) -> list[str]:
    """Warn where patches (a sample of up to `sample`, read from their headers) are smaller than
    the global views: their views would be mostly padding. Returns the small ones found."""
    small = []
    for path in paths[:: max(1, len(paths) // sample)][:sample]:
        try:
            x, y, z = nib.load(path).shape[:3]
        except Exception:  # unreadable or odd: reported where it is read
            continue
        if min(x, y) < cfg.global_size or z < cfg.depth:
            small.append(f"{os.path.basename(path)} ({x} x {y} x {z})")
    if small:
        print(
            f"WARNING: {len(small)} of the patches sampled are smaller than the global views ({cfg.global_size} x "
            f"{cfg.global_size} in-plane, {cfg.depth} slices), e.g. {', '.join(small[:3])}: their views are mostly padding. "
            "Were they split from volumes resampled to 1 mm (or give --global_crop_size / --crop_depth to match)?",
            flush=True,
        )
    return small


class SSLDataset(Dataset):
    """Patches named by a list file. Indexed by (index, epoch) pairs (see EpochSampler);
    returns (views, number of unreadable patches replaced to make this sample), views being
    what `make_views` returns: the list of views, or (crops, geometry) with cfg.output "crops"."""

    def __init__(self, data_path: str, list_path: str, cfg: ViewConfig, seed: int = 0, skip_bad_patches: bool = False):
        self.paths = read_list(data_path, list_path)
        self.cfg = cfg
        self.seed = seed
        self.skip_bad_patches = skip_bad_patches
        self.reported: set[int] = set()
        warn_about_small_patches(self.paths, cfg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            rng = np.random.default_rng([self.seed, epoch, index, attempt])
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            try:
                return make_views(self.paths[i], self.cfg, rng, g), attempt
            except Exception as err:
                if not self.skip_bad_patches:
                    raise RuntimeError(f"cannot read patch {self.paths[i]!r}: {err} (use --skip_bad_patches to go on)") from err
                if i not in self.reported:  # once per patch and process
                    self.reported.add(i)
                    print(f"warning: skipping unreadable patch {self.paths[i]!r}: {err}", flush=True)
        raise RuntimeError("no readable patch in the list")


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed memory for reuse instead of returning it to the
    system (Linux only; elsewhere a no-op that returns False). A sample's views and their
    intermediates are fresh 1-2 MB buffers, which glibc would otherwise map anew and unmap per
    sample, so that every sample pays page faults; with the mmap and trim thresholds raised the
    next sample reuses the heap. A worker then holds on to its peak working set (tens of MB);
    docs/performance.md gives the measured effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def init_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn of the pretraining loader."""
    keep_freed_memory()


class EpochSampler(Sampler):
    """This rank's share of a seeded permutation, yielding (index, epoch) pairs.

    Like DistributedSampler with drop_last: every rank gets len // world_size indices of the
    permutation drawn from (seed, epoch). `start` skips the first indices of this rank's share
    (for resuming in the middle of an epoch).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.world_size - self.start

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        share = order[self.rank : self.n // self.world_size * self.world_size : self.world_size]
        return iter([(i, self.epoch) for i in share[self.start :]])


def collate(batch: list[tuple]) -> tuple:
    """Stack each view position: a list of (B, 1, D, H, W) tensors, and the replaced count.
    Raw crops (output "crops") stack per view group, with their geometry: ((crops, geometry),
    count), crops (B, n, D, S, S) and geometry (B, views, 5). In a loader worker the stacks
    are made in shared memory (default_collate), so handing them to the training process
    copies nothing."""
    samples = [sample for sample, _ in batch]
    bad = sum(b for _, b in batch)
    if isinstance(samples[0], tuple):
        crops = [default_collate(list(parts)) for parts in zip(*(c for c, _ in samples))]
        return (crops, default_collate([geo for _, geo in samples])), bad
    return [default_collate(list(parts)) for parts in zip(*samples)], bad
