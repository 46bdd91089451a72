"""CUDA smoke check for a lent GPU machine: a short pretraining with the augmentation on the
GPU and bf16, then fine-tuning from its teacher on a trivially learnable task, on the GPU.

    PYTHONPATH=. python3 benchmarks/gpu_smoke.py   (from the repository root, where the project is not
                                                    installed; nibabel and MONAI needed)
"""

import argparse
import json

import torch

import finetune
import main_desd
from tools.tiny_data import TINY_TRAIN_ARGS, write_cube_task, write_patches


def run_main_desd(argv: list[str]) -> None:
    main_desd.train_desd(argparse.ArgumentParser("DeSD", parents=[main_desd.get_args_parser()]).parse_args(argv))


root = write_patches("/tmp/smoke/data", n=8)
args = [a if a != "cpu" else "cuda" for a in TINY_TRAIN_ARGS]
run_main_desd(
    [
        "--data_path",
        root,
        "--output_dir",
        "/tmp/smoke/out",
        *args,
        "--epochs",
        "1",
        "--augment_on_device",
        "True",
        "--use_bf16",
        "True",
        "--num_workers",
        "2",
    ]
)
ck = torch.load("/tmp/smoke/out/checkpoint.pth", weights_only=True)
print("pretrain ok, epoch", ck["epoch"], "center finite", bool(torch.isfinite(ck["desd_loss"]["center"]).all()))
write_cube_task("/tmp/smoke/task")
p = argparse.ArgumentParser(parents=[finetune.get_args_parser()])
r = finetune.main(
    p.parse_args(
        [
            "--data_dir",
            "/tmp/smoke/task",
            "--output_dir",
            "/tmp/smoke/ft",
            "--arch",
            "res3d10",
            "--spacing",
            "2",
            "--patch_size",
            "16",
            "64",
            "64",
            "--epochs",
            "4",
            "--num_workers",
            "0",
            "--device",
            "cuda",
            "--lr",
            "1e-3",
            "--use_bf16",
            "True",
            "--pretrained",
            "/tmp/smoke/out/checkpoint.pth",
        ]
    )
)
print("finetune ok", json.dumps(r))
