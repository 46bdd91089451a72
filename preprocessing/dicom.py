"""DICOM CT series as hospitals export them, read onto a regular grid: the slice positions decide
the grid, never an averaged spacing.

A folder's files are grouped by SeriesInstanceUID (a folder's files with no UID form one series).
A series is read file by file (SimpleITK, so compressed transfer syntaxes such as JPEG 2000, JPEG
lossless and RLE are decoded) and checked:
- non-CT modalities and localizers (ImageType LOCALIZER, or slices of another orientation or
  size than the series' most common one) are left out, each with a line;
- a file that cannot be read, or whose pixel data is cut short, is named and its series refused:
  never silently shortened;
- slice positions (ImagePositionPatient) are projected on the slice normal (the cross product
  of ImageOrientationPatient's row and column directions). A missing slice, uneven spacing or
  two slices at one position are found there. Gaps and uneven spacing are resampled onto a
  regular grid at the true positions (linear along the normal), with a warning that names the
  series and the gaps; two slices at one position are refused;
- positions that leave the normal (gantry tilt, shear) are corrected as dcm2niix corrects them:
  each slice is shifted in-plane onto an orthogonal grid (linear), with a warning giving the
  angle. A sheared series is never written as an unsheared box.
Arrays are SimpleITK's (z, y, x); geometry is DICOM's (LPS): origin, spacing, direction.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

FILL_HU = -1024.0  # what a tilt correction shifts in from outside the scanned field: air
TAGS = {
    "modality": "0008|0060",
    "image_type": "0008|0008",
    "series_uid": "0020|000e",
    "position": "0020|0032",
    "orientation": "0020|0037",
}


@dataclass
class Slice:
    path: str
    position: np.ndarray  # ImagePositionPatient, mm (LPS)
    orientation: np.ndarray  # ImageOrientationPatient: row direction, then column direction
    spacing: tuple[float, float]  # (x, y) in mm
    size: tuple[int, int]  # (x, y) voxels
    modality: str
    localizer: bool


@dataclass
class Series:
    folder: str
    uid: str
    slices: list[Slice] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # files of the folder whose header could not be read
    skipped: list[str] = field(default_factory=list)  # what was left out, one line each

    @property
    def modality(self) -> str:
        return Counter(s.modality for s in self.slices).most_common(1)[0][0]

    def __str__(self) -> str:
        return f"{self.folder} (series {self.uid or 'without UID'})"


def _tag(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(TAGS[key]).strip() if reader.HasMetaDataKey(TAGS[key]) else ""


def _numbers(text: str, n: int, what: str, path: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if len(values) != n or not np.isfinite(values).all():
        raise ValueError(f"{path}: {what} {text!r} is not {n} numbers")
    return values


def read_header(path: str) -> tuple[Slice, str]:
    """The slice's geometry and kind, and its SeriesInstanceUID, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO("GDCMImageIO")
    reader.ReadImageInformation()  # raises for a file GDCM cannot parse
    position, orientation = _tag(reader, "position"), _tag(reader, "orientation")
    if not position or not orientation:
        raise ValueError(f"{path}: no ImagePositionPatient / ImageOrientationPatient: its place in the series is unknown")
    size = reader.GetSize()
    return Slice(
        path=path,
        position=_numbers(position, 3, "ImagePositionPatient", path),
        orientation=_numbers(orientation, 6, "ImageOrientationPatient", path),
        spacing=(float(reader.GetSpacing()[0]), float(reader.GetSpacing()[1])),
        size=(int(size[0]), int(size[1])),
        modality=_tag(reader, "modality").upper(),
        localizer="LOCALIZER" in _tag(reader, "image_type").upper(),
    ), _tag(reader, "series_uid")


def is_dicom_file(path: str) -> bool:
    """A Part 10 file ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def scan_folder(folder: str) -> list[Series]:
    """The CT series of one folder (its own files, not its subfolders'), by SeriesInstanceUID."""
    by_uid: dict[str, Series] = {}
    unreadable = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path) or not is_dicom_file(path):
            continue
        try:
            header, uid = read_header(path)
        except (RuntimeError, ValueError) as err:
            unreadable.append(f"{path}: {str(err).strip().splitlines()[-1]}")
            continue
        by_uid.setdefault(uid, Series(folder, uid)).slices.append(header)
    for series in by_uid.values():
        series.unreadable = unreadable  # which series they belonged to is unknown: each is refused
    if unreadable and not by_uid:
        series = Series(folder, "")
        series.unreadable = unreadable
        by_uid[""] = series
    return list(by_uid.values())


def _main_slices(series: Series) -> list[Slice]:
    """The series' slices less localizers and slices of another orientation or size, each noted."""
    kept = [s for s in series.slices if not s.localizer]
    for s in series.slices:
        if s.localizer:
            series.skipped.append(f"{s.path}: a localizer (ImageType LOCALIZER): left out")
    key = Counter((tuple(np.round(s.orientation, 4)), s.size) for s in kept).most_common(1)
    if not key:
        return []
    (orientation, size), _ = key[0]
    main = [s for s in kept if tuple(np.round(s.orientation, 4)) == orientation and s.size == size]
    for s in kept:
        if s not in main:
            series.skipped.append(f"{s.path}: {s.size[0]} x {s.size[1]} slice of another orientation or size than the series': left out")
    return main


def _grid_step(gaps: np.ndarray, tolerance: float) -> float:
    """The regular grid's step: the usual gap where every gap is a whole number of it (missing
    slices), else the smallest (uneven spacing: nothing is thinned out)."""
    usual = float(np.median(gaps))
    whole = np.abs(gaps / usual - np.rint(gaps / usual)) * usual <= tolerance
    return usual if whole.all() else float(gaps.min())


@dataclass
class Geometry:
    """Where a (z, y, x) volume lies: DICOM's LPS origin (mm), spacing (x, y, z) and direction
    (its columns the x, y and z axes)."""

    origin: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray

    def ras_affine(self) -> np.ndarray:
        """The RAS affine (nibabel's) of the volume transposed to (x, y, z)."""
        lps = np.eye(4)
        lps[:3, :3] = self.direction * np.asarray(self.spacing)
        lps[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    def image(self, volume_zyx: np.ndarray) -> sitk.Image:
        """The volume as a SimpleITK image with this geometry (a copy)."""
        out = sitk.GetImageFromArray(volume_zyx)
        out.SetOrigin(tuple(float(v) for v in self.origin))
        out.SetSpacing(tuple(float(v) for v in self.spacing))
        out.SetDirection(tuple(float(v) for v in self.direction.ravel()))
        return out


def read_series(series: Series) -> tuple[np.ndarray, Geometry, list[str]]:
    """The series as one (z, y, x) volume on a regular, orthogonal grid, its geometry, and the
    warnings of what was done to get there. The stored integer type is kept where nothing is
    resampled (one copy of the volume in memory); float32 where something is. Refuses
    (ValueError) what cannot be read faithfully, naming the series."""
    name = str(series)
    if series.unreadable:
        raise ValueError(f"{name}: refused, a file of its folder cannot be read: {series.unreadable[0]}")
    slices = _main_slices(series)
    warnings = list(series.skipped)
    if len(slices) < 2:
        raise ValueError(f"{name}: {len(slices)} slice(s) left after localizers and odd slices: not a volume")
    row, col = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row, col)
    along = np.array([s.position @ normal for s in slices])
    order = np.argsort(along, kind="stable")
    slices, along = [slices[k] for k in order], along[order]
    gaps = np.diff(along)
    tolerance = max(0.01, 0.01 * float(np.median(gaps)))
    if (gaps <= tolerance).any():
        k = int(np.argmax(gaps <= tolerance))
        raise ValueError(f"{name}: {slices[k].path} and {slices[k + 1].path} lie at one position along the slice normal: refused")
    sx, sy = slices[0].spacing
    offsets = np.array([s.position - slices[0].position - (a - along[0]) * normal for s, a in zip(slices, along)])
    shift_xy = np.stack([offsets @ row / sx, offsets @ col / sy], 1)  # in-plane offset of each slice, voxels

    sheared = float(np.abs(offsets).max()) > max(0.05, 0.1 * min(sx, sy))
    uneven = float(np.abs(gaps - np.median(gaps)).max()) > tolerance
    volume = None
    for k, s in enumerate(slices):
        try:
            image = sitk.ReadImage(s.path, imageIO="GDCMImageIO")
            pixels = sitk.GetArrayViewFromImage(image)  # a view: valid while `image` lives
            if volume is None:  # (z, y, x), of the slices' type unless something is resampled
                kind = pixels.dtype if pixels.dtype.kind in "iu" and not (sheared or uneven) else np.float32
                volume = np.empty((len(slices), slices[0].size[1], slices[0].size[0]), kind)
            volume[k] = pixels.reshape(volume.shape[1:])
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{name}: refused, slice {s.path} cannot be read ({str(err).strip().splitlines()[-1]})") from None

    if sheared:
        angle = math.degrees(math.atan2(float(np.linalg.norm(offsets[-1])), float(along[-1] - along[0])))
        from scipy.ndimage import shift

        for k in range(len(slices)):
            if np.abs(shift_xy[k]).max() > 1e-3:  # output voxel (y, x) takes the input at (y - b, x - a)
                volume[k] = shift(volume[k], (shift_xy[k, 1], shift_xy[k, 0]), order=1, mode="constant", cval=FILL_HU)
        warnings.append(
            f"{name}: slices are sheared along the normal (gantry tilt or shear, {angle:.1f} degrees): "
            "each slice shifted in-plane onto an orthogonal grid (linear)"
        )
    if uneven:
        step = _grid_step(gaps, tolerance)
        n = int(round((along[-1] - along[0]) / step)) + 1
        targets = along[0] + step * np.arange(n)
        upper = np.clip(np.searchsorted(along, targets, side="right"), 1, len(along) - 1)
        weight = ((targets - along[upper - 1]) / (along[upper] - along[upper - 1])).astype(np.float32)
        resampled = np.empty((n, *volume.shape[1:]), np.float32)
        for j in range(n):
            w = min(max(float(weight[j]), 0.0), 1.0)
            resampled[j] = volume[upper[j] - 1] * (1 - w) + volume[upper[j]] * w
        odd = [f"{gaps[k]:.2f} mm after {os.path.basename(slices[k].path)}" for k in np.flatnonzero(np.abs(gaps - step) > tolerance)]
        warnings.append(
            f"{name}: slice spacing is uneven or has gaps ({'; '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}; usual "
            f"{float(np.median(gaps)):.2f} mm): resampled onto a regular {step:.2f} mm grid at the true positions (linear)"
        )
        volume, z_step = resampled, step
    else:
        z_step = float((along[-1] - along[0]) / (len(along) - 1))
    return volume, Geometry(np.asarray(slices[0].position, float), (sx, sy, z_step), np.stack([row, col, normal], 1)), warnings


def series_in(in_dir: str, skip: str | None = None) -> tuple[list[tuple[str, Series]], list[str]]:
    """(name, series) of every CT series under `in_dir` (folders walked in order; `skip`, an
    output folder inside it, is never read back) and a line for each series left out (not CT).
    A folder with one series names it (its path below `in_dir`); several in one folder are told
    apart by the tail of their UID."""
    found, notes = [], []
    skip_real = os.path.realpath(skip) if skip else None
    for folder, dirs, _ in os.walk(in_dir):
        dirs[:] = sorted(d for d in dirs if skip_real != os.path.realpath(os.path.join(folder, d)))
        members = []
        for series in scan_folder(folder):
            if series.slices and series.modality != "CT":
                notes.append(f"{series}: {series.modality or 'no modality'}, not CT: skipped")
            else:
                members.append(series)
        rel = os.path.relpath(folder, in_dir)
        stem = "series" if rel == "." else re.sub(r"[^\w.-]+", "_", rel)
        for k, series in enumerate(members):
            tail = re.sub(r"[^\w]+", "", series.uid[-12:]) or str(k)
            found.append((stem if len(members) == 1 else f"{stem}_{tail}", series))
    return found, notes
