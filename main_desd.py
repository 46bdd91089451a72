"""DeSD pretraining: deep self-distillation of a 3D ResNet on CT sub-volumes.

One GPU:
    python main_desd.py --data_path /data/DeepLesion --list_path SSL_data_deeplesion.txt \
        --output_dir out --arch res3d50 --batch_size_per_gpu 32 --use_fp16 False
N GPUs on one node (the published run is 6 GPUs; `sh run_ssl.sh` writes all its flags out):
    torchrun --nproc_per_node 6 main_desd.py --data_path ... --output_dir out
Several nodes: the same torchrun on each node with --nnodes, --node_rank, --master_addr and
--master_port (see run_ssl.sh), or one task per GPU under SLURM (srun python main_desd.py ...).
CPU only (smoke test, or a machine with no GPU):
    python main_desd.py --device cpu --arch res3d10 --out_dim 1024 --batch_size_per_gpu 2 \
        --global_crop_size 64 --epochs 1 --max_iters_per_epoch 5 --data_path ... --output_dir out

The run resumes from the newest readable checkpoint in <output_dir> (checkpoint.pth, its .prev
copy, or a numbered one) whenever there is one; --save_every_iters N also checkpoints within
epochs, and a resumed run then continues exactly where the checkpoint was taken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import utils
from augment import native_chain
from augment.intensity import BRIGHTNESS_ADD_SD, augment_views
from dataset import EpochSampler, SSLDataset, ViewConfig, collate, init_worker, views_from_crops
from loss import STAGE_NAMES, DeSDLoss, view_retrieval
from models import DeSDStudent, DeSDTeacher, create_model, list_models
from models.pretrained import PREFIX, check_layer1_shortcut
from models.res3d import last_stage_shape
from preprocessing import files
from preprocessing.runner import command_parser, entry, parse_with_config, run_command


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DeSD", add_help=False)
    parser.add_argument(
        "--config",
        default="",
        help="A JSON file of flag values (a run's args.json, or recipes/desd_res3d50.json, the published setting); "
        "flags on the command line win.",
    )

    # Model parameters
    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="res3d50", type=str, choices=list_models(), help="3D ResNet backbone; the paper uses res3d50.")
    group.add_argument(
        "--out_dim",
        default=60000,
        type=int,
        help="Dimensionality of the DINO head output. Large values (60000 in the paper) suit complex data.",
    )
    group.add_argument(
        "--norm_last_layer",
        default=True,
        type=utils.bool_flag,
        help="Fix the norm of the prototypes to 1. Typically True; False can improve results but makes training less stable.",
    )
    group.add_argument(
        "--momentum_teacher",
        default=0.996,
        type=float,
        help="Base EMA momentum of the teacher, raised to --momentum_teacher_end by a cosine schedule. Use 0.9995 with small batches.",
    )
    group.add_argument(
        "--momentum_teacher_end",
        default=1.0,
        type=float,
        help="Final EMA momentum of the teacher (1 in DINO). Lower it for runs of a few hundred steps, whose teacher would "
        "otherwise keep much of its random initialisation (the start-up line says how much).",
    )
    group.add_argument(
        "--use_bn_in_head",
        default=False,
        type=utils.bool_flag,
        help="Batch norms in the projection heads (True in the paper); synchronised across GPUs.",
    )
    group.add_argument(
        "--head_hidden_dim",
        default=2048,
        type=int,
        help="Width of the projection heads' hidden layers (DINO's 2048; smaller only for quick runs and tests).",
    )
    group.add_argument(
        "--drop_path_rate",
        default=0.1,
        type=float,
        help="Kept for compatibility with DINO's command line; ResNets have no stochastic depth, so it has no effect.",
    )

    # Temperature teacher parameters
    group = parser.add_argument_group("teacher temperature")
    group.add_argument(
        "--warmup_teacher_temp", default=0.04, type=float, help="Initial teacher temperature. Try lowering it if training is unstable."
    )
    group.add_argument(
        "--teacher_temp", default=0.07, type=float, help="Teacher temperature after the warm-up. Above 0.07 training tends to be unstable."
    )
    group.add_argument("--warmup_teacher_temp_epochs", default=20, type=int, help="Epochs of linear warm-up of the teacher temperature.")

    # Training/Optimization parameters
    group = parser.add_argument_group("optimisation")
    group.add_argument(
        "--use_fp16",
        default=True,
        type=utils.bool_flag,
        help="fp16 autocast with loss scaling (CUDA only; ignored on CPU). The paper trains with False; turn it off if the loss goes NaN.",
    )
    group.add_argument(
        "--use_bf16",
        default=False,
        type=utils.bool_flag,
        help="bf16 autocast (CUDA or CPU); no loss scaling needed. Takes precedence over --use_fp16.",
    )
    group.add_argument("--weight_decay", default=0.04, type=float, help="Initial weight decay (cosine schedule to --weight_decay_end).")
    group.add_argument("--weight_decay_end", default=0.4, type=float, help="Final weight decay.")
    group.add_argument("--clip_grad", default=3.0, type=float, help="Maximal gradient norm of each parameter tensor; 0 disables clipping.")
    group.add_argument(
        "--batch_size_per_gpu", default=64, type=int, help="Patches per process (per GPU). The paper uses 32 on each of 6 GPUs."
    )
    group.add_argument(
        "--accum_iter",
        default=1,
        type=int,
        help="Accumulate gradients over this many batches per optimiser step (EMA and centre update once per step).",
    )
    group.add_argument("--epochs", default=100, type=int, help="Number of epochs of training.")
    group.add_argument(
        "--max_iters_per_epoch", default=0, type=int, help="Cap on iterations per epoch for smoke runs; 0 uses the whole list every epoch."
    )
    group.add_argument(
        "--freeze_last_layer",
        default=1,
        type=int,
        help="Epochs during which the prototypes stay fixed. Increase it if the loss does not decrease.",
    )
    group.add_argument(
        "--lr",
        default=0.0005,
        type=float,
        help="Peak learning rate at a global batch of 256 (linear scaling rule), reached after the warm-up.",
    )
    group.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear learning-rate warm-up.")
    group.add_argument("--min_lr", default=1e-6, type=float, help="Learning rate at the end of the cosine schedule.")
    group.add_argument(
        "--optimizer", default="adamw", type=str, choices=["adamw", "sgd", "lars"], help="The paper uses sgd (momentum 0.9)."
    )
    group.add_argument(
        "--stage_weights",
        default=(0.25, 0.25, 0.25, 0.25),
        type=float,
        nargs=4,
        help="Loss weights of stages 1-4. '0 0 0 1' is plain DINO (the ablation baseline).",
    )

    # Multi-crop and views
    group = parser.add_argument_group("views")
    group.add_argument(
        "--global_crops_scale",
        type=float,
        nargs="+",
        default=(0.4, 1.0),
        help="Kept for compatibility with the reference, whose 3D crops ignore it: the crop scales are fixed (docs/method.md, section 3).",
    )
    group.add_argument("--local_crops_number", type=int, default=0, help="Number of small local views (0 in the paper).")
    group.add_argument(
        "--local_crops_scale",
        type=float,
        nargs="+",
        default=(0.05, 0.4),
        help="Kept for compatibility with the reference, whose 3D crops ignore it.",
    )
    group.add_argument("--global_crop_size", type=int, default=96, help="In-plane side of the global views.")
    group.add_argument("--local_crop_size", type=int, default=48, help="In-plane side of the local views.")
    group.add_argument("--crop_depth", type=int, default=16, help="Slices in each view.")
    group.add_argument(
        "--augment_per_volume",
        default=False,
        type=utils.bool_flag,
        help="One intensity draw per view instead of one per slice (the published weights were trained per slice).",
    )
    group.add_argument(
        "--brightness_add_sd",
        default=BRIGHTNESS_ADD_SD,
        type=float,
        help="Sd of the additive brightness offset, in units of 1024 HU (the published chain: 0.4, about 410 HU, drawn per slice).",
    )
    group.add_argument(
        "--augment_on_device",
        default=False,
        type=utils.bool_flag,
        help="The loader workers only read the raw crops; scaling, resizing, flips and the intensity augmentation run batched on the "
        "training device. Same distributions.",
    )
    group.add_argument(
        "--skip_bad_patches",
        default=False,
        type=utils.bool_flag,
        help="On an unreadable patch, warn and use the next one instead of stopping; counts are logged per epoch.",
    )

    # Misc
    group = parser.add_argument_group("misc")
    group.add_argument(
        "--data_path", default="", type=str, help="Data root: list entries are relative to it (e.g. DL_patches_v2/xxx.nii.gz)."
    )
    group.add_argument(
        "--list_path", default="SSL_data_deeplesion.txt", type=str, help="List file, relative to --data_path unless absolute."
    )
    group.add_argument(
        "--output_dir", default=".", type=str, help="Where checkpoints and log.txt go; a run resumes from its checkpoint.pth."
    )
    group.add_argument("--saveckp_freq", default=20, type=int, help="Keep a numbered checkpoint every this many epochs.")
    group.add_argument(
        "--keep_checkpoints",
        default="all",
        choices=["all", "last"],
        help="last: only checkpoint.pth and the one before it (checkpoint.prev.pth), whatever --saveckp_freq: the disk "
        "holds two checkpoints, however long the run.",
    )
    group.add_argument(
        "--save_every_iters",
        default=0,
        type=int,
        help="Also update checkpoint.pth every this many iterations within an epoch (0: at epoch ends only).",
    )
    group.add_argument("--seed", default=0, type=int, help="Random seed.")
    group.add_argument("--num_workers", default=10, type=int, help="Data loading workers per process.")
    group.add_argument("--dist_url", default="env://", type=str, help="URL used to set up distributed training.")
    group.add_argument("--local_rank", default=0, type=int, help="Accepted for old launchers and ignored: torchrun's LOCAL_RANK is used.")
    group.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto uses CUDA when available.")
    group.add_argument(
        "--allow_tf32",
        default=False,
        type=utils.bool_flag,
        help="TF32 matrix products and convolutions on Ampere+ GPUs (faster, ~1e-3 relative error).",
    )
    group.add_argument(
        "--channels_last", default=False, type=utils.bool_flag, help="channels-last 3D memory format for the networks on CUDA."
    )
    group.add_argument("--compile", default=False, type=utils.bool_flag, help="torch.compile the networks (CUDA).")
    group.add_argument("--print_freq", default=10, type=int, help="Iterations between progress lines.")
    group.add_argument(
        "--tensorboard",
        default=False,
        type=utils.bool_flag,
        help="Also write the epoch scalars for TensorBoard (needs its package: pip install -e '.[tensorboard]').",
    )
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad configurations before any work is done."""
    if args.arch not in list_models():
        raise ValueError(f"unknown --arch {args.arch!r}; expected one of {', '.join(list_models())}")
    for name in ("global_crop_size", "local_crop_size", "crop_depth", "batch_size_per_gpu", "epochs", "accum_iter"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.out_dim < 2:
        raise ValueError(f"--out_dim must be at least 2, got {args.out_dim}")
    if args.local_crops_number < 0:
        raise ValueError(f"--local_crops_number must be >= 0, got {args.local_crops_number}")
    for name in ("global_crop_size", "local_crop_size"):
        d, h, w = last_stage_shape((args.crop_depth, getattr(args, name), getattr(args, name)))
        if d * h * w < 2 and (name == "global_crop_size" or args.local_crops_number > 0):
            raise ValueError(
                f"--{name} {getattr(args, name)} with --crop_depth {args.crop_depth} leaves a last-stage map of {d}x{h}x{w}: "
                "instance norm needs more than one element (use at least 48 in-plane with depth 16)"
            )
    if not args.data_path:
        raise ValueError("--data_path is required (the folder that holds DL_patches_v2/ and the list file)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise NotADirectoryError(f"--output_dir {args.output_dir!r} is a file, not a folder")
    positive = ("lr", "warmup_teacher_temp", "teacher_temp")
    non_negative = (
        "min_lr", "weight_decay", "weight_decay_end", "clip_grad", "warmup_epochs", "warmup_teacher_temp_epochs", "brightness_add_sd"
    )  # fmt: skip
    for name in positive + non_negative:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name in positive and value == 0):
            raise ValueError(f"--{name} must be a finite {'positive' if name in positive else 'non-negative'} number, got {value}")
    for name in ("momentum_teacher", "momentum_teacher_end"):
        value = getattr(args, name, 1.0)
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"--{name} must be in [0, 1], got {value}")
    weights = tuple(args.stage_weights)
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise ValueError(f"--stage_weights must be finite, non-negative and not all zero, got {weights} ('0 0 0 1' is DINO)")


# the stored arguments that shape a run's state: a resumed run must have the same
# stored arguments a resume may change, with a warning: they change the schedules or the data, not the state's shape
RESUME_NOTES = ("batch_size_per_gpu", "accum_iter", "data_path", "list_path")
STATE_SETTINGS = ("arch", "out_dim", "stage_weights", "use_bn_in_head", "norm_last_layer", "optimizer", "local_crops_number")


def check_resumable(ckpt: dict, path: str, args: argparse.Namespace) -> None:
    """Refuse to resume a checkpoint whose run had other state-shaping settings, naming each,
    or one of a BasicBlock net without the reference's layer1 shortcut."""
    differ = utils.setting_differences(ckpt.get("args") or {}, args, STATE_SETTINGS)
    changed = utils.setting_differences(ckpt.get("args") or {}, args, RESUME_NOTES)
    if changed and utils.is_main_process():
        print(
            f"WARNING: resuming {path!r} with other settings: {'; '.join(changed)}. The schedules and the order of the patches "
            "follow this run's settings from here on.",
            flush=True,
        )
    if differ:
        raise ValueError(
            f"{path!r} is a run with other settings: {'; '.join(differ)}. Resume with the same settings, "
            "or give this run another --output_dir"
        )
    teacher = {k[len(PREFIX) :]: v for k, v in ckpt.get("teacher", {}).items() if k.startswith(PREFIX)}
    check_layer1_shortcut(teacher, create_model(args.arch).state_dict(), path)


def autocast_context(args: argparse.Namespace, device: torch.device):
    if args.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=args.amp_dtype)


def train_desd(args: argparse.Namespace) -> None:
    validate_args(args)
    device = utils.init_distributed_mode(args)
    with utils.output_folder(args.output_dir, main=utils.is_main_process()):  # checked, locked, console.log
        run_training(args, device)


def run_training(args: argparse.Namespace, device: torch.device) -> None:
    utils.settle_vector_math()  # before any arithmetic: see its docstring
    torch.manual_seed(args.seed + args.rank)
    np.random.seed(args.seed + args.rank)
    set_up_run(args, device)

    # ============ preparing data ... ============
    loader, sampler, iters_per_epoch = build_loader(args, device)
    print(f"Data loaded: there are {len(loader.dataset)} patches, {iters_per_epoch} iterations per epoch.")

    # ============ building student and teacher networks ... ============
    nets = build_networks(args, device)
    print(
        f"Student and teacher are built: both {args.arch}, {sum(p.numel() for p in nets['student_without_ddp'].parameters()) / 1e6:.1f}M student parameters."
    )

    # ============ preparing loss, optimizer and schedulers ... ============
    desd_loss = DeSDLoss(
        args.out_dim,
        loader.dataset.cfg.ncrops,
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
        stage_weights=tuple(args.stage_weights),
    ).to(device)
    optimizer, fp16_scaler = build_optimizer(args, nets["student_without_ddp"])
    schedules = build_schedules(args, iters_per_epoch // args.accum_iter)
    print("Loss, optimizer and schedulers ready.")

    # ============ optionally resume training ... ============
    start_epoch, start_iter = resume(
        args,
        student=nets["student_without_ddp"],
        teacher=nets["teacher"],
        optimizer=optimizer,
        fp16_scaler=fp16_scaler,
        desd_loss=desd_loss,
    )

    run = TrainingRun(
        args=args,
        device=device,
        loader=loader,
        **nets,
        desd_loss=desd_loss,
        optimizer=optimizer,
        fp16_scaler=fp16_scaler,
        **schedules,
        iters_per_epoch=iters_per_epoch,
        trend=CollapseTrend(args.out_dim, args=args),
        curves=utils.Curves(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "curves.png")),
    )
    writer = utils.tensorboard_writer(args.output_dir) if args.tensorboard and utils.is_main_process() else None
    start_time = time.time()
    print("Starting DeSD training !")
    for epoch in range(start_epoch, args.epochs):
        first = start_iter if epoch == start_epoch else 0
        sampler.set_epoch(epoch, start=first * args.batch_size_per_gpu)

        # ============ training one epoch of DeSD ... ============
        train_stats = train_one_epoch(run, epoch, first)

        # ============ writing logs ... ============
        numbered = args.saveckp_freq and epoch % args.saveckp_freq == 0 and args.keep_checkpoints == "all"
        save_checkpoint(run, epoch + 1, 0, f"checkpoint{epoch:04}.pth" if numbered else "")
        if utils.is_main_process():
            write_logs(run, epoch, train_stats, writer)
    run.checkpoints.wait()
    if writer is not None:
        writer.close()
    total_time = time.time() - start_time
    print(f"Training time {time.strftime('%H:%M:%S', time.gmtime(total_time))}")
    if utils.is_main_process():
        print(f"Teacher checkpoint: {os.path.abspath(os.path.join(args.output_dir, 'checkpoint.pth'))} (key 'teacher')")
    if utils.is_dist():
        dist.barrier()
        dist.destroy_process_group()


def set_up_run(args: argparse.Namespace, device: torch.device) -> None:
    """The start-up lines and args.json on rank 0; the device's math settings; the autocast dtype."""
    if utils.is_main_process():
        print(utils.git_sha())
        precision = "bf16" if args.use_bf16 else ("fp16" if args.use_fp16 and device.type == "cuda" else "fp32")
        print(
            f"DeSD: {args.arch}, out_dim {args.out_dim}, stage weights {tuple(args.stage_weights)}; data {args.data_path}; "
            f"batch {args.batch_size_per_gpu} x {args.world_size} process(es) x {args.accum_iter}; {args.epochs} epochs; "
            f"{device.type}, {precision}; {args.optimizer} lr {args.lr}; output {args.output_dir} (all arguments in args.json)",
            flush=True,
        )
        utils.save_atomic_json(
            {k: v for k, v in sorted(vars(args).items()) if k != "amp_dtype"}, os.path.join(args.output_dir, "args.json")
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
    args.amp_dtype = torch.bfloat16 if args.use_bf16 else (torch.float16 if args.use_fp16 and device.type == "cuda" else None)
    if args.use_fp16 and not args.use_bf16 and device.type != "cuda" and utils.is_main_process():
        print("note: --use_fp16 applies on CUDA only; training in float32 on the CPU")


def build_loader(args: argparse.Namespace, device: torch.device) -> tuple[torch.utils.data.DataLoader, EpochSampler, int]:
    """The views' loader, its sampler, and the iterations of an epoch (a multiple of --accum_iter)."""
    cfg = ViewConfig(
        global_size=args.global_crop_size,
        local_size=args.local_crop_size,
        depth=args.crop_depth,
        local_crops_number=args.local_crops_number,
        per_slice=not args.augment_per_volume,
        offset_sd=args.brightness_add_sd,
        output="crops" if args.augment_on_device else "views",
    )
    dataset = SSLDataset(args.data_path, args.list_path, cfg, seed=args.seed, skip_bad_patches=args.skip_bad_patches)
    if len(dataset) < args.batch_size_per_gpu * args.world_size:
        raise ValueError(
            f"the list holds {len(dataset)} patches, fewer than one batch per process "
            f"({args.batch_size_per_gpu} x {args.world_size} processes)"
        )
    sampler = EpochSampler(len(dataset), args.rank, args.world_size, args.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        collate_fn=collate,
        persistent_workers=args.num_workers > 0,
        prefetch_factor=4 if args.num_workers > 0 else None,
        worker_init_fn=init_worker,
    )
    iters_per_epoch = len(dataset) // args.world_size // args.batch_size_per_gpu
    if args.max_iters_per_epoch > 0:
        iters_per_epoch = min(iters_per_epoch, args.max_iters_per_epoch)
    iters_per_epoch -= iters_per_epoch % args.accum_iter
    if iters_per_epoch == 0:
        raise ValueError(f"an epoch has fewer than --accum_iter {args.accum_iter} batches")
    if cfg.output == "views":  # built here once, before the workers start (they load it)
        chain = "compiled (augment/intensity.c)" if native_chain.library() is not None else "torch (no C compiler)"
        print(f"Intensity augmentation in the loader workers: {chain}.")
    return loader, sampler, iters_per_epoch


def build_networks(args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    """Student and teacher on the device, the student wrapped for DDP where the world is larger
    than 1, and the forwards the loop calls (compiled with --compile)."""
    student = DeSDStudent(create_model(args.arch), args.out_dim, args.use_bn_in_head, args.norm_last_layer, args.head_hidden_dim)
    if args.use_bn_in_head and args.world_size > 1 and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    teacher = DeSDTeacher.from_student(student)  # exact copy of the backbone and last head
    student, teacher = student.to(device), teacher.to(device)
    if args.channels_last and device.type == "cuda":
        student, teacher = student.to(memory_format=torch.channels_last_3d), teacher.to(memory_format=torch.channels_last_3d)
    student_without_ddp = student
    if args.world_size > 1:
        student = DistributedDataParallel(student, device_ids=[args.gpu] if device.type == "cuda" else None)
    student_fwd, teacher_fwd = student, teacher
    if args.compile:
        student_fwd, teacher_fwd = torch.compile(student), torch.compile(teacher)
    return {
        "student": student,
        "teacher": teacher,
        "student_without_ddp": student_without_ddp,
        "student_fwd": student_fwd,
        "teacher_fwd": teacher_fwd,
    }


def build_optimizer(args: argparse.Namespace, student: nn.Module) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """DINO's parameter groups (no weight decay on biases and norms) under --optimizer, and the
    fp16 gradient scaler where fp16 autocast runs. Learning rate and weight decay are set per
    step from the schedules."""
    params_groups = utils.get_params_groups(student)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params_groups)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params_groups, lr=0, momentum=0.9)
    else:
        optimizer = utils.LARS(params_groups)
    return optimizer, torch.amp.GradScaler("cuda") if args.amp_dtype == torch.float16 else None


def build_schedules(args: argparse.Namespace, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """Per optimiser step: the learning rate (peak by the linear scaling rule), the weight decay
    and the teacher momentum, with the warnings about them."""
    global_batch = args.batch_size_per_gpu * args.world_size * args.accum_iter
    lr_schedule = utils.cosine_scheduler(
        args.lr * global_batch / 256.0,  # linear scaling rule
        args.min_lr,
        args.epochs,
        steps_per_epoch,
        warmup_epochs=args.warmup_epochs,
    )
    warn_about_schedule(args, lr_schedule, global_batch, steps_per_epoch)
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, args.momentum_teacher_end, args.epochs, steps_per_epoch)
    report_teacher_init_share(momentum_schedule)
    return {"lr_schedule": lr_schedule, "wd_schedule": wd_schedule, "momentum_schedule": momentum_schedule}


def resume(args: argparse.Namespace, **objects) -> tuple[int, int]:
    """Restore the named objects from the output folder's checkpoint that got furthest, if any,
    after checking it is a run of the same settings; (epoch, iteration) to start from."""
    to_restore = {"epoch": 0, "iteration": 0}
    if utils.is_main_process():
        files.remove_stale_partials(args.output_dir)
    if utils.is_dist():
        dist.barrier()
    ckpt_path, ckpt = utils.load_latest_checkpoint(args.output_dir)
    if ckpt is not None:
        check_resumable(ckpt, ckpt_path, args)
        utils.restore(ckpt, ckpt_path, run_variables=to_restore, **objects)
        del ckpt
    if to_restore["iteration"]:
        print(f"Resuming at epoch {to_restore['epoch']}, iteration {to_restore['iteration']}")
    if utils.is_main_process():
        utils.drop_epochs_from(os.path.join(args.output_dir, "log.txt"), to_restore["epoch"])
    return to_restore["epoch"], to_restore["iteration"]


def write_logs(run: TrainingRun, epoch: int, train_stats: dict, writer) -> None:
    """Rank 0 after an epoch: a JSON line in log.txt, curves.png, TensorBoard, the collapse warnings."""
    args = run.args
    log_path = os.path.join(args.output_dir, "log.txt")
    utils.append_json_line(log_path, {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch})
    run.curves.update(last_epoch=epoch == args.epochs - 1)
    if writer is not None:
        for key, value in train_stats.items():
            writer.add_scalar(key, value, epoch)
        writer.flush()
    if epoch > 0:  # every run starts near ln(out_dim)
        warn_if_collapsing(train_stats, args.out_dim, args)
    trend = run.trend.warning()
    if trend:
        print(trend)


@dataclasses.dataclass
class TrainingRun:
    """What the training loop works with: the networks, the loss and optimiser, the loader and
    the per-step schedules. Built once by `train_desd`."""

    args: argparse.Namespace
    device: torch.device
    loader: torch.utils.data.DataLoader
    student: nn.Module  # wrapped in DistributedDataParallel when the world is larger than 1
    teacher: nn.Module
    student_without_ddp: nn.Module
    student_fwd: nn.Module  # the compiled student where --compile, else `student`
    teacher_fwd: nn.Module
    desd_loss: DeSDLoss
    optimizer: torch.optim.Optimizer
    fp16_scaler: torch.amp.GradScaler | None
    lr_schedule: np.ndarray  # per optimiser step
    wd_schedule: np.ndarray
    momentum_schedule: np.ndarray
    iters_per_epoch: int
    trend: CollapseTrend | None = None  # the progress points' entropy and KL, for the slow-collapse warning
    curves: utils.Curves | None = None  # curves.png, drawn on rank 0
    checkpoints: utils.CheckpointWriter = dataclasses.field(default_factory=utils.CheckpointWriter)


def save_checkpoint(run: TrainingRun, epoch: int, iteration: int, numbered: str = "") -> None:
    """Write the run's state on rank 0 to checkpoint.pth (and to the file `numbered` names, if
    any), atomically, on the writer's thread while training goes on. `epoch` and `iteration` say
    where to resume. Model keys carry the `module.` prefix at every world size (docs/method.md,
    section 6). Weights that are not finite are never written: the run stops instead."""
    if not utils.is_main_process():
        return
    args, student, teacher = run.args, run.student_without_ddp, run.teacher
    bad = [
        name
        for model in (student, teacher)
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not torch.isfinite(t).all()
    ]
    if bad:
        print(
            f"Non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}) at epoch {epoch}, iteration {iteration}: stopping without "
            "writing checkpoint.pth; the last checkpoint is left as it was.",
            flush=True,
        )
        sys.exit(1)
    state = {
        "student": utils.with_prefix(student.state_dict()),
        "teacher": utils.with_prefix(teacher.state_dict()),
        "optimizer": run.optimizer.state_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "args": {k: v for k, v in vars(args).items() if k != "amp_dtype"},
        "desd_loss": run.desd_loss.state_dict(),
    }
    if run.fp16_scaler is not None:
        state["fp16_scaler"] = run.fp16_scaler.state_dict()
    os.makedirs(args.output_dir, exist_ok=True)
    paths = [(os.path.join(args.output_dir, "checkpoint.pth"), True)]
    if numbered:
        paths.append((os.path.join(args.output_dir, numbered), False))
    run.checkpoints.write(state, paths)


PLAUSIBLE_PEAK_LR = {"adamw": 0.1, "sgd": 10.0}  # above these a peak learning rate is almost surely a typo (SGD and LARS alike)


def warn_about_schedule(args: argparse.Namespace, lr_schedule: np.ndarray, global_batch: int, steps_per_epoch: int) -> None:
    """Learning-rate settings that make a run learn nothing, said before it starts."""
    peak = args.lr * global_batch / 256.0
    print(f"Peak learning rate {peak:.3g} (--lr {args.lr} x global batch {global_batch} / 256), then cosine to {args.min_lr:.3g}.")
    if peak < 1e-5:
        print(f"WARNING: the peak learning rate is {peak:.3g} (--lr {args.lr} x global batch {global_batch} / 256): too small to learn")
    if peak < args.min_lr:
        print(
            f"WARNING: the peak learning rate {peak:.3g} (--lr {args.lr} x {global_batch} / 256) is below --min_lr {args.min_lr}, "
            "which is not scaled: the cosine schedule rises instead of falling. Scale --min_lr with the batch too."
        )
    optimizer = getattr(args, "optimizer", "sgd")
    plausible = PLAUSIBLE_PEAK_LR["adamw" if optimizer == "adamw" else "sgd"]
    if peak > plausible:
        print(
            f"WARNING: the peak learning rate {peak:.3g} is above {plausible:g}, far beyond what {optimizer} trains with "
            "(the published SGD peak is 0.225, DINO's AdamW 5e-4 at batch 256): check --lr"
        )
    if args.warmup_epochs > args.epochs:
        print(f"WARNING: --warmup_epochs {args.warmup_epochs} is longer than the run ({args.epochs} epochs): it never leaves the warm-up")


def teacher_init_share(momentum_schedule) -> float:
    """The weight of the initial teacher in the final one: each EMA step keeps a share m of the
    teacher, so after the whole schedule the random initialisation holds the product of the m."""
    return float(np.prod(np.asarray(momentum_schedule, dtype=np.float64)))


def report_teacher_init_share(momentum_schedule, limit: float = 0.1) -> None:
    """Say, before the run, how much of the final teacher the random initialisation will be."""
    share = teacher_init_share(momentum_schedule)
    first, last = float(momentum_schedule[0]), float(momentum_schedule[-1])
    print(
        f"Teacher momentum {first:g} -> {last:g} over {len(momentum_schedule)} steps: the initial weights hold {share:.1%} of the final teacher."
    )
    if share > limit:
        print(
            f"WARNING: {share:.1%} of the final teacher will be its random initialisation (more than {limit:.0%}): the schedule is "
            "too short for this momentum. Lower --momentum_teacher or --momentum_teacher_end, or train for more steps."
        )


def advice(args: argparse.Namespace | None, *tips: tuple[str, str, object]) -> str:
    """The tips whose flag the run has not already set to the advised value: each tip is (text,
    flag, advised value); a value of None, or no `args`, always keeps the tip."""
    kept = [text for text, flag, value in tips if args is None or value is None or getattr(args, flag, None) != value]
    return ", ".join(kept[:-1]) + (" or " if len(kept) > 1 else "") + kept[-1] if kept else "(the run already has every usual remedy)"


def slow_collapse_warning(
    entropy: list[float], kl: list[float], out_dim: int, min_rise: float = 0.02, args: argparse.Namespace | None = None
) -> str | None:
    """The slow collapse toward a uniform teacher, from the trend of a window of progress
    points: the teacher entropy rises (by more than `min_rise` of ln(out_dim) between the
    window's first and second half) while the KL between teacher and student falls, so the
    loss falls only because the student follows a flattening teacher. None when it is not so."""
    n = min(len(entropy), len(kl))
    if n < 4:
        return None
    half = n // 2
    e0, e1 = float(np.mean(entropy[:half])), float(np.mean(entropy[n - half : n]))
    k0, k1 = float(np.mean(kl[:half])), float(np.mean(kl[n - half : n]))
    uniform = math.log(out_dim)
    if e1 - e0 <= min_rise * uniform or k1 >= k0:
        return None
    return (
        f"WARNING: over the last {n} progress points the teacher entropy rose from {e0:.3f} to {e1:.3f} (uniform: ln(out_dim) = "
        f"{uniform:.3f}) while the KL between teacher and student fell from {k0:.3f} to {k1:.3f}: the student is following a teacher "
        "that flattens toward uniform (a slow collapse). Try "
        + advice(
            args,
            ("a lower learning rate", "lr", None),
            ("--optimizer sgd", "optimizer", "sgd"),
            ("a sharper teacher (a lower --teacher_temp)", "teacher_temp", None),
            ("gradient clipping (--clip_grad 3)", "clip_grad", 3.0),
            ("a larger batch", "batch_size_per_gpu", None),
        )
        + "."
    )


@dataclasses.dataclass
class CollapseTrend:
    """Teacher entropy and KL at the last `window` progress points of a run."""

    out_dim: int
    window: int = 10
    args: argparse.Namespace | None = None  # the run's flags: advice skips what it already has
    entropy: list = dataclasses.field(default_factory=list)
    kl: list = dataclasses.field(default_factory=list)

    def add(self, entropy: float, kl: float) -> None:
        self.entropy = [*self.entropy, entropy][-self.window :]
        self.kl = [*self.kl, kl][-self.window :]

    def warning(self) -> str | None:
        """The slow-collapse warning once the window is full (the first steps' rise is the warm-up's)."""
        return slow_collapse_warning(self.entropy, self.kl, self.out_dim, args=self.args) if len(self.entropy) == self.window else None


def warn_if_collapsing(stats: dict, out_dim: int, args: argparse.Namespace | None = None) -> None:
    """DINO's failure modes: a uniform teacher (loss at ln(out_dim)) or a one-hot teacher
    (entropy near zero)."""
    uniform = math.log(out_dim)
    if abs(stats["loss"] - uniform) < 0.02 * uniform:
        print(
            f"WARNING: loss {stats['loss']:.3f} sits near ln(out_dim) = {uniform:.3f}: the teacher output looks uniform (collapse). "
            "Try "
            + advice(
                args,
                ("a sharper teacher (--teacher_temp 0.04)", "teacher_temp", 0.04),
                ("batch norms in the heads (--use_bn_in_head True)", "use_bn_in_head", True),
                ("a larger batch", "batch_size_per_gpu", None),
                ("a peak learning rate (printed at start) of 1e-3 or more", "lr", None),
            )
            + "."
        )
    if stats["teacher_entropy"] < 0.01 * uniform:
        print(
            f"WARNING: teacher entropy {stats['teacher_entropy']:.4f} is near zero: the teacher output looks one-hot (collapse). "
            "Try a softer teacher (a higher --teacher_temp) or a lower learning rate."
        )


STAT_NAMES = ["loss", *STAGE_NAMES, "teacher_entropy", "retrieval", "kl", *(f"kl_{n}" for n in STAGE_NAMES)]  # a step's statistics


def train_one_epoch(run: TrainingRun, epoch: int, first: int) -> dict:
    """One epoch from iteration `first` (non-zero when resuming inside it); returns its averaged
    statistics, reduced over all ranks."""
    args, device, iters_per_epoch = run.args, run.device, run.iters_per_epoch
    metric_logger = utils.MetricLogger(delimiter="  ")
    header = f"Epoch: [{epoch}/{args.epochs}]"
    sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)  # summed on device: no host sync per step
    finite = torch.ones((), dtype=torch.bool, device=device)
    bad_patches, count = 0, 0
    centre_batch: list[torch.Tensor] = []
    batches = zip(range(first, iters_per_epoch), run.loader)
    later = (args.epochs - epoch - 1) * iters_per_epoch  # for the progress line's whole-run ETA
    for it, (views, bad) in metric_logger.log_every(batches, iters_per_epoch - first, args.print_freq, header, later):
        step = epoch * (iters_per_epoch // args.accum_iter) + it // args.accum_iter  # global optimiser step
        if it % args.accum_iter == 0:
            set_step_schedules(run, step)
        views = device_views(run, views, epoch, it)
        bad_patches += bad

        # ============ teacher and student forward passes + the loss ... ============
        teacher_output, terms = forward_backward(run, views, epoch, it)
        finite &= torch.isfinite(terms["loss"])
        centre_batch.append(teacher_output.detach())

        # ============ student update, teacher EMA and centre: once per optimiser step ... ============
        if (it + 1) % args.accum_iter == 0:
            optimiser_step(run, epoch, step, centre_batch)
            centre_batch = []

        # ============ statistics and progress ... ============
        values = step_statistics(run, terms, teacher_output, epoch)
        sums += values
        count += 1
        last = it == iters_per_epoch - 1
        saving = args.save_every_iters > 0 and (it + 1) % args.save_every_iters == 0 and (it + 1) % args.accum_iter == 0 and not last
        if (it - first) % args.print_freq == 0 or last or saving:
            check_finite(finite, epoch, it)
            report_progress(run, metric_logger, dict(zip(STAT_NAMES, values.tolist())))
        if saving:
            save_checkpoint(run, epoch, it + 1)

    check_finite(finite, epoch, iters_per_epoch - 1)
    return epoch_statistics(run, epoch, sums, count, bad_patches, metric_logger)


def set_step_schedules(run: TrainingRun, step: int) -> None:
    """The learning rate and weight decay of global optimiser step `step`."""
    for i, param_group in enumerate(run.optimizer.param_groups):
        param_group["lr"] = float(run.lr_schedule[step])
        if i == 0:  # only the first group is regularised
            param_group["weight_decay"] = float(run.wd_schedule[step])


def device_views(run: TrainingRun, views, epoch: int, it: int) -> list[torch.Tensor]:
    """The batch's views on the device; with --augment_on_device, made there from the raw crops."""
    args, device = run.args, run.device
    if args.augment_on_device:
        crops, geometry = views
        crops = [c.to(device, non_blocking=True) for c in crops]
        views = views_from_crops(crops, geometry.to(device, non_blocking=True), run.loader.dataset.cfg)
        g = torch.Generator(device=device).manual_seed(utils.hashed_seed(args.seed, args.rank, epoch, it))
        views = augment_views(views, g, per_slice=not args.augment_per_volume, offset_sd=args.brightness_add_sd)
    else:
        views = [v.to(device, non_blocking=True) for v in views]
    if args.channels_last and device.type == "cuda":
        views = [v.contiguous(memory_format=torch.channels_last_3d) for v in views]
    return views


def forward_backward(run: TrainingRun, views: list[torch.Tensor], epoch: int, it: int) -> tuple[torch.Tensor, dict]:
    """The teacher's output on the global views and the loss terms; the loss's gradient is
    accumulated in the student (gradients are all-reduced only on an optimiser step's last batch)."""
    args = run.args
    sync = contextlib.nullcontext() if (it + 1) % args.accum_iter == 0 or not utils.is_dist() else run.student.no_sync()
    with sync:
        with autocast_context(args, run.device):
            with torch.no_grad():
                teacher_output = run.teacher_fwd(views[:2])  # only the 2 global views pass through the teacher
            student_output = run.student_fwd(views)
            terms = run.desd_loss(student_output, teacher_output, epoch)
        loss = terms["loss"] / args.accum_iter
        if run.fp16_scaler is None:
            loss.backward()
        else:
            run.fp16_scaler.scale(loss).backward()
    return teacher_output, terms


def optimiser_step(run: TrainingRun, epoch: int, step: int, centre_batch: list[torch.Tensor]) -> None:
    """Clip, step and clear the student; move the teacher and the centre towards it."""
    args, optimizer, fp16_scaler, student = run.args, run.optimizer, run.fp16_scaler, run.student_without_ddp
    if fp16_scaler is not None and args.clip_grad:
        fp16_scaler.unscale_(optimizer)
    if args.clip_grad:
        utils.clip_gradients(student, args.clip_grad)
    utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
    if fp16_scaler is None:
        optimizer.step()
    else:
        fp16_scaler.step(optimizer)
        fp16_scaler.update()
    optimizer.zero_grad(set_to_none=True)
    utils.update_teacher(student, run.teacher, run.momentum_schedule[step])
    run.desd_loss.update_center(torch.cat(centre_batch))


@torch.no_grad()
def step_statistics(run: TrainingRun, terms: dict, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
    """The step's STAT_NAMES as one float64 tensor on the device (no host sync)."""
    desd_loss = run.desd_loss
    weights = torch.tensor(desd_loss.stage_weights, dtype=torch.float64, device=run.device)
    probs = desd_loss.teacher_probs(teacher_output, epoch)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
    retrieval = view_retrieval(teacher_output)  # the two global views of a patch, found among the batch's
    # each stage's cross-entropy is the teacher entropy plus the KL from teacher to that student head
    stage_kl = torch.stack([terms[n].detach().double() for n in STAGE_NAMES]) - entropy.double()
    kl = (weights * stage_kl).sum() / weights.sum()
    losses = [terms[n].detach().double() for n in ("loss", *STAGE_NAMES)]
    return torch.cat([torch.stack([*losses, entropy.double(), retrieval.double(), kl]), stage_kl])


def report_progress(run: TrainingRun, metric_logger: utils.MetricLogger, current: dict) -> None:
    """Feed the progress line (and the slow-collapse trend) with the current step's statistics."""
    metric_logger.update(loss=current["loss"], KL=current["kl"], H=current["teacher_entropy"], ret=current["retrieval"])
    if run.trend is not None:
        run.trend.add(current["teacher_entropy"], current["kl"])
    metric_logger.meters["lr"].fmt = "{global_avg:.2e}"
    metric_logger.update(lr=run.optimizer.param_groups[0]["lr"])


def epoch_statistics(
    run: TrainingRun, epoch: int, sums: torch.Tensor, count: int, bad_patches: int, metric_logger: utils.MetricLogger
) -> dict:
    """The epoch's averages over every step of every rank, with its schedules and timings."""
    optimizer, n = run.optimizer, len(STAT_NAMES)
    totals = torch.cat([sums, torch.tensor([count, bad_patches], dtype=torch.float64, device=run.device)])
    if utils.is_dist():
        dist.all_reduce(totals)
    stats = dict(zip(STAT_NAMES, (totals[:n] / totals[n]).tolist()))
    stats.update(
        lr=optimizer.param_groups[0]["lr"], wd=optimizer.param_groups[0]["weight_decay"], teacher_temp=run.desd_loss.teacher_temp(epoch)
    )
    stats["replaced_patches"] = int(totals[-1].item())
    stats["time_per_iter"] = metric_logger.step_time.global_avg
    stats["data_wait_per_iter"] = metric_logger.data_time.global_avg  # near 0: the loader keeps up
    if stats["replaced_patches"]:
        print(f"epoch {epoch}: {stats['replaced_patches']} unreadable patches were replaced by others")
    print("Averaged stats:", json.dumps({k: round(v, 6) for k, v in stats.items()}))
    return stats


def check_finite(finite: torch.Tensor, epoch: int, it: int) -> None:
    """Stop every process on a non-finite loss, before any checkpoint is written from it."""
    flag = finite.to(torch.int32)
    if utils.is_dist():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if not bool(flag.item()):
        print(
            f"Loss is not finite at epoch {epoch} (by iteration {it}): stopping training; the last checkpoint is left as it was.",
            flush=True,
        )
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    """The command line (`python main_desd.py ...`, or the `desd-pretrain` command)."""
    parser = command_parser("DeSD pretraining (DINO's self-distillation at every stage of a 3D ResNet)", parents=[get_args_parser()])
    train_desd(parse_with_config(parser, argv))
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
