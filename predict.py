"""Predict label maps with a fine-tuned model.

Input: a fine-tuning output folder (or its best.pth) and an image file, a folder of images, or
a dataset folder (its imagesTs/). Each image is read as fine-tuning reads it (reoriented to the
pretraining orientation, resampled to the model's spacing, HU / 1024, depth first), segmented
by sliding-window inference (with `--tta`, averaged over the 8 flips), and the label map is
brought back to the image's own grid: the written file has the input's shape, spacing, origin
and direction.

    python predict.py --model out/liver_desd --input data/Task03_Liver/imagesTs --output out/liver_desd/predictions
    python predict.py --model out/liver_desd/best.pth --input case_0000.nii.gz --output pred/ --tta
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from downstream import labelled
from models import create_model
from models.pretrained import load_checkpoint
from models.segmentation import Res3DSegmentation
from preprocessing import files
from preprocessing.network_input import HU_SCALE
from preprocessing.runner import command_parser, entry, run_command

IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def load_model(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The network of a fine-tuning run (its folder or best.pth) and that run's arguments."""
    ckpt_path = os.path.join(path, "best.pth") if os.path.isdir(path) else path
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path!r} does not exist: give a fine-tuning output folder or its best.pth")
    ckpt = load_checkpoint(ckpt_path, needs=("model", "num_classes"), expected="a fine-tuning checkpoint (best.pth of finetune.py)")
    args = ckpt.get("args")
    if args is None:
        args_path = os.path.join(os.path.dirname(ckpt_path), "args.json")
        if not os.path.isfile(args_path):
            raise KeyError(f"{ckpt_path!r} stores no 'args' and there is no args.json beside it")
        with open(args_path) as f:
            args = json.load(f)
    model = Res3DSegmentation(create_model(args["arch"]), int(ckpt["num_classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), {**args, "num_classes": int(ckpt["num_classes"]), "classes": ckpt.get("classes")}


class Ensemble(torch.nn.Module):
    """Several fine-tuned networks (folds, or runs) as one: the log of their mean softmax
    probabilities, so that the softmax the inference applies gives the mean probability."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([F.softmax(m(x), 1) for m in self.models]).mean(0)
        return torch.log(probs.clamp_min(1e-12))


def load_models(paths: list[str], device: torch.device) -> tuple[torch.nn.Module, dict]:
    """One network, or the ensemble of several whose runs share spacing and classes (refused
    otherwise, naming both runs); the first run's arguments."""
    loaded = [load_model(p, device) for p in paths]
    first_path, (_, first) = paths[0], loaded[0]
    for path, (_, run_args) in zip(paths[1:], loaded[1:]):
        for key in ("spacing", "num_classes", "classes"):
            if run_args.get(key) != first.get(key):
                raise ValueError(
                    f"--model {path!r} has {key} {run_args.get(key)!r}, {first_path!r} {first.get(key)!r}: they cannot be averaged"
                )
    model = loaded[0][0] if len(loaded) == 1 else Ensemble([m for m, _ in loaded]).eval()
    return model, first


def is_dicom_folder(path: str) -> bool:
    """A folder of DICOM files (one series: predicted as one image)."""
    from preprocessing.dicom import is_dicom_file

    return os.path.isdir(path) and any(is_dicom_file(os.path.join(path, f)) for f in sorted(os.listdir(path))[:50])


def find_images(path: str) -> list[str]:
    """One image, a DICOM series' folder, the images of a folder, or a dataset folder's imagesTs/."""
    if os.path.isfile(path) or is_dicom_folder(path):
        return [path]
    if os.path.isfile(os.path.join(path, "dataset.json")):
        path = os.path.join(path, "imagesTs")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is neither an image nor a folder of images")
    images = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(IMAGE_ENDINGS) and not f.startswith("."))
    if not images:
        raise FileNotFoundError(f"no image ({', '.join(IMAGE_ENDINGS)}) in {path!r}")
    stems = {files.split_ending(os.path.basename(p))[0]: p for p in images}
    # nnU-Net's channels: X_0001 beside X_0000 is a second channel of case X, not a case of its own
    channels = [
        p for stem, p in stems.items() if re.search(r"_\d{4}$", stem) and not stem.endswith("_0000") and f"{stem[:-5]}_0000" in stems
    ]
    if channels:
        raise ValueError(
            f"{path!r} holds images of a second channel ({', '.join(os.path.basename(p) for p in channels[:5])}"
            f"{', ...' if len(channels) > 5 else ''}): the model takes one channel (CT, nnU-Net's _0000)"
        )
    return images


def output_path(image: str, out_dir: str) -> str:
    """Where the label map of `image` goes: named after the case (nnU-Net's _0000 dropped), in
    the image's format (NIfTI for a DICOM series, named after its folder)."""
    if os.path.isdir(image):
        return os.path.join(out_dir, os.path.basename(os.path.normpath(image)) + ".nii.gz")
    stem, ext = files.split_ending(os.path.basename(image))
    if stem.endswith("_0000"):  # nnU-Net's channel suffix: the prediction is named after the case
        stem = stem[: -len("_0000")]
    return os.path.join(out_dir, stem + ext)


def check_outputs(images: list[str], out_dir: str) -> None:
    """Refuse, before any work, outputs that would replace an input (the same path, or the same
    file under another name) or each other, naming both files."""
    inputs = {os.path.realpath(p): p for p in images}
    seen: dict[str, str] = {}
    for image in images:
        out = output_path(image, out_dir)
        real = os.path.realpath(out)
        if real in inputs or (os.path.exists(out) and any(os.path.samefile(out, p) for p in images)):
            other = inputs.get(real, out)
            raise ValueError(f"the label map of {image!r} would be written over the input {other!r}: give another --output")
        if real in seen:
            raise ValueError(f"{image!r} and {seen[real]!r} would both be written to {out!r}: predict them into separate folders")
        seen[real] = image


@torch.no_grad()
def segment(model: torch.nn.Module, image: torch.Tensor, patch, overlap: float = 0.5, tta: bool = False) -> torch.Tensor:
    """Softmax probabilities (1, C, z, x, y) of a preprocessed image (1, 1, z, x, y)."""
    from monai.inferers import sliding_window_inference

    def infer(x):
        return F.softmax(sliding_window_inference(x, patch, 2, model, overlap=overlap, mode="gaussian"), 1)

    if not tta:
        return infer(image)
    flips = [tuple(a for a in (2, 3, 4) if (k >> (a - 2)) & 1) for k in range(8)]
    total = sum(infer(image.flip(f) if f else image).flip(f) if f else infer(image) for f in flips)
    return total / len(flips)


def finer_than(input_grid: tuple, grid_affine) -> bool:
    """Whether the input's voxels are smaller than the network grid's along any axis."""
    shape, affine = input_grid
    spacing_in = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    spacing_net = np.linalg.norm(np.asarray(grid_affine, dtype=np.float64)[:3, :3], axis=0)
    return bool(spacing_in.min() < spacing_net.min() - 1e-6)


def to_input_grid(
    probs_czxy: np.ndarray, grid_affine, input_grid: tuple, path: str, resample_probabilities: bool | None = None
) -> sitk.Image:
    """The label map of the class probabilities (C, z, x, y) on the network's grid (`grid_affine`,
    of its (x, y, z) order) on the input image's voxel grid (`input_grid`: shape and affine, as
    read), with the geometry of the file at `path` (read from its header). Where the input is
    finer than the network's grid, each class's probability is resampled (linear) before the
    argmax, as nnU-Net does, one class at a time (memory: two input-grid arrays, whatever the
    number of classes); elsewhere the argmax is taken first and moved by nearest neighbour.
    Separable: the grids' axes are parallel. `resample_probabilities` forces either way."""
    from preprocessing.resample import resample_to_grid

    shape, affine = input_grid
    src, dst = np.asarray(grid_affine, dtype=np.float64), np.asarray(affine, dtype=np.float64)
    if finer_than(input_grid, grid_affine) if resample_probabilities is None else resample_probabilities:
        best = labels = None
        for c, prob in enumerate(probs_czxy):
            p = resample_to_grid(prob.transpose(1, 2, 0), src, dst, shape, order=1)  # (x, y, z)
            if best is None:
                best, labels = p, np.zeros(p.shape, np.uint8)
            else:
                better = p > best
                labels[better], best[better] = c, p[better]
        out_xyz = labels
    else:
        net_xyz = probs_czxy.argmax(0).astype(np.uint8).transpose(1, 2, 0)  # (x, y, z), a view
        out_xyz = resample_to_grid(net_xyz, src, dst, shape, order=0)
    result = sitk.GetImageFromArray(np.ascontiguousarray(out_xyz.transpose(2, 1, 0)))  # (x, y, z) -> SimpleITK's (z, y, x)
    if os.path.isdir(path):  # a DICOM series: the grid it was read on, from its RAS affine
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ dst
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        result.SetOrigin(tuple(lps[:3, 3]))
        result.SetSpacing(tuple(spacing))
        result.SetDirection(tuple((lps[:3, :3] / spacing).ravel()))
        return result
    header = sitk.ImageFileReader()
    header.SetFileName(path)
    header.ReadImageInformation()
    result.SetOrigin(header.GetOrigin())
    result.SetSpacing(header.GetSpacing())
    result.SetDirection(header.GetDirection())
    return result


def draw_overlay(image_zxy: np.ndarray, labels_zxy: np.ndarray, classes: list[str] | None, out: str) -> str:
    """Three slices of the network's input (soft-tissue window) with the label map over them,
    at the quartiles of the predicted foreground's depth (of the volume's without one), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = np.flatnonzero(labels_zxy.reshape(labels_zxy.shape[0], -1).any(1))
    depth = depth if len(depth) else np.arange(labels_zxy.shape[0])
    slices = [int(depth[int(q * (len(depth) - 1))]) for q in (0.25, 0.5, 0.75)]
    rows = -(-len(classes[:9]) // 5) if classes else 0  # lines of the colour key
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6 + 0.3 * rows))
    hu = image_zxy * HU_SCALE  # back to HU from the network input
    for ax, z in zip(axes, slices):
        ax.imshow(hu[z], cmap="gray", vmin=-160, vmax=240)  # soft-tissue window
        shown = np.ma.masked_equal(labels_zxy[z], 0)
        ax.imshow(shown, cmap="tab10", vmin=0, vmax=9, alpha=0.45, interpolation="nearest")
        ax.set_title(f"slice {z} of {labels_zxy.shape[0]}", fontsize=9)
        ax.axis("off")
    if classes:  # the colour key: label k is drawn in tab10's colour k
        from matplotlib.patches import Patch

        colours = plt.get_cmap("tab10")
        key = [Patch(color=colours(i + 1), label=f"{i + 1}: {name}") for i, name in enumerate(classes[:9])]
        fig.legend(handles=key, loc="lower center", ncol=min(len(key), 5), fontsize=8, frameon=False)
        return utils.save_figure(
            fig, out, dpi=90, rect=(0, 0.3 * rows / (3.6 + 0.3 * rows), 1, 0.97)
        )  # the slices above the key, never over it
    return utils.save_figure(fig, out, dpi=90)


def predict_file(
    model, run_args: dict, path: str, out_dir: str, tta: bool, overlap: float, device: torch.device, overlay: bool = False
) -> str:
    from monai.transforms import Compose

    spacing = float(run_args["spacing"])
    load, *steps = labelled.preprocessing(spacing, keys=("image",), grid_only=True)
    item = load({"image": path})
    warn_if_label_map(item["image"], path)  # on the stored values, before any resampling
    item = Compose(steps)(item)
    grid_affine = item["image"].affine  # the network's grid, before the depth-first transpose
    image = Compose(labelled.network_layout(("image",)))(item)["image"]
    probs = segment(model, image[None].to(device), tuple(run_args["patch_size"]), overlap, tta)
    probs_czxy = probs[0].float().cpu().numpy()
    labels_zxy = probs_czxy.argmax(0)
    result = to_input_grid(probs_czxy, grid_affine, item["image_input_grid"], path)
    out = output_path(path, out_dir)
    ext = files.split_ending(out)[1]
    files.write_atomic(out, lambda tmp: sitk.WriteImage(result, tmp, useCompression=ext.endswith(".gz")))
    if overlay:  # after the label map: a picture that cannot be drawn costs only the picture
        stem = files.split_ending(os.path.basename(out))[0]
        picture = os.path.join(out_dir, "overlays", f"{stem}.png")
        try:
            os.makedirs(os.path.dirname(picture), exist_ok=True)
            draw_overlay(image[0].numpy(), labels_zxy, run_args.get("classes"), picture)
        except OSError as err:
            print(f"WARNING: {path}: its overlay could not be drawn ({err}); the label map {out} is written", file=sys.stderr, flush=True)
    return out


def warn_if_label_map(image: torch.Tensor, path: str, max_values: int = 32) -> bool:
    """Warn where an input looks like a label map rather than CT in HU: no negative value (CT
    holds air, about -1000 HU) and at most `max_values` distinct integers."""
    flat = image.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 100_000)]  # most CT is told apart by its air on a sample
    if sample.numel() == 0 or float(sample.min()) < 0 or float(flat.min()) < 0:
        return False
    values = torch.unique(flat)
    if len(values) > max_values or not torch.equal(values, values.round()):
        return False
    shown = ", ".join(f"{v:g}" for v in values.tolist()[:8])
    print(
        f"WARNING: {path} holds only {len(values)} distinct non-negative integers ({shown}{', ...' if len(values) > 8 else ''}): "
        "it looks like a label map, not CT in HU; it is segmented as CT anyway",
        file=sys.stderr,
        flush=True,
    )
    return True


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Predict with a fine-tuned DeSD segmentation network")
    parser.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="A fine-tuning output folder or its best.pth; several (the folds of a cross-validation) average their probabilities.",
    )
    parser.add_argument("--input", required=True, help="An image, a folder of images, or a dataset folder (its imagesTs/).")
    parser.add_argument("--output", required=True, help="Folder for the label maps (named like the inputs).")
    parser.add_argument(
        "--tta",
        nargs="?",
        const=True,
        default=False,
        type=utils.bool_flag,
        help="Average the predictions of the 8 flips (slower, a little better); `--tta` alone or `--tta True`, as the trainers' flags.",
    )
    parser.add_argument("--overlap", default=0.5, type=float, help="Sliding-window overlap.")
    parser.add_argument(
        "--overlay",
        default=False,
        type=utils.bool_flag,
        help="Also draw three slices of each image with its label map (<output>/overlays/).",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where the network runs.")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, run_args = load_models(args.model, device)
    images = find_images(args.input)
    check_outputs(images, args.output)
    with utils.output_folder(args.output, "--output"):  # checked, locked (one live prediction a folder), console.log
        if args.overlay:
            try:
                files.prepare_output_folder(os.path.join(args.output, "overlays"), "--overlay True: overlays folder")
            except OSError as err:  # the label maps matter more than their pictures
                print(f"WARNING: {err}; writing the label maps without overlays", file=sys.stderr, flush=True)
                args.overlay = False
        return predict_all(model, run_args, images, args, device)


def predict_all(model, run_args: dict, images: list[str], args: argparse.Namespace, device: torch.device) -> int:
    """Every image in turn; one that fails is named and the others go on. Exit status 1 if any failed."""
    failed = []
    for path in tqdm(images, desc="predict", unit="image"):
        try:
            predict_file(model, run_args, path, args.output, args.tta, args.overlap, device, args.overlay)
        except Exception as err:  # one bad image does not stop the others; each is named at the end
            err = labelled.transform_error(err)
            failed.append(f"{path}: {type(err).__name__}: {err}")
            print(f"ERROR: {failed[-1]}", file=sys.stderr, flush=True)
    print(f"{len(images) - len(failed)} label maps in {args.output}")
    if failed:
        print(f"{len(failed)} image(s) could not be predicted:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
