"""Write the teacher backbone of a DeSD pretraining checkpoint to a small file of its own, the
file to keep or share: a run's checkpoint also holds the student, the projection heads and the
optimiser state (about 1 GB for res3d50 at out_dim 8192), the backbone alone about a fifth.

    python tools/export_teacher.py RUN/checkpoint.pth RUN/teacher.pth

The output is itself a DeSD checkpoint in the layout that fine-tuning, probing and prediction
read (key `teacher`, backbone keys `module.backbone.<name>`, the run's `args` and `epoch`).
Works on the released DeSD checkpoint too.
"""

from __future__ import annotations

import argparse
import os
import sys

import utils
from models.pretrained import PREFIX, checkpoint_arch, read_checkpoint, teacher_backbone
from preprocessing.runner import command_parser, entry, run_command


def export_teacher(checkpoint: str, out: str) -> int:
    """Write the backbone of `checkpoint`'s teacher to `out`, atomically; returns its tensor count."""
    ckpt = read_checkpoint(checkpoint)
    backbone = teacher_backbone(ckpt, checkpoint)
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    small = {"teacher": {PREFIX + k: v for k, v in backbone.items()}, "args": dict(args or {}), "epoch": ckpt.get("epoch")}
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    utils.save_atomic(small, out)
    return len(backbone)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Export a DeSD teacher backbone")
    parser.add_argument("checkpoint", help="A pretraining checkpoint (checkpoint.pth), or the released DeSD file.")
    parser.add_argument("out", help="Where to write the backbone-only checkpoint.")
    args = parser.parse_args(argv)
    if os.path.abspath(args.checkpoint) == os.path.abspath(args.out):
        parser.error("the output would replace the checkpoint it is read from; name another file")
    ckpt_arch = checkpoint_arch(read_checkpoint(args.checkpoint))
    n = export_teacher(args.checkpoint, args.out)
    size, before = os.path.getsize(args.out), os.path.getsize(args.checkpoint)
    print(
        f"{args.out}: the {ckpt_arch or 'unnamed-arch'} teacher backbone, {n} tensors, {size / 2**20:.0f} MiB (from {before / 2**20:.0f} MiB)"
    )
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
