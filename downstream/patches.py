"""Patches of labelled volumes, one sampler for every user of them: fine-tuning reads them from
the cache through memory maps (`PatchDataset`), the experiment and the probe from volumes in
memory (`sample`). A patch is centred on a foreground voxel with probability `fg_share` (of a
class drawn uniformly among those the case holds, then a voxel of it, as nnU-Net samples) and
lies anywhere in the volume otherwise (a uniform corner, as MONAI's random crop draws it).
Parts of a patch outside its volume are zero, the padding that SpatialPad adds."""

from __future__ import annotations

import numpy as np


def crop(array: np.ndarray, start, size) -> np.ndarray:
    """The box [start, start + size) of `array` (in memory or memory-mapped), zero outside it."""
    out = np.zeros(tuple(size), dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def patch_start(centre, shape, size) -> list[int]:
    """The corner of a `size` box around `centre` moved inside `shape`; a box larger than an
    axis is centred on it (and padded by `crop`)."""
    return [(dim - n) // 2 if n >= dim else int(np.clip(c - n // 2, 0, dim - n)) for c, dim, n in zip(centre, shape, size)]


def draw_start(shape, size, locations: np.ndarray, fg_share: float, rng: np.random.Generator) -> list[int]:
    """The corner of one patch: around a foreground voxel of `locations` ((n, 4) rows of class,
    z, x, y) with probability `fg_share`, else uniform among the boxes inside `shape`."""
    if len(locations) and rng.random() < fg_share:
        rows = locations[locations[:, 0] == rng.choice(np.unique(locations[:, 0]))]
        return patch_start(rows[rng.integers(len(rows)), 1:], shape, size)
    return [(dim - n) // 2 if n >= dim else int(rng.integers(dim - n + 1)) for dim, n in zip(shape, size)]


def sample(cases, size, count: int, fg_share: float, rng: np.random.Generator, per_case: bool = False):
    """`count` patches of in-memory cases [(image, label, locations)]: from cases drawn uniformly,
    or `count` of each case with `per_case`. Returns images (N, D, H, W), labels (N, D, H, W)
    and the index of each patch's case."""
    owners = np.repeat(np.arange(len(cases)), count) if per_case else rng.integers(len(cases), size=count)
    images, labels = [], []
    for c in owners:
        image, label, locations = cases[c]
        start = draw_start(image.shape, size, locations, fg_share, rng)
        images.append(crop(image, start, size))
        labels.append(crop(label, start, size))
    return np.stack(images), np.stack(labels), owners


class PatchDataset:
    """Training patches from the cache, `samples_per_volume` per visit of a case, centred on
    foreground with probability pos_ratio / (pos_ratio + 1). Items are lists of {"image",
    "label"} (1, z, x, y) tensors, augmented by `augment` (a MONAI dictionary transform),
    flattened into batches by MONAI's list_data_collate. Each loader worker draws from its own
    generator, seeded by torch per worker and epoch."""

    def __init__(self, records: list[dict], patch_size, samples_per_volume: int, pos_ratio: float, augment=None):
        self.records, self.patch = records, [int(n) for n in patch_size]
        self.samples, self.fg_share = samples_per_volume, pos_ratio / (pos_ratio + 1.0)
        self.augment = augment
        self._rng, self._seed = None, None

    def __len__(self) -> int:
        return len(self.records)

    def rng(self) -> np.random.Generator:
        import torch

        seed = torch.initial_seed()  # differs per worker and per epoch of a seeded DataLoader
        if self._seed != seed:
            self._rng, self._seed = np.random.default_rng(seed), seed
        return self._rng

    def __getitem__(self, i: int) -> list[dict]:
        import torch

        record, rng = self.records[i], self.rng()
        locations = np.load(record["locations"])
        image, label = np.load(record["image"], mmap_mode="r"), np.load(record["label"], mmap_mode="r")
        out = []
        for _ in range(self.samples):
            start = draw_start(record["shape"], self.patch, locations, self.fg_share, rng)
            item = {
                "image": torch.from_numpy(crop(image, start, self.patch))[None],
                "label": torch.from_numpy(crop(label, start, self.patch))[None],
                "image_path": record["source"],
            }
            out.append(self.augment(item) if self.augment is not None else item)
        del image, label  # drop the maps: memory does not grow with the cohort
        return out


class VolumeDataset:
    """Whole preprocessed volumes for validation: {"image" float32, "label" uint8} of shape
    (1, z, x, y), read from the cache (no resampling at each validation), with the case's
    "id" and "image_path"."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        import torch

        record = self.records[i]
        return {
            "image": torch.from_numpy(np.load(record["image"]))[None],
            "label": torch.from_numpy(np.load(record["label"]))[None],
            "image_path": record["source"],
            "id": record["id"],
        }
