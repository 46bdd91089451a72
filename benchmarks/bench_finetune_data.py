"""Memory and time of fine-tuning's data path on a generated cohort of real CT size: building the
preprocessed cache, drawing training patches from it, and reading validation volumes from it,
for growing numbers of cases. Each phase runs in a process of its own, so that its peak RSS is
its own; the loader workers report theirs (VmHWM) with every batch.

    python benchmarks/bench_finetune_data.py --cases 2 4 8      # 512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm

For comparison it prints what MONAI's CacheDataset (cache_rate 1, the former loader) would
hold per process: every preprocessed training volume, as float32 images and uint8 labels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
from common import report

HERE = os.path.dirname(os.path.abspath(__file__))


def write_cohort(root: str, n: int, size, spacing) -> str:
    """n CT-like cases (a body ellipse with an organ, int16 HU) in the MSD layout, once."""
    task = os.path.join(root, "task")
    os.makedirs(os.path.join(task, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(task, "labelsTr"), exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    x, y = np.meshgrid(np.linspace(-1, 1, size[0]), np.linspace(-1, 1, size[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    training = []
    for i in range(n):
        image_path, label_path = (os.path.join(task, d, f"case_{i:03d}.nii") for d in ("imagesTr", "labelsTr"))
        if not os.path.isfile(label_path):
            rng = np.random.default_rng(i)
            organ = ((x - 0.3 + 0.05 * i % 0.2) / 0.25) ** 2 + ((y + 0.1) / 0.2) ** 2 < 1
            image = np.full((*size[:2], size[2]), -1000, np.int16)
            label = np.zeros(image.shape, np.uint8)
            lo, hi = size[2] // 4, 3 * size[2] // 4
            image[body] = 40
            image[organ, lo:hi] = 120
            label[organ, lo:hi] = 1
            image += rng.integers(-20, 21, image.shape, dtype=np.int16)
            nib.save(nib.Nifti1Image(image, affine), image_path)
            nib.save(nib.Nifti1Image(label, affine), label_path)
        training.append({"image": f"./imagesTr/case_{i:03d}.nii", "label": f"./labelsTr/case_{i:03d}.nii"})
    with open(os.path.join(task, "dataset.json"), "w") as f:
        json.dump({"labels": {"0": "background", "1": "organ"}, "training": training}, f)
    return task


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vmhwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def phase(args) -> dict:
    """One measurement in this process; returns its figures."""
    from downstream import cache, labelled, patches

    data = labelled.read_dataset(args.task)
    cases = data.cases[: args.n]
    folder = os.path.join(args.root, "cache")
    if args.phase == "build":
        before = {c["id"] for c in cases if cache.read_meta(folder, c, args.spacing) is not None}
        start = time.perf_counter()
        cache.build(cases, args.spacing, folder, workers=1)
        built = len(cases) - len(before)
        return {
            "s_per_case": round((time.perf_counter() - start) / built, 1) if built else None,
            "built": built,
            "peak_rss_mib": round(peak_rss_mib()),
        }
    records = cache.build(cases, args.spacing, folder, workers=1)  # all cached: only reads the records
    import torch
    from monai.data import DataLoader

    if args.phase == "train":

        class Measured(patches.PatchDataset):
            def __getitem__(self, i):
                items = super().__getitem__(i)
                for item in items:
                    item["vmhwm"] = torch.tensor(vmhwm_mib())
                return items

        ds = Measured(records, args.patch, 2, 2.0)
        loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0))
        worker_peak, batches, start = 0.0, 0, time.perf_counter()
        while batches < args.batches:
            for batch in loader:
                worker_peak = max(worker_peak, float(batch["vmhwm"].max()))
                batches += 1
                if batches == args.batches:
                    break
        return {
            "s_per_batch": round((time.perf_counter() - start) / batches, 3),
            "worker_peak_rss_mib": round(worker_peak),
            "peak_rss_mib": round(peak_rss_mib()),
        }
    loader = DataLoader(patches.VolumeDataset(records), batch_size=1, num_workers=1)
    start, count = time.perf_counter(), 0
    for item in loader:
        assert item["image"].shape[2:] == tuple(records[count]["shape"])
        count += 1
    per_case = (time.perf_counter() - start) / count
    shape = records[0]["shape"]
    figures = {"s_per_case": round(per_case, 2), "peak_rss_mib": round(peak_rss_mib()), "volume_mib": round(np.prod(shape) * 5 / 2**20)}
    if args.compare:  # what each validation cost when it preprocessed its volumes again
        from monai.transforms import Compose

        start = time.perf_counter()
        Compose(labelled.preprocessing(args.spacing))({"image": cases[0]["image"], "label": cases[0]["label"]})
        figures["uncached_s_per_case"] = round(time.perf_counter() - start, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser("bench_finetune_data")
    parser.add_argument("--cases", type=int, nargs="+", default=[2, 4, 8], help="Cohort sizes, measured in turn.")
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], help="Voxels (x, y, z) of each case.")
    parser.add_argument("--input_spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5])
    parser.add_argument("--spacing", type=float, default=1.0, help="The cache's isotropic spacing in mm.")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--root", default="bench_data/finetune")
    parser.add_argument("--phase", default="", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--task", default="", help=argparse.SUPPRESS)
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return

    args.root = os.path.abspath(args.root)  # the phases run in benchmarks/
    task = write_cohort(args.root, max(args.cases), args.size, args.input_spacing)
    rows = []
    for n in sorted(args.cases):
        row = {"cases": n}
        for name in ("build", "train", "validate"):
            cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--n", str(n), "--task", task, "--root", args.root]
            cmd += ["--spacing", str(args.spacing), "--patch", *map(str, args.patch), "--batches", str(args.batches)]
            cmd += ["--compare"] if name == "validate" and n == min(args.cases) else []
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
            if done.returncode:
                raise RuntimeError(f"phase {name} with {n} cases failed:\n{done.stderr[-3000:]}")
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            row.update({f"{name}_{k}": v for k, v in figures.items()})
        row["cachedataset_estimate_mib"] = round(n * row["validate_volume_mib"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    columns = [
        "cases", "build_s_per_case", "build_peak_rss_mib", "train_s_per_batch", "train_peak_rss_mib", "train_worker_peak_rss_mib",
        "validate_s_per_case", "validate_uncached_s_per_case", "validate_peak_rss_mib", "cachedataset_estimate_mib",
    ]  # fmt: skip
    report("finetune_data", rows, columns)


if __name__ == "__main__":
    main()
