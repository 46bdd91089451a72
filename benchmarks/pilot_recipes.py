"""Pilot pretraining recipes at small scale, each judged by a stated gate.

Every pilot pretrains res3d10 on the generated DeepLesion of `make evaluate` (the CPU
configuration's data: 2 mm grid, about 300 patches, in the phantom style of `--phantoms`) at
batch 8 with 48 x 48 x 16 views for 8 epochs in fp32 (a bf16 trial of adamw_3e-4 stopped on a
non-finite loss in its third epoch: results/pilots/bf16_trial/), once per seed of `--seeds`.
Each run's teacher and a seed-matched random initialisation of the same arch are probed with
downstream/probe.py on the generated labelled set. A run passes if, over the second half of its
epochs,
- the teacher entropy does not rise (by more than 1% of ln(out_dim) from the first epoch of
  the half to the last),
- the KL between teacher and student (loss minus teacher entropy) falls,
- the view retrieval stays at 3x chance (3 / batch) or more in every epoch;
and a recipe passes if every seed's run does and its frozen dense probe (mean Dice over the four
stages, held-out cases) lies above the random initialisation's by more than twice the sd of that
gain over the seeds (so at least 2 seeds).

    python benchmarks/pilot_recipes.py --out pilots --results benchmarks/results/pilots_varied \
        --phantoms varied --seeds 0 1 --only adamw_1e-4 adamw_1e-4_offset_0.1

Each run's log, probe and verdict go to `<results>/<name>/seed<s>/`, the random probes to
`<results>/random_probe_seed<s>.json`, and the table to `<results>/table.md`. A finished run (its
verdict written) is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch

import evaluate
import utils
from downstream import probe
from preprocessing import files
from preprocessing.synthetic_deeplesion import STYLES

BATCH, VIEW, EPOCHS, OUT_DIM = 8, 48, 8, 256
COMMON = [
    "--arch", "res3d10", "--device", "cpu", "--out_dim", str(OUT_DIM), "--batch_size_per_gpu", str(BATCH),
    "--epochs", str(EPOCHS), "--global_crop_size", str(VIEW), "--crop_depth", "16", "--use_bn_in_head", "True",
    "--warmup_epochs", "1", "--warmup_teacher_temp", "0.02", "--teacher_temp", "0.02", "--warmup_teacher_temp_epochs", "0",
    "--use_bf16", "False", "--num_workers", "2", "--saveckp_freq", "0", "--print_freq", "10",
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
    "adamw_1e-4_per_volume": ["--optimizer", "adamw", "--lr", "0.0032", "--min_lr", "1e-6", "--clip_grad", "3",
                              "--weight_decay", "0.04", "--weight_decay_end", "0.04", "--momentum_teacher", "0.98",
                              "--momentum_teacher_end", "0.98", "--augment_per_volume", "True"],
    "adamw_1e-4_offset_0.1": ["--optimizer", "adamw", "--lr", "0.0032", "--min_lr", "1e-6", "--clip_grad", "3",
                              "--weight_decay", "0.04", "--weight_decay_end", "0.04", "--momentum_teacher", "0.98",
                              "--momentum_teacher_end", "0.98", "--brightness_add_sd", "0.1"],
    "sgd": ["--optimizer", "sgd", "--lr", "0.3", "--min_lr", "1e-4", "--clip_grad", "3", "--weight_decay", "1e-6",
            "--weight_decay_end", "1e-6", "--momentum_teacher", "0.98", "--momentum_teacher_end", "0.98"],
}  # fmt: skip
PER_VOLUME = "augmentation drawn per volume (the published chain draws per slice)"
DEPARTURES = {
    "adamw_3e-4_per_volume": PER_VOLUME,
    "adamw_1e-4_per_volume": PER_VOLUME,
    "adamw_1e-4_offset_0.1": "brightness offset sd 0.1, about 100 HU (the published chain: 0.4)",
}


def gate(records: list[dict], dense: float, dense_random: float, batch: int = BATCH, out_dim: int = OUT_DIM) -> dict:
    """The verdict of one run from its per-epoch log records and its probes' mean dense Dice:
    evaluate.py's trend checks (`passes`: all of them), and the two dense figures."""
    verdict = evaluate.trend_checks(records, batch, out_dim)
    return {"passes": all(verdict["checks"].values()), **verdict, "dense_dice": dense, "dense_dice_random": dense_random}


def recipe_verdict(runs: list[dict]) -> dict:
    """A recipe's verdict from its runs' (one a seed): every run passes its trend checks, and the
    dense probe's gain over the random initialisation is above twice its sd over the seeds (no
    verdict of gain from fewer than 2 seeds)."""
    gains = [r["dense_dice"] - r["dense_dice_random"] for r in runs if "dense_dice" in r]
    trends = len(gains) == len(runs) and all(r["passes"] for r in runs)
    if len(gains) < 2:
        return {"passes": False, "trends_pass": trends, "gain": gains[0] if gains else None, "gain_sd": None, "seeds": len(runs)}
    mean, sd = float(np.mean(gains)), float(np.std(gains, ddof=1))
    beats = mean > 2 * sd
    return {"passes": trends and beats, "trends_pass": trends, "gain_beats_2sd": beats, "gain": mean, "gain_sd": sd, "seeds": len(runs)}


def mean_dense(results: list[dict]) -> float:
    return float(np.mean([r["dense_dice_mean"] for r in results]))


def random_dense(results_dir: str, cases, classes, patch, seed: int) -> float:
    """The seed's random initialisation on the dense probe, computed once and kept."""
    path = os.path.join(results_dir, f"random_probe_seed{seed}.json")
    if not os.path.isfile(path):
        probed = probe.run_probe(cases, classes, "res3d10", None, patch, 24, seed, "cpu")
        utils.save_atomic_json(utils.strict_json(probed), path)
    return mean_dense(json.load(open(path)))


def run_pilot(name: str, seed: int, data: str, out: str, results_dir: str, cases, classes, random: float, patch) -> dict:
    """One recipe pretrained with one seed, probed and judged; its files kept in results_dir."""
    folder, keep = os.path.join(out, name, f"seed{seed}"), os.path.join(results_dir, name, f"seed{seed}")
    os.makedirs(keep, exist_ok=True)
    cmd = ["-m", "main_desd", "--data_path", data, "--output_dir", folder, *COMMON, "--seed", str(seed), *RECIPES[name]]
    start = time.time()
    log = os.path.join(keep, "console.log")
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *cmd], stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if done.returncode:
        verdict = {"name": name, "seed": seed, "passes": False, "failed": f"main_desd exited {done.returncode}; see {log}"}
    else:
        records = [json.loads(line) for line in open(os.path.join(folder, "log.txt"))]
        probed = probe.run_probe(cases, classes, "res3d10", os.path.join(folder, "checkpoint.pth"), patch, 24, seed, "cpu")
        with open(os.path.join(keep, "probe.json"), "w") as f:
            json.dump(utils.strict_json(probed), f, indent=1)
        with open(os.path.join(keep, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        verdict = {"name": name, "seed": seed, **gate(records, mean_dense(probed), random)}
    verdict.update(command="python " + " ".join(cmd), pretraining_seconds=round(seconds, 1), departure=DEPARTURES.get(name, ""))
    utils.save_atomic_json(utils.strict_json(verdict), os.path.join(keep, "verdict.json"))
    return verdict


def write_table(recipes: dict[str, list[dict]], phantoms: str, results_dir: str, machine: str) -> str:
    """One row per run and one per recipe, to <results_dir>/table.md."""
    yes = {True: "yes", False: "no", None: "-"}
    lines = [
        f"# Pretraining pilots at batch 8 on the CPU, {phantoms} phantoms",
        "",
        f"Machine: {machine}. Written by `benchmarks/{os.path.basename(__file__)}` (each run's command in its `verdict.json`).",
        "",
        "| recipe | seed | entropy flat | KL falls | retrieval >= 3x chance | dense Dice | random init | gain | passes | departure |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in recipes.items():
        for v in runs:
            c = v.get("checks", {})
            cells = [yes[c.get(k)] for k in ("entropy_does_not_rise", "kl_falls", "retrieval_at_3x_chance")]
            if "dense_dice" in v:
                dense = f"{v['dense_dice']:.3f} | {v['dense_dice_random']:.3f} | {v['dense_dice'] - v['dense_dice_random']:+.3f}"
            else:
                dense = f"{v.get('failed', '')} | | "
            lines.append(f"| {name} | {v['seed']} | {' | '.join(cells)} | {dense} | {yes[v['passes']]} | {v['departure']} |")
        r = recipe_verdict(runs)
        gain = "-" if r["gain"] is None else f"{r['gain']:+.3f}" + ("" if r["gain_sd"] is None else f" +- {r['gain_sd']:.3f}")
        lines.append(f"| **{name}** | all {r['seeds']} | trends {yes[r['trends_pass']]} | | | | | {gain} | **{yes[r['passes']]}** | |")
    text = "\n".join(lines) + "\n"
    files.write_atomic(os.path.join(results_dir, "table.md"), lambda tmp: pathlib.Path(tmp).write_text(text))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("Pilot pretraining recipes")
    parser.add_argument("--out", default="pilots", help="Working folder (data and runs).")
    parser.add_argument("--results", default="benchmarks/results/pilots_varied", help="Where logs, probes and verdicts are kept.")
    parser.add_argument("--only", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--phantoms", default="varied", choices=STYLES, help="The generated CT's style.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="One run of each recipe per seed.")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.results, exist_ok=True)
    cfg = evaluate.Config(phantoms=args.phantoms)
    data, task = evaluate.make_data(cfg, args.out)
    cases, classes = probe.load_cases(task, cfg.spacing)
    patch = (16, 64, 64)
    randoms = {seed: random_dense(args.results, cases, classes, patch, seed) for seed in args.seeds}
    recipes = {}
    for name in args.only:
        for seed in args.seeds:
            done = os.path.join(args.results, name, f"seed{seed}", "verdict.json")
            verdict = json.load(open(done)) if os.path.isfile(done) else None
            if verdict is None:
                verdict = run_pilot(name, seed, data, args.out, args.results, cases, classes, randoms[seed], patch)
            recipes.setdefault(name, []).append(verdict)
            print(
                f"{name} seed {seed}: {'passes' if verdict['passes'] else 'fails'} {verdict.get('checks', verdict.get('failed'))}",
                flush=True,
            )
    machine = utils.machine()
    print(write_table(recipes, args.phantoms, args.results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
