"""Synthetic DeepLesion: CT-like series in DeepLesion's exact format (docs/method.md, sections 1 and 8).

DeepLesion (220 GB) cannot be downloaded everywhere, so this writes look-alike data:
`Images_png/{patient:06d}_{study:02d}_{series:02d}/{slice:03d}.png` (16-bit, HU + 32768) and a
`DL_info.csv` with DeepLesion's 18 columns, one row per lesion. Each patient is a phantom of the
trunk: body outline, skin, subcutaneous fat, muscle, lungs and heart in the upper slices,
liver, spleen, stomach, pancreas, kidneys, aorta and vena cava, bowel, spine with discs, ribs,
a patient table, and a few lesions, with a scanner's partial-volume blur. In the default style,
`varied`, each scan draws its contrast phase (unenhanced, arterial or portal), its tissues' HU
(organs overlapping), calibration offset, noise (5-40 HU) and organ shapes and positions
(`varied_look`), with organ-like distractors, so that no intensity band names an organ.
`--style portal` writes the former phantoms, one portal-venous look whose organs sit in fixed HU
bands with 10-25 HU of noise, so that figures made on them can be reproduced. Series draw an
in-plane spacing of 0.6-1.0 mm and a slice interval of 0.8-5 mm, and keep only the slices around
their key slices, so slice indices have gaps.

It can also write, for the same kind of phantom, labelled volumes in the Medical Segmentation
Decathlon layout (dataset.json, imagesTr/, labelsTr/; labels 1 liver, 2 spleen, 3 kidney) for
fine-tuning.

    python preprocessing/synthetic_deeplesion.py --out data/SyntheticDeepLesion --patients 4
    python preprocessing/synthetic_deeplesion.py --out data/SyntheticDeepLesion --patients 0 \
        --msd_dir data/Task01_SyntheticAbdomen --msd_cases 12 --msd_size 128
    python preprocessing/synthetic_deeplesion.py --out data/SyntheticDeepLesion --patients 4 --style portal
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
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

    def region(self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, lobes=()):
        """(row slice, col slice) of the box and the ellipse mask inside it; None if empty. `lobes`,
        (k, amplitude, phase) triples, modulate the radius by 1 + sum(amplitude cos(k theta + phase))."""
        r = max(rx, ry) * (1 + sum(abs(amp) for _, amp, _ in lobes))
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
        if not lobes:
            return (slice(r0, r1), slice(c0, c1)), u * u + v * v <= 1.0
        theta = np.arctan2(v, u)
        radius = 1.0 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in lobes)
        return (slice(r0, r1), slice(c0, c1)), u * u + v * v <= radius * radius

    def fill(self, value: float, cx, cy, rx, ry, angle=0.0, label: int | None = None, within: int | None = None, lobes=()) -> None:
        """Paint an ellipse (mm, centre relative to the body centre, y towards the back), lobulated
        by `lobes` (see `region`); `within` restricts it to pixels already labelled so."""
        found = self.region(cx, cy, rx, ry, angle, lobes)
        if found is None:
            return
        box, m = found
        if within is not None:
            m = m & (self.lab[box] == within)
        self.hu[box][m] = value
        if label is not None:
            self.lab[box][m] = label


STYLES = ("portal", "varied")  # the phantoms' look: one portal phase, or drawn per scan (`varied_look`)
DEFAULT_STYLE = "varied"
SLAB_STARTS = {"portal": (0.3, 0.45), "varied": (0.2, 0.6)}  # a labelled case's first-slice depth, fractions of the trunk
PHASES = ("unenhanced", "arterial", "portal")
PORTAL_LOOK = {  # HU of each tissue in the "portal" style (the liver's is drawn, 100-130)
    "muscle": 50.0, "paraspinal": 52.0, "liver_veins": 165.0, "spleen_minus_liver": -10.0, "kidney_cortex": 185.0,
    "kidney_medulla": 110.0, "aorta": 210.0, "ivc": 140.0, "heart_blood": 170.0, "pancreas": 95.0, "bowel_wall": 45.0,
    "bowel_fluid": 20.0, "stomach": 12.0, "offset": 0.0,
}  # fmt: skip


def check_style(style: str) -> None:
    """Refuse an unknown phantom style by name, before anything is drawn or written."""
    if style not in STYLES:
        raise ValueError(f"phantom style {style!r}: expected one of {', '.join(STYLES)}")


def varied_look(rng: np.random.Generator) -> dict:
    """One scan's tissues, geometry and scanner, drawn so that no intensity band names an organ:
    a contrast phase (unenhanced, arterial or portal); liver HU per case, fatty at times; the
    spleen's HU the liver's plus -30 to +30, mottled in the arterial phase; a kidney cortex and
    medulla that differ by phase; muscle at 55-65 HU; bowel loops at the liver's HU and with oral
    contrast at times, a stomach holding a meal at the liver's HU half the time; a calibration offset of -20 to +20 HU and noise of 5 to 40 HU; each organ
    moved and scaled by up to 15%, turned, and lobulated."""
    phase = PHASES[int(rng.integers(len(PHASES)))]
    u = rng.uniform
    if phase == "unenhanced":
        liver = u(-5, 40) if rng.random() < 0.25 else u(45, 65)  # a fatty liver a quarter of the time
        look = {"liver_veins": liver - u(10, 25), "kidney_cortex": u(28, 40), "aorta": u(35, 50), "ivc": u(35, 50),
                "heart_blood": u(35, 50), "pancreas": u(35, 50), "bowel_wall": u(35, 50)}  # fmt: skip
        look["kidney_medulla"] = look["kidney_cortex"] - u(0, 8)
    elif phase == "arterial":
        liver = u(60, 85)
        look = {"liver_veins": u(70, 120), "kidney_cortex": u(150, 230), "kidney_medulla": u(50, 90), "aorta": u(250, 400),
                "ivc": u(60, 110), "heart_blood": u(200, 350), "pancreas": u(90, 130), "bowel_wall": u(70, 110)}  # fmt: skip
    else:
        liver = u(95, 130)
        look = {"liver_veins": u(150, 190), "kidney_cortex": u(150, 200), "aorta": u(140, 200), "ivc": u(120, 170),
                "heart_blood": u(130, 180), "pancreas": u(80, 110), "bowel_wall": u(60, 100)}  # fmt: skip
        look["kidney_medulla"] = look["kidney_cortex"] - u(0, 30)
    oral = rng.random() < 0.3  # positive oral contrast in the bowel
    look.update(
        phase=phase, liver=liver, spleen_minus_liver=u(-30, 30), muscle=u(55, 65), paraspinal=u(55, 65),
        bowel_fluid=u(150, 300) if oral else u(5, 30), offset=u(-20, 20), noise=u(5, 40),
        mottle=u(30, 60) if phase == "arterial" else 0.0,
        bowel_like_organ=[liver + u(-20, 20) if rng.random() < 0.6 else None for _ in range(14)],
        stomach=liver + u(-20, 20) if rng.random() < 0.5 else u(5, 20),  # a meal at the liver's HU half the time
        geometry={organ: (u(-0.15, 0.15), u(-0.15, 0.15), u(0.85, 1.15), u(-0.35, 0.35),
                          tuple((int(rng.integers(2, 6)), u(0.03, 0.12), u(0, 2 * math.pi)) for _ in range(2)))
                  for organ in ("liver", "spleen", "kidney")},
        spleen_spots=[(u(-0.7, 0.7), u(-0.7, 0.7), u(0.15, 0.35), rng.choice([-1.0, 1.0])) for _ in range(8)],
    )  # fmt: skip
    return look


class Phantom:
    """One patient's trunk; `render(z, size, spacing)` gives an axial slice in HU and labels. Its
    style (`STYLES`) sets the tissues' HU and the organs' shapes: "portal", one portal-venous look
    whose organs differ by fixed HU bands, or "varied" (`varied_look`)."""

    def __init__(self, rng: np.random.Generator, style: str = DEFAULT_STYLE):
        check_style(style)
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
        self.style = style
        self.look = dict(PORTAL_LOOK, geometry={}, mottle=0.0, bowel_like_organ=[None] * len(self.bowel), spleen_spots=[])
        if style == "varied":  # drawn after the portal style's draws, which stay as they were
            self.look = varied_look(rng)
            self.liver_hu = self.look["liver"]

    def noise_std(self, rng: np.random.Generator) -> float:
        """The scan's noise, HU: 10-25 (drawn from `rng`) in the portal style, the look's in the varied one."""
        drawn = float(rng.uniform(10, 25))
        return self.look.get("noise", drawn)

    def organ(self, name: str, rx: float, ry: float) -> tuple[float, float, float, float, tuple]:
        """The look's change to an organ of half-axes rx, ry: its move (mm, x and y), scale, turn
        (radians) and lobes; none in the portal style."""
        dx, dy, scale, turn, lobes = self.look["geometry"].get(name, (0.0, 0.0, 1.0, 0.0, ()))
        return dx * rx, dy * ry, scale, turn, lobes

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
        a, b, j, look = self.a, self.b, self.jitter, self.look

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
        cv.fill(look["muscle"], 0, 0, a * inner, b * inner)
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
            cv.fill(look["heart_blood"], a * 0.14, -b * 0.2, a * 0.22 * f, b * 0.26 * f, 0.5)

        # abdominal organs
        f = profile(0.28, 0.7)
        if f:
            rx, ry = a * 0.5 * f, b * 0.62 * f
            dx, dy, k, turn, lobes = self.organ("liver", rx, ry)
            cv.fill(self.liver_hu, -a * (0.38 + j[1]) + dx, -b * 0.02 + dy, rx * k, ry * k, 0.2 + turn, label=LABELS["liver"], lobes=lobes)
            for vx, vy, r in self.veins:  # portal and hepatic vein branches
                cv.fill(look["liver_veins"], -a * vx + dx, b * vy + dy, r * f + 1, r * f + 1, within=LABELS["liver"])
        f = profile(0.32, 0.6)
        if f:
            rx, ry = a * 0.2 * f, b * 0.3 * f
            dx, dy, k, turn, lobes = self.organ("spleen", rx, ry)
            cx, cy, rx, ry = a * (0.6 + j[2]) + dx, b * 0.28 + dy, rx * k, ry * k
            spleen = self.liver_hu + look["spleen_minus_liver"]
            cv.fill(spleen, cx, cy, rx, ry, -0.5 + turn, label=LABELS["spleen"], lobes=lobes)
            for sx, sy, sr, sign in look["spleen_spots"] if look["mottle"] else ():  # the arterial phase's mottled spleen
                cv.fill(spleen + sign * look["mottle"], cx + sx * rx, cy + sy * ry, sr * rx, sr * ry, within=LABELS["spleen"])
        f = profile(0.32, 0.56)
        if f:
            sx, sy = a * 0.28, -b * 0.32
            cv.fill(40.0, sx, sy, a * 0.28 * f, b * 0.24 * f)  # stomach wall
            cv.fill(look["stomach"], sx, sy, a * 0.25 * f, b * 0.21 * f, label=7)
            cv.fill(-950.0, sx, sy - b * 0.21 * f, a * 0.25 * f, b * 0.12 * f, within=7)  # air above the fluid
        f = profile(0.48, 0.6)
        if f:
            cv.fill(look["pancreas"], a * 0.05, b * 0.1, a * 0.3 * f, b * 0.07 * f, -0.2)  # pancreas
        for side in (-1, 1):
            f = profile(0.5 + 0.03 * side, 0.8 + 0.03 * side)
            if f:
                dx, dy, k, turn, lobes = self.organ("kidney", a * 0.13 * f + 2, b * 0.2 * f + 2)
                cx, cy, angle = side * a * (0.4 + j[3]) + dx, b * 0.4 + dy, side * 0.4 + turn
                cv.fill(
                    look["kidney_cortex"], cx, cy, (a * 0.13 * f + 2) * k, (b * 0.2 * f + 2) * k, angle, label=LABELS["kidney"], lobes=lobes
                )
                cv.fill(look["kidney_medulla"], cx - side * 4, cy, a * 0.07 * f * k, b * 0.11 * f * k, angle, within=LABELS["kidney"])
        if t > (0.6 if self.style == "portal" else 0.45):  # the varied style's bowel reaches the kidneys and the liver
            for (bx, by, r, air), like_organ in zip(self.bowel, look["bowel_like_organ"]):
                cx, cy = a * bx, b * by + 6 * math.sin(z / 20 + bx * 10)
                cv.fill(look["bowel_wall"], cx, cy, r, r)
                lumen = -900.0 if air else (like_organ if like_organ is not None else look["bowel_fluid"])
                cv.fill(lumen, cx, cy, r - 3, r - 3)

        # great vessels, spine with discs, paraspinal muscles
        cv.fill(look["aorta"], a * 0.06, b * 0.26, 12, 12)  # aorta
        if t > 0.32:
            cv.fill(look["ivc"], -a * 0.12, b * 0.24, 12, 10)  # inferior vena cava
        for side in (-1, 1):
            cv.fill(look["paraspinal"], side * a * 0.17, b * 0.66, a * 0.12, b * 0.15)
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
        if look["offset"]:  # the scanner's calibration
            cv.hu += look["offset"]
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
    noise = phantom.noise_std(rng)
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


def make_deeplesion(root: str, patients: int, size: int = 512, seed: int = 0, context_mm: float = 30.0, style: str = DEFAULT_STYLE) -> str:
    """Write Images_png/ and DL_info.csv for `patients` phantoms of a style (`STYLES`) under root;
    returns the CSV path."""
    check_style(style)
    rng = np.random.default_rng(seed)
    png_dir = os.path.join(root, "Images_png")
    os.makedirs(png_dir, exist_ok=True)
    records = []
    for p in range(1, patients + 1):
        phantom = Phantom(rng, style)
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


def check_start(start: tuple[float, float]) -> None:
    """Refuse a first-slice depth range that is not LO <= HI within the trunk."""
    if len(start) != 2 or not 0 <= start[0] <= start[1] < 1:
        raise ValueError(f"first-slice depth {tuple(start)}: need LO <= HI, fractions of the trunk in [0, 1)")


def add_start_argument(parser, help_text: str) -> None:
    """`--msd_start LO HI`: the first-slice depth range of `make_msd`'s `start` (None: the style's)."""
    parser.add_argument("--msd_start", nargs=2, type=float, default=None, metavar=("LO", "HI"), help=help_text)


def render_case(
    rng: np.random.Generator, size: int, slices: int, style: str = DEFAULT_STYLE, start: tuple[float, float] | None = None
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """One labelled phantom: image (HU) and label volumes, (rows, cols, slices) with NIH's affine.
    Its first slice lies a fraction of the way down the trunk drawn from `start` (default the
    style's, `SLAB_STARTS`: 30-45% for portal, 20-60% for varied). Slices 2.5-3.5 mm apart, so 24
    span 13-18% of the trunk; the kidneys lie at 47-83%, the liver at 28-70%, the spleen at 32-60%."""
    phantom = Phantom(rng, style)
    spacing = phantom.series_spacing(size)
    interval = float(rng.uniform(2.5, 3.5))
    start = rng.uniform(*(SLAB_STARTS[style] if start is None else start)) * TRUNK_MM
    for _ in range(int(rng.integers(1, 3))):
        phantom.add_lesion(start + rng.uniform(0.2, 0.8) * slices * interval)
    noise = phantom.noise_std(rng)
    hu, lab = [], []
    for s in range(slices):
        h, lbl = phantom.render(start + s * interval, size, spacing)
        hu.append(scanner(h, spacing, noise, rng))
        lab.append(lbl)
    affine = nih_affine((spacing, spacing, interval))
    return nib.Nifti1Image(np.stack(hu, axis=2), affine), nib.Nifti1Image(np.stack(lab, axis=2), affine)


def make_msd(
    out_dir: str,
    cases: int,
    size: int = 128,
    seed: int = 0,
    slices: int = 48,
    test_cases: int = 0,
    style: str = DEFAULT_STYLE,
    start: tuple[float, float] | None = None,
) -> str:
    """Labelled phantoms of a style (`STYLES`) in the Decathlon layout, and `test_cases` unlabelled
    ones in imagesTs/ (drawn apart, so that the training cases do not depend on their number);
    volumes are (rows, cols, slices) with NIH's affine, so nibabel reads them in the same
    orientation as the pretraining patches. `start`: the range of the first slice's depth
    (`render_case`); another range draws the same patients, scanned at other depths."""
    check_style(style)
    if start is not None:
        check_start(start)
    rng = np.random.default_rng(seed + 1_000_003)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):  # imagesTs/ even when empty: nnU-Net's MSD converter expects it
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    training = []
    for i in range(cases):
        image, label = render_case(rng, size, slices, style, start)
        name = f"synth_{i:03d}.nii.gz"
        write_atomic(os.path.join(out_dir, "imagesTr", name), lambda tmp, im=image: nib.save(im, tmp))
        write_atomic(os.path.join(out_dir, "labelsTr", name), lambda tmp, im=label: nib.save(im, tmp))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    test, test_rng = [], np.random.default_rng(seed + 2_000_003)
    for i in range(test_cases):
        image, _ = render_case(test_rng, size, slices, style, start)
        name = f"synth_test_{i:03d}.nii.gz"
        write_atomic(os.path.join(out_dir, "imagesTs", name), lambda tmp, im=image: nib.save(im, tmp))
        test.append(f"./imagesTs/{name}")
    meta = {
        "name": "SyntheticAbdomen",
        "description": (
            "Synthetic portal-venous CT phantoms (DeSD project); not real patients"
            if style == "portal"
            else "Synthetic CT phantoms in unenhanced, arterial and portal phases (DeSD project); not real patients"
        ),
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): k for k, v in LABELS.items()},
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
    }
    write_atomic(os.path.join(out_dir, "dataset.json"), lambda tmp: pathlib.Path(tmp).write_text(json.dumps(meta, indent=2)))
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
    add_start_argument(
        parser,
        "Depth range of a labelled case's first slice, as fractions of the trunk from the lung apex "
        "(default the style's: varied 0.2 0.6, portal 0.3 0.45). 0.45 0.55 puts liver, spleen and kidneys in every 24-slice case; "
        "0 0 with --msd_slices 190 covers the whole trunk.",
    )
    parser.add_argument(
        "--style",
        default=DEFAULT_STYLE,
        choices=STYLES,
        help="varied (default): phase, HU, calibration, noise, organ shape and position drawn per scan, with "
        "organ-like distractors; portal: the former phantoms, one portal-venous look, organs in fixed HU bands.",
    )
    args = parser.parse_args(argv)
    if args.msd_start is not None:
        check_start(args.msd_start)  # before the unlabelled phantoms take their time
    if args.patients > 0:
        csv_path = make_deeplesion(args.out, args.patients, args.size, args.seed, args.context_mm, args.style)
        n = len(os.listdir(os.path.join(args.out, "Images_png")))
        print(f"wrote {n} series to {os.path.join(args.out, 'Images_png')} and {csv_path}")
    if args.msd_dir:
        make_msd(args.msd_dir, args.msd_cases, args.msd_size, args.seed, args.msd_slices, args.msd_test_cases, args.style, args.msd_start)
        print(f"wrote {args.msd_cases} labelled and {args.msd_test_cases} test cases to {args.msd_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
