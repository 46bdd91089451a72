"""Picture of a real abdomen CT after the own-CT conversion, with its reference labels over it:
the scan and the label map are each converted by preprocessing/ct_to_nifti.py, then drawn
through the liver's centre in the three planes of the pretraining orientation (P, L, I).

    make realct      # once: the reference scans of TotalSegmentator 2.18.0 into ~/.cache/desd/realct
    python tools/real_ct_figure.py --out docs/real_ct.png

The labels are TotalSegmentator's predictions, not manual ground truth.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import tempfile

import nibabel as nib
import numpy as np

from preprocessing import ct_to_nifti
from preprocessing.runner import command_parser, entry, run_command

REALCT = os.environ.get("DESD_REALCT") or os.path.join(os.path.expanduser("~"), ".cache", "desd", "realct")  # `make realct`'s folder
SHOWN = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta", "vertebrae_L1", "pancreas", "gallbladder")


def class_map(realct: str) -> dict[int, str]:
    with open(os.path.join(realct, "totalsegmentator", "map_to_binary.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "class_map":
            return ast.literal_eval(node.value)["total"]
    raise KeyError("class_map")


def converted(path: str, work: str, name: str) -> nib.Nifti1Image:
    folder = os.path.join(work, name)
    os.makedirs(folder)
    shutil.copy(path, os.path.join(folder, f"{name}.nii.gz"))
    if ct_to_nifti.main(["--in_dir", folder, "--out_dir", os.path.join(work, f"{name}_out")]) != 0:
        raise SystemExit(f"{path}: the conversion failed")
    return nib.load(os.path.join(work, f"{name}_out", f"{name}.nii.gz"))


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("A real abdomen CT after conversion, with its reference labels.")
    parser.add_argument("--realct", default=REALCT, help="Where `make realct` put the reference scans.")
    parser.add_argument("--out", default="docs/real_ct.png", help="The PNG to write.")
    args = parser.parse_args(argv)
    files = os.path.join(args.realct, "tests", "reference_files")
    if not os.path.isfile(os.path.join(files, "example_ct.nii.gz")):
        parser.error(f"no reference scans in {args.realct}: run `make realct` first")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    import utils

    with tempfile.TemporaryDirectory() as work:
        ct = converted(os.path.join(files, "example_ct.nii.gz"), work, "ct")
        seg = converted(os.path.join(files, "example_seg_fast_force_split.nii.gz"), work, "seg")
        hu, lab = np.asanyarray(ct.dataobj).astype(np.float32), np.asanyarray(seg.dataobj)
    names = class_map(args.realct)
    shown = [(k, n) for k, n in names.items() if n in SHOWN and (lab == k).any()]
    centre = np.rint(np.argwhere(lab == next(k for k, n in names.items() if n == "liver")).mean(0)).astype(int)
    colours = plt.get_cmap("tab10")
    overlay = np.zeros((*lab.shape, 4), np.float32)
    for c, (k, _) in enumerate(shown):
        overlay[lab == k] = (*colours(c)[:3], 0.45)
    zooms = ct.header.get_zooms()  # (P, L, I) axes: rows run posterior, columns left, slices inferior
    planes = [
        ("axial (slice I)", np.s_[:, :, centre[2]], zooms[0] / zooms[1]),
        ("coronal (slice P)", np.s_[centre[0], :, :], zooms[2] / zooms[1]),
        ("sagittal (slice L)", np.s_[:, centre[1], :], zooms[2] / zooms[0]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    for ax, (title, cut, aspect) in zip(axes, planes):
        image, colour = hu[cut], overlay[cut]
        if title.startswith(("coronal", "sagittal")):  # the I axis down the rows: head up
            image, colour = image.T, colour.transpose(1, 0, 2)
        ax.imshow(image, cmap="gray", vmin=-160, vmax=240, aspect=aspect, interpolation="nearest")
        ax.imshow(colour, aspect=aspect, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.legend(
        handles=[Patch(color=colours(c), label=n) for c, (_, n) in enumerate(shown)], loc="lower center", ncol=len(shown), fontsize=8
    )
    fig.suptitle("TotalSegmentator's example abdomen CT after ct_to_nifti (P, L, I), its predicted labels over it", fontsize=10)
    print(utils.save_figure(fig, args.out, dpi=90))
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
