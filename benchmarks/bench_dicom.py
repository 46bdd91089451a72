"""DICOM series conversion against a plain SimpleITK series read: a generated 512 x 512 x 300 CT
series (one file a slice, int16), each step in a process of its own for its peak RSS (less the
peak of a process that only imports the same modules).

- plain: SimpleITK's ImageSeriesReader on the sorted files, the array in hand;
- read: preprocessing/dicom.py (headers, grouping, positions, the volume on its grid);
- convert: ct_to_nifti's whole conversion of the series (read, HU, reorientation, .nii.gz write).

    python benchmarks/bench_dicom.py --root /tmp/bench_dicom
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SIZE, SPACING = (512, 512, 300), (0.7, 0.7, 1.0)


def write_series(folder: str) -> None:
    import SimpleITK as sitk

    if os.path.isdir(folder) and len(os.listdir(folder)) == SIZE[2]:
        return
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    y, x = np.mgrid[: SIZE[1], : SIZE[0]]
    body = ((x - 256) / 200) ** 2 + ((y - 256) / 150) ** 2 < 1
    for k in range(SIZE[2]):
        hu = np.where(body, 40, -1000).astype(np.int16) + rng.integers(-20, 21, body.shape, dtype=np.int16)
        image = sitk.GetImageFromArray(hu[None])
        image.SetSpacing((SPACING[0], SPACING[1], 1.0))
        for tag, value in {
            "0008|0060": "CT",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.9",
            "0020|0013": str(k + 1),
            "0020|0032": f"-179.2\\-179.2\\{-150.0 + k * SPACING[2]}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0028|0030": f"{SPACING[1]}\\{SPACING[0]}",
        }.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{k:04d}.dcm"))
        writer.Execute(image)


def phase(name: str, folder: str, out: str) -> dict:
    import SimpleITK as sitk

    from preprocessing import ct_to_nifti, dicom

    start = time.perf_counter()
    if name == "plain":
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
        arr = sitk.GetArrayViewFromImage(reader.Execute())
        shape = arr.shape
    elif name == "read":
        (series,) = dicom.scan_folder(folder)
        volume, *_ = dicom.read_series(series)
        shape = volume.shape if hasattr(volume, "shape") else volume.GetSize()
    elif name == "convert":
        (series,) = dicom.scan_folder(folder)
        result = ct_to_nifti.convert(("bench.nii.gz", series), out)
        shape = result.written
    else:
        shape = None
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "shape": shape}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/bench_dicom", help="Working folder (the series is kept for reruns).")
    parser.add_argument("--repeats", default=2, type=int, help="Runs of each step, alternating.")
    parser.add_argument("--phase", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder, out = os.path.join(args.root, "series"), os.path.join(args.root, "out")
    if args.phase:
        print(json.dumps(phase(args.phase, folder, out)))
        return 0
    write_series(folder)
    volume_mib = np.prod(SIZE) * 2 / 2**20

    def run(name: str) -> dict:
        if name == "convert" and os.path.isdir(out):
            for f in os.listdir(out):
                os.remove(os.path.join(out, f))
        os.makedirs(out, exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--root", args.root, "--phase", name]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    base = run("baseline")["peak_rss_mib"]
    rows = {name: [] for name in ("plain", "read", "convert")}
    for _ in range(args.repeats):
        for name in rows:
            rows[name].append(run(name))
    summary = {
        name: {
            "seconds": [r["seconds"] for r in runs],
            "peak_above_imports_mib": [round(r["peak_rss_mib"] - base, 1) for r in runs],
            "peak_over_volume": [round((r["peak_rss_mib"] - base) / volume_mib, 2) for r in runs],
        }
        for name, runs in rows.items()
    }
    from common import machine

    print(json.dumps({"benchmark": "DICOM series 512 x 512 x 300", "machine": machine(), "volume_mib": volume_mib, "results": summary}))
    for name, s in summary.items():
        print(f"{name:8s} s {s['seconds']}  peak above imports MiB {s['peak_above_imports_mib']}  x volume {s['peak_over_volume']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
