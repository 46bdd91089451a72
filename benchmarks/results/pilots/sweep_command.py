"""The probe.sweep run recorded in README.md here, on the data and checkpoints of `pilot_recipes.py --out /tmp/pilots`:
python benchmarks/results/pilots/sweep_command.py (from the repository root)."""

import json
import time

import numpy as np
from desd.downstream import probe

cases, names = probe.load_cases("/tmp/pilots/Labelled", 2.0)
images, labels, owner = probe.sample_patches(cases, (16, 64, 64), 24, 0)
t = time.time()
enc = {
    "adamw_1e-4": probe.encoder_maps("res3d10", "/tmp/pilots/adamw_1e-4/checkpoint.pth", images, 0),
    "none": probe.encoder_maps("res3d10", None, images, 0),
}
print("maps", time.time() - t, flush=True)
t = time.time()
r = probe.sweep(cases, names, enc, counts=(1, 2, 4, 8), draws=3)
print("sweep", time.time() - t, flush=True)
json.dump(r, open("benchmarks/results/pilots/sweep_adamw_1e-4.json", "w"), default=float)
for name, row in r["rows"].items():
    for fs, d in row["dense"].items():
        print(name, fs, {k: {c: round(float(np.mean(v)), 3) for c, v in d[k].items()} for k in d})
    print(name, row["auc"])
