"""Does pretraining pay? DeSD against DINO against no pretraining, on generated CT.

One command runs the whole experiment:
1. generates an unlabelled synthetic DeepLesion and runs the three preprocessing scripts on it,
   and generates a separate labelled set (other phantoms) at the same physical scale;
2. pretrains two encoders of the same arch, budget and seed: DeSD (stage weights 0.25 each)
   and DINO (`--stage_weights 0 0 0 1`); the third encoder is a random initialisation;
3. probes the three (downstream/probe.py: per stage, a linear probe of organ presence and a frozen dense
   probe);
4. fine-tunes each with 1, 2 and 4 labelled training cases and with all of them, over several
   seeds, with the same budget and at the pretraining spacing, and scores every run by Dice on
   the same held-out cases;
5. writes results.json, results.md (mean and spread over seeds) and a figure.

    python evaluate.py --config cpu --out evidence      # `make evaluate`: 52 minutes on 2 CPU cores
    python evaluate.py --config gpu --out evidence_gpu  # one H100/H200, res3d50 at the published crop size
    python evaluate.py --config smoke --out /tmp/smoke  # the smallest run, for the tests

The labelled cases are read as fine-tuning reads them (the pretraining orientation, spacing and
intensity scaling); fine-tuning here is a compact in-process loop (the network, loss and
sliding-window inference of finetune.py) so that the sweep's runs do not pay the set-up of a
process each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

import utils
from downstream import cache, metrics, patches, probe
from models.pretrained import load_checkpoint

ROOT = os.path.dirname(os.path.abspath(__file__))
ENCODERS = ("desd", "dino", "none")
STAGE_WEIGHTS = {"desd": ("0.25", "0.25", "0.25", "0.25"), "dino": ("0", "0", "0", "1")}


@dataclasses.dataclass
class Config:
    """One experiment's size: data, pretraining recipe, probes and fine-tuning. `cpu` fits an
    hour on 2 cores (res3d10 on a 2 mm grid, so that a 64 x 64 x 16 view covers 128 x 128 x 32 mm;
    batch 8; out_dim 256; 8 epochs of the unlabelled patches per encoder; 36 fine-tuning runs of
    30 steps); `gpu` (in CONFIGS) is sized for one H100/H200. How the recipe was chosen, and what it
    does and does not show, is in docs/evidence.md."""

    arch: str = "res3d10"
    spacing: float = 2.0
    patients: int = 16  # unlabelled phantoms (1-2 studies of 1-2 series each)
    png_size: int = 192
    context_mm: float = 48.0
    labelled_cases: int = 12
    held_out: int = 4
    msd_size: int = 96
    msd_slices: int = 24
    view: int = 64
    out_dim: int = 256
    batch: int = 8
    epochs: int = 8
    iters_per_epoch: int = 0  # 0: the whole list
    optimizer: str = "adamw"
    lr: float = 0.1  # scaled by batch / 256
    min_lr: float = 1e-5
    weight_decay: float = 0.04
    bn_head: bool = True
    momentum_teacher: float = 0.99
    warmup_epochs: int = 1
    warmup_teacher_temp: float = 0.02
    teacher_temp: float = 0.02
    teacher_temp_warmup: int = 0
    label_counts: tuple = (1, 2, 4, 0)  # 0: all training cases
    seeds: tuple = (0, 1, 2)
    ft_patch: tuple = (16, 64, 64)
    ft_iters: int = 30
    ft_batch: int = 4
    ft_lr: float = 1e-3
    sw_overlap: float = 0.0
    probe_per_case: int = 24
    workers: int = 2
    device: str = "cpu"
    extra: tuple = ()  # further main_desd.py flags


CONFIGS = {
    "cpu": Config(),
    "smoke": Config(
        patients=3, png_size=128, context_mm=30, labelled_cases=5, held_out=2, msd_size=64, msd_slices=16, out_dim=256, batch=4,
        epochs=1, iters_per_epoch=2, label_counts=(1, 0), seeds=(0,), ft_iters=2, ft_batch=2, probe_per_case=4, warmup_epochs=1,
        teacher_temp_warmup=1,
    ),
    "gpu": Config(
        arch="res3d50", spacing=1.0, patients=20, png_size=384, context_mm=48, labelled_cases=16, held_out=4, msd_size=192,
        msd_slices=40, view=96, out_dim=60000, batch=32, epochs=12, optimizer="sgd", lr=0.3, min_lr=0.008, weight_decay=1e-6,
        warmup_epochs=2, warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup=4, ft_patch=(32, 96, 96), ft_iters=150,
        ft_batch=4, sw_overlap=0.25, probe_per_case=32, workers=8, device="cuda", extra=("--use_bf16", "True"),
    ),
}  # fmt: skip
# gpu: the published recipe at one GPU's batch of 32; min_lr is the published 0.048 scaled, as the
# peak is, by 32 / 192 (the published global batch), so that the cosine still falls


def paired_gap(a: list[float], b: list[float]) -> dict:
    """The gap a - b paired by pretraining seed, and whether it may be claimed: only where the
    mean paired gap exceeds twice its standard deviation (over seeds, ddof 1) and every seed's
    gap has the same sign. Needs at least two seeds; NaN pairs are left out."""
    gaps = np.array([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))], dtype=np.float64)
    if len(gaps) < 2:
        return {"gaps": gaps.tolist(), "mean": math.nan, "std": math.nan, "holds": False}
    mean, std = float(gaps.mean()), float(gaps.std(ddof=1))
    same_sign = bool((gaps > 0).all() or (gaps < 0).all())
    return {"gaps": gaps.tolist(), "mean": mean, "std": std, "holds": same_sign and abs(mean) > 2 * std}


def run(cmd: list[str], log: str) -> None:
    """Run one step as a process of its own, its output in `log`; fail naming the log."""
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {done.returncode}); see {log}:\n{tail}")


def make_data(cfg: Config, out: str) -> tuple[str, str]:
    """The unlabelled DeepLesion (preprocessed to patches) and the labelled set."""
    from preprocessing.synthetic_deeplesion import make_deeplesion, make_msd

    data, task = os.path.join(out, "DeepLesion"), os.path.join(out, "Labelled")
    list_file = os.path.join(data, "SSL_data_deeplesion.txt")
    if not os.path.isfile(list_file):
        make_deeplesion(data, patients=cfg.patients, size=cfg.png_size, seed=1, context_mm=cfg.context_mm)
        common = ["--data_root", data, "--workers", str(cfg.workers)]
        py = sys.executable
        # as modules from the repository root: they import the project's modules installed or not
        run([py, "-m", "preprocessing.DL_save_nifti", *common], os.path.join(out, "prep1.log"))
        run([py, "-m", "preprocessing.re_spacing_ITK", *common, "--spacing", str(cfg.spacing)], os.path.join(out, "prep2.log"))
        run([py, "-m", "preprocessing.splitting_to_patches", *common, "--ext", ".nii"], os.path.join(out, "prep3.log"))
    if not os.path.isfile(os.path.join(task, "dataset.json")):
        make_msd(task, cases=cfg.labelled_cases, size=cfg.msd_size, seed=2, slices=cfg.msd_slices)  # other phantoms
    return data, task


def pretrain_command(cfg: Config, name: str, data: str, folder: str) -> list[str]:
    """main_desd.py's arguments for one encoder of the experiment."""
    return [
        "--data_path", data, "--output_dir", folder, "--arch", cfg.arch, "--device", cfg.device,
        "--out_dim", str(cfg.out_dim), "--batch_size_per_gpu", str(cfg.batch), "--epochs", str(cfg.epochs),
        "--global_crop_size", str(cfg.view), "--crop_depth", "16", "--optimizer", cfg.optimizer, "--lr", str(cfg.lr),
        "--min_lr", str(cfg.min_lr), "--weight_decay", str(cfg.weight_decay), "--weight_decay_end", str(cfg.weight_decay),
        "--clip_grad", "0", "--use_bn_in_head", str(cfg.bn_head), "--momentum_teacher", str(cfg.momentum_teacher),
        "--warmup_epochs", str(cfg.warmup_epochs), "--warmup_teacher_temp", str(cfg.warmup_teacher_temp),
        "--teacher_temp", str(cfg.teacher_temp), "--warmup_teacher_temp_epochs", str(cfg.teacher_temp_warmup),
        "--use_fp16", "False", "--num_workers", str(cfg.workers),
        "--saveckp_freq", "0", "--print_freq", "20", "--seed", "0", "--stage_weights", *STAGE_WEIGHTS[name],
        "--max_iters_per_epoch", str(cfg.iters_per_epoch), *cfg.extra,
    ]  # fmt: skip


def pretrain(cfg: Config, name: str, data: str, out: str) -> str:
    """One pretraining; returns its checkpoint. Skipped when it already finished."""
    folder = os.path.join(out, f"pretrain_{name}")
    ckpt = os.path.join(folder, "checkpoint.pth")
    if os.path.isfile(ckpt) and load_checkpoint(ckpt, mmap=True).get("epoch", 0) >= cfg.epochs:
        return ckpt
    run([sys.executable, "main_desd.py", *pretrain_command(cfg, name, data, folder)], os.path.join(out, f"pretrain_{name}.log"))
    return ckpt


# ============ fine-tuning ============


def crop_batch(cases, patch, n: int, rng: np.random.Generator):
    """n training patches of (image, label, locations) cases as fine-tuning draws them (two in
    three centred on foreground), each flipped along a random set of axes."""
    images, labels, _ = patches.sample(cases, patch, n, fg_share=2 / 3, rng=rng)
    for i in range(n):
        flips = [a for a in range(3) if rng.random() < 0.5]
        images[i], labels[i] = np.flip(images[i], flips), np.flip(labels[i], flips)
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)


def fine_tune(cfg: Config, train_cases, test_cases, num_classes: int, checkpoint: str | None, seed: int, device) -> list[float]:
    """Train a segmentation network for cfg.ft_iters iterations; per-class Dice on the test cases."""
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    from models import create_model
    from models.pretrained import load_pretrained_encoder
    from models.segmentation import Res3DSegmentation

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_cases = [(img, lab, cache.foreground_locations(lab, rng)) for img, lab in train_cases]
    model = Res3DSegmentation(create_model(cfg.arch), num_classes)
    if checkpoint:
        load_pretrained_encoder(model.encoder, checkpoint)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.ft_lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    for it in range(cfg.ft_iters):
        for group in opt.param_groups:  # cosine decay
            group["lr"] = cfg.ft_lr * 0.5 * (1 + math.cos(math.pi * it / cfg.ft_iters))
        x, y = crop_batch(train_cases, cfg.ft_patch, cfg.ft_batch, rng)
        loss = loss_fn(model(x.to(device)), y[:, None].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    scores = []
    with torch.no_grad():
        for img, lab in test_cases:
            x = torch.from_numpy(img)[None, None].to(device)
            logits = sliding_window_inference(x, cfg.ft_patch, 4, model, overlap=cfg.sw_overlap, mode="gaussian")
            scores.append(metrics.case_scores(logits.argmax(1)[0].cpu(), torch.from_numpy(lab), num_classes, tolerance=None)[0])
    per_class = torch.nanmean(torch.stack(scores), 0)
    return [float(v) for v in per_class]


# ============ the experiment ============


def spread(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if not math.isnan(x)])
    return (float(v.mean()), float(v.std())) if len(v) else (math.nan, math.nan)


def write_report(results: dict, out: str, figure: str) -> str:
    """results.md (tables) and the figure; returns the markdown."""
    names = results["classes"]
    lines = ["## Probes (per stage; mean over classes)", "", "| encoder | stage | linear AUC | dense Dice |", "| --- | --- | --- | --- |"]
    for enc in ENCODERS:
        for r in results["probe"][enc]:
            lines.append(f"| {enc} | {r['stage']} | {r['auc_mean']:.3f} | {r['dense_dice_mean']:.3f} |")
    counts = [str(c) for c in results["label_counts"]]
    lines += ["", f"## Fine-tuning: mean Dice over {', '.join(names)} on the held-out cases (mean +- std over seeds)", ""]
    lines += ["| labelled cases | " + " | ".join(ENCODERS) + " |", "| --- |" + " --- |" * len(ENCODERS)]
    for c in counts:
        cells = []
        for enc in ENCODERS:
            m, s = spread([np.nanmean(d) for d in results["finetune"][enc][c]])
            cells.append(f"{m:.3f} +- {s:.3f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
    for enc, colour in zip(ENCODERS, ("tab:red", "tab:blue", "tab:grey")):
        stages = [r["stage"] for r in results["probe"][enc]]
        a.plot(stages, [r["auc_mean"] for r in results["probe"][enc]], "o-", color=colour, label=enc)
        b.plot(stages, [r["dense_dice_mean"] for r in results["probe"][enc]], "o-", color=colour, label=enc)
        xs = [int(k) for k in counts]
        stats = [spread([np.nanmean(d) for d in results["finetune"][enc][k]]) for k in counts]
        c.errorbar(range(len(xs)), [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o-", color=colour, capsize=3, label=enc)
    a.set(title="linear probe: organ presence", xlabel="stage", ylabel="AUC (mean over classes)", xticks=[1, 2, 3, 4])
    b.set(title="frozen dense probe", xlabel="stage", ylabel="Dice (mean over classes)", xticks=[1, 2, 3, 4])
    c.set(title="fine-tuning", xlabel="labelled training cases", ylabel="Dice on held-out cases", xticks=range(len(counts)))
    c.set_xticklabels([k if k != str(results["all_cases"]) else f"{k} (all)" for k in counts])
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("DeSD vs DINO vs no pretraining")
    parser.add_argument("--config", default="cpu", choices=list(CONFIGS))
    parser.add_argument("--out", default="evidence", help="Working folder (data, runs, results).")
    parser.add_argument("--figure", default="", help="Where the figure goes (default: <out>/evidence.png).")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(cfg.device)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.time()
    timings = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - start - sum(timings.values()), 1)
        print(f"[{time.time() - start:7.0f} s] {name} done", flush=True)

    data, task = make_data(cfg, args.out)
    with open(os.path.join(data, "SSL_data_deeplesion.txt")) as f:
        n_patches = sum(1 for line in f if line.strip())
    lap("data")
    checkpoints = {"none": None}
    for enc in ("desd", "dino"):
        checkpoints[enc] = pretrain(cfg, enc, data, args.out)
        lap(f"pretrain_{enc}")
    cases, classes = probe.load_cases(task, cfg.spacing)
    probes = {
        enc: probe.run_probe(cases, classes, cfg.arch, checkpoints[enc], (16, cfg.view, cfg.view), cfg.probe_per_case, 0, cfg.device)
        for enc in ENCODERS
    }
    lap("probes")
    test, pool = cases[: cfg.held_out], cases[cfg.held_out :]
    counts = [c if c else len(pool) for c in cfg.label_counts]
    finetune: dict[str, dict[str, list]] = {enc: {} for enc in ENCODERS}
    for enc in ENCODERS:
        for c in counts:
            runs = []
            for seed in cfg.seeds:
                pick = np.random.default_rng(100 + seed).permutation(len(pool))[:c]  # the same cases for every encoder
                runs.append(fine_tune(cfg, [pool[i] for i in sorted(pick)], test, len(classes) + 1, checkpoints[enc], seed, device))
            finetune[enc][str(c)] = runs
            print(f"  fine-tuned {enc} with {c} cases: mean Dice {np.nanmean(runs):.3f}", flush=True)
    lap("finetune")
    logs = {}
    for enc in ("desd", "dino"):
        with open(os.path.join(args.out, f"pretrain_{enc}", "log.txt")) as f:
            logs[enc] = [json.loads(line) for line in f]
    machine = f"{os.uname().machine}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")
    results = {
        "config": args.config,
        "settings": dataclasses.asdict(cfg),
        "unlabelled_patches": n_patches,
        "classes": classes,
        "label_counts": counts,
        "all_cases": len(pool),
        "held_out_cases": cfg.held_out,
        "probe": probes,
        "finetune": finetune,
        "pretraining_log": logs,
        "seconds": timings,
        "machine": machine,
        "command": "python evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "title": f"{args.config} configuration: {cfg.arch}, {n_patches} unlabelled patches at {cfg.spacing:g} mm, "
        f"{cfg.epochs} pretraining epochs; {machine}",
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(utils.strict_json(results), f, indent=1)
    print(write_report(results, args.out, args.figure or os.path.join(args.out, "evidence.png")))
    print(f"Total {time.time() - start:.0f} s; results in {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
