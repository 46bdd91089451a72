"""Fine-tune a res3d segmentation network, from a DeSD teacher or from scratch, and measure
Dice on whole validation volumes.

Data: a labelled set in the Medical Segmentation Decathlon layout (`dataset.json` with
`labels` and a `training` list of {"image", "label"} paths, `imagesTr/`, `labelsTr/`).
Images are read with nibabel and put in the pretraining orientation (z, x, y) = depth first,
then the nibabel (x, y) axes, as the DeSD patches were (see dataset.py); resampled to
`--spacing` mm (cubic for images, nearest for labels); clipped to [-1024, 1024] HU and divided
by 1024, as in pretraining.

One process (CPU or one GPU):
    python finetune.py --data_dir data/Task03_Liver --output_dir out/ft_desd \
        --pretrained snapshots/DeSD_res3d50/checkpoint.pth
From scratch: leave out --pretrained. Label efficiency: --train_fraction 0.1.
N GPUs: torchrun --nproc_per_node N finetune.py ... (see run_finetune.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transposed,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

import utils
from models import create_model, list_models
from models.pretrained import load_pretrained_encoder
from models.res3d import last_stage_shape
from models.segmentation import Res3DSegmentation


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DeSD fine-tuning", add_help=False)
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", required=True, help="Decathlon-layout folder holding dataset.json.")
    group.add_argument(
        "--split_file", default="", help="JSON {'train': [...], 'val': [...]} of image paths as in dataset.json; default: a seeded split."
    )
    group.add_argument("--val_fraction", default=0.2, type=float, help="Share of the cases held out for validation by the seeded split.")
    group.add_argument(
        "--train_fraction", default=1.0, type=float, help="Use only this share of the training cases (label-efficiency experiments)."
    )
    group.add_argument(
        "--spacing", default=1.0, type=float, help="Isotropic spacing in mm; 1 mm is what the DeSD encoder was pretrained on."
    )
    group.add_argument(
        "--patch_size", default=(64, 128, 128), type=int, nargs=3, help="Training patch (depth, rows, cols) and sliding-window size."
    )
    group.add_argument("--samples_per_volume", default=2, type=int, help="Patches drawn from each volume per visit.")
    group.add_argument(
        "--pos_ratio", default=2.0, type=float, help="Foreground-centred patches per background-centred one (foreground oversampling)."
    )
    group.add_argument("--cache_rate", default=1.0, type=float, help="Share of the preprocessed volumes kept in memory.")
    group.add_argument("--num_workers", default=4, type=int)

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
    group.add_argument("--epochs", default=100, type=int)
    group.add_argument(
        "--max_iters_per_epoch", default=0, type=int, help="Cap on iterations per epoch (0: every training volume visited once)."
    )
    group.add_argument(
        "--batch_size", default=2, type=int, help="Volumes per process and iteration (each gives --samples_per_volume patches)."
    )
    group.add_argument("--lr", default=3e-4, type=float)
    group.add_argument("--weight_decay", default=1e-5, type=float)
    group.add_argument("--use_bf16", default=False, type=utils.bool_flag, help="bf16 autocast.")

    group = parser.add_argument_group("evaluation and misc")
    group.add_argument("--eval_every", default=1, type=int, help="Epochs between validations (the last epoch is always evaluated).")
    group.add_argument("--sw_batch_size", default=2, type=int)
    group.add_argument("--sw_overlap", default=0.5, type=float)
    group.add_argument("--output_dir", default="finetune_out")
    group.add_argument("--seed", default=0, type=int)
    group.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    group.add_argument("--dist_url", default="env://")
    group.add_argument("--local_rank", default=0, type=int, help="Ignored; torchrun's LOCAL_RANK is used.")
    return parser


def read_dataset(data_dir: str) -> tuple[list[dict], dict[int, str]]:
    """Cases (absolute image/label paths) and class names (background excluded) of an MSD folder."""
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist: expected a Decathlon-layout folder")
    with open(path) as f:
        meta = json.load(f)
    cases = []
    for entry in meta.get("training", []):
        case = {k: os.path.normpath(os.path.join(data_dir, entry[k])) for k in ("image", "label")}
        for k, p in case.items():
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{path}: {k} {p!r} does not exist")
        cases.append(case)
    if len(cases) < 2:
        raise ValueError(f"{path}: needs at least 2 labelled cases (one to train, one to validate), found {len(cases)}")
    labels = {int(k): v for k, v in meta["labels"].items() if int(k) != 0}
    return cases, labels


def split_cases(cases: list[dict], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """A fixed seeded split, or the one the split file gives; then the training fraction."""
    if args.split_file:
        with open(args.split_file) as f:
            split = json.load(f)
        by_name = {os.path.basename(c["image"]): c for c in cases}
        pick = lambda names: [by_name[os.path.basename(n)] for n in names]  # noqa: E731
        train, val = pick(split["train"]), pick(split["val"])
    else:
        order = np.random.default_rng(args.seed).permutation(len(cases))
        n_val = max(1, int(round(args.val_fraction * len(cases))))
        val = [cases[i] for i in sorted(order[:n_val])]
        train = [cases[i] for i in sorted(order[n_val:])]
    if args.train_fraction < 1.0:
        keep = max(1, int(round(args.train_fraction * len(train))))
        train = [train[i] for i in sorted(np.random.default_rng(args.seed + 1).permutation(len(train))[:keep])]
    return train, val


def preprocessing(spacing: float) -> list:
    """Read, put depth first, resample, clip and scale: the deterministic part."""
    keys = ["image", "label"]
    return [
        LoadImaged(keys, reader="NibabelReader"),
        EnsureChannelFirstd(keys),  # (1, x, y, z), nibabel order
        Spacingd(keys, pixdim=(spacing,) * 3, mode=(3, "nearest")),
        ScaleIntensityRanged("image", a_min=-1024, a_max=1024, b_min=-1.0, b_max=1.0, clip=True),  # HU / 1024
        Transposed(keys, indices=(0, 3, 1, 2)),  # (1, z, x, y): the pretraining orientation
        EnsureTyped(keys, track_meta=False),
    ]


def train_transforms(args: argparse.Namespace) -> Compose:
    keys = ["image", "label"]
    return Compose(
        preprocessing(args.spacing)
        + [
            SpatialPadd(keys, spatial_size=args.patch_size),
            RandCropByPosNegLabeld(keys, "label", args.patch_size, pos=args.pos_ratio, neg=1.0, num_samples=args.samples_per_volume),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Per-class Dice (background excluded) over whole volumes, by sliding-window inference;
    each process scores its share of the cases and the scores of all processes are pooled."""
    model.eval()
    scores = [torch.empty(0, num_classes - 1)]
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.use_bf16):
            logits = sliding_window_inference(image, args.patch_size, args.sw_batch_size, model, overlap=args.sw_overlap, mode="gaussian")
        pred = torch.nn.functional.one_hot(logits.argmax(1), num_classes).permute(0, 4, 1, 2, 3)
        truth = torch.nn.functional.one_hot(label[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3)
        scores.append(compute_dice(pred, truth, include_background=False, ignore_empty=True).float().cpu())  # (1, classes - 1)
    scores = torch.cat(scores)
    if utils.is_dist():
        gathered = [None] * utils.get_world_size()
        dist.all_gather_object(gathered, scores)
        scores = torch.cat(gathered)
    model.train()
    return [float(v) for v in torch.nanmean(scores, dim=0)]  # classes absent from a case's truth are skipped


def dice_table(columns: dict[str, list[float]], names: list[str]) -> str:
    """Per-class Dice of one or more runs, side by side."""
    width = max(len(n) for n in [*names, "mean"]) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{c:>14}" for c in columns)]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}" + "".join(f"{v[i]:>14.4f}" for v in columns.values()))
    lines.append(f"{'mean':<{width}}" + "".join(f"{np.nanmean(v):>14.4f}" for v in columns.values()))
    return "\n".join(lines)


def validate_args(args: argparse.Namespace) -> None:
    d, h, w = last_stage_shape(tuple(args.patch_size))
    if min(args.patch_size) <= 0 or d * h * w < 2:
        raise ValueError(
            f"--patch_size {tuple(args.patch_size)} is too small: the encoder's last stage would be {d}x{h}x{w} (use e.g. 32 64 64)"
        )
    if args.pretrained and not os.path.isfile(args.pretrained):
        raise FileNotFoundError(f"--pretrained {args.pretrained!r} does not exist")
    if not 0 < args.train_fraction <= 1 or not 0 < args.val_fraction < 1:
        raise ValueError("--train_fraction must be in (0, 1] and --val_fraction in (0, 1)")


def main(args: argparse.Namespace) -> dict:
    validate_args(args)
    device = utils.init_distributed_mode(args)
    utils.settle_vector_math()  # before any arithmetic: see its docstring
    torch.manual_seed(args.seed + args.rank)
    os.makedirs(args.output_dir, exist_ok=True)
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
    cases, labels = read_dataset(args.data_dir)
    train_cases, val_cases = split_cases(cases, args)
    num_classes = max(labels) + 1
    class_names = [labels.get(i, str(i)) for i in range(1, num_classes)]
    train_ds = CacheDataset(train_cases, train_transforms(args), cache_rate=args.cache_rate, num_workers=args.num_workers, progress=False)
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
    val_share = val_cases[args.rank :: args.world_size]  # each process validates its share
    val_loader = DataLoader(Dataset(val_share, Compose(preprocessing(args.spacing))), batch_size=1, num_workers=min(args.num_workers, 2))
    print(f"Data: {len(train_cases)} training and {len(val_cases)} validation cases, classes {class_names}.")

    # ============ building the network ... ============
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
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    iters = len(train_loader) if args.max_iters_per_epoch <= 0 else min(len(train_loader), args.max_iters_per_epoch)
    lr_schedule = utils.cosine_scheduler(args.lr, args.lr * 0.01, args.epochs, iters)

    to_restore = {"epoch": 0, "best_mean_dice": -1.0}
    utils.restart_from_checkpoint(
        os.path.join(args.output_dir, "checkpoint.pth"), run_variables=to_restore, model=model_without_ddp, optimizer=optimizer
    )
    best = to_restore["best_mean_dice"]
    history = []

    # ============ training ... ============
    start = time.time()
    for epoch in range(to_restore["epoch"], args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        losses = []
        for it, batch in enumerate(train_loader):
            if it >= iters:
                break
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[epoch * iters + it])
            image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.use_bf16):
                loss = loss_fn(model(image).float(), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        mean_loss = float(utils.all_reduce_mean(torch.stack(losses).mean()).item())
        record = {"epoch": epoch, "train_loss": mean_loss, "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % args.eval_every == 0 or epoch == args.epochs - 1:
            dice = evaluate(model_without_ddp, val_loader, num_classes, args, device)
            record.update({f"dice_{n}": d for n, d in zip(class_names, dice)}, mean_dice=float(np.nanmean(dice)))
            if record["mean_dice"] > best and utils.is_main_process():
                best = record["mean_dice"]
                utils.save_atomic(
                    {"model": model_without_ddp.state_dict(), "epoch": epoch + 1, "dice": dice}, os.path.join(args.output_dir, "best.pth")
                )
        if utils.is_main_process():
            elapsed = time.time() - start
            done = epoch + 1 - to_restore["epoch"]
            eta = elapsed / done * (args.epochs - epoch - 1)
            print(
                f"epoch {epoch}: " + "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch") + f"  eta {eta:.0f}s", flush=True
            )
            utils.append_json_line(os.path.join(args.output_dir, "log.txt"), record)
            utils.plot_curves(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "curves.png"))
            state = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "best_mean_dice": best,
                "args": vars(args),
            }
            utils.save_atomic(state, os.path.join(args.output_dir, "checkpoint.pth"))
        history.append(record)

    result = {}
    if utils.is_main_process():
        final = [history[-1].get(f"dice_{n}", math.nan) for n in class_names] if history else []
        result = {
            "classes": class_names,
            "dice": final,
            "mean_dice": float(np.nanmean(final)) if final else math.nan,
            "best_mean_dice": best,
        }
        utils.save_atomic_json(result, os.path.join(args.output_dir, "dice.json"))
        if final:
            print(dice_table({"Dice": final}, class_names))
    if utils.is_dist():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser("DeSD fine-tuning", parents=[get_args_parser()])
    sys.exit(0 if main(parser.parse_args()) is not None else 1)
