"""Synthetic DeepLesion: CT-like series in DeepLesion's exact format (docs/method.md, sections 1 and 8).

DeepLesion (220 GB) cannot be downloaded everywhere, so this writes look-alike data:
`Images_png/{patient:06d}_{study:02d}_{series:02d}/{slice:03d}.png` (16-bit, HU + 32768) and a
`DL_info.csv` with DeepLesion's 18 columns, one row per lesion. Each patient is a phantom of the
trunk: body outline, skin, subcutaneous fat, muscle, lungs and heart in the upper slices,
liver, spleen, stomach, pancreas, kidneys, aorta and vena cava, bowel, spine with discs, ribs,
a patient table, and a few lesions; portal-venous-phase HU values, a scanner's partial-volume
blur and 10-25 HU of noise. Series draw an in-plane spacing of 0.6-1.0 mm and a slice interval
of 0.8-5 mm, and keep only the slices around their key slices, so slice indices have gaps.

It can also write, for the same kind of phantom, labelled volumes in the Medical Segmentation
Decathlon layout (dataset.json, imagesTr/, labelsTr/; labels 1 liver, 2 spleen, 3 kidney) for
fine-tuning.

    python preprocessing/synthetic_deeplesion.py --out data/SyntheticDeepLesion --patients 4
    python preprocessing/synthetic_deeplesion.py --out data/SyntheticDeepLesion --patients 0 \
        --msd_dir data/Task01_SyntheticAbdomen --msd_cases 12 --msd_size 128
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from preprocessing.DL_save_nifti import CSV_COLUMNS, HU_OFFSET, nih_affine
from preprocessing.files import write_atomic
from preprocessing.runner import command_parser, run_command

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
TRUNK_MM = 460.0  # lung apex (z = 0) to pelvis


@dataclass
class Lesion:
    x: float  # mm from the image centre, + towards the patient's left (image right)
    y: float  # mm, + towards the back (image bottom)
    z: float  # mm from the lung apex
    radius: float
    hu: float
    kind: int  # DeepLesion's coarse lesion type: 2 lung, 4 liver, 5 kidney, 7 other


class Canvas:
    """An axial slice being painted: HU and labels, with shapes drawn only inside their
    bounding boxes (so a 512 x 512 slice of ~60 shapes takes milliseconds)."""

    def __init__(self, size: int, spacing: float, y_offset: float):
        self.size, self.spacing, self.y_offset = size, spacing, y_offset
        self.hu = np.full((size, size), -1000.0, np.float32)
        self.lab = np.zeros((size, size), np.uint8)

    def region(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0):
        """(row slice, col slice) of the box and the ellipse mask inside it; None if empty."""
        r = max(rx, ry)
        half = (self.size - 1) / 2
        c0, c1 = int(math.floor((cx - r) / self.spacing + half)), int(math.ceil((cx + r) / self.spacing + half)) + 1
        r0, r1 = (
            int(math.floor((cy + self.y_offset - r) / self.spacing + half)),
            int(math.ceil((cy + self.y_offset + r) / self.spacing + half)) + 1,
        )
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, self.size), min(r1, self.size)
        if c0 >= c1 or r0 >= r1 or rx <= 0 or ry <= 0:
            return None
        xs = (np.arange(c0, c1) - half) * self.spacing - cx
        ys = (np.arange(r0, r1) - half) * self.spacing - self.y_offset - cy
        dy, dx = np.meshgrid(ys, xs, indexing="ij")
        ca, sa = math.cos(angle), math.sin(angle)
        u, v = (dx * ca + dy * sa) / rx, (-dx * sa + dy * ca) / ry
        return (slice(r0, r1), slice(c0, c1)), u * u + v * v <= 1.0

    def fill(self, value: float, cx, cy, rx, ry, angle=0.0, label: int | None = None, within: int | None = None) -> None:
        """Paint an ellipse (mm, centre relative to the body centre, y towards the back);
        `within` restricts it to pixels already labelled so."""
        found = self.region(cx, cy, rx, ry, angle)
        if found is None:
            return
        box, m = found
        if within is not None:
            m = m & (self.lab[box] == within)
        self.hu[box][m] = value
        if label is not None:
            self.lab[box][m] = label


class Phantom:
    """One patient's trunk; `render(z, size, spacing)` gives an axial slice in HU and labels."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.a = rng.uniform(125, 175)  # body half-width, mm
        self.b = self.a * rng.uniform(0.66, 0.78)  # body half-depth, mm
        self.fat = rng.uniform(0.06, 0.14)  # subcutaneous fat, fraction of the body radius
        self.liver_hu = rng.uniform(100, 130)
        self.jitter = rng.normal(0, 0.03, size=(8,))
        self.veins = [(rng.uniform(0.15, 0.6), rng.uniform(-0.45, 0.35), rng.uniform(2, 6)) for _ in range(7)]
        self.lung_vessels = [(rng.uniform(0.2, 0.75), rng.uniform(-0.5, 0.45), rng.uniform(1.5, 3.5)) for _ in range(24)]
        self.bowel = [(rng.uniform(-0.5, 0.5), rng.uniform(-0.55, 0.1), rng.uniform(9, 18), rng.random() < 0.3) for _ in range(14)]
        self.lesions: list[Lesion] = []

    def series_spacing(self, size: int) -> float:
        """A reconstruction field of view fitted to this patient: 0.6-1.0 mm pixels at 512."""
        return float(np.clip(self.a / (size * self.rng.uniform(0.34, 0.42)), 0.6 * 512 / size, 1.0 * 512 / size))

    def add_lesion(self, z: float) -> Lesion:
        """A lesion centred at depth z, placed in an organ present there."""
        rng = self.rng
        t = z / TRUNK_MM
        organs = []
        if 0.05 < t < 0.36:
            organs.append("lung")
        if 0.3 < t < 0.66:
            organs.append("liver")
        if 0.52 < t < 0.78:
            organs.append("kidney")
        organ = organs[rng.integers(len(organs))] if organs else "other"
        radius = rng.uniform(4, 14)
        if organ == "lung":
            side = rng.choice([-1, 1])
            x, y, hu, kind = side * self.a * rng.uniform(0.35, 0.6), self.b * rng.uniform(-0.4, 0.3), rng.uniform(10, 50), 2
            radius = min(radius, 9)
        elif organ == "liver":
            x, y, kind = -self.a * rng.uniform(0.3, 0.55), self.b * rng.uniform(-0.3, 0.2), 4
            hu = self.liver_hu + (rng.uniform(-60, -20) if rng.random() < 0.75 else rng.uniform(20, 50))
        elif organ == "kidney":
            side = rng.choice([-1, 1])
            x, y, hu, kind = side * self.a * 0.4, self.b * 0.4, rng.uniform(0, 25), 5
            radius = min(radius, 10)
        else:
            x, y, hu, kind = self.a * rng.uniform(-0.3, 0.3), self.b * rng.uniform(-0.4, 0.0), rng.uniform(30, 70), 7
        lesion = Lesion(x, y, z, radius, hu, kind)
        self.lesions.append(lesion)
        return lesion

    def render(self, z: float, size: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free axial slice at depth z mm: (HU float32, labels uint8), both (size, size)."""
        cv = Canvas(size, spacing, y_offset=-0.12 * self.b)  # body a little above the image centre, table below
        t = z / TRUNK_MM
        a, b, j = self.a, self.b, self.jitter

        def profile(t0, t1):  # ellipsoid cross-section factor over [t0, t1], 0 outside
            if not t0 < t < t1:
                return 0.0
            return math.sqrt(1 - ((2 * t - t0 - t1) / (t1 - t0)) ** 2)

        # patient table, body outline, skin, fat, muscle wall, visceral fat
        rows = slice(
            max(int((b + 14 + cv.y_offset) / spacing + (size - 1) / 2), 0), max(int((b + 22 + cv.y_offset) / spacing + (size - 1) / 2), 0)
        )
        cols = slice(max(int((size - 1) / 2 - a * 1.25 / spacing), 0), int((size - 1) / 2 + a * 1.25 / spacing))
        cv.hu[rows, cols] = 90.0  # patient table
        cv.fill(40.0, 0, 0, a, b, label=9)  # 9: inside the body (cleared below)
        cv.fill(-100.0, 0, 0, a - 2, b - 2)
        inner = 1 - self.fat
        cv.fill(50.0, 0, 0, a * inner, b * inner)
        cv.fill(-90.0, 0, 0, a * (inner - 0.06), b * (inner - 0.07))

        # ribs, under the muscle wall of the chest and upper abdomen
        if t < 0.62:
            for k in range(7):
                if math.sin(z / 9 + 2.1 * k) < -0.2:  # ribs slope: each crosses only some slices
                    continue
                ang = math.pi * (0.25 + 0.65 * k / 6)
                for side in (-1, 1):
                    rx, ry = side * a * (inner - 0.04) * math.sin(ang), -b * (inner - 0.05) * math.cos(ang)
                    cv.fill(850.0, rx, ry, 8, 4.5, side * (math.pi / 2 - ang))
                    cv.fill(280.0, rx, ry, 5, 2.2, side * (math.pi / 2 - ang))

        # lungs with vessels, heart with enhanced blood
        for side in (-1, 1):
            f = profile(0.0, 0.38 + 0.04 * side)
            if f:
                cx = side * a * (0.43 + j[0])
                cv.fill(-850.0, cx, -b * 0.02, a * 0.36 * f + 5, b * 0.6 * f + 5, label=8)
                for vx, vy, r in self.lung_vessels:
                    cv.fill(60.0, side * a * vx, b * vy, r, r, within=8)
        f = profile(0.06, 0.34)
        if f:
            cv.fill(45.0, a * 0.12, -b * 0.18, a * 0.32 * f, b * 0.38 * f, 0.5)
            cv.fill(170.0, a * 0.14, -b * 0.2, a * 0.22 * f, b * 0.26 * f, 0.5)

        # abdominal organs
        f = profile(0.28, 0.7)
        if f:
            cv.fill(self.liver_hu, -a * (0.38 + j[1]), -b * 0.02, a * 0.5 * f, b * 0.62 * f, 0.2, label=LABELS["liver"])
            for vx, vy, r in self.veins:  # portal and hepatic vein branches
                cv.fill(165.0, -a * vx, b * vy, r * f + 1, r * f + 1, within=LABELS["liver"])
        f = profile(0.32, 0.6)
        if f:
            cv.fill(self.liver_hu - 10, a * (0.6 + j[2]), b * 0.28, a * 0.2 * f, b * 0.3 * f, -0.5, label=LABELS["spleen"])
        f = profile(0.32, 0.56)
        if f:
            sx, sy = a * 0.28, -b * 0.32
            cv.fill(40.0, sx, sy, a * 0.28 * f, b * 0.24 * f)  # stomach wall
            cv.fill(12.0, sx, sy, a * 0.25 * f, b * 0.21 * f, label=7)
            cv.fill(-950.0, sx, sy - b * 0.21 * f, a * 0.25 * f, b * 0.12 * f, within=7)  # air above the fluid
        f = profile(0.48, 0.6)
        if f:
            cv.fill(95.0, a * 0.05, b * 0.1, a * 0.3 * f, b * 0.07 * f, -0.2)  # pancreas
        for side in (-1, 1):
            f = profile(0.5 + 0.03 * side, 0.8 + 0.03 * side)
            if f:
                cx = side * a * (0.4 + j[3])
                cv.fill(185.0, cx, b * 0.4, a * 0.13 * f + 2, b * 0.2 * f + 2, side * 0.4, label=LABELS["kidney"])
                cv.fill(110.0, cx - side * 4, b * 0.4, a * 0.07 * f, b * 0.11 * f, side * 0.4, within=LABELS["kidney"])
        if t > 0.6:
            for bx, by, r, air in self.bowel:
                cx, cy = a * bx, b * by + 6 * math.sin(z / 20 + bx * 10)
                cv.fill(45.0, cx, cy, r, r)
                cv.fill(-900.0 if air else 20.0, cx, cy, r - 3, r - 3)

        # great vessels, spine with discs, paraspinal muscles
        cv.fill(210.0, a * 0.06, b * 0.26, 12, 12)  # aorta
        if t > 0.32:
            cv.fill(140.0, -a * 0.12, b * 0.24, 12, 10)  # inferior vena cava
        for side in (-1, 1):
            cv.fill(52.0, side * a * 0.17, b * 0.66, a * 0.12, b * 0.15)
        disc = (z % 32.0) < 6.0
        vy = b * 0.45
        cv.fill(90.0 if disc else 800.0, 0, vy, 21, 18)
        if not disc:
            cv.fill(260.0, 0, vy, 18, 15)
        cv.fill(700.0, 0, vy + 28, 13, 13)  # neural arch
        cv.fill(15.0, 0, vy + 28, 8, 9)  # spinal canal
        cv.fill(700.0, 0, vy + 46, 5, 10)  # spinous process

        for lesion in self.lesions:
            r2 = lesion.radius**2 - (z - lesion.z) ** 2
            if r2 > 1:
                cv.fill(lesion.hu, lesion.x, lesion.y, math.sqrt(r2), math.sqrt(r2) * 0.9)
        lab = np.where(cv.lab <= 3, cv.lab, 0).astype(np.uint8)
        return cv.hu, lab


def scanner(img: np.ndarray, spacing: float, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Partial-volume blur (about 0.8 mm) and slightly correlated noise, rounded to int16 HU."""
    blurred = ndi.gaussian_filter(img, 0.8 / spacing)
    noise = ndi.gaussian_filter(rng.normal(size=img.shape).astype(np.float32), 0.6)
    noise *= noise_std / (noise.std() + 1e-6)
    return np.rint(blurred + noise).clip(-1024, 3071).astype(np.int16)


def write_png(path: str, hu: np.ndarray) -> None:
    stored = (hu.astype(np.int32) + HU_OFFSET).astype(np.uint16)
    write_atomic(path, lambda tmp: Image.fromarray(stored).save(tmp, format="PNG", compress_level=1))


def fmt(values) -> str:
    return ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values)


def make_series(phantom: Phantom, folder: str, size: int, context_mm: float, rng: np.random.Generator) -> tuple[list[dict], dict]:
    """Write one series' PNGs around 2-3 key slices; return its CSV rows and its facts."""
    spacing = round(phantom.series_spacing(size), 6)
    interval = float(rng.choice([0.8, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0]))
    n_keys = int(rng.integers(2, 4))
    context = max(2, int(round(context_mm / interval)))
    start_mm = rng.uniform(0, TRUNK_MM * 0.45)
    keys, k = [], context + 1
    for _ in range(n_keys):  # key slices far enough apart that their runs leave a gap
        k += int(rng.integers(2 * context + 2, 2 * context + 12))
        keys.append(k)
    noise = float(rng.uniform(10, 25))
    os.makedirs(folder, exist_ok=True)
    rows, written = [], set()
    for key in keys:
        lesion = phantom.add_lesion(start_mm + (key - 1) * interval)
        for idx in range(key - context, key + context + 1):
            if idx in written:
                continue
            hu, _ = phantom.render(start_mm + (idx - 1) * interval, size, spacing)
            write_png(os.path.join(folder, f"{idx:03d}.png"), scanner(hu, spacing, noise, rng))
            written.add(idx)
        cx = lesion.x / spacing + (size - 1) / 2
        cy = (lesion.y - 0.12 * phantom.b) / spacing + (size - 1) / 2
        r = lesion.radius / spacing
        rows.append(
            {
                "Key_slice_index": key,
                "Measurement_coordinates": fmt([cx - r, cy, cx + r, cy, cx, cy - 0.9 * r, cx, cy + 0.9 * r]),
                "Bounding_boxes": fmt([cx - r - 5, cy - r - 5, cx + r + 5, cy + r + 5]),
                "Lesion_diameters_Pixel_": fmt([2 * r, 1.8 * r]),
                "Normalized_lesion_location": fmt([cx / size, cy / size, lesion.z / TRUNK_MM]),
                "Coarse_lesion_type": lesion.kind,
                "Slice_range": fmt([key - context, key + context]),
            }
        )
    return rows, {"spacing": (spacing, spacing, interval)}


def make_deeplesion(root: str, patients: int, size: int = 512, seed: int = 0, context_mm: float = 30.0) -> str:
    """Write Images_png/ and DL_info.csv for `patients` phantoms under root; returns the CSV path."""
    rng = np.random.default_rng(seed)
    png_dir = os.path.join(root, "Images_png")
    os.makedirs(png_dir, exist_ok=True)
    records = []
    for p in range(1, patients + 1):
        phantom = Phantom(rng)
        gender, age = rng.choice(["M", "F"]), int(rng.integers(20, 85))
        split = int(rng.choice([1, 2, 3], p=[0.7, 0.15, 0.15]))
        for study in range(1, int(rng.integers(1, 3)) + 1):
            for series in range(1, int(rng.integers(1, 3)) + 1):
                phantom.lesions = []
                name = f"{p:06d}_{study:02d}_{series:02d}"
                rows, facts = make_series(phantom, os.path.join(png_dir, name), size, context_mm, rng)
                for row in rows:
                    row.update(
                        File_name=f"{name}_{row['Key_slice_index']:03d}.png",
                        Patient_index=p,
                        Study_index=study,
                        Series_ID=series,
                        Possibly_noisy=0,
                        Spacing_mm_px_=fmt(facts["spacing"]),
                        Image_size=fmt([size, size]),
                        DICOM_windows=fmt([-175, 275]),
                        Patient_gender=gender,
                        Patient_age=age,
                        Train_Val_Test=split,
                    )
                    records.append(row)
    csv_path = os.path.join(root, "DL_info.csv")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(records)

    write_atomic(csv_path, write)
    return csv_path


def render_case(rng: np.random.Generator, size: int, slices: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """One labelled phantom: image (HU) and label volumes, (rows, cols, slices) with NIH's affine."""
    phantom = Phantom(rng)
    spacing = phantom.series_spacing(size)
    interval = float(rng.uniform(2.5, 3.5))
    start = rng.uniform(0.3, 0.45) * TRUNK_MM
    for _ in range(int(rng.integers(1, 3))):
        phantom.add_lesion(start + rng.uniform(0.2, 0.8) * slices * interval)
    noise = float(rng.uniform(10, 25))
    hu, lab = [], []
    for s in range(slices):
        h, lbl = phantom.render(start + s * interval, size, spacing)
        hu.append(scanner(h, spacing, noise, rng))
        lab.append(lbl)
    affine = nih_affine((spacing, spacing, interval))
    return nib.Nifti1Image(np.stack(hu, axis=2), affine), nib.Nifti1Image(np.stack(lab, axis=2), affine)


def make_msd(out_dir: str, cases: int, size: int = 128, seed: int = 0, slices: int = 48, test_cases: int = 0) -> str:
    """Labelled phantoms in the Decathlon layout, and `test_cases` unlabelled ones in imagesTs/
    (drawn apart, so that the training cases do not depend on their number); volumes are (rows,
    cols, slices) with NIH's affine, so nibabel reads them in the same orientation as the
    pretraining patches."""
    rng = np.random.default_rng(seed + 1_000_003)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):  # imagesTs/ even when empty: nnU-Net's MSD converter expects it
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    training = []
    for i in range(cases):
        image, label = render_case(rng, size, slices)
        name = f"synth_{i:03d}.nii.gz"
        write_atomic(os.path.join(out_dir, "imagesTr", name), lambda tmp, im=image: nib.save(im, tmp))
        write_atomic(os.path.join(out_dir, "labelsTr", name), lambda tmp, im=label: nib.save(im, tmp))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    test, test_rng = [], np.random.default_rng(seed + 2_000_003)
    for i in range(test_cases):
        image, _ = render_case(test_rng, size, slices)
        name = f"synth_test_{i:03d}.nii.gz"
        write_atomic(os.path.join(out_dir, "imagesTs", name), lambda tmp, im=image: nib.save(im, tmp))
        test.append(f"./imagesTs/{name}")
    meta = {
        "name": "SyntheticAbdomen",
        "description": "Synthetic portal-venous CT phantoms (DeSD project); not real patients",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): k for k, v in LABELS.items()},
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
    }
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Synthetic DeepLesion")
    parser.add_argument("--out", default="data/SyntheticDeepLesion", help="Data root to create (Images_png/, DL_info.csv).")
    parser.add_argument("--patients", default=4, type=int, help="Patients; each has 1-2 studies of 1-2 series.")
    parser.add_argument("--size", default=512, type=int, help="Image side in pixels (DeepLesion: 512).")
    parser.add_argument(
        "--context_mm", default=30.0, type=float, help="Slices kept on each side of a key slice, in mm (DeepLesion: about 30)."
    )
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--msd_dir", default=None, help="Also write labelled cases in the Decathlon layout here.")
    parser.add_argument("--msd_cases", default=12, type=int)
    parser.add_argument("--msd_size", default=128, type=int, help="Image side of the labelled cases.")
    parser.add_argument("--msd_slices", default=48, type=int)
    parser.add_argument("--msd_test_cases", default=2, type=int, help="Unlabelled cases for imagesTs/, as a Decathlon task has.")
    args = parser.parse_args(argv)
    if args.patients > 0:
        csv_path = make_deeplesion(args.out, args.patients, args.size, args.seed, args.context_mm)
        n = len(os.listdir(os.path.join(args.out, "Images_png")))
        print(f"wrote {n} series to {os.path.join(args.out, 'Images_png')} and {csv_path}")
    if args.msd_dir:
        make_msd(args.msd_dir, args.msd_cases, args.msd_size, args.seed, args.msd_slices, args.msd_test_cases)
        print(f"wrote {args.msd_cases} labelled and {args.msd_test_cases} test cases to {args.msd_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
