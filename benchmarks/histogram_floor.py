"""The strongest no-network floor, added to an `evaluate.py` run recorded before the floor was
part of the experiment: the dense probes (linear and k-NN) on 54 intensity-histogram features
(`probe.floor_row`), on that run's own bench (its patches, held-out cases and case draws, as its
results.json records them). The floor replaces the run's no-network dense row in results.json
(the command is recorded there), and the claims, results.md and the figure are redone.

    python benchmarks/histogram_floor.py --results benchmarks/results/evidence_cpu_3seeds/results.json \
        --figure docs/evidence.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

import evaluate
import utils
from downstream import probe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="The results.json of an evaluate.py run.")
    parser.add_argument("--figure", default="", help="Where the figure goes (default: evidence.png beside results.json).")
    parser.add_argument("--labelled", default="", help="That run's Labelled/ folder (default: made again, as the run made it).")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    cfg = evaluate.CONFIGS[results["config"]]
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        labelled = args.labelled or os.path.join(tmp, "Labelled")
        if not args.labelled:
            evaluate.make_labelled(cfg, labelled)
        cases, classes = probe.load_cases(labelled, cfg.spacing)
        b = probe.bench(cases, classes, cfg.probe_patch, cfg.probe_per_case, cfg.probe_counts, cfg.probe_draws)
    recorded = results["probe"]
    b = dataclasses.replace(b, held_out=recorded["held_out_cases"], draws={int(c): v for c, v in recorded["draws"].items()})
    floor = probe.floor_row(b, device=cfg.device, limit=cfg.probe_rows, max_iter=cfg.probe_iters)
    recorded["rows"]["no network"]["dense"] = floor["dense"]
    results["floor_added"] = {
        "command": "python " + " ".join(sys.argv),
        "machine": utils.machine(),
        "seconds": round(time.time() - t, 1),
    }
    with open(args.results + ".tmp", "w") as f:
        json.dump(utils.strict_json(results), f, indent=1)
    os.replace(args.results + ".tmp", args.results)
    return evaluate.report_again(args.results, args.figure)


if __name__ == "__main__":
    sys.exit(main())
