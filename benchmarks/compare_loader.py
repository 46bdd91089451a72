"""Compare the loader worker path of two checkouts in one process, alternating batch by batch,
so that both see the same machine (a shared machine's speed drifts between runs).

    git worktree add /tmp/old <commit>
    python benchmarks/compare_loader.py /tmp/old .     # A = the old code, B = this checkout

Each checkout's dataset.py and intensity chain (augment/intensity.py; augment/intensity.py
or augment.py in older checkouts) are loaded under their own names (the rest, such as
augment/native_chain.py, comes from this checkout). Prints CPU milliseconds a sample (collated into
batches of 32, as a worker does) for the full path and without the intensity chain, as a JSON
line and a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types

import torch
from common import report

from tools.tiny_data import make_patch_set


def load(folder: str, name: str):
    """folder's dataset module, importing folder's augment module (checkouts with top-level
    modules, or those of the one-package layout, which get this checkout's other modules under
    their `desd.` names)."""

    def module(file: str):
        key = f"{name}_{file.replace(os.sep, '_')}"
        spec = importlib.util.spec_from_file_location(key, os.path.join(folder, file))
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[key] = loaded
        spec.loader.exec_module(loaded)
        return loaded

    package = "desd" if os.path.isfile(os.path.join(folder, "desd", "dataset.py")) else ""
    if package:  # a checkout of the one-package layout imports this checkout's modules as desd.*
        for old in ("", "preprocessing", "preprocessing.network_input", "augment", "augment.native_chain"):
            sys.modules.setdefault(".".join(filter(None, ["desd", old])), importlib.import_module(old) if old else types.ModuleType("desd"))
    key = ".".join(filter(None, [package, "augment.intensity"]))  # what dataset.py imports
    ours = sys.modules.get(key)
    try:
        if os.path.isfile(os.path.join(folder, package, "augment", "intensity.py")):
            sys.modules[key] = module(os.path.join(package, "augment", "intensity.py"))
        else:
            sys.modules["augment"] = module("augment.py")
        return module(os.path.join(package, "dataset.py"))
    finally:
        if ours is not None:
            sys.modules[key] = ours


def view_config(module, intensity: bool):
    """The checkout's ViewConfig with or without the intensity chain (older ones take `intensity`)."""
    if "output" in module.ViewConfig.__dataclass_fields__:
        return module.ViewConfig(output="views" if intensity else "plain")
    return module.ViewConfig(intensity=intensity)


def main() -> None:
    parser = argparse.ArgumentParser("compare the loader worker path of two checkouts")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--root", default="bench_data")
    parser.add_argument("--patches", default=32, type=int)
    parser.add_argument("--rounds", default=30, type=int, help="Batches of 32 samples timed per checkout and mode.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modules = [load(args.a, "a"), load(args.b, "b")]
    modules[0].keep_freed_memory()
    list_path = make_patch_set(args.root, args.patches, ".nii")
    rows = []
    for mode in ("full", "no intensity chain"):
        datasets = [m.SSLDataset(args.root, list_path, view_config(m, mode == "full")) for m in modules]
        for m, ds in zip(modules, datasets):
            m.collate([ds[(0, 0)]])  # warm-up
        seconds = [0.0, 0.0]
        for r in range(args.rounds):
            for j in (0, 1) if r % 2 == 0 else (1, 0):
                start = time.process_time()
                modules[j].collate([datasets[j][(i % len(datasets[j]), r)] for i in range(32)])
                seconds[j] += time.process_time() - start
        a, b = (1e3 * s / (32 * args.rounds) for s in seconds)
        rows.append({"worker path": mode, "A ms/sample": round(a, 3), "B ms/sample": round(b, 3), "B/A": round(b / a, 3)})
    report(f"loader worker CPU time, A = {args.a}, B = {args.b}", rows, ["worker path", "A ms/sample", "B ms/sample", "B/A"])


if __name__ == "__main__":
    main()
