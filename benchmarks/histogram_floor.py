"""The strongest network-free floor of the frozen-probe bench: per-coarse-voxel intensity
histograms (18 bins over -160..240 HU) at the three stage grids (54 features), scored with the
same linear head and k-NN, on the same bench and case draws as `evaluate.py` builds them, beside
the rows of that run's results.json (stages 1-3, mean over seeds).

    python benchmarks/histogram_floor.py --out evidence          # after make evaluate
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

import evaluate
from downstream import probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="evidence", help="The folder of an evaluate.py run (its Labelled/ and results.json).")
    parser.add_argument("--config", default="cpu", choices=list(evaluate.CONFIGS), help="That run's configuration.")
    args = parser.parse_args()
    cfg = evaluate.CONFIGS[args.config]
    torch.set_num_threads(os.cpu_count() or 1)
    cases, classes = probe.load_cases(os.path.join(args.out, "Labelled"), cfg.spacing)
    b = probe.bench(cases, classes, cfg.probe_patch, cfg.probe_per_case, cfg.probe_counts, cfg.probe_draws)
    maps = probe.histogram_maps(b.images, cfg.probe_patch)
    row = probe.label_efficiency(b, {"histogram": maps}, knn_sets={"histogram"}, limit=cfg.probe_rows, max_iter=cfg.probe_iters)
    results, rows = os.path.join(args.out, "results.json"), {}
    if os.path.isfile(results):  # the encoders' rows of that run, beside the floor
        with open(results) as f:
            rows = json.load(f)["probe"]["rows"]
    counts = [str(c) for c in cfg.probe_counts]
    table = {
        "histogram, 54 features (no network)": {h: [float(np.mean(row["histogram"][h][c])) for c in counts] for h in ("linear", "knn")}
    }
    for name in ("desd", "dino", "none") if rows else ():
        seeds = [k for k in rows if k.startswith(f"{name} seed")]
        table[f"{name}, stages 1-3"] = {
            h: [float(np.nanmean([np.nanmean(rows[k]["dense"]["stages1-3"][h][c]) for k in seeds])) for c in counts]
            for h in ("linear", "knn")
        }
    if "no network" in rows:
        table["intensity mean and mean square (no network)"] = {
            "linear": [float(np.mean(rows["no network"]["dense"]["intensity"]["linear"][c])) for c in counts]
        }
    print(json.dumps({"counts": counts, "held_out": b.held_out, "rows": table}))
    print(f"{'mean Dice, held-out cases':46s}" + "".join(f"{c:>8s}" for c in counts))
    for name, heads in table.items():
        for head, values in heads.items():
            print(f"{name + ' ' + head:46s}" + "".join(f"{v:8.3f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
