"""A finished `make evaluate` run's encoders on real CT: the secondary table of docs/evidence.md.

TotalSegmentator's reference scans (`make realct`, tools/real_ct_dataset.py), with that tool's
predicted labels, not manual ground truth. Heads are fitted on one training scan, the
abdomen/pelvis CT, and scored on the whole DICOM upper abdomen and the whole chest CT angiogram.
The rows go into the run's results.json, and its results.md gets the table
(`evaluate.real_ct_table`).

    python tools/real_ct_probe.py --results evidence/results.json   # `make evaluate-realct`
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

import evaluate
import utils
from downstream import labelled, probe
from preprocessing.network_input import HU_SCALE
from preprocessing.runner import command_parser, run_command
from tools import real_ct_dataset
from tools.real_ct_figure import REALCT

REAL_TRAIN, REAL_TESTS = "abdomen", ("upperabdomen", "chestcta")  # tools/real_ct_dataset.py's cases
REAL_MIN_VOXELS = 1000  # a class is scored on a real scan where it and the training scan each hold this many voxels


def probe_real_ct(path: str, realct: str, figure: str = "", argv: list[str] | None = None) -> int:
    """Probe a finished run's encoders on real CT: TotalSegmentator's reference scans
    (tools/real_ct_dataset.py), read as the labelled phantoms are. Each encoder's frozen stages 1-3
    (and the histogram floor) on the abdomen CT, tiled whole, fit the linear and the k-NN head;
    the whole DICOM case and the whole angiogram are scored. Adds `real_ct` to results.json and
    rewrites results.md and the figure."""
    realct = realct or REALCT
    results = evaluate.load_results(path)
    out, settings = os.path.dirname(os.path.abspath(path)), results["settings"]
    if not os.path.isdir(os.path.join(realct, "tests", "reference_files", "example_ct_dicom")):
        raise SystemExit(f"{realct}: the reference scans are not there; fetch them once with `make realct`")
    checkpoints = {
        (enc, s): os.path.join(evaluate.pretrain_folder(out, enc, s), "checkpoint.pth")
        for s in settings["seeds"]
        for enc in evaluate.PRETRAINED
    }
    missing = [c for c in checkpoints.values() if not os.path.isfile(c)]
    if missing:
        raise SystemExit(f"{missing[0]}: no checkpoint there; the probe needs the run's pretraining folders beside {path}")
    start, device, patch = time.time(), torch.device(settings["device"]), tuple(settings["probe_patch"])
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    ignore = real_ct_dataset.LABELS["ignore"]
    with tempfile.TemporaryDirectory() as work:
        real_ct_dataset.build(realct, work)
        cases, classes = probe.load_cases(work, settings["spacing"])
        by_id = dict(zip((c["id"] for c in labelled.read_dataset(work).cases), cases))
    scans = {REAL_TRAIN: probe.tiles(*by_id[REAL_TRAIN], patch, pad_label=0)}
    scans.update({name: probe.tiles(*by_id[name], patch, pad_label=ignore) for name in REAL_TESTS})
    num_classes = len(classes) + 1
    in_train = [int((scans[REAL_TRAIN][1] == k).sum()) >= REAL_MIN_VOXELS for k in range(1, num_classes)]
    scored = {
        n: [c for k, c in enumerate(classes, 1) if in_train[k - 1] and (scans[n][1] == k).sum() >= REAL_MIN_VOXELS] for n in REAL_TESTS
    }
    median_hu = {  # each class's median HU in each scan: the contrast phases differ
        name: {c: round(float(np.median(img[lab == k])) * HU_SCALE) for k, c in enumerate(classes, 1) if (lab == k).any()}
        for name, (img, lab) in by_id.items()
    }
    images = torch.cat([img for img, _ in scans.values()])
    bounds = np.cumsum([0] + [len(img) for img, _ in scans.values()])

    def scores(fmap: torch.Tensor, seed: int) -> dict:
        parts = {name: (fmap[a:b], lab) for (name, (_, lab)), a, b in zip(scans.items(), bounds[:-1], bounds[1:])}
        return probe.transfer_scores(  # the training scan scored too: how well the heads fit it
            parts[REAL_TRAIN], parts, num_classes, ignore, seed=seed, device=device, limit=settings["probe_rows"],
            max_iter=settings["probe_iters"],
        )  # fmt: skip

    rows = {}
    for seed in settings["seeds"]:
        for enc in evaluate.ENCODERS:
            maps = probe.encoder_maps(settings["arch"], checkpoints.get((enc, seed)), images, seed, device)
            rows[f"{enc} seed{seed}"] = scores(probe.stack_stages(maps, probe.FEATURE_SETS["stages1-3"]), seed)
            del maps
        print(f"  real CT: probed seed {seed}", flush=True)
    rows["no network"] = scores(probe.histogram_maps(images, patch), 0)
    machine = f"{os.uname().machine}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")
    results["real_ct"] = {
        "train": REAL_TRAIN, "tests": list(REAL_TESTS), "classes": classes, "scored": scored,
        "fitted": [c for c, present in zip(classes, in_train) if present],
        "tiles": {name: len(img) for name, (img, _) in scans.items()}, "median_hu": median_hu, "rows": rows,
        "command": "python tools/real_ct_probe.py " + " ".join(argv or []), "machine": machine, "seconds": round(time.time() - start, 1),
    }  # fmt: skip
    with open(path + ".tmp", "w") as f:
        json.dump(utils.strict_json(results), f, indent=1)
    os.replace(path + ".tmp", path)
    print(evaluate.write_report(results, out, figure or os.path.join(out, "evidence.png")))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("A finished evaluate.py run's encoders on real CT")
    parser.add_argument("--results", required=True, help="The finished run's results.json (its pretraining folders beside it).")
    parser.add_argument("--realct", default=REALCT, help="Where `make realct` put the reference scans.")
    parser.add_argument("--figure", default="", help="Where the run's figure goes (default: evidence.png beside results.json).")
    args = parser.parse_args(argv)
    return probe_real_ct(args.results, args.realct, args.figure, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(run_command(main))
