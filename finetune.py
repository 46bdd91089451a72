"""Fine-tune a res3d segmentation network, from a DeSD teacher or from scratch, and measure
Dice, the 95th-percentile Hausdorff distance and the normalised surface Dice on whole
validation volumes.

Data: a labelled set in the Medical Segmentation Decathlon layout or nnU-Net v2's (see
downstream/labelled.py), checked for integrity before any training (`python downstream/labelled.py --data_dir ...`
runs the check alone). Every image and label is reoriented to the pretraining patches'
anatomical orientation, resampled to `--spacing` mm (cubic for images, nearest for labels),
clipped to [-1024, 1024] HU and divided by 1024, and put depth first: a network input is
(1, z, x, y), z running to inferior, x to posterior, y to the patient's left, exactly as the
DeSD patches entered pretraining (docs/method.md, section 3).

One process (CPU or one GPU):
    python finetune.py --data_dir data/Task03_Liver --output_dir out/ft_desd \
        --pretrained snapshots/DeSD_res3d50/checkpoint.pth
From scratch: leave out --pretrained. Label efficiency: --train_fraction 0.1. nnU-Net folds:
--split_file data/Dataset003_Liver/splits_final.json --fold 0.
N GPUs: torchrun --nproc_per_node N finetune.py ... (see run_finetune.sh).

A rerun in the same output folder resumes an unfinished run with the same settings, prints
the result of a finished one without touching it, and refuses other settings (naming them)
unless --restart True.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from monai.data import DataLoader
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

import utils
from downstream import cache, labelled, metrics, patches
from models import create_model, list_models
from models.pretrained import load_pretrained_encoder
from models.res3d import last_stage_shape
from models.segmentation import Res3DSegmentation
from preprocessing.runner import command_parser, entry, parse_with_config, positive_float, run_command

# the settings a rerun must share with the run already in its output folder
RUN_SETTINGS = (
    "data_dir", "split_file", "fold", "val_fraction", "train_fraction", "spacing", "patch_size", "samples_per_volume", "pos_ratio",
    "arch", "pretrained", "epochs", "max_iters_per_epoch", "batch_size", "lr", "weight_decay", "seed",
)  # fmt: skip


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DeSD fine-tuning", add_help=False)
    parser.add_argument("--config", default="", help="A JSON file of flag values (a run's args.json); flags on the command line win.")
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", required=True, help="An MSD or nnU-Net v2 dataset folder (with dataset.json).")
    group.add_argument(
        "--split_file",
        default="",
        help="JSON {'train': [...], 'val': [...]} of case ids (or image paths), or nnU-Net's splits_final.json with --fold; "
        "default: a seeded split.",
    )
    group.add_argument("--fold", default=0, type=int, help="The fold of a splits_final.json.")
    group.add_argument("--val_fraction", default=0.2, type=float, help="Share of the cases held out for validation by the seeded split.")
    group.add_argument(
        "--train_fraction", default=1.0, type=float, help="Use only this share of the training cases (label-efficiency experiments)."
    )
    group.add_argument(
        "--spacing", default=1.0, type=positive_float, help="Isotropic spacing in mm; 1 mm is what the DeSD encoder was pretrained on."
    )
    group.add_argument(
        "--patch_size", default=(64, 128, 128), type=int, nargs=3, help="Training patch (depth, rows, cols) and sliding-window size."
    )
    group.add_argument("--samples_per_volume", default=2, type=int, help="Patches drawn from each volume per visit.")
    group.add_argument(
        "--flip_axes",
        default=(0, 1, 2),
        type=int,
        nargs="*",
        choices=(0, 1, 2),
        help="Patch axes (0 depth, 1 rows, 2 cols: inferior, posterior, left) each mirrored at random in training; "
        "leave out 2 where labels tell left from right (e.g. left and right kidney).",
    )
    group.add_argument(
        "--pos_ratio", default=2.0, type=float, help="Foreground-centred patches per background-centred one (foreground oversampling)."
    )
    group.add_argument(
        "--preprocessed_dir",
        default="",
        help="Where each case is preprocessed once and read memory-mapped from "
        "(default: $DESD_CACHE or ~/.cache/desd, under preprocessed/<dataset>-<hash>/<spacing>mm).",
    )
    group.add_argument("--num_workers", default=4, type=int, help="Loader processes per GPU (0: in the main process).")

    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="res3d50", choices=list_models(), help="Encoder; must match the pretrained checkpoint.")
    group.add_argument(
        "--pretrained", default="", help="DeSD checkpoint whose teacher backbone initialises the encoder; empty: from scratch."
    )
    group.add_argument(
        "--partial_load",
        default=False,
        type=utils.bool_flag,
        help="Load the tensors that the checkpoint shares with the encoder even if the archs differ (counts are printed).",
    )

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", default=100, type=int, help="Training epochs of --max_iters_per_epoch iterations.")
    group.add_argument(
        "--max_iters_per_epoch", default=0, type=int, help="Cap on iterations per epoch (0: every training volume visited once)."
    )
    group.add_argument(
        "--batch_size", default=2, type=int, help="Volumes per process and iteration (each gives --samples_per_volume patches)."
    )
    group.add_argument("--lr", default=3e-4, type=float, help="Peak AdamW learning rate, after the warm-up; cosine decay to 0.")
    group.add_argument("--weight_decay", default=1e-5, type=float, help="AdamW weight decay (not on norms and biases).")
    group.add_argument("--use_bf16", default=False, type=utils.bool_flag, help="bf16 autocast.")

    group = parser.add_argument_group("evaluation and misc")
    group.add_argument("--eval_every", default=1, type=int, help="Epochs between validations (the last epoch is always evaluated).")
    group.add_argument("--nsd_tolerance", default=2.0, type=float, help="Tolerance in mm of the normalised surface Dice.")
    group.add_argument("--sw_batch_size", default=2, type=int, help="Windows per forward pass in sliding-window validation.")
    group.add_argument("--sw_overlap", default=0.5, type=float, help="Overlap of the validation windows (0 to <1).")
    group.add_argument("--print_every", default=10, type=int, help="Iterations between progress lines within an epoch.")
    group.add_argument("--output_dir", default="finetune_out", help="Where best.pth, checkpoint.pth, log.txt and dice.json go.")
    group.add_argument(
        "--tensorboard",
        default=False,
        type=utils.bool_flag,
        help="Also write each epoch's scalars for TensorBoard into --output_dir (needs its package: pip install -e '.[tensorboard]').",
    )
    group.add_argument(
        "--restart", default=False, type=utils.bool_flag, help="Start over in an output folder whose run had other settings."
    )
    group.add_argument("--seed", default=0, type=int, help="Seed of the split, the decoder's initialisation and the sampling.")
    group.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA where available.")
    group.add_argument("--dist_url", default="env://", help="Rendezvous of the distributed run (torchrun sets the environment).")
    group.add_argument("--local_rank", default=0, type=int, help="Ignored; torchrun's LOCAL_RANK is used.")
    return parser


def patch_augmentation(flip_axes=(0, 1, 2)) -> Compose:
    """What each training patch goes through after its crop from the cache: each of `flip_axes`
    (of depth, rows, cols) mirrored with probability 0.5, then a random intensity scale and shift."""
    keys = ["image", "label"]
    return Compose(
        [
            *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in flip_axes),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )


METRICS = ("dice", "hd95", "nsd")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader, num_classes: int, args: argparse.Namespace, device: torch.device, ignore: int | None = None
) -> dict[str, list]:
    """Per-class Dice, HD95 and NSD (mm, background excluded) over whole volumes, by
    sliding-window inference; each process scores its share of the cases and the scores of
    all processes are pooled. A class absent from a case's truth is left out of its means, and
    voxels labelled `ignore` out of every score. "per_case" holds each case's scores, as
    nnU-Net's summary.json holds them."""
    model.eval()
    spacing = getattr(args, "spacing", 1.0)
    tolerance = getattr(args, "nsd_tolerance", 2.0)
    scores, cases = [torch.empty(0, 3, num_classes - 1)], []
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.use_bf16):
            logits = sliding_window_inference(image, args.patch_size, args.sw_batch_size, model, overlap=args.sw_overlap, mode="gaussian")
        for pred, truth in zip(logits.argmax(1), label[:, 0]):
            scores.append(metrics.case_scores(pred, truth, num_classes, ignore, spacing, tolerance)[None])
        cases += [{"case": c, "image": p} for c, p in zip(batch["id"], batch["image_path"])]
    scores = torch.cat(scores)
    if utils.is_dist():
        gathered = [None] * utils.get_world_size()
        dist.all_gather_object(gathered, (scores, cases))
        scores, cases = torch.cat([s for s, _ in gathered]), [c for _, share in gathered for c in share]
    model.train()
    means = torch.nanmean(scores, dim=0)  # (3, classes - 1)
    out: dict[str, list] = {name: [float(v) for v in means[i]] for i, name in enumerate(METRICS)}
    out["per_case"] = [{**case, **{m: [float(v) for v in s[i]] for i, m in enumerate(METRICS)}} for case, s in zip(cases, scores)]
    return out


def validate_args(args: argparse.Namespace) -> None:
    """Refuse nonsense settings before any work."""
    d, h, w = last_stage_shape(tuple(args.patch_size))
    if min(args.patch_size) <= 0 or d * h * w < 2:
        raise ValueError(
            f"--patch_size {tuple(args.patch_size)} is too small: the encoder's last stage would be {d}x{h}x{w} (use e.g. 32 64 64)"
        )
    if args.pretrained and not os.path.isfile(args.pretrained):
        raise FileNotFoundError(f"--pretrained {args.pretrained!r} does not exist")
    if not 0 < args.train_fraction <= 1 or not 0 < args.val_fraction < 1:
        raise ValueError("--train_fraction must be in (0, 1] and --val_fraction in (0, 1)")
    for name in ("epochs", "eval_every", "batch_size", "samples_per_volume", "print_every", "sw_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "spacing", "nsd_tolerance"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise ValueError(f"--{name} must be a finite positive number, got {getattr(args, name)}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight_decay must be finite and non-negative, got {args.weight_decay}")
    if args.lr > 0.1:
        print(f"WARNING: --lr {args.lr:g} is far above what AdamW fine-tunes with (1e-4 to 1e-2): check it", flush=True)


def check_rerun(args: argparse.Namespace) -> dict | None:
    """The finished result of an earlier run with these settings (None: train). Refuses a folder
    whose run had other settings, naming each, unless --restart, which clears that run."""
    args_path = os.path.join(args.output_dir, "args.json")
    if not os.path.isfile(args_path):
        return None
    with open(args_path) as f:
        before = json.load(f)
    differ = utils.setting_differences(before, args, RUN_SETTINGS)
    if differ and not args.restart:
        raise ValueError(
            f"{args.output_dir!r} holds a run with other settings: {'; '.join(differ)}. Use another --output_dir, or --restart True "
            "to start over there"
        )
    if differ:
        for name in ("checkpoint.pth", "best.pth", "log.txt", "dice.json", "curves.png", "args.json"):
            path = os.path.join(args.output_dir, name)
            if os.path.exists(path) and utils.is_main_process():
                os.remove(path)
        print(f"--restart: cleared the earlier run in {args.output_dir} ({'; '.join(differ)})")
        return None
    dice_path = os.path.join(args.output_dir, "dice.json")
    if os.path.isfile(dice_path):
        with open(dice_path) as f:
            result = json.load(f)
        if result.get("finished"):
            return result
    return None


def build_data(args: argparse.Namespace, device: torch.device):
    """The labelled set (checked for integrity first), its split, the cache built for this
    process's share, and the training and validation loaders."""
    data = labelled.read_dataset(args.data_dir)
    cache_dir = args.preprocessed_dir or cache.default_dir(args.data_dir, args.spacing)
    known_good = cache.checked_cases(data.cases, args.spacing, cache_dir)  # unchanged since they passed: not read again
    problems = labelled.check_integrity(data, known_good=known_good)
    if problems:
        raise ValueError(f"{args.data_dir}: {len(problems)} problem(s) found before training:\n  " + "\n  ".join(problems))
    if known_good:
        print(f"Integrity: {len(data.cases) - len(known_good)} case(s) checked, {len(known_good)} unchanged since their check.")
    train_cases, val_cases = labelled.split_cases(data.cases, args.split_file, args.fold, args.val_fraction, args.seed)
    if args.train_fraction < 1.0:
        keep = max(1, int(round(args.train_fraction * len(train_cases))))
        train_cases = [train_cases[i] for i in sorted(np.random.default_rng(args.seed + 1).permutation(len(train_cases))[:keep])]
    records = cache.build(train_cases + val_cases, args.spacing, cache_dir, args.num_workers, args.rank, args.world_size, checked=True)
    train_records, val_records = records[: len(train_cases)], records[len(train_cases) :]
    train_ds = patches.PatchDataset(
        train_records, args.patch_size, args.samples_per_volume, args.pos_ratio, patch_augmentation(args.flip_axes)
    )
    sampler = DistributedSampler(train_ds, args.world_size, args.rank, shuffle=True, seed=args.seed) if args.world_size > 1 else None
    train_loader = DataLoader(
        train_ds,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_share = val_records[args.rank :: args.world_size]  # each process validates its share
    val_loader = DataLoader(patches.VolumeDataset(val_share), batch_size=1, num_workers=min(args.num_workers, 2))
    print(f"Data: {data.layout} layout, {len(train_cases)} training and {len(val_cases)} validation cases, classes {data.class_names}.")
    return data, train_loader, val_loader


def build_model(args: argparse.Namespace, num_classes: int, device: torch.device):
    """The segmentation network, its encoder from --pretrained or from scratch, on the device
    (wrapped for DDP where the world is larger than 1), and the unwrapped module."""
    model = Res3DSegmentation(create_model(args.arch), num_classes)
    if args.pretrained:
        shared, total = load_pretrained_encoder(model.encoder, args.pretrained, partial=args.partial_load)
        print(f"Loaded {shared} of {total} encoder tensors from the teacher in {args.pretrained}")
    else:
        print("Encoder initialised from scratch.")
    model = model.to(device)
    model_without_ddp = model
    if args.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)
    return model, model_without_ddp


def main(args: argparse.Namespace) -> dict:
    validate_args(args)
    device = utils.init_distributed_mode(args)
    with utils.output_folder(args.output_dir, main=utils.is_main_process()):  # checked, locked, console.log
        return fine_tune(args, device)


def train_one_epoch(model, loader, optimizer, lr_schedule, epoch: int, iters: int, ignore, args, device, progress: dict) -> float:
    """`iters` steps of Dice + cross-entropy on training patches; the mean loss over all ranks.
    A non-finite loss stops the run before any checkpoint is written from it."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    model.train()
    losses = []
    for it, batch in enumerate(loader):
        if it >= iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = float(lr_schedule[epoch * iters + it])
        image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.use_bf16):
            logits = model(image).float()
        loss = metrics.masked_dice_ce(logits, label, ignore)
        if not bool(torch.isfinite(utils.all_reduce_mean(loss.detach())).item()):
            print(
                f"Loss is not finite at epoch {epoch}, iteration {it} (cases {batch.get('image_path', '?')}): stopping; "
                "the last checkpoint is left as it was.",
                flush=True,
            )
            sys.exit(1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        progress["done"] += 1
        if utils.is_main_process() and (it % args.print_every == 0 or it == iters - 1):
            left = (time.time() - progress["start"]) / progress["done"] * (progress["total"] - progress["done"])
            eta = datetime.timedelta(seconds=int(left))
            print(
                f"epoch {epoch} [{it}/{iters}]  loss {loss.item():.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  run eta {eta}", flush=True
            )
    return float(utils.all_reduce_mean(torch.stack(losses).mean()).item())


def write_result(
    history: list[dict], class_names: list[str], best: float, args: argparse.Namespace, first_epoch: int, per_case: list | None = None
) -> dict:
    """dice.json (strict JSON) from the last epoch's scores, per class and per case, and the printed table."""
    if not history:
        raise RuntimeError(f"{args.output_dir}: no epoch was trained (the checkpoint there is at epoch {first_epoch})")
    last = history[-1]
    result = utils.strict_json(
        {
            "classes": class_names,
            "dice": [last.get(f"dice_{n}", math.nan) for n in class_names],
            "hd95": [last.get(f"hd95_{n}", math.nan) for n in class_names],
            "nsd": [last.get(f"nsd_{n}", math.nan) for n in class_names],
            "mean_dice": last.get("mean_dice", math.nan),
            "best_mean_dice": best,
            "nsd_tolerance_mm": args.nsd_tolerance,
            "per_case": per_case or [],
            "finished": True,
        }
    )
    utils.save_atomic_json(result, os.path.join(args.output_dir, "dice.json"))
    print(metrics.dice_table({"Dice": result["dice"], "HD95 mm": result["hd95"], "NSD": result["nsd"]}, class_names))
    return result


def fine_tune(args: argparse.Namespace, device: torch.device) -> dict:
    utils.settle_vector_math()  # before any arithmetic: see its docstring
    torch.manual_seed(args.seed + args.rank)
    os.makedirs(args.output_dir, exist_ok=True)
    finished = check_rerun(args)
    if finished is not None:
        print(f"{args.output_dir} holds a finished run with these settings; its result (nothing was changed):")
        print(
            metrics.dice_table(
                {"Dice": finished["dice"], "HD95 mm": finished.get("hd95", []), "NSD": finished.get("nsd", [])}, finished["classes"]
            )
        )
        return finished
    if utils.is_main_process():
        print(utils.git_sha())
        print(
            f"Fine-tuning {args.arch} from {args.pretrained or 'scratch'} on {args.data_dir}: {args.epochs} epochs, batch "
            f"{args.batch_size} x {args.world_size}, patch {tuple(args.patch_size)} at {args.spacing:g} mm on {device.type} "
            f"(all arguments in args.json)",
            flush=True,
        )
        utils.save_atomic_json(dict(sorted(vars(args).items())), os.path.join(args.output_dir, "args.json"))

    # ============ preparing data ... ============
    data, train_loader, val_loader = build_data(args, device)

    # ============ building the network ... ============
    model, model_without_ddp = build_model(args, data.num_classes, device)
    num_classes, class_names = data.num_classes, data.class_names
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    iters = len(train_loader) if args.max_iters_per_epoch <= 0 else min(len(train_loader), args.max_iters_per_epoch)
    lr_schedule = utils.cosine_scheduler(args.lr, args.lr * 0.01, args.epochs, iters)

    to_restore = {"epoch": 0, "best_mean_dice": -1.0}
    ckpt_path, ckpt = utils.load_latest_checkpoint(args.output_dir)
    if ckpt is not None:
        utils.restore(ckpt, ckpt_path, run_variables=to_restore, model=model_without_ddp, optimizer=optimizer)
    best = to_restore["best_mean_dice"]
    history, per_case = [], []

    # ============ training ... ============
    progress = {"start": time.time(), "done": 0, "total": (args.epochs - to_restore["epoch"]) * iters}
    curves = utils.Curves(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "curves.png"))
    writer = utils.tensorboard_writer(args.output_dir) if args.tensorboard and utils.is_main_process() else None
    for epoch in range(to_restore["epoch"], args.epochs):
        mean_loss = train_one_epoch(model, train_loader, optimizer, lr_schedule, epoch, iters, data.ignore, args, device, progress)
        record = {"epoch": epoch, "train_loss": mean_loss, "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1:
            scores = evaluate(model_without_ddp, val_loader, num_classes, args, device, data.ignore)
            per_case = scores["per_case"]
            record.update({f"dice_{n}": d for n, d in zip(class_names, scores["dice"])}, mean_dice=metrics.mean_or_nan(scores["dice"]))
            record.update({f"hd95_{n}": d for n, d in zip(class_names, scores["hd95"])})
            record.update({f"nsd_{n}": d for n, d in zip(class_names, scores["nsd"])})
            if record["mean_dice"] > best and utils.is_main_process():
                best = record["mean_dice"]
                utils.save_atomic(
                    {"model": model_without_ddp.state_dict(), "epoch": epoch + 1, "dice": scores["dice"], "args": vars(args),
                     "num_classes": num_classes, "classes": class_names},
                    os.path.join(args.output_dir, "best.pth"),
                )  # fmt: skip
        if utils.is_main_process():
            shown = {k: v for k, v in record.items() if k in ("train_loss", "mean_dice")}
            print(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f"  lr {record['lr']:.2e}", flush=True)
            utils.append_json_line(os.path.join(args.output_dir, "log.txt"), utils.strict_json(record))
            curves.update(last_epoch=epoch == args.epochs - 1)
            if writer is not None:
                for key, value in record.items():
                    if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                        writer.add_scalar(key, value, epoch)
                writer.flush()
            state = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "best_mean_dice": best,
                "args": vars(args),
            }
            utils.save_atomic(state, os.path.join(args.output_dir, "checkpoint.pth"))
        history.append(record)

    # ============ reporting ... ============
    result = write_result(history, class_names, best, args, to_restore["epoch"], per_case) if utils.is_main_process() else {}
    if utils.is_dist():
        dist.barrier()
        dist.destroy_process_group()
    return result


def run(argv: list[str] | None = None) -> int:
    """The command line (`python finetune.py ...`, or the `desd-finetune` command)."""
    main(parse_with_config(command_parser("DeSD fine-tuning", parents=[get_args_parser()]), argv))
    return 0


cli = entry(run)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(run))
