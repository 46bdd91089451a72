"""Resampling, the former paths against the separable resampler, alternating in one run.

1. DeepLesion: one sub-volume of 512 x 512 x 60 at 0.8 x 0.8 x 1.25 mm to 1 mm, on one core:
   SimpleITK's cubic B-spline (the former re_spacing_ITK path) against
   `re_spacing_ITK.resample_volume`.
2. Fine-tuning cache: one case of 512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm preprocessed to 1 mm
   (read, reorient, resample, scale, depth first), each build in a process of its own for its
   peak RSS: MONAI's Spacingd (the former `labelled.preprocessing`) against the current one.
3. Prediction of that case with res3d10 (random weights; the network's time does not depend
   on them): preprocessing, the network's sliding window, and the resampling back.
4. nnU-Net v2's default resampling of the same case (`resample_data_or_seg_to_shape`,
   order 3 for the image), where nnunetv2 is installed; skipped with a message otherwise.

    python benchmarks/bench_resample.py --repeats 2 --json benchmarks/results/cpu_2core_resample.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from common import machine

HERE = os.path.dirname(os.path.abspath(__file__))
CASE_SIZE, CASE_SPACING = (512, 512, 300), (0.8, 0.8, 1.5)
DL_SIZE, DL_SPACING = (512, 512, 60), (0.8, 0.8, 1.25)


def ct_like(size, seed: int = 0) -> np.ndarray:
    """int16 (x, y, z): air, a body ellipse, an organ, noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, size[0]), np.linspace(-1, 1, size[1]), indexing="ij")
    image = np.full(size, -1000, np.int16)
    image[(x / 0.8) ** 2 + (y / 0.6) ** 2 < 1] = 40
    organ = ((x - 0.3) / 0.25) ** 2 + ((y + 0.1) / 0.2) ** 2 < 1
    image[organ, size[2] // 4 : 3 * size[2] // 4] = 120
    return image + rng.integers(-20, 21, size, dtype=np.int16)


def write_case(root: str) -> dict:
    image, label = os.path.join(root, "case.nii"), os.path.join(root, "case_label.nii")
    if not os.path.isfile(label):
        arr = ct_like(CASE_SIZE)
        affine = np.diag([-CASE_SPACING[0], -CASE_SPACING[1], CASE_SPACING[2], 1.0])  # LPS-stored, as DICOM exports are
        nib.save(nib.Nifti1Image(arr, affine), image)
        nib.save(nib.Nifti1Image((arr == 120).astype(np.uint8) + (arr > 100).astype(np.uint8), affine), label)
    return {"id": "case", "image": image, "label": label}


def former_preprocessing(spacing: float) -> list:
    """`labelled.preprocessing` as it was, with MONAI's Spacingd."""
    from monai.transforms import Orientationd, ScaleIntensityRanged, Spacingd

    from downstream import labelled

    keys = ["image", "label"]
    return [
        labelled.LoadCT(keys),
        Orientationd(keys, axcodes=labelled.PRETRAINING_AXCODES, labels=labelled.RAS_LABELS),
        Spacingd(keys, pixdim=(spacing,) * 3, mode=(3, "nearest")),
        ScaleIntensityRanged("image", a_min=-1024.0, a_max=1024.0, b_min=-1.0, b_max=1.0, clip=True),
        *labelled.network_layout(keys),
    ]


def former_itk(image, new_spacing: float = 1.0):
    """re_spacing_ITK.resample_volume as it was: SimpleITK's B-spline on the edge-aligned grid."""
    import SimpleITK as sitk

    from preprocessing.re_spacing_ITK import output_grid

    clipped = sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, -1024.0, 1024.0)
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(clipped)
    size, spacing, origin = output_grid(image, new_spacing)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkBSpline)
    resampler.SetUseNearestNeighborExtrapolator(True)
    out = resampler.Execute(clipped)
    return np.rint(sitk.GetArrayFromImage(out).clip(stats.GetMinimum(), stats.GetMaximum())).astype(np.int16)


def phase(args) -> dict:
    """One measurement in this process (so that its peak RSS is its own)."""
    import torch

    torch.set_num_threads(1)
    case = write_case(args.root)
    out: dict = {}
    if args.phase in ("build_former", "build_current"):
        from monai.transforms import Compose

        from downstream import labelled

        steps = former_preprocessing(1.0) if args.phase == "build_former" else labelled.preprocessing(1.0)
        start = time.perf_counter()
        item = Compose(steps)({"image": case["image"], "label": case["label"]})
        image = np.ascontiguousarray(item["image"][0].numpy(), dtype=np.float32)
        label = np.ascontiguousarray(item["label"][0].numpy()).astype(np.uint8)
        out["seconds"] = time.perf_counter() - start
        np.save(os.path.join(args.root, f"{args.phase}.image.npy"), image)
        np.save(os.path.join(args.root, f"{args.phase}.label.npy"), label)
        out["shape"] = list(image.shape)
    elif args.phase == "nnunet":
        try:
            from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
        except ImportError as err:
            return {"skipped": f"nnunetv2 is not installed here ({err})"}
        arr = np.asanyarray(nib.load(case["image"]).dataobj).astype(np.float32)[None]
        new_shape = [int(round(n * s)) for n, s in zip(CASE_SIZE, CASE_SPACING)]
        start = time.perf_counter()
        res = resample_data_or_seg_to_shape(arr, new_shape, CASE_SPACING, (1.0, 1.0, 1.0), is_seg=False, order=3, order_z=0)
        out["seconds"] = time.perf_counter() - start
        out["shape"] = list(res.shape[1:])
    elif args.phase == "predict":
        from monai.transforms import Compose

        import predict
        from downstream import labelled
        from models import create_model
        from models.segmentation import Res3DSegmentation

        model = Res3DSegmentation(create_model("res3d10"), 3).eval()
        torch.set_num_threads(os.cpu_count() or 1)
        start = time.perf_counter()
        item = Compose(labelled.preprocessing(1.0, keys=("image",), grid_only=True))({"image": case["image"]})
        grid_affine = item["image"].affine
        image = Compose(labelled.network_layout(("image",)))(item)["image"]
        out["preprocess_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        probs = predict.segment(model, image[None], (64, 128, 128), overlap=args.overlap)[0].numpy()
        out["network_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        predict.to_input_grid(probs, grid_affine, item["image_input_grid"], case["image"], resample_probabilities=False)
        out["back_seconds_labels_nearest"] = time.perf_counter() - start
        start = time.perf_counter()
        result = predict.to_input_grid(probs, grid_affine, item["image_input_grid"], case["image"])  # finer input: probabilities
        out["back_seconds"] = time.perf_counter() - start
        out["output_size"] = list(result.GetSize())
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def in_process(args, name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--root", args.root, "--overlap", str(args.overlap)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def deeplesion(repeats: int) -> dict:
    import SimpleITK as sitk

    from preprocessing import re_spacing_ITK

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # one core, as each worker of the script runs
    image = sitk.GetImageFromArray(ct_like(DL_SIZE, seed=1).transpose(2, 1, 0))
    image.SetSpacing(DL_SPACING)
    former, current = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        a = former_itk(image)
        former.append(time.perf_counter() - start)
        start = time.perf_counter()
        b = sitk.GetArrayFromImage(re_spacing_ITK.resample_volume(image))
        current.append(time.perf_counter() - start)
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    return {
        "former_seconds": former,
        "current_seconds": current,
        "speedup": float(np.median(former) / np.median(current)),
        "max_abs_difference_hu": int(diff.max()),
        "voxels_differing": float((diff > 0).mean()),
        "output_shape_zyx": list(b.shape),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("Resampling benchmark")
    parser.add_argument("--repeats", default=2, type=int)
    parser.add_argument("--overlap", default=0.0, type=float, help="Sliding-window overlap of the prediction (predict.py: 0.5).")
    parser.add_argument("--root", default="", help="Working folder (default: a temporary one).")
    parser.add_argument("--json", default="", help="Also write the results here.")
    parser.add_argument("--phase", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args)))
        return 0
    keep = args.root
    args.root = args.root or tempfile.mkdtemp(prefix="bench_resample_")
    os.makedirs(args.root, exist_ok=True)
    write_case(args.root)
    results: dict = {"machine": machine(), "command": "python benchmarks/bench_resample.py " + " ".join(argv or sys.argv[1:])}
    results["deeplesion"] = deeplesion(args.repeats)
    print("deeplesion", json.dumps(results["deeplesion"]), flush=True)
    builds: dict = {"former": [], "current": []}
    for _ in range(args.repeats):
        for name in ("former", "current"):
            builds[name].append(in_process(args, f"build_{name}"))
            print(name, builds[name][-1], flush=True)
    a, b = (np.load(os.path.join(args.root, f"build_{n}.image.npy")) for n in ("former", "current"))
    la, lb = (np.load(os.path.join(args.root, f"build_{n}.label.npy")) for n in ("former", "current"))
    results["finetune_case"] = {
        **builds,
        "speedup": float(np.median([r["seconds"] for r in builds["former"]]) / np.median([r["seconds"] for r in builds["current"]])),
        "max_abs_difference_hu": float(np.abs(a - b).max() * 1024),
        "label_agreement": float((la == lb).mean()),
        "label_sets": [sorted(np.unique(la).tolist()), sorted(np.unique(lb).tolist())],
    }
    results["nnunet"] = in_process(args, "nnunet")
    print("nnunet", results["nnunet"], flush=True)
    results["predict"] = in_process(args, "predict")
    print("predict", results["predict"], flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not keep:
        import shutil

        shutil.rmtree(args.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
