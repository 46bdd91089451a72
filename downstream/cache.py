"""The preprocessed cache of a labelled set, as nnU-Net keeps one: each case is preprocessed once
(`labelled.preprocessing`: reoriented to the pretraining orientation, resampled to the spacing,
clipped and scaled, depth first) into plain `.npy` arrays that fine-tuning and validation read
memory-mapped. Memory no longer grows with the cohort: a loader worker maps one case, copies
one patch out and drops the map again.

Per case, in `<cache>/`:
- `<id>.image.npy`: float32 (z, x, y), the network's input scale;
- `<id>.label.npy`: uint8 (z, x, y);
- `<id>.locations.npy`: int32 (n, 4) rows (class, z, x, y), up to `LOCATIONS_PER_CLASS`
  foreground voxels of each class, drawn once, where patches centred on foreground come from;
- `<id>.json`, written last: shape, the classes present and the fingerprint. A case is reused
  only when its fingerprint equals the current one: the preprocessing settings and version,
  and the path, size and modification time of its image and label files. Any other case is
  preprocessed again; an interrupted build leaves no `.json`, so it is redone.
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from downstream import labelled
from preprocessing import files
from preprocessing.network_input import HU_RANGE, PRETRAINING_AXCODES
from preprocessing.runner import JobResult, run_jobs, summarise

VERSION = 3  # of the preprocessing: bump whenever labelled.preprocessing changes what it computes
LOCATIONS_PER_CLASS = 10000
# peak memory of preprocessing one case beyond the process's own: a bound per voxel of its
# resampled grid (the float32 input, its reoriented copy and the output, the label's), plus the
# separable resampler's blocks (measured: 1.05 GB for 512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm to
# 1 mm, 75.6M voxels, 14 bytes a voxel; benchmarks/bench_resample.py)
BYTES_PER_OUTPUT_VOXEL = 20
BYTES_PER_CASE = 256 * 2**20


def settings(spacing: float) -> dict:
    """What a cached case was computed with, besides its input files."""
    return {
        "version": VERSION,
        "spacing_mm": float(spacing),
        "orientation": PRETRAINING_AXCODES,
        "hu_range": list(HU_RANGE),
        "image_interpolation": "cubic spline, edge values beyond the border (separable)",
        "label_interpolation": "nearest",
    }


def input_fingerprint(case: dict) -> dict:
    fp = {}
    for key in ("image", "label"):
        st = os.stat(case[key])
        fp[key] = [os.path.abspath(case[key]), st.st_size, st.st_mtime_ns]
    return fp


def default_dir(data_dir: str, spacing: float) -> str:
    """`<data_dir>_preprocessed/<spacing>mm`, beside the dataset (which stays read-only)."""
    data_dir = os.path.abspath(data_dir).rstrip(os.sep)
    return f"{data_dir}_preprocessed{os.sep}{spacing:g}mm"


def paths(cache_dir: str, case_id: str) -> dict[str, str]:
    base = os.path.join(cache_dir, case_id)
    return {"image": f"{base}.image.npy", "label": f"{base}.label.npy", "locations": f"{base}.locations.npy", "meta": f"{base}.json"}


def read_meta(cache_dir: str, case: dict, spacing: float) -> dict | None:
    """The cached case's record if it is complete and its fingerprint matches, else None."""
    p = paths(cache_dir, case["id"])
    try:
        with open(p["meta"]) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("settings") != settings(spacing) or meta.get("inputs") != input_fingerprint(case):
        return None
    if not all(os.path.isfile(p[k]) for k in ("image", "label", "locations")):
        return None
    return {**meta, **{k: p[k] for k in ("image", "label", "locations")}, "source": case["image"]}


def foreground_locations(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to LOCATIONS_PER_CLASS (class, z, x, y) rows per foreground class, drawn uniformly."""
    rows = []
    for c in np.unique(label):
        if c == 0:
            continue
        where = np.argwhere(label == c)
        if len(where) > LOCATIONS_PER_CLASS:
            where = where[np.sort(rng.choice(len(where), LOCATIONS_PER_CLASS, replace=False))]
        rows.append(np.concatenate([np.full((len(where), 1), c, dtype=np.int64), where], 1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def preprocess_case(case: dict, spacing: float, cache_dir: str) -> JobResult:
    """One case into the cache; skipped when its record already matches. A failure is
    returned naming the case and its image, for the summary."""
    try:
        return _preprocess_case(case, spacing, cache_dir)
    except Exception as err:
        while err.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
            err = err.__cause__
        return JobResult(case["id"], error=f"{case['image']}: {type(err).__name__}: {err}")


def _preprocess_case(case: dict, spacing: float, cache_dir: str) -> JobResult:
    from monai.transforms import Compose

    if read_meta(cache_dir, case, spacing) is not None:
        return JobResult(case["id"], skipped=[case["id"]])
    item = Compose(labelled.preprocessing(spacing))({"image": case["image"], "label": case["label"]})
    image = np.ascontiguousarray(item["image"][0].numpy(), dtype=np.float32)
    label = np.ascontiguousarray(item["label"][0].numpy()).astype(np.uint8)
    if image.shape != label.shape:
        raise ValueError(f"{case['image']}: preprocessed image {image.shape} and label {label.shape} differ")
    locations = foreground_locations(label, np.random.default_rng(zlib.crc32(case["id"].encode())))
    p = paths(cache_dir, case["id"])
    for key, arr in (("image", image), ("label", label), ("locations", locations)):
        files.write_atomic(p[key], lambda tmp, arr=arr: np.save(tmp, arr))
    meta = {
        "id": case["id"],
        "shape": list(image.shape),
        "classes_present": sorted(int(c) for c in np.unique(locations[:, 0])),
        "settings": settings(spacing),
        "inputs": input_fingerprint(case),
    }

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    files.write_atomic(p["meta"], write)
    return JobResult(case["id"], written=[case["id"]])


def output_voxels(case: dict, spacing: float) -> int:
    """Voxels of a case's image resampled to `spacing`, from its header alone."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(case["image"])
    reader.ReadImageInformation()
    return int(np.prod([max(1, round(n * s / spacing)) for n, s in zip(reader.GetSize(), reader.GetSpacing())]))


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def processes_for(cases: list[dict], spacing: float, workers: int) -> int:
    """At most `workers`, and as many as the available memory holds preprocessing the
    largest case at once (at least 1); says so when that is fewer."""
    free = available_memory()
    if workers <= 1 or free is None or not cases:
        return max(1, workers)
    need = max(output_voxels(c, spacing) for c in cases) * BYTES_PER_OUTPUT_VOXEL + BYTES_PER_CASE
    fit = max(1, int(free // need))
    if fit < workers:
        print(f"preprocessing with {fit} of {workers} processes: each may need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free")
    return min(workers, fit)


def build(cases: list[dict], spacing: float, cache_dir: str, workers: int = 1, first: int = 0, step: int = 1) -> list[dict]:
    """Preprocess what is not cached yet (a tqdm bar, then a summary) and return the cached
    records of `cases`, in order. Processes of one distributed run pass `first`/`step` (rank,
    world size): each starts on its own share and then checks the rest, so all of them return
    a complete cache. Fails naming every case that could not be preprocessed."""
    import functools

    os.makedirs(cache_dir, exist_ok=True)
    files.remove_stale_partials(cache_dir)
    order = cases[first::step] + [c for i, c in enumerate(cases) if i % step != first]
    todo = [c for c in order if read_meta(cache_dir, c, spacing) is None]
    workers = processes_for(todo, spacing, min(workers, len(todo)))  # 1 when nothing is left to do
    job = functools.partial(preprocess_case, spacing=spacing, cache_dir=cache_dir)
    results = run_jobs(job, order, workers, desc=f"preprocessing to {spacing:g} mm", start_method="spawn")
    if summarise(results, f"preprocessed cache {cache_dir}"):
        failed = [f"{r.name}: {r.error}" for r in results if r.error]
        raise RuntimeError(f"{len(failed)} case(s) could not be preprocessed into {cache_dir}:\n  " + "\n  ".join(failed))
    records = []
    for case in cases:
        meta = read_meta(cache_dir, case, spacing)
        if meta is None:
            raise RuntimeError(f"{cache_dir}: case {case['id']} is not cached after preprocessing (was it changed meanwhile?)")
        records.append(meta)
    return records
