"""What `main_desd.py` costs beyond its training steps: the start-up (imports, model and loader
built, first batch) and the per-epoch overhead (the epoch's checkpoint.pth, the loader refilled
at the epoch's start, the epoch's statistics and log line).

Two runs with the same number of steps N on generated patches of the real size: one epoch of N
iterations, and N epochs of one iteration (--max_iters_per_epoch). Each run's wall time is its
process's, from launch to exit; its step time is log.txt's `train_time_per_iter`. Then

    per-epoch overhead = (wall(N epochs) - wall(1 epoch)) / (N - 1)
    start-up           = wall(1 epoch) - N * step(1 epoch) - one checkpoint write

(the first batch's wait is inside the step time, not the start-up). The step time of the run of
N epochs, beside the other's, shows how much of the overhead is inside the steps: the batch
each epoch's loader has to fetch afresh, and the checkpoint writer's thread competing with the
step for the cores. On their own: the imports
(`main_desd.py --help`) and one checkpoint write (the run's own checkpoint.pth, written again
through the same atomic, flushed write).

    python benchmarks/bench_epoch_overhead.py                      # published heads, res3d50, CPU
    python benchmarks/bench_epoch_overhead.py --arch res3d10 --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import ROOT, report  # noqa: I001

import utils
from tools.tiny_data import make_patch_set


def run_training(data: str, out: str, args: argparse.Namespace, epochs: int, iters: int) -> dict:
    """One main_desd.py run as its own process: its wall time and log.txt's mean step time."""
    command = [sys.executable, os.path.join(ROOT, "main_desd.py"), "--data_path", data, "--list_path", args.list_name]
    command += ["--output_dir", out, "--arch", args.arch, "--batch_size_per_gpu", str(args.batch), "--device", args.device]
    command += ["--epochs", str(epochs), "--max_iters_per_epoch", str(iters), "--num_workers", str(args.workers)]
    command += ["--warmup_epochs", "0", "--print_freq", "1000"]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "log.txt")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    step = sum(line["train_time_per_iter"] for line in lines) / len(lines)
    return {"wall_s": wall, "step_s": step, "epochs": len(lines)}


def checkpoint_write_s(path: str, rounds: int = 3) -> float:
    """The median time to write `path`'s content again, as the run writes it (atomic, fsync)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    target = os.path.join(os.path.dirname(path), "rewrite.pth")
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        utils.save_atomic(state, target, keep_previous=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_s(rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "main_desd.py"), "--help"], check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="res3d50")
    parser.add_argument("--batch", type=int, default=2, help="Samples per step.")
    parser.add_argument("--steps", type=int, default=8, help="N: steps of each run.")
    parser.add_argument("--workers", type=int, default=2, help="Loader workers (persistent across epochs).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="", help="Folder for the generated patches (kept; default: a temporary one).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "data")
        args.list_name = make_patch_set(data, max(16, 2 * args.batch * args.steps), ".nii.gz")
        one = run_training(data, os.path.join(tmp, "one"), args, 1, args.steps)
        many = run_training(data, os.path.join(tmp, "many"), args, args.steps, 1)
        write = checkpoint_write_s(os.path.join(tmp, "one", "checkpoint.pth"))
        size_mb = os.path.getsize(os.path.join(tmp, "one", "checkpoint.pth")) / 1e6
        imports = import_s()
    n = args.steps
    per_epoch = (many["wall_s"] - one["wall_s"]) / (n - 1)
    row = {
        "arch": args.arch,
        "batch": args.batch,
        "steps": n,
        "workers": args.workers,
        "step_s": round(one["step_s"], 3),
        f"step_s_{n}_epochs": round(many["step_s"], 3),
        "wall_1_epoch_s": round(one["wall_s"], 2),
        f"wall_{n}_epochs_s": round(many["wall_s"], 2),
        "per_epoch_overhead_s": round(per_epoch, 3),
        "checkpoint_write_s": round(write, 3),
        "checkpoint_mb": round(size_mb, 1),
        "start_up_s": round(one["wall_s"] - n * one["step_s"] - write, 2),
        "imports_s": round(imports, 2),
    }
    report("epoch_overhead", [row], list(row))


if __name__ == "__main__":
    main()
