"""Pilot pretraining recipes at small scale, each judged by a stated gate.

Every pilot pretrains res3d10 on the generated DeepLesion of `make evaluate` (the CPU
configuration's data: 2 mm grid, 303 patches) at batch 8 with 48 x 48 x 16 views for 8 epochs
(296 steps) in fp32 (a bf16 trial of adamw_3e-4 stopped on a non-finite loss in its third epoch:
bf16_trial/), then probes its teacher and a seed-matched random initialisation of the same arch
with downstream/probe.py on the generated labelled set. A recipe passes the gate only if, over the second
half of its epochs,
- the teacher entropy does not rise (by more than 1% of ln(out_dim) from the first epoch of
  the half to the last),
- the KL between teacher and student (loss minus teacher entropy) falls,
- the view retrieval stays at 3x chance (3 / batch) or more in every epoch,
and its frozen dense probe (mean Dice over the four stages, held-out cases) beats the random
initialisation's.

    python benchmarks/pilot_recipes.py --out pilots --results benchmarks/results/pilots
    python benchmarks/pilot_recipes.py --out pilots --only adamw_3e-4 sgd   # some of them

Each pilot's log, probe and verdict go to `<results>/<name>/`, and a table to
`<results>/README.md`. A finished pilot (its verdict written) is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

import evaluate
import utils
from downstream import probe

BATCH, VIEW, EPOCHS, OUT_DIM = 8, 48, 8, 256
COMMON = [
    "--arch", "res3d10", "--device", "cpu", "--out_dim", str(OUT_DIM), "--batch_size_per_gpu", str(BATCH),
    "--epochs", str(EPOCHS), "--global_crop_size", str(VIEW), "--crop_depth", "16", "--use_bn_in_head", "True",
    "--warmup_epochs", "1", "--warmup_teacher_temp", "0.02", "--teacher_temp", "0.02", "--warmup_teacher_temp_epochs", "0",
    "--use_bf16", "False", "--num_workers", "2", "--saveckp_freq", "0", "--print_freq", "10", "--seed", "0",
]  # fmt: skip
# peak learning rates follow the linear scaling rule: lr x 8 / 256
RECIPES = {
    "adamw_3e-4": ["--optimizer", "adamw", "--lr", "0.0096", "--min_lr", "1e-5", "--clip_grad", "3",
                   "--weight_decay", "0.04", "--weight_decay_end", "0.04", "--momentum_teacher", "0.98", "--momentum_teacher_end", "0.98"],
    "adamw_1e-4": ["--optimizer", "adamw", "--lr", "0.0032", "--min_lr", "1e-6", "--clip_grad", "3",
                   "--weight_decay", "0.04", "--weight_decay_end", "0.04", "--momentum_teacher", "0.98", "--momentum_teacher_end", "0.98"],
    "adamw_3e-4_per_volume": ["--optimizer", "adamw", "--lr", "0.0096", "--min_lr", "1e-5", "--clip_grad", "3",
                              "--weight_decay", "0.04", "--weight_decay_end", "0.04", "--momentum_teacher", "0.98",
                              "--momentum_teacher_end", "0.98", "--augment_per_volume", "True"],
    "sgd": ["--optimizer", "sgd", "--lr", "0.3", "--min_lr", "1e-4", "--clip_grad", "3", "--weight_decay", "1e-6",
            "--weight_decay_end", "1e-6", "--momentum_teacher", "0.98", "--momentum_teacher_end", "0.98"],
}  # fmt: skip
DEPARTURES = {"adamw_3e-4_per_volume": "augmentation drawn per volume (the published chain draws per slice)"}


def gate(records: list[dict], dense: float, dense_random: float, batch: int = BATCH, out_dim: int = OUT_DIM) -> dict:
    """The verdict of one pilot from its per-epoch log records and its probes' mean dense Dice:
    evaluate.py's trend checks, and the dense probe above the random initialisation."""
    verdict = evaluate.trend_checks(records, batch, out_dim)
    verdict["checks"]["dense_probe_beats_random"] = dense > dense_random
    return {"passes": all(verdict["checks"].values()), **verdict, "dense_dice": dense, "dense_dice_random": dense_random}


def mean_dense(results: list[dict]) -> float:
    return float(np.mean([r["dense_dice_mean"] for r in results]))


def run_pilot(name: str, data: str, task: str, out: str, results_dir: str, cases, classes, random_dense: float, patch) -> dict:
    folder, keep = os.path.join(out, name), os.path.join(results_dir, name)
    os.makedirs(keep, exist_ok=True)
    cmd = ["-m", "main_desd", "--data_path", data, "--output_dir", folder, *COMMON, *RECIPES[name]]
    start = time.time()
    log = os.path.join(keep, "console.log")
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *cmd], stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if done.returncode:
        verdict = {"name": name, "passes": False, "failed": f"main_desd exited {done.returncode}; see {log}"}
    else:
        records = [json.loads(line) for line in open(os.path.join(folder, "log.txt"))]
        ckpt = os.path.join(folder, "checkpoint.pth")
        probed = probe.run_probe(cases, classes, "res3d10", ckpt, patch, 24, 0, "cpu")
        with open(os.path.join(keep, "probe.json"), "w") as f:
            json.dump(utils.strict_json(probed), f, indent=1)
        with open(os.path.join(keep, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        verdict = {"name": name, **gate(records, mean_dense(probed), random_dense)}
    verdict.update(command="python " + " ".join(cmd), pretraining_seconds=round(seconds, 1), departure=DEPARTURES.get(name, ""))
    with open(os.path.join(keep, "verdict.json"), "w") as f:
        json.dump(utils.strict_json(verdict), f, indent=1)
    return verdict


def write_table(verdicts: list[dict], random_dense: float, results_dir: str, machine: str) -> str:
    lines = [
        "# Pretraining pilots at batch 8 on the CPU",
        "",
        f"Machine: {machine}. Each row: `{os.path.basename(__file__)}` (command in each `verdict.json`).",
        f"Random initialisation, mean dense Dice over stages: {random_dense:.3f}.",
        "",
        "| recipe | entropy flat | KL falls | retrieval >= 3x chance | dense > random | dense Dice | passes | departure |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in verdicts:
        c = v.get("checks", {})
        cells = [
            ("yes" if c.get(k) else "no")
            for k in ("entropy_does_not_rise", "kl_falls", "retrieval_at_3x_chance", "dense_probe_beats_random")
        ]
        dense = f"{v['dense_dice']:.3f}" if "dense_dice" in v else v.get("failed", "")
        lines.append(f"| {v['name']} | {' | '.join(cells)} | {dense} | {'**yes**' if v['passes'] else 'no'} | {v['departure']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "README.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("Pilot pretraining recipes")
    parser.add_argument("--out", default="pilots", help="Working folder (data and runs).")
    parser.add_argument("--results", default="benchmarks/results/pilots", help="Where logs, probes and verdicts are kept.")
    parser.add_argument("--only", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.results, exist_ok=True)
    data, task = evaluate.make_data(evaluate.Config(), args.out)
    cases, classes = probe.load_cases(task, evaluate.Config().spacing)
    patch = (16, 64, 64)
    random_path = os.path.join(args.results, "random_probe.json")
    if not os.path.isfile(random_path):
        with open(random_path, "w") as f:
            json.dump(utils.strict_json(probe.run_probe(cases, classes, "res3d10", None, patch, 24, 0, "cpu")), f, indent=1)
    random_dense = mean_dense(json.load(open(random_path)))
    verdicts = []
    for name in args.only:
        done = os.path.join(args.results, name, "verdict.json")
        verdict = json.load(open(done)) if os.path.isfile(done) else None
        if verdict is None:
            verdict = run_pilot(name, data, task, args.out, args.results, cases, classes, random_dense, patch)
        verdicts.append(verdict)
        print(f"{name}: {'passes' if verdict['passes'] else 'fails'} {verdict.get('checks', verdict.get('failed'))}", flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(write_table(verdicts, random_dense, args.results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
