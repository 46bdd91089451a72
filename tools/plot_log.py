"""Curves of training runs from their log.txt (one JSON line per epoch).

    python tools/plot_log.py snapshots/desd/log.txt snapshots/dino/log.txt --out desd_vs_dino.png
    python tools/plot_log.py out/liver/log.txt --out liver.png          # a fine-tuning run

Pretraining logs give one panel each for the total loss, the per-stage losses, the teacher's
entropy, the pretext retrieval score (where logged), the learning rate and the teacher
temperature; fine-tuning logs give the loss, the learning rate and the Dice of each class.
Several runs are drawn over each other, labelled by their folder names. The drawing is
`utils.plot_logs`, which `main_desd.py` and `finetune.py` call after an epoch (at most once a
minute, and after the last) to keep `curves.png` next to their log.
"""

from __future__ import annotations

import os
import sys

from preprocessing import files
from preprocessing.runner import command_parser, entry, run_command
from utils import plot_logs, read_log


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Plot training logs")
    parser.add_argument("logs", nargs="+", help="log.txt files of pretraining or fine-tuning runs.")
    parser.add_argument("--out", default="curves.png", help="The PNG to write.")
    parser.add_argument("--overwrite", action="store_true", help="Write --out over an existing file that is not a PNG.")
    parser.add_argument("--labels", nargs="*", default=None, help="One label per log (default: its folder's name).")
    args = parser.parse_args(argv)
    for path in args.logs:
        if not os.path.isfile(path):
            parser.error(f"{path!r} does not exist")
        if os.path.exists(args.out) and os.path.samefile(path, args.out):
            parser.error(f"--out {args.out!r} is the log {path!r}: give the PNG another name")
        if not read_log(path):
            parser.error(f"{path!r} holds no epoch yet (no JSON line): nothing to draw; was the run stopped before its first epoch ended?")
    files.refuse_overwrite(args.out, files.is_png, "a picture (PNG)", args.overwrite)
    print(plot_logs(args.logs, args.out, args.labels))
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
