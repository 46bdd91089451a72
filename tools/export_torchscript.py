"""Write a fine-tuned segmentation network as TorchScript, to run without this project's code:

    python tools/export_torchscript.py snapshots/finetune_res3d50_desd model.pt

The file holds the compiled network (input (N, 1, D, H, W) in the pretraining orientation,
spacing and intensity scaling, as predict.py prepares it; output the class logits on the same
grid, any size) and, as `desd.json` among its extra files, the run's arch, spacing, patch size
and classes. It is loaded back and checked against the network on an input of the run's patch
size before it replaces anything; `torch.jit.load(path, _extra_files={"desd.json": ""})` reads it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import torch

from predict import load_model
from preprocessing import files


def export_torchscript(run: str, out: str, tolerance: float = 1e-4) -> float:
    """Compile the network of `run` (a fine-tuning folder or its best.pth) to `out`, atomically;
    returns the largest difference between the loaded file's output and the network's."""
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
    parser = argparse.ArgumentParser("Export a fine-tuned DeSD segmentation network as TorchScript")
    parser.add_argument("run", help="A fine-tuning output folder or its best.pth.")
    parser.add_argument("out", help="The TorchScript file to write (.pt).")
    args = parser.parse_args(argv)
    gap = export_torchscript(args.run, args.out)
    print(f"{args.out}: TorchScript, {os.path.getsize(args.out) / 2**20:.1f} MiB; loaded back, it differs from the network by {gap:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
