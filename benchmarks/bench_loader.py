"""Loader throughput: training samples per second (2 global views of 16 x 96 x 96, no local
crops) from generated patches of the real size (nibabel 286 x 286 x 24 int16).

Modes: the worker reads, crops, resizes, flips and augments (with the compiled intensity chain
where a C compiler built it, and with the torch chain); or it only reads the raw crops, the
resize, flips and intensity augmentation running batched on the training device (timed on
their own on --aug_device).
One process (single-threaded; samples collated into batches of 32 as a worker does; the median
of --rounds timings), then --workers loader processes.

    python benchmarks/bench_loader.py                 # CPU defaults, a minute or two
    python benchmarks/bench_loader.py --workers 8 --aug_device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import report  # noqa: I001

from augment import native_chain
from augment.intensity import augment_views
from dataset import SSLDataset, ViewConfig, collate, init_worker, keep_freed_memory, views_from_crops
from tools.tiny_data import make_patch_set


def samples_per_second_single(ds: SSLDataset, n: int, rounds: int, batch: int = 32) -> float:
    """The median of `rounds` timings of n samples each (a shared machine's speed varies),
    collated into batches as a loader worker does."""
    collate([ds[(0, 0)]])  # warm-up
    rates = []
    for r in range(rounds):
        start = time.perf_counter()
        for first in range(0, n, batch):
            collate([ds[(i % len(ds), 1 + r)] for i in range(first, min(first + batch, n))])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def samples_per_second_workers(ds: SSLDataset, n: int, workers: int, batch: int = 32) -> float:
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, sampler=[(i % len(ds), 1) for i in range(n + 4 * batch * workers)], num_workers=workers,
        collate_fn=collate, prefetch_factor=4, persistent_workers=False, worker_init_fn=init_worker,
    )  # fmt: skip
    it = iter(loader)
    for _ in range(2 * workers):  # let every worker start
        next(it)
    start, count = time.perf_counter(), 0
    for views, _ in it:
        count += len(views[1] if isinstance(views, tuple) else views[0])  # output "crops": (crops, geometry)
        if count >= n:
            break
    return count / (time.perf_counter() - start)


def device_aug_seconds_per_sample(ds: SSLDataset, device: str, batch: int = 64, repeats: int = 5) -> float:
    """Seconds per sample for the training device's share in the crops-only mode: views from
    the raw crops (resize, flips) and the intensity augmentation, batched."""
    (crops, geometry), _ = collate([ds[(i % len(ds), 0)] for i in range(batch)])
    crops, geometry = [c.to(device) for c in crops], geometry.to(device)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        return augment_views(views_from_crops(crops, geometry, ds.cfg), g)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (repeats * batch)


def main() -> None:
    parser = argparse.ArgumentParser("loader benchmark")
    parser.add_argument("--root", default="bench_data")
    parser.add_argument("--patches", default=64, type=int)
    parser.add_argument("--samples", default=200, type=int, help="Samples timed per configuration.")
    parser.add_argument("--rounds", default=3, type=int, help="One-process figures: the median of this many timings.")
    parser.add_argument("--workers", default=2, type=int)
    parser.add_argument("--aug_device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as in a training loader's workers

    library = native_chain.library()  # the compiled intensity chain, or None (no C compiler)
    compiled = library is not None
    rows = []
    for ext in (".nii", ".nii.gz"):
        list_path = make_patch_set(args.root, args.patches, ext)
        modes = [("read+crop+augment (compiled chain)", ViewConfig(), True)] * compiled + [
            ("read+crop+augment (torch chain)", ViewConfig(), False),
            ("raw crops (views+augment on device)", ViewConfig(output="crops"), compiled),
        ]
        for mode, cfg, use_compiled in modes:
            native_chain._library = library if use_compiled else False  # forked workers inherit the choice
            ds = SSLDataset(args.root, list_path, cfg)
            single = samples_per_second_single(ds, args.samples, args.rounds)
            multi = samples_per_second_workers(ds, args.samples * args.workers, args.workers) if args.workers > 0 else float("nan")
            rows.append({"format": ext, "worker does": mode, "1 process": round(single, 1), f"{args.workers} workers": round(multi, 1)})
    native_chain._library = library
    torch.set_num_threads(torch.get_num_threads() if args.aug_device == "cuda" else 1)
    aug = device_aug_seconds_per_sample(SSLDataset(args.root, list_path, ViewConfig(output="crops")), args.aug_device)
    rows.append(
        {"format": "-", "worker does": f"(views + augmentation batched on {args.aug_device}, 1 thread)", "1 process": round(1 / aug, 1)}
    )
    report("loader samples/s", rows, ["format", "worker does", "1 process", f"{args.workers} workers"])


if __name__ == "__main__":
    main()
