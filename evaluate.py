"""Does pretraining pay? DeSD against DINO against no pretraining, on generated CT.

One command runs the whole experiment:
1. generates an unlabelled synthetic DeepLesion and runs the three preprocessing scripts on it,
   and generates a separate labelled set (other phantoms) at the same physical scale;
2. pretrains DeSD (stage weights 0.25 each) and DINO (`--stage_weights 0 0 0 1`) with the same
   arch, recipe and budget, each with several seeds; the "none" encoder of a seed is the random
   initialisation drawn with it; each run's second-half trends (teacher entropy, KL, view
   retrieval) are kept beside its scores;
3. scores every encoder's teacher (and student) frozen, on one bench of patches and held-out
   cases (downstream/probe.py): per stage and on stages 1-3 together, a linear head trained to
   convergence on the coarse grid and k-NN label transfer, at 1, 2, 4 and 8 labelled cases
   with several distinct draws of cases; the presence AUC as a secondary score; the strongest
   no-network floor at hand (54 intensity-histogram features, linear and k-NN) in every table;
4. pairs the gaps by pretraining seed and tests them (`paired_gap`, `claims`): one primary
   endpoint (DeSD - DINO, linear head on stages 1-3, the largest label count) alone, every other
   cell as one Holm-corrected family, no claim from fewer than 3 seeds;
5. where the configuration fine-tunes (smoke, gpu), fine-tunes each encoder and logs Dice on the
   held-out cases at several step counts, so that a plateau can be seen;
   pretrainings and fine-tunings run as concurrent processes where the configuration says so, and
   with a clock their timed first epochs or steps decide whether the fixed schedule fits: if not,
   the run stops and names the shortfall (exit 2) instead of shrinking the schedule;
6. writes results.json, results.md and a figure.

A secondary table then takes the finished run's teachers to real CT (tools/real_ct_probe.py):
TotalSegmentator's reference scans with that tool's predicted labels, heads fitted on the
abdomen/pelvis CT and scored on the DICOM upper abdomen and the chest CT angiogram.

    python evaluate.py --config cpu --out evidence      # `make evaluate`: 53 min on 2 CPU cores
    python tools/real_ct_probe.py --results evidence/results.json  # `make evaluate-realct`: 3 min
    python evaluate.py --config gpu --out evidence_gpu  # one H100/H200 within 9 minutes, or refused
    python evaluate.py --config smoke --out /tmp/smoke  # the smallest run, for the tests

The CPU hour does not fine-tune: 30 steps did not feel the label count and a converged run per
encoder, count and seed does not fit; the frozen probes are its result. The labelled cases are
read as fine-tuning reads them (the pretraining orientation, spacing and intensity scaling).
"""

from __future__ import annotations

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
from preprocessing import files
from preprocessing.runner import command_parser, entry, run_command
from preprocessing.synthetic_deeplesion import STYLES

PRETRAINED = ("desd", "dino")
ENCODERS = (*PRETRAINED, "none")
STAGE_WEIGHTS = {"desd": ("0.25", "0.25", "0.25", "0.25"), "dino": ("0", "0", "0", "1")}
PAIRS = (("desd", "dino"), ("desd", "none"), ("dino", "none"))


@dataclasses.dataclass
class Config:
    """One experiment's size: data, pretraining recipe, probes and fine-tuning. `cpu` takes under an hour
    on 2 cores: res3d10 on a 2 mm grid, batch 8 of 48 x 48 x 16 views, 8 epochs of 37 steps (296) per
    run, 3 seeds per method, with the recipe that passed most of the pilots' gate
    (benchmarks/results/pilots/README.md: AdamW at a peak of 1e-4, clipping at 3, the teacher's
    momentum held at 0.98 so that its initial weights hold 0.3% of it at the end). docs/evidence.md
    says what it does and does not show."""

    arch: str = "res3d10"
    phantoms: str = "varied"  # the generated CT's style (preprocessing/synthetic_deeplesion.py --style; "portal": the former)
    spacing: float = 2.0
    patients: int = 16  # unlabelled phantoms (1-2 studies of 1-2 series each)
    png_size: int = 192
    context_mm: float = 48.0
    labelled_cases: int = 12  # a third is held out, in each of probe_splits ways
    msd_size: int = 96
    msd_slices: int = 24
    view: int = 48
    crop_depth: int = 16
    out_dim: int = 256
    batch: int = 8
    epochs: int = 8
    iters_per_epoch: int = 0  # 0: the whole list
    optimizer: str = "adamw"
    lr: float = 0.0032  # scaled by batch / 256: a peak of 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    bn_head: bool = True
    momentum_teacher: float = 0.98
    momentum_teacher_end: float = 0.98
    warmup_epochs: int = 1
    warmup_teacher_temp: float = 0.02
    teacher_temp: float = 0.02
    teacher_temp_warmup: int = 0
    seeds: tuple = (0, 1, 2)  # pretraining seeds per method
    probe_patch: tuple = (16, 64, 64)
    probe_per_case: int = 24
    probe_counts: tuple = (1, 2, 4, 8)
    probe_draws: int = 2  # distinct draws of training cases per label count and split
    probe_splits: int = 3  # held-out thirds of the labelled cases, each its own bench of draws
    probe_rows: int = 10000  # training voxels per dense-probe fit (half foreground where there are enough)
    probe_iters: int = 100  # L-BFGS iterations per dense-probe fit at most (it stops earlier once converged)
    student_sets: tuple = ("stages1-3",)  # feature sets scored on the student too
    knn_sets: tuple = ("stages1-3",)  # feature sets scored by k-NN too (its cost grows with the grid)
    every_count_sets: tuple = ("stages1-3",)  # feature sets scored at every label count; the others at the largest
    ft_counts: tuple = ()  # labelled cases to fine-tune with; () skips fine-tuning
    ft_steps: tuple = ()  # step counts at which Dice is logged (the last is the run's length)
    ft_seeds: int = 1  # pretraining seeds whose encoders are fine-tuned
    ft_draws: int = 1  # distinct draws of cases per count (the first split's) that are fine-tuned
    ft_patch: tuple = (16, 64, 64)
    ft_batch: int = 4
    ft_lr: float = 1e-3
    ft_flip_axes: tuple = (0, 1, 2)  # axes of the patch (D, H, W) each flipped at random in fine-tuning, as finetune.py does
    sw_overlap: float = 0.0
    time_limit: float = 0.0  # seconds for the whole run (a schedule that cannot fit is refused); 0: none
    min_pretrain_steps: int = 0  # steps per pretraining run at least: fewer is refused before it starts
    concurrent: int = 1  # pretraining processes at once (on one device)
    ft_concurrent: int = 1  # fine-tuning processes at once
    workers: int = 2  # loader workers per pretraining process; the preprocessing uses every core
    device: str = "cpu"
    extra: tuple = ()  # further main_desd.py flags


CONFIGS = {
    "cpu": Config(iters_per_epoch=37),  # 296 steps a run: the varied style's 362 patches would give 360, past the hour
    "smoke": Config(
        patients=3, png_size=128, context_mm=30, labelled_cases=6, msd_size=64, msd_slices=16, out_dim=64, batch=4,
        epochs=2, iters_per_epoch=1, min_pretrain_steps=2, concurrent=2, ft_concurrent=2, time_limit=1800, seeds=(0, 1), probe_per_case=4, probe_counts=(1, 4), probe_splits=2, probe_rows=2000, probe_iters=20, ft_counts=(1,),
        ft_steps=(1, 2), ft_batch=2, warmup_epochs=1, teacher_temp_warmup=1, extra=("--head_hidden_dim", "256"),
    ),
    "gpu": Config(
        arch="res3d18", spacing=1.0, patients=32, png_size=256, context_mm=48, labelled_cases=15, msd_size=160,
        msd_slices=40, view=96, out_dim=1024, batch=64, epochs=10, iters_per_epoch=30, min_pretrain_steps=300,
        concurrent=6, ft_counts=(1, 4), ft_draws=2, ft_steps=(50, 100, 200, 400), ft_concurrent=12, ft_patch=(32, 96, 96),
        ft_flip_axes=(0, 1), sw_overlap=0.25, time_limit=500, workers=2, device="cuda", extra=("--use_bf16", "True", "--augment_on_device", "True"),
    ),
}  # fmt: skip
# gpu: the CPU experiment scaled up to answer within one 9-minute call on one H100/H200
# (benchmarks/gpu_evaluate.sh): 32 phantoms at 1 mm, 96 x 96 x 16 views, batch 64 (the same flags:
# the peak learning rate scales with the batch), bf16 and the intensity chain on the device,
# res3d18. DeSD and DINO x 3 seeds pretrain as 6 concurrent processes on the one GPU, 300 steps each
# (a fixed schedule, the minimum); then the 3 encoders of seed 0 fine-tune with 1 and 4 cases, 2
# draws each, as 12 concurrent processes, scored at 50 to 400 steps, never mirrored left-right (the
# varied phantoms tell the liver from the spleen by side: benchmarks/results/phantom_gate/). The
# clock (time_limit, 500 s) never shrinks a schedule: the first epochs and steps of the real runs
# are timed, and a projection past the clock stops the phase with a message that names the
# shortfall.


PRIMARY = {"pair": "desd - dino", "head": "linear", "features": "stages1-3"}  # at the largest label count
MIN_SEEDS = 3  # no claim from fewer pretraining seeds
ALPHA = 0.05
MIN_EFFECT = 0.005  # a Dice difference below half a point is not called a difference, however steady
FLOOR = "histogram"  # the no-network comparator: 54 intensity-histogram features (probe.histogram_maps)


def paired_gap(a: list[float], b: list[float]) -> dict:
    """The gap a - b paired by pretraining seed: the per-seed gaps, their mean and standard
    deviation (ddof 1), and the two-sided p-value of a one-sample t-test of the gaps against 0
    (NaN with fewer than MIN_SEEDS seeds: no claim is made from them). NaN pairs are left out."""
    from scipy import stats

    gaps = np.array([x - y for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))], dtype=np.float64)
    mean = float(gaps.mean()) if len(gaps) else math.nan
    std = float(gaps.std(ddof=1)) if len(gaps) > 1 else math.nan
    if len(gaps) < MIN_SEEDS:
        p = math.nan
    elif std == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(stats.ttest_1samp(gaps, 0.0).pvalue)
    return {"gaps": gaps.tolist(), "mean": mean, "std": std, "p": p}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count in the family)."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


class OutOfTime(RuntimeError):
    """The run's own clock ran out; what finished is still written."""


class Shortfall(RuntimeError):
    """A stated schedule cannot be met (too few patches for its steps, or its timed first steps
    project past the clock): the run stops and says by how much, rather than shrink the schedule."""


PRETRAIN_SHARE = 0.5  # of the clock left after the data: the pretraining's part; the probes and fine-tuning get the rest


class Clock:
    """The wall-clock budget of a run: `left()` seconds remain (infinite without a limit)."""

    def __init__(self, limit: float, start: float | None = None):
        self.limit, self.start = limit, time.time() if start is None else start

    def left(self) -> float:
        return self.limit - (time.time() - self.start) if self.limit > 0 else math.inf


def run(cmd: list[str], log: str, timeout: float = math.inf) -> None:
    """Run one step as a process of its own, its output in `log`; fail naming the log, or raise
    OutOfTime when it outlives `timeout` seconds."""
    name = " ".join(os.path.basename(c) for c in cmd[:3])  # python -m main_desd, say
    with open(log, "w") as f:
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=None if math.isinf(timeout) else timeout)
        except subprocess.TimeoutExpired:
            raise OutOfTime(f"{name} stopped by the time limit; see {log}") from None
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"{name} failed (exit {done.returncode}); see {log}:\n{tail}")


def make_data(cfg: Config, out: str) -> tuple[str, str]:
    """The unlabelled DeepLesion (preprocessed to patches) and the labelled set."""
    from preprocessing.synthetic_deeplesion import make_deeplesion

    data, task = os.path.join(out, "DeepLesion"), os.path.join(out, "Labelled")
    style_file = os.path.join(out, "phantoms.txt")  # a resumed run must not mix the styles' data and runs
    made = open(style_file).read().strip() if os.path.isfile(style_file) else ("portal" if os.path.isdir(data) else "")
    if made and made != cfg.phantoms:
        raise SystemExit(f"{out}: holds a run on {made} phantoms, not {cfg.phantoms}; give --out another folder")
    os.makedirs(out, exist_ok=True)
    files.write_atomic(style_file, lambda tmp: open(tmp, "w").write(cfg.phantoms + "\n"))
    list_file = os.path.join(data, "SSL_data_deeplesion.txt")
    if not os.path.isfile(list_file):
        make_deeplesion(data, patients=cfg.patients, size=cfg.png_size, seed=1, context_mm=cfg.context_mm, style=cfg.phantoms)
        common = ["--data_root", data, "--workers", str(os.cpu_count() or 1)]
        py = sys.executable
        # as modules from the repository root: they import the project's modules installed or not
        run([py, "-m", "preprocessing.DL_save_nifti", *common], os.path.join(out, "prep1.log"))
        run([py, "-m", "preprocessing.re_spacing_ITK", *common, "--spacing", str(cfg.spacing)], os.path.join(out, "prep2.log"))
        run([py, "-m", "preprocessing.splitting_to_patches", *common, "--ext", ".nii"], os.path.join(out, "prep3.log"))
    if not os.path.isfile(os.path.join(task, "dataset.json")):
        make_labelled(cfg, task)
    return data, task


def make_labelled(cfg: Config, task: str) -> None:
    """The labelled set of the experiment (other phantoms than the unlabelled ones); the same
    cases every time for a configuration."""
    from preprocessing.synthetic_deeplesion import make_msd

    make_msd(task, cases=cfg.labelled_cases, size=cfg.msd_size, seed=2, slices=cfg.msd_slices, style=cfg.phantoms)


def pretrain_command(cfg: Config, name: str, data: str, folder: str, seed: int = 0) -> list[str]:
    """main_desd.py's arguments for one encoder of the experiment."""
    return [
        "--data_path", data, "--output_dir", folder, "--arch", cfg.arch, "--device", cfg.device,
        "--out_dim", str(cfg.out_dim), "--batch_size_per_gpu", str(cfg.batch), "--epochs", str(cfg.epochs),
        "--global_crop_size", str(cfg.view), "--crop_depth", str(cfg.crop_depth), "--optimizer", cfg.optimizer,
        "--lr", str(cfg.lr), "--min_lr", str(cfg.min_lr), "--weight_decay", str(cfg.weight_decay),
        "--weight_decay_end", str(cfg.weight_decay), "--clip_grad", str(cfg.clip_grad), "--use_bn_in_head", str(cfg.bn_head),
        "--momentum_teacher", str(cfg.momentum_teacher), "--momentum_teacher_end", str(cfg.momentum_teacher_end),
        "--warmup_epochs", str(cfg.warmup_epochs), "--warmup_teacher_temp", str(cfg.warmup_teacher_temp),
        "--teacher_temp", str(cfg.teacher_temp), "--warmup_teacher_temp_epochs", str(cfg.teacher_temp_warmup),
        "--use_fp16", "False", "--num_workers", str(cfg.workers), "--saveckp_freq", "0", "--print_freq", "20",
        "--seed", str(seed), "--stage_weights", *STAGE_WEIGHTS[name], "--max_iters_per_epoch", str(cfg.iters_per_epoch), *cfg.extra,
    ]  # fmt: skip


def read_log(folder: str) -> list[dict]:
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f if line.strip()]


def pretrain_folder(out: str, name: str, seed: int) -> str:
    return os.path.join(out, f"pretrain_{name}_seed{seed}")


def finished(folder: str, epochs: int) -> bool:
    ckpt = os.path.join(folder, "checkpoint.pth")
    return os.path.isfile(ckpt) and load_checkpoint(ckpt, mmap=True).get("epoch", 0) >= epochs


@dataclasses.dataclass
class Job:
    """One process of a phase: its command, the folder whose log.txt gets a line per epoch, and
    (once it runs) the times at which those lines appeared, in seconds from its start."""

    name: str
    cmd: list[str]
    folder: str
    epochs: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    epoch_times: list = dataclasses.field(default_factory=list)
    error: str = ""

    def logged_epochs(self) -> int:
        try:
            with open(os.path.join(self.folder, "log.txt")) as f:
                return sum(1 for line in f if line.strip())
        except OSError:
            return 0

    def projected_seconds(self) -> float | None:
        """Its whole run's length at its measured pace (start-up, then the time between its first
        and last logged epochs for each further epoch); None before it has logged two."""
        t = self.epoch_times
        if len(t) < 2:
            return None
        return t[-1] + (self.epochs - len(t)) * (t[-1] - t[0]) / (len(t) - 1)


def projected_end(running: list[Job], queued: int, at_once: int, now: float) -> float | None:
    """When the phase ends: each running job at its own pace, then the queued ones in further
    waves of `at_once`, each as long as the slowest running job. None until every running job
    has logged two epochs."""
    lengths = [j.projected_seconds() for j in running]
    if not running or None in lengths:
        return None
    end = max(j.started + length for j, length in zip(running, lengths))
    return max(now, end) + math.ceil(queued / at_once) * max(lengths)


def run_concurrently(jobs: list[Job], at_once: int, deadline: float, hard_deadline: float, poll: float = 0.5) -> None:
    """Run the jobs' processes, `at_once` at a time, each with its output in <folder>.log; a job
    that fails keeps its error and the others go on. Each job's epochs are timed as its log.txt
    grows: as soon as the phase's end can be projected (`projected_end`) and it falls after
    `deadline`, every job is stopped and Shortfall names the gap. OutOfTime at `hard_deadline`."""
    queue, running = list(jobs), []
    try:
        while queue or running:
            while queue and len(running) < at_once:
                job = queue.pop(0)
                os.makedirs(os.path.dirname(job.folder) or ".", exist_ok=True)
                with open(job.folder + ".log", "w") as log:
                    job.proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT)
                job.started = time.time()
                running.append(job)
            time.sleep(poll)
            now = time.time()
            for job in running:
                job.epoch_times += [now - job.started] * (job.logged_epochs() - len(job.epoch_times))
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                job.ended = now
                if job.proc.returncode:
                    with open(job.folder + ".log") as f:
                        tail = f.read()[-2000:]
                    job.error = f"{job.name} failed (exit {job.proc.returncode}); see {job.folder}.log:\n{tail}"
                print(f"  {job.name}: {'failed' if job.error else 'done'} in {job.ended - job.started:.0f} s", flush=True)
            end = projected_end(running, len(queue), at_once, now)
            if end is not None and end > deadline and math.isfinite(deadline):
                paces = [(j.epoch_times[-1] - j.epoch_times[0]) / (len(j.epoch_times) - 1) for j in running]
                raise Shortfall(
                    f"{len(jobs)} runs of {jobs[0].epochs} epochs, {at_once} at once, would end {end - deadline:.0f} s after "
                    f"their share of the clock ({deadline - min(j.started for j in running):.0f} s from the first start), at the "
                    f"measured {max(paces):.1f} s an epoch; the schedule is the minimum, so the run stops rather than shrink it"
                )
            if now > hard_deadline:
                raise OutOfTime(f"{', '.join(j.name for j in running)} stopped by the time limit")
    finally:
        for job in running:
            job.proc.kill()
            job.proc.wait()


def pretrain_all(cfg: Config, runs: list[tuple[str, int]], data: str, out: str, clock: Clock) -> dict[tuple[str, int], Job]:
    """The pretrainings of `runs`, cfg.concurrent at once; a run that already finished is not redone."""
    jobs = {}
    for name, seed in runs:
        folder = pretrain_folder(out, name, seed)
        cmd = [sys.executable, "-m", "main_desd", *pretrain_command(cfg, name, data, folder, seed)]
        jobs[name, seed] = Job(f"pretraining {name} seed {seed}", cmd, folder, cfg.epochs)
    todo = [job for job in jobs.values() if not finished(job.folder, cfg.epochs)]
    deadline = time.time() + PRETRAIN_SHARE * clock.left()
    run_concurrently(todo, cfg.concurrent, deadline, time.time() + clock.left())
    return jobs


def trend_checks(records: list[dict], batch: int, out_dim: int) -> dict:
    """A pretraining's verdict from its per-epoch log records, over the second half of its
    epochs: the teacher entropy does not rise (by more than 1% of ln(out_dim) from the first epoch
    of the half to the last), the KL between teacher and student falls, and the view retrieval
    stays at 3x chance (3 / batch) or more in every epoch."""
    half = records[len(records) // 2 :]
    entropy = [r["train_teacher_entropy"] for r in half]
    kl = [r["train_kl"] if "train_kl" in r else r["train_loss"] - r["train_teacher_entropy"] for r in half]
    retrieval = [r["train_retrieval"] for r in half]
    checks = {
        "entropy_does_not_rise": entropy[-1] - entropy[0] <= 0.01 * math.log(out_dim),
        "kl_falls": kl[-1] < kl[0],
        "retrieval_at_3x_chance": min(retrieval) >= 3.0 / batch,
    }
    return {"checks": checks, "second_half": {"entropy": entropy, "kl": kl, "retrieval": retrieval}}


FAILED = {"entropy_does_not_rise": "entropy rises", "kl_falls": "KL does not fall", "retrieval_at_3x_chance": "retrieval under 3x chance"}


# ============ fine-tuning ============


def crop_batch(cases, patch, n: int, rng: np.random.Generator, flip_axes=(0, 1, 2)):
    """n training patches of (image, label, locations) cases as fine-tuning draws them (two in
    three centred on foreground), each flipped along a random subset of `flip_axes`."""
    images, labels, _ = patches.sample(cases, patch, n, fg_share=2 / 3, rng=rng)
    for i in range(n):
        flips = [a for a in flip_axes if rng.random() < 0.5]
        images[i], labels[i] = np.flip(images[i], flips), np.flip(labels[i], flips)
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)


def fine_tune(
    cfg: Config,
    train_cases,
    test_cases,
    num_classes: int,
    checkpoint: str | None,
    seed: int,
    device,
    steps: list[int],
    clock: Clock,
    on_score=None,
) -> dict[int, list[float]]:
    """Fine-tune a segmentation network (AdamW, cosine decay over the last of `steps`, the
    network, loss and sliding-window inference of finetune.py); per-class Dice on the test cases
    after each of `steps`, also handed to `on_score(step, dice)` as it comes. With a clock, the
    steps and the scoring up to the first of `steps` are timed: a projection of the rest past the
    clock raises Shortfall (the steps are a fixed schedule, never cut); OutOfTime when the clock
    runs out all the same."""
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
    total, curve = steps[-1], {}

    def score() -> list[float]:
        model.eval()
        scores = []
        with torch.no_grad():
            for img, lab in test_cases:
                x = torch.from_numpy(img)[None, None].to(device)
                logits = sliding_window_inference(x, cfg.ft_patch, 4, model, overlap=cfg.sw_overlap, mode="gaussian")
                scores.append(metrics.case_scores(logits.argmax(1)[0].cpu(), torch.from_numpy(lab), num_classes, tolerance=None)[0])
        model.train()
        return [float(v) for v in torch.nanmean(torch.stack(scores), 0)]

    model.train()
    start = time.time()
    for it in range(total):
        if clock.left() <= 0:
            raise OutOfTime(f"fine-tuning stopped by the time limit at step {it} of {total}")
        for group in opt.param_groups:  # cosine decay
            group["lr"] = cfg.ft_lr * 0.5 * (1 + math.cos(math.pi * it / total))
        x, y = crop_batch(train_cases, cfg.ft_patch, cfg.ft_batch, rng, cfg.ft_flip_axes)
        loss = loss_fn(model(x.to(device)), y[:, None].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it + 1 in steps:
            scored = time.time()
            curve[it + 1] = score()
            if on_score is not None:
                on_score(it + 1, curve[it + 1])
            if len(curve) == 1 and math.isfinite(clock.left()):
                step_s, score_s = (scored - start) / (it + 1), time.time() - scored
                rest = (total - it - 1) * step_s + (len(steps) - 1) * score_s
                if rest > clock.left():
                    raise Shortfall(
                        f"fine-tuning for {total} steps would end {rest - clock.left():.0f} s after the time limit, at the "
                        f"measured {step_s:.2f} s a step and {score_s:.1f} s a scoring; the schedule is the minimum, so the "
                        "run stops rather than shrink it"
                    )
    return curve


# ============ the experiment ============


def spread(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def per_seed(rows: dict, enc: str, seeds, head: str, fs: str, count: str) -> list[float]:
    """One value per pretraining seed: the mean over the draws of cases. The floor (`FLOOR`) has no
    seed: its one value (over the same draws) stands for every seed, on stages 1-3's grid."""
    if enc == FLOOR:
        dense = rows.get("no network", {}).get("dense", {})
        draws = dense.get(FLOOR, {}).get(head, {}).get(count, []) if fs == "stages1-3" else []
        return [metrics.mean_or_nan(draws)] * len(seeds)
    out = []
    for seed in seeds:
        row = rows.get(f"{enc} seed{seed}")
        draws = row["dense"][fs].get(head, {}).get(count, []) if row and fs in row["dense"] else []
        out.append(metrics.mean_or_nan(draws))
    return out


def claims(rows: dict, seeds, counts, feature_sets) -> list[dict]:
    """Every paired comparison that was scored (per pair of encoders or encoder and floor, head,
    feature set and label count), and which of them hold. The primary endpoint (`PRIMARY`, at the
    largest count) is tested alone at ALPHA; every other cell is one family, Holm-corrected. A cell
    holds where its (adjusted) p-value is below ALPHA and its mean gap at least MIN_EFFECT; none
    holds with fewer than MIN_SEEDS seeds."""
    out = []
    pairs = [*PAIRS, *((enc, FLOOR) for enc in ENCODERS)]
    for a, b in pairs:
        for head in ("linear", "knn"):
            for fs in feature_sets:
                for c in counts:
                    x, y = per_seed(rows, a, seeds, head, fs, c), per_seed(rows, b, seeds, head, fs, c)
                    if all(math.isnan(v) for v in x) or all(math.isnan(v) for v in y):
                        continue  # not scored this way (k-NN on the stages outside cfg.knn_sets)
                    cell = {"pair": f"{a} - {b}", "head": head, "features": fs, "cases": c}
                    primary = all(cell[k] == v for k, v in PRIMARY.items()) and c == counts[-1]
                    out.append({**cell, "role": "primary" if primary else "secondary", **paired_gap(x, y)})
    secondary = [c for c in out if c["role"] == "secondary"]
    for c, adjusted in zip(secondary, holm([c["p"] for c in secondary])):
        c["p_holm"] = adjusted
    for c in out:
        p = c["p"] if c["role"] == "primary" else c["p_holm"]
        c["holds"] = bool(p < ALPHA and abs(c["mean"]) >= MIN_EFFECT)  # NaN compares False
    return out


def _fmt(m: float, s: float) -> str:
    return "n/a" if math.isnan(m) else f"{m:.3f} +- {s:.3f}"


LABELS = {
    "desd": "DeSD teacher",
    "desd student": "DeSD student",
    "dino": "DINO teacher",
    "dino student": "DINO student",
    "none": "none (random init)",
}
FLOOR_LABEL = "histogram, 54 features (no network)"


def floor_of(rows: dict) -> tuple[str, dict]:
    """The no-network dense row of a run and its label: the histogram floor, or the two intensity
    moments of runs recorded before it (benchmarks/histogram_floor.py adds the floor to those)."""
    dense = rows["no network"]["dense"]
    return (FLOOR_LABEL, dense[FLOOR]) if FLOOR in dense else ("intensity mean and mean square (no network)", dense["intensity"])


def summary_table(results: dict) -> str:
    """The headline table (README, docs/evidence.md): frozen stages 1-3, mean Dice on the held-out
    cases per label count, for the teachers and the random initialisation (mean +- std over
    pretraining seeds, each seed's value the mean over its draws of cases) and for the floor."""
    rows, seeds, counts = results["probe"]["rows"], results["settings"]["seeds"], [str(c) for c in results["probe_counts"]]
    label, floor = floor_of(rows)
    lines = ["| stages 1-3, mean Dice | " + " | ".join(f"{c} case{'s' * (c != '1')}" for c in counts) + " |"]
    lines.append("| --- |" + " --- |" * len(counts))
    for head, name in (("linear", "linear"), ("knn", "k-NN")):
        for enc in ENCODERS:
            cells = [_fmt(*spread(per_seed(rows, enc, seeds, head, "stages1-3", c))) for c in counts]
            lines.append(f"| {LABELS[enc]}, {name} | " + " | ".join(cells) + " |")
        if head in floor:
            lines.append(f"| {label}, {name} | " + " | ".join(f"{metrics.mean_or_nan(floor[head][c]):.3f}" for c in counts) + " |")
    return "\n".join(lines) + "\n"


def real_ct_table(results: dict) -> str:
    """The real-CT rows (tools/real_ct_probe.py): Dice per (test scan, class) and their mean, frozen stages
    1-3, heads fitted on the one training scan (encoders: mean +- std over pretraining seeds)."""
    real, seeds = results["real_ct"], results["settings"]["seeds"]
    pairs = [(scan, c) for scan in real["tests"] for c in real["scored"][scan]]
    columns = [f"{scan} {c}" for scan, c in pairs] + ["mean", f"{real['train']} itself (fitted), mean"]
    lines = ["| real CT, stages 1-3, Dice | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]

    def values(row: dict, head: str) -> list[float]:
        tested = [row[head][scan][real["classes"].index(c)] for scan, c in pairs]
        fitted = [row[head][real["train"]][real["classes"].index(c)] for c in real["fitted"]]
        return [*tested, metrics.mean_or_nan(tested), metrics.mean_or_nan(fitted)]

    for head, name in (("linear", "linear"), ("knn", "k-NN")):
        for enc in ENCODERS:
            runs = [values(real["rows"][f"{enc} seed{s}"], head) for s in seeds if f"{enc} seed{s}" in real["rows"]]
            if runs:
                cells = [_fmt(*spread([r[k] for r in runs])) for k in range(len(columns))]
                lines.append(f"| {LABELS[enc]}, {name} | " + " | ".join(cells) + " |")
        floor = values(real["rows"]["no network"], head)
        lines.append(f"| {FLOOR_LABEL}, {name} | " + " | ".join(f"{v:.3f}" for v in floor) + " |")
    return "\n".join(lines) + "\n"


def per_class_table(results: dict) -> str:
    """Dice per class of the frozen stages 1-3, linear head, at the largest label count (mean over
    seeds and draws); empty for runs that kept only the class means."""
    rows, seeds, names = results["probe"]["rows"], results["settings"]["seeds"], results.get("classes", [])
    top = str(results["probe_counts"][-1])
    label, floor = floor_of(rows)
    found = {}
    for enc in ENCODERS:
        per = [rows[f"{enc} seed{s}"]["dense"]["stages1-3"].get("per_class", {}) for s in seeds if f"{enc} seed{s}" in rows]
        draws = [d for p in per for d in p.get("linear", {}).get(top, [])]
        if draws:
            found[LABELS[enc]] = draws
    encoders_kept = bool(found)
    if floor.get("per_class"):
        found[label] = floor["per_class"]["linear"][top]
    if not found:
        return ""
    lines = [] if encoders_kept else ["The encoders' Dice per class was not kept by this run (only their class means).", ""]
    lines += ["| encoder | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for name, draws in found.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics.mean_or_nan([d[k] for d in draws]):.3f}" for k in range(len(names))) + " |")
    return "\n".join(lines) + "\n"


def split_means(results: dict, enc: str, head: str, fs: str, count: str) -> list[float]:
    """Per held-out split, the encoder's (or the floor's) mean over seeds of its mean over that
    split's draws; empty for runs with one split."""
    splits = results["probe"].get("splits", [])
    if len(splits) < 2:
        return []
    rows, seeds = results["probe"]["rows"], results["settings"]["seeds"]
    keys = ["no network"] if enc == FLOOR else [f"{enc} seed{s}" for s in seeds if f"{enc} seed{s}" in rows]
    out = []
    for k in range(len(splits)):
        start = sum(len(splits[j]["draws"][count]) for j in range(k))
        stop = start + len(splits[k]["draws"][count])
        values = []
        for key in keys:
            dense = rows[key]["dense"].get(FLOOR if enc == FLOOR else fs, {})
            values.append(metrics.mean_or_nan(dense.get(head, {}).get(count, [])[start:stop]))
        out.append(metrics.mean_or_nan(values))
    return out


def split_table(results: dict) -> str:
    """The headline cell (stages 1-3, linear head, the largest count) per held-out split."""
    splits = results["probe"].get("splits", [])
    top = str(results["probe_counts"][-1])
    if len(splits) < 2:
        return ""
    lines = ["| encoder | " + " | ".join(f"held out {', '.join(map(str, s['held_out']))}" for s in splits) + " |"]
    lines.append("| --- |" + " --- |" * len(splits))
    for enc, label in [*((e, LABELS[e]) for e in ENCODERS), (FLOOR, FLOOR_LABEL)]:
        values = split_means(results, enc, "linear", "stages1-3", top)
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def claims_text(results: dict) -> list[str]:
    """The rule and the gaps table of results.md."""
    top = str(results["probe_counts"][-1])
    primary = f"{PRIMARY['pair']}, {PRIMARY['head']} head, {PRIMARY['features']}, {top} cases"
    lines = [
        f"Primary endpoint: {primary}, tested alone (paired t-test over pretraining seeds, two-sided, "
        f"p < {ALPHA}); every other cell is one family, Holm-corrected. A cell holds where its p (Holm's for "
        f"the family) is below {ALPHA} and its mean gap at least {MIN_EFFECT}; nothing holds with fewer than "
        f"{MIN_SEEDS} seeds. The floor has no seed: its value stands for every seed.",
        "",
        "| pair | head | features | cases | mean gap +- std | per seed | p | p (Holm) | holds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in sorted(results["claims"], key=lambda c: c["role"] != "primary"):
        if c["features"] == "stages1-3" or (c["head"] == "linear" and c["cases"] == top):
            per = ", ".join(f"{g:+.3f}" for g in c["gaps"])
            pair = f"**{c['pair']}** (primary)" if c["role"] == "primary" else c["pair"]
            holm_p = "" if c["role"] == "primary" else f"{c.get('p_holm', math.nan):.3g}"
            lines.append(
                f"| {pair} | {c['head']} | {c['features']} | {c['cases']} | {_fmt(c['mean'], c['std'])} | {per} | "
                f"{c['p']:.3g} | {holm_p} | {'**yes**' if c['holds'] else 'no'} |"
            )
    return lines


def write_report(results: dict, out: str, figure: str) -> str:
    """results.md (tables) and the figure; returns the markdown."""
    rows, seeds, counts = results["probe"]["rows"], results["settings"]["seeds"], [str(c) for c in results["probe_counts"]]
    floor_label, floor = floor_of(rows)
    lines = [f"# {results['title']}", ""]
    if results.get("stopped"):
        lines += [f"**Incomplete: {results['stopped']}**", ""]
    if results.get("floor_added"):
        added = results["floor_added"]
        lines += [f"The no-network floor was added after the run: `{added['command']}` ({added['machine']}).", ""]
    lines += ["## Pretraining runs (second half of the epochs)", ""]
    lines += [
        "| run | steps | seconds | teacher entropy | KL | view retrieval (min) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["pretraining"].items():
        if "failed" in r:
            lines.append(f"| {name} | | | | | | failed: {r['failed'].splitlines()[0]} |")
            continue
        h, c = r["second_half"], r["checks"]
        failed = [FAILED[k] for k, ok in c.items() if not ok]
        t = r["seconds"]  # None (NaN once through results.json): finished by an earlier invocation
        seconds = "-" if t is None or math.isnan(t) else f"{t:.0f}"
        lines.append(
            f"| {name} | {r['steps']} | {seconds} | {h['entropy'][0]:.2f} -> {h['entropy'][-1]:.2f} | "
            f"{h['kl'][0]:.2f} -> {h['kl'][-1]:.2f} | {min(h['retrieval']):.3f} | {'passes' if not failed else 'fails: ' + ', '.join(failed)} |"
        )
    lines += ["", "## Frozen dense probe, stages 1-3: mean Dice on the held-out cases", "", summary_table(results)]
    students = [e for e in ("desd student", "dino student") if any(f"{e} seed{s}" in rows for s in seeds)]
    if students:
        lines += ["Students, linear head:", "", "| encoder | " + " | ".join(counts) + " |", "| --- |" + " --- |" * len(counts)]
        for enc in students:
            lines.append(
                f"| {LABELS[enc]} | "
                + " | ".join(_fmt(*spread(per_seed(rows, enc, seeds, "linear", "stages1-3", c))) for c in counts)
                + " |"
            )
    by_split = split_table(results)
    if by_split:
        lines += ["", f"## Per held-out split, stages 1-3, linear head, {counts[-1]} cases: mean Dice (mean over seeds)", "", by_split]
    per_class = per_class_table(results)
    if per_class:
        lines += ["", f"## Per class, stages 1-3, linear head, {counts[-1]} cases: Dice", "", per_class]
    top = counts[-1]
    stage_sets = [fs for fs in probe.FEATURE_SETS if fs != "stages1-3"]
    lines += ["", f"## Per stage, linear head, {top} cases: mean Dice / presence AUC", ""]
    lines += ["| encoder | " + " | ".join(stage_sets) + " |", "| --- |" + " --- |" * len(stage_sets)]
    for enc in ENCODERS:
        cells = []
        for fs in stage_sets:
            dice = spread(per_seed(rows, enc, seeds, "linear", fs, top))[0]
            aucs = [rows[f"{enc} seed{s}"]["auc"][fs] for s in seeds if f"{enc} seed{s}" in rows]
            cells.append(f"{dice:.3f} / {np.nanmean(aucs):.3f}" if aucs else "n/a")
        lines.append(f"| {LABELS[enc]} | " + " | ".join(cells) + " |")
    lines.append(
        f"| no network | {floor_label}: {metrics.mean_or_nan(floor['linear'][top]):.3f} / histogram AUC "
        f"{rows['no network']['auc']['histogram']:.3f} |" + " |" * (len(stage_sets) - 1)
    )
    lines += ["", "## Paired gaps (by pretraining seed)", "", *claims_text(results)]
    if results.get("real_ct"):
        real = results["real_ct"]
        lines += ["", "## Real CT (secondary): heads fitted on one scan, Dice on two others", ""]
        lines += [
            f"TotalSegmentator 2.18.0's reference scans with that tool's predicted labels, not manual ground truth. "
            f"Heads fitted on `{real['train']}` (the abdomen/pelvis CT), scored on the whole of the DICOM upper "
            f"abdomen and of the chest CT angiogram, for the classes in both the training and the test scan. "
            f"One training scan: a description, not a claim. `{real['command']}` ({real['machine']}, {real['seconds']:.0f} s).",
            "",
            real_ct_table(results),
            "Median HU of each class in each scan (the scans' contrast phases):",
            "",
            "| scan | " + " | ".join(real["classes"]) + " |",
            "| --- |" + " --- |" * len(real["classes"]),
            *(f"| {scan} | " + " | ".join(str(hu.get(c, "")) for c in real["classes"]) + " |" for scan, hu in real["median_hu"].items()),
        ]
    if results.get("finetune"):
        lines += ["", "## Fine-tuning: mean Dice on the held-out cases after each step count (mean over seeds)", ""]
        for count, by_enc in results["finetune"].items():
            steps = sorted({int(k) for runs in by_enc.values() for r in runs for k in r})
            lines += [f"{count} labelled cases:", "", "| encoder | " + " | ".join(f"{s} steps" for s in steps) + " |"]
            lines.append("| --- |" + " --- |" * len(steps))
            for enc, runs in by_enc.items():
                cells = [_fmt(*spread([float(np.nanmean(r[str(s)])) for r in runs if str(s) in r])) for s in steps]
                lines.append(f"| {enc} | " + " | ".join(cells) + " |")
            lines.append("")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    try:
        draw_figure(results, figure)
    except ImportError as err:  # a lent GPU machine may lack matplotlib: the tables still stand
        print(f"WARNING: no figure ({err}); redraw it with python evaluate.py --from_results {out}/results.json")
    return text


def draw_figure(results: dict, figure: str) -> None:
    rows, seeds, counts = results["probe"]["rows"], results["settings"]["seeds"], [str(c) for c in results["probe_counts"]]
    colours = {"desd": "tab:red", "dino": "tab:blue", "none": "tab:grey"}
    fine = results.get("finetune") or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 + bool(fine), figsize=(4.2 * (4 + bool(fine)), 3.6))
    floor_label, floor = floor_of(rows)
    xs = range(len(counts))
    for ax, head, title in ((axes[0], "linear", "dense probe, linear head"), (axes[1], "knn", "dense probe, k-NN")):
        for enc in ENCODERS:
            stats = [spread(per_seed(rows, enc, seeds, head, "stages1-3", c)) for c in counts]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o-", color=colours[enc], capsize=3, label=enc)
        if head in floor:
            ax.plot(xs, [np.nanmean(floor[head][c]) for c in counts], "k--", label=floor_label.split(",")[0] + " (no network)")
        ax.set(title=f"{title} (stages 1-3)", xlabel="labelled cases", ylabel="Dice, held-out cases", xticks=list(xs))
        ax.set_xticklabels(counts)
    stage_sets = [fs for fs in probe.FEATURE_SETS if fs != "stages1-3"]
    for k, enc in enumerate(ENCODERS):
        stats = [spread(per_seed(rows, enc, seeds, "linear", fs, counts[-1])) for fs in stage_sets]
        axes[2].bar(np.arange(4) + (k - 1) * 0.27, [s[0] for s in stats], 0.27, yerr=[s[1] for s in stats], color=colours[enc], label=enc)
    axes[2].set(title=f"per stage, linear head, {counts[-1]} cases", ylabel="Dice", xticks=range(4), xticklabels=["1", "2", "3", "4"])
    for name, run in results["pretraining"].items():
        log = run.get("log", [])
        colour = colours[name.split()[0]]
        axes[3].plot([r["train_teacher_entropy"] for r in log], ".-", color=colour, alpha=0.7)
        axes[3].plot([r["train_kl"] for r in log], ".:", color=colour, alpha=0.7)
    axes[3].set(title="pretraining: teacher entropy (-), KL (:)", xlabel="epoch", ylabel="nats")
    if fine:
        for count, by_enc in fine.items():
            for enc, runs in by_enc.items():
                steps = sorted({int(k) for r in runs for k in r})
                means = [spread([float(np.nanmean(r[str(s)])) for r in runs if str(s) in r])[0] for s in steps]
                axes[4].plot(steps, means, "o-" if count == min(fine) else "s--", color=colours[enc], label=f"{enc}, {count} cases")
        axes[4].set(title="fine-tuning", xlabel="steps", ylabel="Dice, held-out cases", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(results["title"], fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
    utils.save_figure(fig, figure, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("DeSD vs DINO vs no pretraining")
    parser.add_argument(
        "--config",
        default="cpu",
        choices=list(CONFIGS),
        help="cpu: 53 min on 2 cores; gpu: one H100/H200; smoke: the tests' minute.",
    )
    parser.add_argument("--out", default="evidence", help="Working folder (data, runs, results).")
    parser.add_argument("--figure", default="", help="Where the figure goes (default: <out>/evidence.png).")
    parser.add_argument("--time_limit", default=None, type=float, help="Seconds for the whole run (default: the configuration's).")
    parser.add_argument(
        "--phantoms",
        default=None,
        choices=STYLES,
        help="The generated CT's style (default: the configuration's, varied; portal: the former phantoms): see synthetic_deeplesion.py --style.",
    )
    parser.add_argument("--from_results", default="", help="Only redo the gaps, tables and figure from this results.json.")
    args = parser.parse_args(argv)
    if args.from_results:
        return report_again(args.from_results, args.figure)
    cfg = CONFIGS[args.config]
    if args.time_limit is not None:
        cfg = dataclasses.replace(cfg, time_limit=args.time_limit)
    if args.phantoms is not None:
        cfg = dataclasses.replace(cfg, phantoms=args.phantoms)
    files.prepare_output_folder(args.out, "--out")
    device = torch.device(cfg.device)
    torch.set_num_threads(os.cpu_count() or 1)
    clock = Clock(cfg.time_limit)
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.time() - clock.start - sum(timings.values()), 1)
        print(f"[{time.time() - clock.start:7.0f} s] {name} done", flush=True)

    machine = utils.machine()
    results: dict = {
        "config": args.config,
        "settings": dataclasses.asdict(cfg),
        "probe_counts": list(cfg.probe_counts),
        "machine": machine,
        "command": "python evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": timings,
        "pretraining": {},
        "probe": {"rows": {}},
        "claims": [],
        "finetune": {},
    }
    try:
        experiment(cfg, args.out, device, clock, results, lap)
    except OutOfTime as stop:
        results["stopped"] = str(stop)
        print(f"Stopped by the time limit ({cfg.time_limit:.0f} s): {stop}; writing what finished.", flush=True)
    except Shortfall as stop:
        results["refused"] = str(stop)
        print(f"Refused: {stop}. Writing what finished.", flush=True)
    results["title"] = (
        f"{args.config}: {cfg.arch}, {results.get('unlabelled_patches', '?')} unlabelled patches at {cfg.spacing:g} mm, "
        f"{len(cfg.seeds)} pretraining seeds per method; {machine}"
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(utils.strict_json(results), f, indent=1)
    if "no network" in results["probe"]["rows"]:
        print(write_report(results, args.out, args.figure or os.path.join(args.out, "evidence.png")))
    print(f"Total {time.time() - clock.start:.0f} s; results in {os.path.join(args.out, 'results.json')}")
    return 2 if "refused" in results else 0


def load_results(path: str) -> dict:
    """A run's results.json, with the NaNs that strict JSON wrote as null."""

    def nan_for_null(value):
        if isinstance(value, dict):
            return {k: nan_for_null(v) for k, v in value.items()}
        if isinstance(value, list):
            return [nan_for_null(v) for v in value]
        return math.nan if value is None else value

    with open(path) as f:
        return nan_for_null(json.load(f))


def report_again(path: str, figure: str = "") -> int:
    """The gaps, results.md and the figure of a finished run, from its results.json."""
    results = load_results(path)
    rows = results["probe"]["rows"]
    settings = results["settings"]
    full = results["unlabelled_patches"] // settings["batch"]
    iters = results.get("calibration", {}).get("iters_per_epoch") or settings["iters_per_epoch"]  # calibration: former runs
    for run in results["pretraining"].values():
        if "log" in run:
            run["steps"] = len(run["log"]) * (min(iters, full) if iters else full)
    feature_sets = tuple(probe.FEATURE_SETS)
    results["claims"] = claims(rows, results["settings"]["seeds"], [str(c) for c in results["probe_counts"]], feature_sets)
    out = os.path.dirname(os.path.abspath(path))
    with open(path + ".tmp", "w") as f:
        json.dump(utils.strict_json(results), f, indent=1)
    os.replace(path + ".tmp", path)
    print(write_report(results, out, figure or os.path.join(out, "evidence.png")))
    return 0


def experiment(cfg: Config, out: str, device: torch.device, clock: Clock, results: dict, lap) -> None:
    """Data, pretraining, probes, gaps and fine-tuning, filling `results` as each part finishes."""
    data, task = make_data(cfg, out)
    with open(os.path.join(data, "SSL_data_deeplesion.txt")) as f:
        results["unlabelled_patches"] = n_patches = sum(1 for line in f if line.strip())
    lap("data")
    runs = [(enc, seed) for seed in cfg.seeds for enc in PRETRAINED]
    full = n_patches // cfg.batch  # the loader drops the last partial batch
    iters = min(cfg.iters_per_epoch, full) if cfg.iters_per_epoch else full
    results["schedule"] = {"steps_per_run": iters * cfg.epochs, "min_steps_per_run": cfg.min_pretrain_steps, "concurrent": cfg.concurrent}
    if iters * cfg.epochs < cfg.min_pretrain_steps:
        raise Shortfall(
            f"{n_patches} patches give {full} batches of {cfg.batch} an epoch: {iters * cfg.epochs} steps a run over "
            f"{cfg.epochs} epochs, under the minimum of {cfg.min_pretrain_steps}; nothing was pretrained"
        )
    t = time.time()
    jobs = pretrain_all(cfg, runs, data, out, clock)
    checkpoints: dict[tuple[str, int], str] = {}
    for (enc, seed), job in jobs.items():
        if job.error:  # a failed run (a non-finite loss, say) is reported, the others go on
            results["pretraining"][f"{enc} seed{seed}"] = {"failed": job.error[-1500:]}
            print(f"  pretraining {enc} seed {seed} failed: {job.error.splitlines()[0]}", flush=True)
            continue
        checkpoints[enc, seed] = os.path.join(job.folder, "checkpoint.pth")
        log = read_log(job.folder)
        results["pretraining"][f"{enc} seed{seed}"] = {
            "steps": len(log) * iters, "seconds": round(job.ended - job.started, 1) if job.ended else None, "log": log,
            **trend_checks(log, cfg.batch, cfg.out_dim),
        }  # fmt: skip
    print(f"  {len(jobs)} pretrainings, {cfg.concurrent} at once: {time.time() - t:.0f} s", flush=True)
    lap("pretraining")
    cases, classes = probe.load_cases(task, cfg.spacing)
    results["classes"] = classes
    b = probe.bench(cases, classes, cfg.probe_patch, cfg.probe_per_case, cfg.probe_counts, cfg.probe_draws)
    benches = [probe.resplit(b, k, cfg.probe_counts, cfg.probe_draws) for k in range(cfg.probe_splits)]
    results["probe"]["splits"] = [{"held_out": x.held_out, "draws": {str(c): v for c, v in x.draws.items()}} for x in benches]
    results["probe"]["auc_classes"] = [classes[k] for k in b.scored]
    rows = results["probe"]["rows"]
    for seed in cfg.seeds:
        # the students by the linear head only: the reports read nothing else of them
        encoders = [("none", None, "teacher", tuple(probe.FEATURE_SETS), cfg.knn_sets)]
        for enc in (e for e in PRETRAINED if (e, seed) in checkpoints):
            encoders += [(enc, checkpoints[enc, seed], "teacher", tuple(probe.FEATURE_SETS), cfg.knn_sets)]
            encoders += [(f"{enc} student", checkpoints[enc, seed], "student", cfg.student_sets, ())]
        for name, ckpt, part, sets, knn_sets in encoders:
            if clock.left() <= 0:
                raise OutOfTime(f"probes stopped by the time limit before {name} seed{seed}")
            maps = probe.encoder_maps(cfg.arch, ckpt, b.images, seed, cfg.device, part=part)
            rows[f"{name} seed{seed}"] = probe.encoder_row(
                benches, maps, sets, knn_sets=knn_sets, device=cfg.device, limit=cfg.probe_rows, max_iter=cfg.probe_iters,
                every_count=cfg.every_count_sets,
            )  # fmt: skip
            del maps
        print(f"  probed seed {seed}", flush=True)
    rows["no network"] = probe.floor_row(benches, device=cfg.device, limit=cfg.probe_rows, max_iter=cfg.probe_iters)
    results["claims"] = claims(rows, cfg.seeds, [str(c) for c in cfg.probe_counts], tuple(probe.FEATURE_SETS))
    lap("probes")
    if cfg.ft_counts:
        fine_tuning(cfg, cases, b, checkpoints, device, clock, results)
        lap("finetune")


def fine_tune_job(threads: int, *args) -> tuple[str, object]:
    """fine_tune(*args), in a process of its own where the pool runs it: ("ok", its curve), or the
    stop's kind and message (so that no exception class has to cross the process boundary)."""
    torch.set_num_threads(threads)
    try:
        return "ok", fine_tune(*args)
    except (OutOfTime, Shortfall) as stop:
        return type(stop).__name__, str(stop)


def fine_tuning(cfg: Config, cases, b, checkpoints, device, clock: Clock, results: dict) -> None:
    """Each encoder (DeSD, DINO, none; the first cfg.ft_seeds pretraining seeds) fine-tuned with
    each of cfg.ft_counts labelled cases (the first split's first cfg.ft_draws draws of them),
    scored on that split's held-out cases at each of cfg.ft_steps; cfg.ft_concurrent runs at once,
    each a process of its own. A run that stops (Shortfall, OutOfTime) stops them all."""
    import multiprocessing

    test = [cases[i] for i in b.held_out]
    jobs = []
    for count in cfg.ft_counts:
        count = min(count, max(b.draws))
        for draw, picked in enumerate(b.draws[count][: cfg.ft_draws]):
            jobs += [(count, draw, picked, enc, seed) for seed in cfg.seeds[: cfg.ft_seeds] for enc in ENCODERS]
    results["ft_steps"] = list(cfg.ft_steps)
    threads = max(1, torch.get_num_threads() // cfg.ft_concurrent)
    arguments = [
        (
            threads,
            cfg,
            [cases[i] for i in picked],
            test,
            b.num_classes,
            checkpoints.get((enc, seed)),
            seed,
            device,
            list(cfg.ft_steps),
            clock,
        )
        for _, _, picked, enc, seed in jobs
    ]
    pool = multiprocessing.get_context("spawn").Pool(cfg.ft_concurrent) if cfg.ft_concurrent > 1 else None
    try:
        pending = [pool.apply_async(fine_tune_job, a) for a in arguments] if pool else None
        for i, (count, draw, _, enc, seed) in enumerate(jobs):
            kind, value = pending[i].get() if pool else fine_tune_job(*arguments[i])
            if kind != "ok":
                raise (Shortfall if kind == "Shortfall" else OutOfTime)(f"fine-tuning {enc} seed {seed} with {count} cases: {value}")
            by_enc = results["finetune"].setdefault(str(count), {})
            by_enc.setdefault(enc, []).append({str(k): v for k, v in value.items()})
            print(
                f"  fine-tuned {enc} seed {seed} with {count} cases (draw {draw}): "
                + ", ".join(f"{k}: {np.nanmean(v):.3f}" for k, v in value.items()),
                flush=True,
            )
    finally:
        if pool:
            pool.terminate()
            pool.join()


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
