"""The labelled phantoms' gate: can a network-free feature set solve them, and can a network?

For each phantom style (preprocessing/synthetic_deeplesion.py, `--style`), the labelled set of an
`evaluate.py` configuration is made as that experiment makes it, and scored on the experiment's
own bench (patches, the held-out thirds, the distinct draws of training cases):
- the strongest network-free floor at hand (`probe.floor_row`: 54 intensity-histogram features,
  linear head and k-NN), mean and per-class Dice on the held-out cases at every label count;
- with `--scratch_steps`, a segmentation network trained from scratch (evaluate.fine_tune: the
  configuration's arch, patch, batch and learning rate, cosine decay over the last step count)
  on the largest draw of one split (`--split`, default the first; `--seed` seeds it), with
  volumetric Dice on that split's held-out cases after each step count.
The gate of a style that the experiment can learn from: the floor at most 0.35 mean Dice with 8
cases while the network from scratch reaches at least 0.75.

    python benchmarks/phantom_gate.py --styles portal varied --out benchmarks/results/phantom_gate.json
    python benchmarks/phantom_gate.py --styles varied --scratch_steps 250 500 1000 2000
    python benchmarks/phantom_gate.py --styles varied --scratch_steps 500 1000 --flip_axes 0 1

`--flip_axes`, `--ft_patch` and `--ft_batch` change the network's training from the
configuration's (to find what defeats it); the results record the values used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import torch

import evaluate
import utils
from downstream import metrics, probe
from preprocessing.synthetic_deeplesion import STYLES, add_start_argument, check_start, make_msd


def floor_scores(benches, cfg: evaluate.Config) -> dict:
    """The histogram floor on every split: mean Dice per count (over splits and draws), and Dice
    per class at the largest count, for the linear head and k-NN."""
    dense = probe.floor_row(benches, device=cfg.device, limit=cfg.probe_rows, max_iter=cfg.probe_iters)["dense"]["histogram"]
    top = str(max(cfg.probe_counts))
    return {
        head: {
            "mean": {count: float(np.mean(values)) for count, values in dense[head].items()},
            "per_class": [float(v) for v in np.nanmean(np.array(dense["per_class"][head][top], dtype=float), 0)],
        }
        for head in ("linear", "knn")
    }


def scratch_curve(cases, benches, num_classes: int, cfg: evaluate.Config, steps: list[int], split: int = 0, seed: int = 0) -> dict:
    """A network from scratch (torch and numpy seeded with `seed`) on split `split`'s largest
    draw: per-class Dice on that split's held-out cases after each step count."""
    b = benches[split]
    train = b.draws[max(b.draws)][0]
    curve = evaluate.fine_tune(
        cfg, [cases[i] for i in train], [cases[i] for i in b.held_out], num_classes, None, seed, torch.device(cfg.device), steps,
        evaluate.Clock(float("inf")),
        on_score=lambda step, dice: print(f"  from scratch, {step} steps: {', '.join(f'{v:.3f}' for v in dice)}", flush=True),
    )  # fmt: skip
    return {"split": split, "seed": seed, "train_cases": train, "held_out": b.held_out, "dice": {str(k): v for k, v in curve.items()},
            "mean": {str(k): metrics.mean_or_nan(v) for k, v in curve.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu", choices=sorted(evaluate.CONFIGS), help="The evaluate.py configuration.")
    parser.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    parser.add_argument("--scratch_steps", nargs="*", type=int, default=[], help="Step counts of a network from scratch.")
    parser.add_argument(
        "--flip_axes",
        nargs="*",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="Patch axes (D, H, W) flipped at random in training; default the configuration's.",
    )
    parser.add_argument("--ft_patch", nargs=3, type=int, default=None, help="Training patch (D H W); default the configuration's.")
    parser.add_argument("--ft_batch", type=int, default=None, help="Training batch; default the configuration's.")
    parser.add_argument("--split", type=int, default=0, help="The held-out split the network from scratch trains and is scored on.")
    parser.add_argument("--seed", type=int, default=0, help="The network from scratch's seed (weights, patches, flips).")
    add_start_argument(parser, "Depth range of a labelled case's first slice (synthetic_deeplesion.py --msd_start); default the style's.")
    parser.add_argument("--no_floor", action="store_true", help="Leave out the histogram floor (only the network from scratch).")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="Torch threads (default: every core).")
    parser.add_argument("--out", default="", help="Also write the results here (JSON).")
    args = parser.parse_args(argv)
    cfg = evaluate.CONFIGS[args.config]
    if not 0 <= args.split < cfg.probe_splits:
        parser.error(f"--split {args.split}: the {args.config} configuration has splits 0 to {cfg.probe_splits - 1}")
    if args.msd_start is not None:
        try:
            check_start(args.msd_start)
        except ValueError as err:
            parser.error(f"--msd_start: {err}")
    changes = {"ft_flip_axes": args.flip_axes, "ft_patch": args.ft_patch, "ft_batch": args.ft_batch}
    cfg = dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None})
    torch.set_num_threads(args.threads)
    results = {
        "command": "python benchmarks/phantom_gate.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": utils.machine(),
        "config": args.config,
        "counts": list(cfg.probe_counts),
        "training": {"ft_patch": list(cfg.ft_patch), "ft_batch": cfg.ft_batch, "ft_flip_axes": list(cfg.ft_flip_axes), "ft_lr": cfg.ft_lr},
        "msd_start": args.msd_start,  # None: each style's own (SLAB_STARTS)
        "styles": {},
    }
    for style in args.styles:
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            make_msd(tmp, cases=cfg.labelled_cases, size=cfg.msd_size, seed=2, slices=cfg.msd_slices, style=style, start=args.msd_start)
            cases, classes = probe.load_cases(tmp, cfg.spacing)
        b = probe.bench(cases, classes, cfg.probe_patch, cfg.probe_per_case, cfg.probe_counts, cfg.probe_draws)
        benches = [probe.resplit(b, k, cfg.probe_counts, cfg.probe_draws) for k in range(cfg.probe_splits)]
        # voxels of each class in each case on the probe grid: a class absent from a held-out case is left out of its mean
        one = {"classes": classes, "voxels": [[int((label == k).sum()) for k in range(1, len(classes) + 1)] for _, label in cases]}
        if not args.no_floor:
            one.update(floor=floor_scores(benches, cfg), floor_seconds=round(time.time() - start, 1))
            print(report(style, one, cfg), flush=True)  # the floor before the long scratch run
        if args.scratch_steps:
            start = time.time()
            one["scratch"] = scratch_curve(cases, benches, len(classes) + 1, cfg, sorted(args.scratch_steps), args.split, args.seed)
            one["scratch_seconds"] = round(time.time() - start, 1)
            print(report(style, one, cfg).splitlines()[-1], flush=True)
            print(f"  per class at {max(args.scratch_steps)} steps: "
                  + ", ".join(f"{c} {v:.3f}" for c, v in zip(classes, one["scratch"]["dice"][str(max(args.scratch_steps))])), flush=True)  # fmt: skip
        results["styles"][style] = one
    if args.out:
        utils.save_atomic_json(utils.strict_json(results), args.out)
    return 0


def report(style: str, one: dict, cfg: evaluate.Config) -> str:
    counts = [str(c) for c in cfg.probe_counts]
    lines = [f"{style}: mean Dice over {', '.join(one['classes'])}"]
    if "floor" in one:
        lines.append(f"  histogram floor ({one['floor_seconds']:.0f} s):")
    for head, scores in one.get("floor", {}).items():
        per_class = ", ".join(f"{c} {v:.3f}" for c, v in zip(one["classes"], scores["per_class"]))
        lines.append(
            f"  {head}: "
            + " / ".join(f"{scores['mean'][c]:.3f}" for c in counts)
            + f" at {'/'.join(counts)} cases; {per_class} at {counts[-1]}"
        )
    if "scratch" in one:
        curve = one["scratch"]
        lines.append(f"  from scratch on cases {curve['train_cases']} ({one['scratch_seconds']:.0f} s): "
                     + ", ".join(f"{k} steps {v:.3f}" for k, v in curve["mean"].items()))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
