"""The DeSD pretraining dataset: a list file of sub-volumes -> global and local views
(SPEC section 3).

Orientation: patches are read with nibabel, whose array is (x, y, z), and depth is moved
first, so every view is (1, z, x, y) = (1, D, H, W) with H along x and W along y. This is the
reference's orientation, in which the released weights were trained; fine-tuning reads images
the same way (see finetune.py).

Randomness: each sample draws from a generator seeded by (seed, epoch, index), so the views of
a sample do not depend on the worker, the rank or the number of workers, and a resumed run
sees exactly the views an uninterrupted run would have.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from augment import augment_intensity, probs_for_view

BASE_SCALE = (1.4, 1.8)  # base crop side / global crop side
GLOBAL_SCALE = (0.8, 1.2)  # global view side / global crop side
LOCAL_SCALE = (1.5, 2.0)  # local view side / local crop side
HU_SCALE = 1024.0


@dataclass(frozen=True)
class ViewConfig:
    global_size: int = 96
    local_size: int = 48
    depth: int = 16
    local_crops_number: int = 0
    per_slice: bool = True
    intensity: bool = True  # False: leave the intensity chain to the training device

    @property
    def ncrops(self) -> int:
        return 2 + self.local_crops_number


def read_list(data_path: str, list_path: str) -> list[str]:
    """Entries of a list file (one path relative to data_path a line), all checked to exist."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"data path {data_path!r} is not a directory")
    full = list_path if os.path.isabs(list_path) else os.path.join(data_path, list_path)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"list file {full!r} does not exist (expected one patch path a line)")
    with open(full) as f:
        entries = [line.strip() for line in f if line.strip()]
    if not entries:
        raise ValueError(f"list file {full!r} is empty: run preprocessing/splitting_to_patches.py first")
    for lineno, entry in enumerate(entries, 1):
        if not os.path.isfile(os.path.join(data_path, entry)):
            raise FileNotFoundError(f"list file {full!r}, entry {lineno}: {os.path.join(data_path, entry)!r} does not exist")
    return [os.path.join(data_path, e) for e in entries]


def load_region(path: str, side_h: int, side_w: int, min_h: int, rng: np.random.Generator) -> np.ndarray:
    """Read a random (D, side_h, side_w) in-plane window of the zero-padded patch.

    The patch is padded at the end of the in-plane axes to at least `min_h` (only the part of
    the window inside the image is read, so an uncompressed `.nii` is read from disk only
    where needed). Returns int16 (z, x, y).
    """
    img = nib.load(path)
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {img.shape}")
    sx, sy, _ = img.shape
    ph, pw = max(sx, min_h), max(sy, min_h)
    if side_h >= ph:
        side_h = min_h
    if side_w >= pw:
        side_w = min_h
    h0 = int(rng.integers(0, ph - side_h + 1))
    w0 = int(rng.integers(0, pw - side_w + 1))
    part = np.asarray(img.dataobj[h0 : min(h0 + side_h, sx), w0 : min(w0 + side_w, sy), :])  # (x, y, z)
    region = np.zeros((part.shape[2], side_h, side_w), dtype=np.float32)
    region[:, : part.shape[0], : part.shape[1]] = part.transpose(2, 0, 1)
    return region


def crop_view(base: torch.Tensor, size: int, scale: tuple[float, float], depth: int, rng: np.random.Generator) -> torch.Tensor:
    """A random crop of the base (D, H, W): side int(size * U(scale)) per axis (size when that
    reaches the base side), `depth` slices, each axis flipped with p 0.8, resized in-plane to
    size x size bilinearly. Returns (D', size, size)."""
    d, h, w = base.shape
    sides = []
    for full in (h, w):
        side = int(size * rng.uniform(*scale))
        sides.append(size if side >= full else side)
    z0 = int(rng.integers(0, d - depth + 1))
    y0 = int(rng.integers(0, h - sides[0] + 1))
    x0 = int(rng.integers(0, w - sides[1] + 1))
    view = base[z0 : z0 + depth, y0 : y0 + sides[0], x0 : x0 + sides[1]]
    flips = [axis for axis in range(3) if rng.random() < 0.8]
    if flips:
        view = view.flip(flips)
    if sides != [size, size]:
        view = F.interpolate(view[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return view.contiguous()


def make_views(path: str, cfg: ViewConfig, rng: np.random.Generator, g: torch.Generator) -> list[torch.Tensor]:
    """SPEC section 3, steps 1-6, for one patch: a list of (1, D, H, W) float32 views."""
    side_h = int(cfg.global_size * rng.uniform(*BASE_SCALE))
    side_w = int(cfg.global_size * rng.uniform(*BASE_SCALE))
    region = load_region(path, side_h, side_w, cfg.global_size, rng)  # (z, x, y)
    if region.shape[0] < cfg.depth:  # pad depth symmetrically
        before = (cfg.depth - region.shape[0]) // 2
        region = np.pad(region, ((before, cfg.depth - region.shape[0] - before), (0, 0), (0, 0)))
    base = torch.from_numpy(region).div_(HU_SCALE)  # HU -> [-1, 1]
    views = [crop_view(base, cfg.global_size, GLOBAL_SCALE, cfg.depth, rng) for _ in range(2)]
    views += [crop_view(base, cfg.local_size, LOCAL_SCALE, cfg.depth, rng) for _ in range(cfg.local_crops_number)]
    if cfg.intensity:
        views = [augment_intensity(v[None], probs_for_view(k), g, cfg.per_slice)[0] for k, v in enumerate(views)]
    return [v[None] for v in views]


class SSLDataset(Dataset):
    """Patches named by a list file. Indexed by (index, epoch) pairs (see EpochSampler);
    returns (views, number of unreadable patches replaced to make this sample)."""

    def __init__(self, data_path: str, list_path: str, cfg: ViewConfig, seed: int = 0, skip_bad_patches: bool = False):
        self.paths = read_list(data_path, list_path)
        self.cfg = cfg
        self.seed = seed
        self.skip_bad_patches = skip_bad_patches

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
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
                print(f"warning: skipping unreadable patch {self.paths[i]!r}: {err}", flush=True)
        raise RuntimeError("no readable patch in the list")


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


def collate(batch: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], int]:
    """Stack each view position: a list of (B, 1, D, H, W) tensors, and the replaced count."""
    views = [torch.stack(parts) for parts in zip(*(sample for sample, _ in batch))]
    return views, sum(bad for _, bad in batch)
