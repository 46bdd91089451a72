"""Curves of training runs from their log.txt (one JSON line per epoch).

    python tools/plot_log.py snapshots/desd/log.txt snapshots/dino/log.txt --out desd_vs_dino.png
    python tools/plot_log.py out/liver/log.txt --out liver.png          # a fine-tuning run

Pretraining logs give one panel each for the total loss, the per-stage losses, the teacher's
entropy, the pretext retrieval score (where logged), the learning rate and the teacher
temperature; fine-tuning logs give the loss, the learning rate and the Dice of each class.
Several runs are drawn over each other, labelled by their folder names. `main_desd.py` and
`finetune.py` call `plot_logs` after every epoch to keep `curves.png` next to their log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import files

PRETRAIN_PANELS = [
    ("loss", ["train_loss"]),
    ("per-stage loss", ["train_stage1", "train_stage2", "train_stage3", "train_stage4"]),
    ("teacher entropy", ["train_teacher_entropy"]),
    ("view retrieval (top-1)", ["train_retrieval"]),
    (
        "KL, teacher to student (loss minus entropy)",
        ["train_kl", "train_kl_stage1", "train_kl_stage2", "train_kl_stage3", "train_kl_stage4"],
    ),
    ("learning rate", ["train_lr"]),
    ("teacher temperature", ["train_teacher_temp"]),
]


def read_log(path: str) -> list[dict]:
    """The JSON lines of a log.txt; a line cut short by a crash is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def panels_for(records: list[dict]) -> list[tuple[str, list[str]]]:
    keys = set().union(*records) if records else set()
    if "train_stage1" in keys:
        return [(title, [k for k in ks if k in keys]) for title, ks in PRETRAIN_PANELS if any(k in keys for k in ks)]
    dice = sorted(k for k in keys if k.startswith("dice_")) + (["mean_dice"] if "mean_dice" in keys else [])
    return [(t, ks) for t, ks in [("loss", ["train_loss"]), ("learning rate", ["lr"]), ("Dice", dice)] if ks]


def plot_logs(paths: list[str], out: str, labels: list[str] | None = None) -> str:
    """Draw the runs' curves into `out` (PNG), written under a temporary name then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_log(p) for p in paths]
    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) or p for p in paths]
    panels = panels_for([r for run in runs for r in run])
    cols = min(3, max(1, len(panels)))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.0 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes.flat, panels):
        for n, (run, label) in enumerate(zip(runs, labels)):
            for k, key in enumerate(keys):
                points = [(r.get("epoch", i), r[key]) for i, r in enumerate(run) if isinstance(r.get(key), int | float)]
                if points:
                    name = label if len(keys) == 1 else f"{label} {key.replace('train_', '').replace('dice_', '')}"
                    ax.plot(*zip(*points), styles[n % len(styles)], color=f"C{k if len(keys) > 1 else n}", label=name, marker=".")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if title == "learning rate" and any(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")  # a run at lr 0 (a frozen test run) stays linear
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    try:
        files.write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("Plot training logs")
    parser.add_argument("logs", nargs="+", help="log.txt files of pretraining or fine-tuning runs.")
    parser.add_argument("--out", default="curves.png")
    parser.add_argument("--labels", nargs="*", default=None, help="One label per log (default: its folder's name).")
    args = parser.parse_args(argv)
    for path in args.logs:
        if not os.path.isfile(path):
            parser.error(f"{path!r} does not exist")
    print(plot_logs(args.logs, args.out, args.labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
