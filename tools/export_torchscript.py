"""Write a fine-tuned segmentation network to run without this project's code, as TorchScript
(any input size) or through torch.export (`--format export`: the run's patch size, as sliding-
window inference feeds it; TorchScript is deprecated in recent torch):

    python tools/export_torchscript.py snapshots/finetune_res3d50_desd model.pt
    python tools/export_torchscript.py snapshots/finetune_res3d50_desd model.pt2 --format export

Beside the network, `desd.json` among the file's extra files holds the run's arch, spacing,
patch size and classes, and the input contract: CT in HU, in the pretraining orientation (nibabel
codes P, L, I for x, y, z, then depth first), at `spacing` mm, clipped to `intensity.clip_hu` and
divided by `intensity.divide_by`; the output is the class logits on the same grid. The file is
loaded back and checked against the network on an input of the run's patch size before it
replaces anything. Loading it takes plain torch:

    import json, torch
    extra = {"desd.json": ""}
    net = torch.jit.load("model.pt", _extra_files=extra)  # or: torch.export.load("model.pt2", extra_files=extra).module()
    meta = json.loads(extra["desd.json"])
    low, high = meta["intensity"]["clip_hu"]
    labels = net(hu.clamp(low, high) / meta["intensity"]["divide_by"]).argmax(1)  # hu: (N, 1, I, P, L) at meta["spacing"] mm
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile

import torch

from predict import load_model
from preprocessing import files
from preprocessing.network_input import HU_RANGE, HU_SCALE, PRETRAINING_AXCODES
from preprocessing.runner import command_parser, entry, run_command

FORMATS = ("torchscript", "export")


def contract(args: dict) -> dict:
    """`desd.json`: the run's arch, spacing, patch size and classes, and the input contract."""
    meta = {k: args.get(k) for k in ("arch", "spacing", "patch_size", "num_classes", "classes")}
    meta["input"] = (
        f"(N, 1, depth, rows, cols): CT in HU at `spacing` mm, reoriented to nibabel codes {tuple(PRETRAINING_AXCODES)} "
        f"for (x, y, z), then depth first: ({PRETRAINING_AXCODES[2]}, {PRETRAINING_AXCODES[0]}, {PRETRAINING_AXCODES[1]})"
    )
    meta["intensity"] = {"clip_hu": list(HU_RANGE), "divide_by": HU_SCALE}
    meta["output"] = "(N, num_classes, depth, rows, cols) logits on the input's grid; the argmax is the label map (0: background)"
    return meta


def our_export(path: str) -> bool:
    """Whether `path` is a file this tool wrote (a zip archive, either format, with `desd.json`)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("desd.json") for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def check_output(run: str, out: str, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that is the run's own checkpoint (or its folder), or an
    existing file that this tool did not write (unless `overwrite`)."""
    checkpoint = os.path.join(run, "best.pth") if os.path.isdir(run) else run
    if os.path.isdir(out):
        raise IsADirectoryError(f"out {out!r} is a folder: give the file to write (model.pt)")
    if os.path.exists(out) and os.path.exists(checkpoint) and os.path.samefile(out, checkpoint):
        raise ValueError(f"out {out!r} is the fine-tuned checkpoint being exported: give another file name (model.pt)")
    files.refuse_overwrite(out, our_export, "an export of this tool", overwrite)


def export_torchscript(run: str, out: str, tolerance: float = 1e-4, overwrite: bool = False, fmt: str = "torchscript") -> float:
    """Compile the network of `run` (a fine-tuning folder or its best.pth) to `out` in `fmt`
    (FORMATS), atomically; returns the largest difference between the loaded file's output and
    the network's. Never writes over the run's checkpoint, nor over a file it did not write
    unless `overwrite`."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    check_output(run, out, overwrite)
    model, args = load_model(run, torch.device("cpu"))
    extra = {"desd.json": json.dumps(contract(args))}
    x = torch.randn(1, 1, *[int(n) for n in args.get("patch_size") or (16, 64, 64)], generator=torch.Generator().manual_seed(0))

    buffer = io.BytesIO()  # the check first, on the bytes the file will hold
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), buffer, _extra_files=extra)
        buffer.seek(0)
        loaded = torch.jit.load(buffer, map_location="cpu")
    else:
        torch.export.save(torch.export.export(model, (x,)), buffer, extra_files=extra)
        buffer.seek(0)
        loaded = torch.export.load(buffer).module()
    with torch.no_grad():
        gap = float((loaded(x) - model(x)).abs().max())
    if not gap <= tolerance:
        raise RuntimeError(f"the compiled network differs from {run!r} by {gap:.3g} (tolerance {tolerance}); nothing written")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    data = buffer.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    files.write_atomic(out, write)
    return gap


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Export a fine-tuned DeSD segmentation network as TorchScript or through torch.export")
    parser.add_argument("run", help="A fine-tuning output folder or its best.pth.")
    parser.add_argument("out", help="The file to write (.pt for TorchScript, .pt2 for torch.export).")
    parser.add_argument(
        "--format", default="torchscript", choices=FORMATS, help="torchscript: any input size; export: the run's patch size."
    )
    parser.add_argument("--overwrite", action="store_true", help="Write over an existing file that this tool did not write.")
    args = parser.parse_args(argv)
    gap = export_torchscript(args.run, args.out, overwrite=args.overwrite, fmt=args.format)
    print(f"{args.out}: {args.format}, {os.path.getsize(args.out) / 2**20:.1f} MiB; loaded back, it differs from the network by {gap:.2g}")
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
