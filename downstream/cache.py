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
  only when its fingerprint equals the current one (the preprocessing settings and version,
  and the path, size, modification time and a content sample of its image and label files)
  and its arrays are what the record says (shape, dtype and file size from each `.npy`
  header; object arrays are never loaded). Any other case is preprocessed again, naming the
  damaged file; an interrupted build leaves no `.json`, so it is redone.
"""

from __future__ import annotations

import errno
import hashlib
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


SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 4096  # the fingerprint's content sample: the first 64 KiB and 16 blocks spread over the file


def content_sample(path: str) -> str:
    """A hash of the file's first 64 KiB (the header and more) and of 16 blocks of 4 KiB spread
    evenly over the rest: an edit that keeps the size and the modification time still changes
    it (for compressed files, any edit does), at the cost of reading about 130 KiB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(16 * SAMPLE_BYTES))
        for k in range(SAMPLE_BLOCKS):
            f.seek(16 * SAMPLE_BYTES + (max(size - 17 * SAMPLE_BYTES, 0) * k) // max(SAMPLE_BLOCKS - 1, 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def input_fingerprint(case: dict) -> dict:
    """Per input file: its path, size, modification time and content sample."""
    fp = {}
    for key in ("image", "label"):
        st = os.stat(case[key])
        fp[key] = [os.path.abspath(case[key]), st.st_size, st.st_mtime_ns, content_sample(case[key])]
    return fp


def array_problem(path: str, shape=None, dtype=None, columns: int | None = None) -> str | None:
    """Why the `.npy` at `path` is not the array its record says (None when it is), from its
    header and size alone: a missing or cut-short file, another shape or dtype, or an object
    array (a pickle, never loaded)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    stored_shape, _, stored_dtype = header
    if stored_dtype.hasobject:
        return "holds Python objects (a pickle), which are never loaded"
    if dtype is not None and stored_dtype != np.dtype(dtype):
        return f"dtype {stored_dtype}, expected {np.dtype(dtype)}"
    if shape is not None and list(stored_shape) != list(shape):
        return f"shape {tuple(stored_shape)}, expected {tuple(shape)}"
    if columns is not None and (len(stored_shape) != 2 or stored_shape[1] != columns):
        return f"shape {tuple(stored_shape)}, expected (n, {columns})"
    expected = offset + int(np.prod(stored_shape)) * stored_dtype.itemsize
    if os.path.getsize(path) != expected:
        return f"{os.path.getsize(path)} bytes, expected {expected} (cut short?)"
    return None


def cache_root() -> str:
    """Where caches live unless --preprocessed_dir says otherwise: $DESD_CACHE, else
    ~/.cache/desd (nnU-Net keeps its own in $nnUNet_preprocessed the same way)."""
    return os.environ.get("DESD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "desd")


def former_dir(data_dir: str, spacing: float) -> str:
    """Where caches used to be: `<data_dir>_preprocessed/<spacing>mm`, beside the dataset."""
    return f"{os.path.abspath(data_dir).rstrip(os.sep)}_preprocessed{os.sep}{spacing:g}mm"


def default_dir(data_dir: str, spacing: float) -> str:
    """`<cache root>/preprocessed/<dataset name>-<hash of its path>/<spacing>mm`: never beside
    the dataset, where nnU-Net's commands take a sibling folder for a second dataset of the same
    id ("More than one dataset name found"). A cache found in the former place beside the
    dataset is still used, with a note on moving it."""
    former = former_dir(data_dir, spacing)
    if os.path.isdir(former) and any(f.endswith(".json") for f in os.listdir(former)):
        print(
            f"note: using the cache {former!r} beside the dataset; nnU-Net's commands fail on such a sibling folder. Move it "
            f"to {_default_dir(data_dir, spacing)!r} (or pass --preprocessed_dir) to keep it out of their way",
            flush=True,
        )
        return former
    return _default_dir(data_dir, spacing)


def _default_dir(data_dir: str, spacing: float) -> str:
    path = os.path.abspath(data_dir).rstrip(os.sep)
    key = hashlib.sha256(path.encode()).hexdigest()[:8]
    return os.path.join(cache_root(), "preprocessed", f"{os.path.basename(path)}-{key}", f"{spacing:g}mm")


def paths(cache_dir: str, case_id: str) -> dict[str, str]:
    base = os.path.join(cache_dir, case_id)
    return {"image": f"{base}.image.npy", "label": f"{base}.label.npy", "locations": f"{base}.locations.npy", "meta": f"{base}.json"}


def checked_cases(cases: list[dict], spacing: float, cache_dir: str) -> set[str]:
    """Ids of the cases whose cache record matches their files and holds a passed integrity
    check: `labelled.check_integrity` need not read them again."""
    if not os.path.isdir(cache_dir):
        return set()
    return {c["id"] for c in cases if (read_meta(cache_dir, c, spacing, quiet=True) or {}).get("integrity_checked")}


def read_meta(cache_dir: str, case: dict, spacing: float, quiet: bool = False) -> dict | None:
    """The cached case's record if it is complete and its fingerprint matches, else None."""
    p = paths(cache_dir, case["id"])
    try:
        with open(p["meta"]) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if meta.get("settings") != settings(spacing) or meta.get("inputs") != input_fingerprint(case):
        return None
    expected = {
        "image": (meta.get("shape"), np.float32, None),
        "label": (meta.get("shape"), np.uint8, None),
        "locations": (None, np.int32, 4),
    }
    for key, (shape, dtype, columns) in expected.items():
        problem = array_problem(p[key], shape, dtype, columns)
        if problem:
            if not quiet:
                print(f"cache: {p[key]} {problem}; case {case['id']} is preprocessed again", flush=True)
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


def preprocess_case(case: dict, spacing: float, cache_dir: str, checked: bool = False) -> JobResult:
    """One case into the cache; skipped when its record already matches. `checked`: the case
    passed the integrity check, which its record then keeps (`labelled.check_integrity` need not
    read it again while the record matches). A failure is returned naming the case and its
    image, for the summary."""
    try:
        return _preprocess_case(case, spacing, cache_dir, checked)
    except CacheWriteError as err:  # the cache's disk, not the input
        return JobResult(case["id"], error=str(err))
    except Exception as err:
        err = labelled.transform_error(err)
        return JobResult(case["id"], error=f"{case['image']}: {type(err).__name__}: {err}")


class CacheWriteError(OSError):
    """A case's arrays could not be written into the cache (a full disk, a lost mount)."""


def _write_meta(path: str, meta: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    files.write_atomic(path, write)


def _preprocess_case(case: dict, spacing: float, cache_dir: str, checked: bool) -> JobResult:
    from monai.transforms import Compose

    p = paths(cache_dir, case["id"])
    record = read_meta(cache_dir, case, spacing)
    if record is not None:
        if checked and not record.get("integrity_checked"):
            with open(p["meta"]) as f:
                _write_meta(p["meta"], {**json.load(f), "integrity_checked": True})
        return JobResult(case["id"], skipped=[case["id"]])
    item = Compose(labelled.preprocessing(spacing))({"image": case["image"], "label": case["label"]})
    image = np.ascontiguousarray(item["image"][0].numpy(), dtype=np.float32)
    label = np.ascontiguousarray(item["label"][0].numpy()).astype(np.uint8)
    if image.shape != label.shape:
        raise ValueError(f"{case['image']}: preprocessed image {image.shape} and label {label.shape} differ")
    locations = foreground_locations(label, np.random.default_rng(zlib.crc32(case["id"].encode())))
    try:
        for key, arr in (("image", image), ("label", label), ("locations", locations)):
            files.write_atomic(p[key], lambda tmp, arr=arr: np.save(tmp, arr))
    except OSError as err:
        raise CacheWriteError(
            f"the preprocessed cache {cache_dir}: {err.strerror or err}; give --preprocessed_dir a disk with room"
        ) from err
    meta = {
        "id": case["id"],
        "shape": list(image.shape),
        "classes_present": sorted(int(c) for c in np.unique(locations[:, 0])),
        "settings": settings(spacing),
        "inputs": input_fingerprint(case),
        "integrity_checked": checked,
    }
    _write_meta(p["meta"], meta)
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


def build(
    cases: list[dict], spacing: float, cache_dir: str, workers: int = 1, first: int = 0, step: int = 1, checked: bool = False
) -> list[dict]:
    """Preprocess what is not cached yet (a tqdm bar, then a summary) and return the cached
    records of `cases`, in order. Processes of one distributed run pass `first`/`step` (rank,
    world size): each starts on its own share and then checks the rest, so all of them return
    a complete cache. Fails naming every case that could not be preprocessed."""
    import functools

    try:
        os.makedirs(cache_dir, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as err:
        raise PermissionError(
            f"cannot write the preprocessed cache {cache_dir!r} ({err.strerror or err}): give a writable folder with --preprocessed_dir"
        ) from None
    files.remove_stale_partials(cache_dir)
    order = cases[first::step] + [c for i, c in enumerate(cases) if i % step != first]
    todo = [c for c in order if read_meta(cache_dir, c, spacing) is None]
    workers = processes_for(todo, spacing, min(workers, len(todo)))  # 1 when nothing is left to do
    job = functools.partial(preprocess_case, spacing=spacing, cache_dir=cache_dir, checked=checked)
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
