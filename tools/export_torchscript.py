"""Write a fine-tuned segmentation network as TorchScript, to run without this project's code:

    python tools/export_torchscript.py snapshots/finetune_res3d50_desd model.pt

The file holds the compiled network (input (N, 1, D, H, W) in the pretraining orientation,
spacing and intensity scaling, as predict.py prepares it; output the class logits on the same
grid, any size) and, as `desd.json` among its extra files, the run's arch, spacing, patch size
and classes. It is loaded back and checked against the network on an input of the run's patch
size before it replaces anything; `torch.jit.load(path, _extra_files={"desd.json": ""})` reads it.
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
from preprocessing.runner import command_parser, entry, run_command


def our_export(path: str) -> bool:
    """Whether `path` is a TorchScript file this tool wrote (a zip archive with `desd.json`)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/extra/desd.json") for name in z.namelist())
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
    files.refuse_overwrite(out, our_export, "a TorchScript export of this tool", overwrite)


def export_torchscript(run: str, out: str, tolerance: float = 1e-4, overwrite: bool = False) -> float:
    """Compile the network of `run` (a fine-tuning folder or its best.pth) to `out`, atomically;
    returns the largest difference between the loaded file's output and the network's. Never
    writes over the run's checkpoint, nor over a file it did not write unless `overwrite`."""
    check_output(run, out, overwrite)
    model, args = load_model(run, torch.device("cpu"))
    meta = {k: args.get(k) for k in ("arch", "spacing", "patch_size", "num_classes", "classes")}
    scripted = torch.jit.script(model)
    x = torch.randn(1, 1, *[int(n) for n in args.get("patch_size") or (16, 64, 64)], generator=torch.Generator().manual_seed(0))

    buffer = io.BytesIO()  # the check first, on the bytes the file will hold
    torch.jit.save(scripted, buffer, _extra_files={"desd.json": json.dumps(meta)})
    buffer.seek(0)
    loaded = torch.jit.load(buffer, map_location="cpu")
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
    parser = command_parser("Export a fine-tuned DeSD segmentation network as TorchScript")
    parser.add_argument("run", help="A fine-tuning output folder or its best.pth.")
    parser.add_argument("out", help="The TorchScript file to write (.pt).")
    parser.add_argument("--overwrite", action="store_true", help="Write over an existing file that this tool did not write.")
    args = parser.parse_args(argv)
    gap = export_torchscript(args.run, args.out, overwrite=args.overwrite)
    print(f"{args.out}: TorchScript, {os.path.getsize(args.out) / 2**20:.1f} MiB; loaded back, it differs from the network by {gap:.2g}")
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
