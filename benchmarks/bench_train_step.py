"""Training-step throughput: samples per second and peak memory of one DeSD step (teacher
forward on the 2 global views, student forward and backward on every view, loss, optimiser
step, teacher EMA, centre update) on random views already on the device.

    python benchmarks/bench_train_step.py                     # CPU defaults: res3d10, batch 2
    python benchmarks/bench_train_step.py --device cuda --arch res3d50 --batch 32 \
        --precision fp32 tf32 bf16 --channels_last False True
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from common import report  # noqa: I001

import utils
from loss import DeSDLoss
from models import DeSDStudent, DeSDTeacher, create_model


def measure(args, precision: str, channels_last: bool, compile_: bool) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = True
    student = DeSDStudent(create_model(args.arch), args.out_dim, use_bn=True).to(device)
    teacher = DeSDTeacher.from_student(student)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    student, teacher = student.to(memory_format=fmt), teacher.to(memory_format=fmt)
    s_fwd, t_fwd = (torch.compile(student), torch.compile(teacher)) if compile_ else (student, teacher)
    loss_fn = DeSDLoss(args.out_dim, 2, 0.04, 0.07, 20, 100).to(device)
    optimizer = torch.optim.SGD(utils.get_params_groups(student), lr=0.01, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    views = [torch.randn(args.batch, 1, 16, args.size, args.size, device=device).contiguous(memory_format=fmt) for _ in range(2)]

    def step():
        ctx = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            with torch.no_grad():
                t_out = t_fwd(views)
            loss = loss_fn(s_fwd(views), t_out, 0)["loss"]
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        utils.update_teacher(student, teacher, 0.996)
        loss_fn.update_center(t_out)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "arch": args.arch, "batch": args.batch, "precision": precision, "channels_last": channels_last, "compile": compile_,
        "s/step": round(seconds, 4), "samples/s": round(args.batch / seconds, 1), "peak GiB": round(peak, 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser("training step benchmark")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="res3d10")
    parser.add_argument("--batch", default=2, type=int)
    parser.add_argument("--size", default=96, type=int, help="In-plane side of the global views (depth 16).")
    parser.add_argument("--out_dim", default=60000, type=int)
    parser.add_argument("--precision", default=["fp32"], nargs="+", choices=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--channels_last", default=[False], nargs="+", type=utils.bool_flag)
    parser.add_argument("--compile", default=[False], nargs="+", type=utils.bool_flag)
    parser.add_argument("--warmup", default=2, type=int)
    parser.add_argument("--steps", default=5, type=int)
    args = parser.parse_args()
    rows = []
    for compile_ in args.compile:
        for channels_last in args.channels_last:
            for precision in args.precision:
                rows.append(measure(args, precision, channels_last, compile_))
                print(rows[-1], flush=True)
    report("training step", rows, ["arch", "batch", "precision", "channels_last", "compile", "s/step", "samples/s", "peak GiB"])


if __name__ == "__main__":
    main()
