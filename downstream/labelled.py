"""Labelled CT for fine-tuning, probing and prediction: dataset layouts, splits, reading, the
pretraining orientation, and an integrity check.

Layouts (`read_dataset`):
- the Medical Segmentation Decathlon's `dataset.json`: `labels` index -> name, a `training`
  list of {"image", "label"} paths, `modality`;
- nnU-Net v2's: `channel_names`, `labels` name -> index (with an optional `ignore` label),
  `file_ending`, `numTraining`, images `imagesTr/{case}_0000{file_ending}` and labels
  `labelsTr/{case}{file_ending}`.
Files are NIfTI (read with nibabel) or anything SimpleITK reads (`.mha`, `.nrrd`, ...).

Orientation. Every image and label is reoriented to the pretraining patches' anatomical
orientation before it enters a network: nibabel axis codes ('P', 'L', 'I'), the orientation
that NIH's affine gives DeepLesion (docs/method.md, section 3). Then depth is moved first, so a
network input is (1, z, x, y) with z running to inferior, x to posterior and y to the patient's
left, as in pretraining, whatever the orientation the file was stored in.

    python downstream/labelled.py --data_dir data/Dataset003_Liver      # the integrity check alone
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from preprocessing.files import split_ending
from preprocessing.network_input import HU_RANGE, HU_SCALE, PRETRAINING_AXCODES, RAS_LABELS, ras_affine
from preprocessing.runner import command_parser, entry, run_command

NIFTI = (".nii", ".nii.gz")


@dataclass
class LabelledSet:
    """Cases ({"id", "image", "label"} with absolute paths), class names by index (background
    excluded), and the label index that marks voxels to ignore (nnU-Net's `ignore`), if any."""

    root: str
    cases: list[dict]
    classes: dict[int, str]
    ignore: int | None = None
    layout: str = "msd"
    file_ending: str = ".nii.gz"

    @property
    def num_classes(self) -> int:
        """Output channels of a segmentation network: background and every class."""
        return max(self.classes) + 1

    @property
    def class_names(self) -> list[str]:
        return [self.classes.get(i, str(i)) for i in range(1, self.num_classes)]


def _ext_of(path: str) -> str:
    return split_ending(path)[1]


def read_dataset(data_dir: str) -> LabelledSet:
    """The cases and classes of a labelled set in either layout; refuses what it cannot read,
    naming dataset.json and the problem."""
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: expected an MSD or nnU-Net v2 dataset folder")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); is the file cut short?") from None
    classes, ignore = read_classes(meta.get("labels"), path)
    if "training" in meta:
        layout, ending, cases = "msd", ".nii.gz", msd_cases(meta, data_dir, path)
    elif "file_ending" in meta or "channel_names" in meta:
        layout, ending = "nnunetv2", meta.get("file_ending", ".nii.gz")
        cases = nnunet_cases(meta, data_dir, path, ending)
    else:
        raise ValueError(f"{path}: neither a 'training' list (MSD) nor 'file_ending'/'channel_names' (nnU-Net v2)")
    check_cases(cases, path)
    return LabelledSet(root=os.path.abspath(data_dir), cases=cases, classes=classes, ignore=ignore, layout=layout, file_ending=ending)


def read_classes(labels, path: str) -> tuple[dict[int, str], int | None]:
    """The foreground classes (index -> name) and the ignore index of dataset.json's `labels`:
    MSD's index -> name or nnU-Net v2's name -> index (with an optional `ignore`)."""
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: no 'labels' mapping")
    ignore = None
    if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: index -> name
        classes = {int(k): str(v) for k, v in labels.items()}
    else:  # nnU-Net v2 (and MSD files written the other way round): name -> index
        regions = [k for k, v in labels.items() if isinstance(v, list | tuple)]
        if regions:
            raise ValueError(
                f"{path}: region-based labels ({', '.join(regions)} map to lists of values, nnU-Net's 'regions') are not supported; "
                "give one integer per class"
            )
        try:
            classes = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{path}: 'labels' must map indices to names or names to integer indices, got {labels}") from None
        for index, name in list(classes.items()):
            if name.lower() == "ignore":
                ignore = index
                del classes[index]
    classes = {i: n for i, n in classes.items() if i != 0}
    if not classes:
        raise ValueError(f"{path}: 'labels' declares no foreground class")
    return classes, ignore


def msd_cases(meta: dict, data_dir: str, path: str) -> list[dict]:
    """The cases of a Decathlon `training` list: image and label paths relative to the folder."""
    cases = []
    for n, item in enumerate(meta["training"]):
        if not isinstance(item, dict) or not {"image", "label"} <= set(item):
            raise ValueError(f"{path}: training entry {n} ({item!r}) needs both 'image' and 'label'")
        case = {k: os.path.normpath(os.path.join(data_dir, item[k])) for k in ("image", "label")}
        name = os.path.basename(case["image"])
        case["id"] = name[: -len(_ext_of(name))]
        cases.append(case)
    return cases


def nnunet_cases(meta: dict, data_dir: str, path: str, ending: str) -> list[dict]:
    """The cases of an nnU-Net v2 set: one per label in labelsTr, its image `imagesTr/{case}_0000`."""
    channels = meta.get("channel_names", {"0": "CT"})
    if len(channels) != 1:
        raise ValueError(f"{path}: {len(channels)} input channels {channels}; the DeSD encoder takes one (CT)")
    label_dir = os.path.join(data_dir, "labelsTr")
    if not os.path.isdir(label_dir):
        raise FileNotFoundError(f"{path}: nnU-Net v2 layout, but {label_dir!r} does not exist")
    ids = sorted(f[: -len(ending)] for f in os.listdir(label_dir) if f.endswith(ending) and not f.startswith("."))
    cases = [
        {"id": c, "image": os.path.join(data_dir, "imagesTr", f"{c}_0000{ending}"), "label": os.path.join(label_dir, f"{c}{ending}")}
        for c in ids
    ]
    if "numTraining" in meta and meta["numTraining"] != len(cases):
        raise ValueError(f"{path}: numTraining is {meta['numTraining']}, but {label_dir} holds {len(cases)} labels ending in {ending}")
    return cases


def check_cases(cases: list[dict], path: str) -> None:
    """Unique case names, every file present, at least one case to train and one to validate."""
    seen: dict[str, dict] = {}
    for case in cases:
        if case["id"] in seen:
            raise ValueError(
                f"{path}: two cases named {case['id']!r} ({seen[case['id']]['image']} and {case['image']}); case names must be unique"
            )
        seen[case["id"]] = case
        for key in ("image", "label"):
            if not os.path.isfile(case[key]):
                raise FileNotFoundError(f"{path}: {key} of case {case['id']} ({case[key]!r}) does not exist")
    if len(cases) < 2:
        raise ValueError(f"{path}: needs at least 2 labelled cases (one to train, one to validate), found {len(cases)}")


# ============ splits ============


def split_cases(cases: list[dict], split_file: str = "", fold: int = 0, val_fraction: float = 0.2, seed: int = 0):
    """(train, val) cases: a seeded split; a {"train": [...], "val": [...]} file of case ids
    (or image paths); or nnU-Net's splits_final.json (a list of such folds) with `fold`."""
    if not split_file:
        order = np.random.default_rng(seed).permutation(len(cases))
        n_val = max(1, int(round(val_fraction * len(cases))))
        if n_val >= len(cases):
            raise ValueError(
                f"--val_fraction {val_fraction} of {len(cases)} cases leaves no case to train on; use a smaller fraction or more cases"
            )
        return [cases[i] for i in sorted(order[n_val:])], [cases[i] for i in sorted(order[:n_val])]
    try:
        with open(split_file) as f:
            split = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{split_file}: not valid JSON ({err})") from None
    if isinstance(split, list):  # splits_final.json
        if not 0 <= fold < len(split):
            raise ValueError(f"{split_file} holds {len(split)} folds; --fold {fold} is not one of them")
        split = split[fold]
    if not isinstance(split, dict) or not {"train", "val"} <= set(split):
        found = sorted(split) if isinstance(split, dict) else type(split).__name__
        raise ValueError(f"{split_file}: expected keys 'train' and 'val' (found {found}), or nnU-Net's splits_final.json list of them")
    by_id = {c["id"]: c for c in cases}
    by_name = {os.path.basename(c["image"]): c for c in cases}

    def pick(names: list[str], part: str) -> list[dict]:
        out = []
        for n in names:
            case = by_id.get(n) or by_name.get(os.path.basename(n))
            if case is None:
                raise ValueError(f"{split_file}: {part} case {n!r} is not in the dataset")
            out.append(case)
        return out

    train, val = pick(split["train"], "train"), pick(split["val"], "val")
    both = {c["id"] for c in train} & {c["id"] for c in val}
    if both:
        raise ValueError(f"{split_file}: cases in both train and val: {sorted(both)[:5]}")
    return train, val


# ============ reading ============


def read_dicom_folder(folder: str):
    """(volume (z, y, x), geometry) of the one CT series of a DICOM folder, on the grid its slice
    positions give (preprocessing/dicom.py; its warnings printed); refused unless the folder
    holds exactly one."""
    from preprocessing import dicom

    series = [s for s in dicom.scan_folder(folder) if not s.slices or s.modality == "CT"]
    if len(series) != 1:
        raise ValueError(f"{folder}: {len(series)} CT series; a DICOM input folder must hold one (ct_to_nifti.py splits several)")
    volume, geometry, warnings = dicom.read_series(series[0])
    for line in warnings:
        print(f"WARNING: {line}", flush=True)
    return volume, geometry


def read_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(array in (x, y, z) order, RAS affine) of a NIfTI or any SimpleITK-readable file, or of
    the DICOM series in a folder."""
    if os.path.isdir(path):
        volume, geometry = read_dicom_folder(path)
        return volume.transpose(2, 1, 0), geometry.ras_affine()
    if path.endswith(NIFTI):
        img = nib.load(path)
        return np.asanyarray(img.dataobj), img.affine
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), ras_affine(img)  # (z, y, x) -> (x, y, z)


LABEL_TOLERANCE = 1e-3  # a stored label value within this of an integer is that integer (float files)


def label_values(arr: np.ndarray, path: str) -> np.ndarray:
    """A label map as uint8 classes, read exactly: a float value within LABEL_TOLERANCE of an
    integer is rounded to it (never truncated: 0.99998 is class 1); any other value, or one
    outside 0-255, is refused naming the file and the value furthest off."""
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.asarray(arr, dtype=np.float64)
        nearest = np.rint(arr)
        off = np.nan_to_num(np.abs(arr - nearest), nan=np.inf)
        if off.size and off.max() > LABEL_TOLERANCE:
            raise ValueError(
                f"{path}: label value {float(arr.flat[int(off.argmax())])!r} is not a class index (integers within {LABEL_TOLERANCE} expected)"
            )
        arr = nearest
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"{path}: label values {arr.min():g} .. {arr.max():g} outside 0-255; is this an image rather than a label map?")
    return arr.astype(np.uint8)


def transform_error(err: BaseException) -> BaseException:
    """The error that a transform raised, out of MONAI's "applying transform <...>" wrapper, so
    that a message names the file and the problem rather than the transform object."""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        err = err.__cause__
    return err


MAX_VOXELS = 2**30  # 4 GiB of float32 after resampling: far beyond any CT, a sign of a wrong header spacing


class LoadCT:
    """MONAI-style dictionary transform: read `keys` with `read_volume` into MetaTensors of
    shape (1, x, y, z) with their affine (images float32, labels uint8)."""

    def __init__(self, keys=("image", "label")):
        self.keys = keys

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        out = dict(data)
        for key in self.keys:
            if key not in data:
                continue
            arr, affine = read_volume(data[key])
            if arr.ndim != 3:
                raise ValueError(f"{data[key]}: expected a single-channel 3-D volume, got shape {arr.shape}")
            # in the file's memory order (Fortran for NIfTI): a C-order copy would be a slow transpose
            arr = arr.astype(np.float32) if key == "image" else label_values(arr, data[key])
            if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
                arr = np.ascontiguousarray(arr)
            out[key] = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine, dtype=torch.float64))
            out[f"{key}_path"] = data[key]
            out[f"{key}_input_grid"] = (arr.shape, affine)  # where a prediction goes back to
        return out


class ResampleToSpacing:
    """MONAI-style dictionary transform: `keys` (MetaTensors (1, x, y, z)) resampled to
    `spacing` mm on the grid that MONAI's Spacing chooses (its affine and shape), images by
    cubic B-spline with edge values beyond the border (the values of Spacing's mode 3 with its
    "border" padding, to float32 rounding), labels by nearest neighbour (a label map keeps its
    label set; nnU-Net's per-label linear resampling of label maps smooths boundaries only
    when the label grid is coarser than the network's, which is not the case for CT at
    0.6-1 mm going to the pretraining spacing). Separable (preprocessing/resample.py): no dense
    coordinate grid, float32 blocks."""

    def __init__(self, keys, spacing: float):
        self.keys, self.spacing = list(keys), float(spacing)

    def grid(self, shape, affine: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(affine, shape) of the resampled grid, as MONAI's Spacing computes them."""
        from monai.data.utils import compute_shape_offset, zoom_affine

        new_affine = zoom_affine(affine, (self.spacing,) * 3, diagonal=False)
        out_shape, offset = compute_shape_offset(list(shape), affine, new_affine, scale_extent=False)
        new_affine[:3, 3] = offset[:3]
        return new_affine, [int(n) for n in out_shape]

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        from preprocessing.resample import resample_to_grid

        out = dict(data)
        for key in self.keys:
            if key not in data:
                continue
            img = data[key]
            affine = np.asarray(img.affine, dtype=np.float64)
            new_affine, shape = self.grid(img.shape[1:], affine)
            if math.prod(shape) > MAX_VOXELS:
                extent = [round(n * s) for n, s in zip(img.shape[1:], np.linalg.norm(affine[:3, :3], axis=0))]
                raise ValueError(
                    f"{data.get(f'{key}_path', key)}: {tuple(img.shape[1:])} voxels spanning {extent} mm would be "
                    f"{tuple(shape)} voxels at {self.spacing:g} mm ({math.prod(shape) * 4 / 2**30:.0f} GiB): "
                    "is the header's spacing right?"
                )
            arr = resample_to_grid(img[0].numpy(), affine, new_affine, shape, order=3 if key == "image" else 0, mode="nearest")
            out[key] = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(new_affine, dtype=torch.float64))
        return out


def preprocessing(spacing: float, keys=("image", "label"), grid_only: bool = False) -> list:
    """Read, reorient to the pretraining orientation, resample to `spacing` mm (cubic for
    images, nearest for labels: `ResampleToSpacing`), clip to [-1024, 1024] HU and divide by
    1024, put depth first: (1, z, x, y), as the pretraining views were. With `grid_only` the
    last step, `network_layout`, is left out: the items stay MetaTensors (1, x, y, z) whose
    affine is the network's grid."""
    from monai.transforms import Orientationd

    keys = list(keys)
    steps = [
        LoadCT(keys),
        Orientationd(keys, axcodes=PRETRAINING_AXCODES, labels=RAS_LABELS),  # (1, x, y, z) with x -> P, y -> L, z -> I
        ResampleToSpacing(keys, spacing),
    ]
    if "image" in keys:
        steps.append(scale_hu)
    return steps if grid_only else steps + network_layout(keys)


def scale_hu(data: dict) -> dict:
    """The image clipped to HU_RANGE and divided by HU_SCALE, in place: [-1, 1]."""
    image = data["image"]
    image.clamp_(*HU_RANGE).mul_(1.0 / HU_SCALE)
    return data


def network_layout(keys=("image", "label")) -> list:
    """Depth first, (1, x, y, z) -> (1, z, x, y), as plain tensors."""
    from monai.transforms import EnsureTyped, Transposed

    return [Transposed(list(keys), indices=(0, 3, 1, 2)), EnsureTyped(list(keys), track_meta=False)]


# ============ integrity ============


def _header(path: str):
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def header_orientation(path: str) -> tuple[tuple, tuple, tuple]:
    """(shape, spacing, axis codes) in nibabel's (x, y, z) order."""
    if path.endswith(NIFTI):
        img = nib.load(path)
        return tuple(img.shape), tuple(float(z) for z in img.header.get_zooms()[:3]), nib.aff2axcodes(img.affine)
    h = _header(path)
    affine = np.eye(4)
    lps = np.array(h.GetDirection()).reshape(3, 3) * np.array(h.GetSpacing())
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps
    return tuple(h.GetSize()), tuple(h.GetSpacing()), nib.aff2axcodes(affine)


ORIGIN_TOLERANCE_MM = 1e-3  # plus 1e-5 of the coordinate, as numpy's allclose
DIRECTION_TOLERANCE = 1e-4  # per direction cosine
UNDECLARED_SHOWN = 10  # undeclared label values listed per file


def _geometry(path: str) -> dict:
    """Shape, spacing, origin and direction from the file's header (SimpleITK's reading of
    every format alike, so that image and label compare in one convention), and axis codes."""
    h = _header(path)
    if h.GetNumberOfComponents() != 1 or h.GetDimension() != 3:
        raise ValueError(f"{h.GetDimension()}-D with {h.GetNumberOfComponents()} channels; expected one channel in 3-D (CT)")
    shape, spacing, codes = header_orientation(path)
    return {"shape": shape, "spacing": spacing, "codes": codes, "origin": h.GetOrigin(), "direction": h.GetDirection()}


def check_integrity(data: LabelledSet, spacing_tolerance: float = 1e-3, known_good: set[str] = frozenset()) -> list[str]:
    """Every problem of the set, each naming its file: unreadable files, multi-channel images,
    a label that is its image, image and label of different shape, orientation, spacing,
    origin or direction (within the tolerances above, as nnU-Net's check compares them),
    label values that are not integers or not declared (a bounded list). Cases in `known_good`
    (ids whose unchanged files passed before: `cache.checked_cases`) are not read again."""
    problems = []
    allowed = {0, *data.classes} | ({data.ignore} if data.ignore is not None else set())
    for case in data.cases:
        if case["id"] in known_good:
            continue
        if os.path.samefile(case["image"], case["label"]):  # the same path, a link to it, or a hard link
            problems.append(f"{case['label']}: the label is the image file itself")
            continue
        geometry = {}
        for key in ("image", "label"):
            path = case[key]
            try:
                geometry[key] = _geometry(path)
            except ValueError as err:
                problems.append(f"{path}: {err}")
            except Exception as err:
                problems.append(f"{path}: unreadable ({str(err).strip().splitlines()[-1]})")
        if len(geometry) < 2:
            continue
        image, label = geometry["image"], geometry["label"]
        if image["shape"] != label["shape"]:
            problems.append(f"{case['label']}: shape {label['shape']} differs from its image's {image['shape']}")
        if image["codes"] != label["codes"]:
            problems.append(f"{case['label']}: orientation {''.join(label['codes'])} differs from its image's {''.join(image['codes'])}")
        if not np.allclose(image["spacing"], label["spacing"], rtol=spacing_tolerance, atol=spacing_tolerance):
            problems.append(f"{case['label']}: spacing {label['spacing']} differs from its image's {image['spacing']}")
        if not np.allclose(image["origin"], label["origin"], atol=ORIGIN_TOLERANCE_MM):
            shift = float(np.linalg.norm(np.subtract(label["origin"], image["origin"])))
            problems.append(f"{case['label']}: origin {tuple(round(v, 3) for v in label['origin'])} is {shift:.3g} mm from its image's")
        if not np.allclose(image["direction"], label["direction"], rtol=0, atol=DIRECTION_TOLERANCE):
            cosines = np.clip(np.sum(np.reshape(image["direction"], (3, 3)) * np.reshape(label["direction"], (3, 3)), 0), -1, 1)
            problems.append(
                f"{case['label']}: direction differs from its image's (axes turned by up to {np.degrees(np.arccos(cosines.min())):.3g} degrees)"
            )
        try:
            values = set(np.unique(label_values(read_volume(case["label"])[0], case["label"])).tolist())
        except ValueError as err:
            problems.append(str(err))
            continue
        except Exception as err:
            problems.append(f"{case['label']}: unreadable ({err})")
            continue
        undeclared = sorted(values - allowed)
        if undeclared:
            shown = ", ".join(map(str, undeclared[:UNDECLARED_SHOWN])) + (
                f", ... ({len(undeclared)} in all)" if len(undeclared) > UNDECLARED_SHOWN else ""
            )
            hint = "; is this an image rather than a label map?" if len(undeclared) > 2 * UNDECLARED_SHOWN else ""
            problems.append(f"{case['label']}: label values [{shown}] are not declared in dataset.json (declared {sorted(allowed)}){hint}")
    return problems


def verify(data_dir: str) -> LabelledSet:
    """read_dataset and check_integrity; raises listing every problem."""
    data = read_dataset(data_dir)
    problems = check_integrity(data)
    if problems:
        listing = "\n  ".join(problems)
        raise ValueError(f"{data_dir}: {len(problems)} problem(s) found before training:\n  {listing}")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Check a labelled set before fine-tuning")
    parser.add_argument("--data_dir", required=True, help="An MSD or nnU-Net v2 dataset folder (with dataset.json).")
    args = parser.parse_args(argv)
    try:
        data = verify(args.data_dir)
    except (ValueError, FileNotFoundError) as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{args.data_dir}: {data.layout} layout, {len(data.cases)} cases, classes {data.class_names}: no problem found")
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
