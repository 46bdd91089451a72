"""Helpers shared by the benchmarks: generated patches of the real size, JSON + table output."""

from __future__ import annotations

import json
import os
import platform

import nibabel as nib
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REAL_PATCH = (286, 286, 24)  # nibabel (x, y, z) of a typical DeepLesion patch after the 80% crop


def make_patch_set(root: str, n: int, ext: str, shape=REAL_PATCH, seed: int = 0) -> str:
    """n int16 CT-like patches (a smooth body with noise) and their list file, once; returns
    the list file's name, relative to root."""
    list_name = f"list{ext.replace('.', '_')}.txt"
    list_path = os.path.join(root, list_name)
    if os.path.exists(list_path):
        return list_name
    os.makedirs(os.path.join(root, "DL_patches_v2"), exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = np.where(x**2 / 0.8 + y**2 / 0.5 < 1, 40.0, -1000.0)
    names = []
    for i in range(n):
        vol = body[..., None] + rng.normal(0, 20, shape)
        name = f"DL_patches_v2/bench_{i:04d}_dep0{ext}"
        nib.save(nib.Nifti1Image(vol.astype(np.int16), np.eye(4)), os.path.join(root, name))
        names.append(name)
    with open(list_path, "w") as f:
        f.write("\n".join(names) + "\n")
    return list_name


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {gpu}"


def report(name: str, rows: list[dict], columns: list[str]) -> None:
    """One JSON line, then a short table."""
    print(json.dumps({"benchmark": name, "machine": machine(), "results": rows}))
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(columns, widths)))
