"""Probe what a pretrained encoder learned, stage by stage, on a labelled set.

For one checkpoint (this project's or the released format) or a random initialisation of the
same arch, the teacher backbone runs on patches sampled from the labelled cases, read as
fine-tuning reads them: the pretraining orientation (1, z, x, y), `--spacing`, HU / 1024.
Per stage it reports
- a linear probe of organ presence in the patch from the globally pooled features: one ridge
  classifier per class, cross-validated with folds by case (no case in both the training and
  the test fold); AUC per class and mean;
- a frozen dense probe: a 1x1x1 linear classifier on the stage map, trained to convergence on
  the training cases' patches and scored by Dice on the held-out cases' patches, its logits
  upsampled to the patch.
A JSON line per stage and a table; deterministic for a seed, on the CPU or CUDA.

    python downstream/probe.py --data_dir data/Task03_Liver --checkpoint snapshots/desd/checkpoint.pth --arch res3d50
    python downstream/probe.py --data_dir data/Task03_Liver --random --arch res3d50      # the baseline
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

import utils
from downstream import metrics, patches
from models import create_model, list_models
from models.pretrained import load_pretrained_encoder
from models.res3d import STAGE_NAMES, STAGE_REDUCTIONS
from preprocessing.network_input import HU_SCALE
from preprocessing.runner import command_parser, entry, positive_float, run_command

PRESENT = 0.01  # an organ is "in the patch" when it covers at least this share of its voxels


def load_cases(data_dir: str, spacing: float) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """Every labelled case as (image (z, x, y) float32, label (z, x, y) uint8) at `spacing`, in
    the pretraining orientation, and the class names (background excluded)."""
    from monai.transforms import Compose

    from downstream import labelled

    data = labelled.read_dataset(data_dir)
    transform = Compose(labelled.preprocessing(spacing))
    out = []
    for case in data.cases:
        item = transform(dict(case))
        out.append((item["image"][0].numpy().astype(np.float32), item["label"][0].numpy().astype(np.uint8)))
    return out, data.class_names


def sample_patches(cases, patch: tuple[int, int, int], per_case: int, seed: int):
    """`per_case` patches of each case at uniform random positions (zero-padded where the case is
    smaller): images (N, 1, D, H, W), labels (N, D, H, W) and the case index of each."""
    anywhere = np.zeros((0, 4), np.int32)
    images, labels, owner = patches.sample(
        [(img, lab, anywhere) for img, lab in cases], patch, per_case, 0.0, np.random.default_rng(seed), per_case=True
    )
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels).long(), owner


@torch.no_grad()
def stage_maps(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 8) -> list[torch.Tensor]:
    """The four stage maps of every patch, on the CPU: 4 x (N, C_k, d_k, h_k, w_k)."""
    backbone.eval()  # instance norm without running statistics: the same in both modes
    maps: list[list[torch.Tensor]] = [[], [], [], []]
    for i in range(0, len(images), batch):
        for k, m in enumerate(backbone(images[i : i + batch].to(device))):
            maps[k].append(m.float().cpu())
    return [torch.cat(m) for m in maps]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic); NaN without both classes."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ridge_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Ridge regression of +-1 targets (one column per class) on standardised features; the
    penalty is `alpha` times the mean eigenvalue of the features' Gram matrix."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    gram = a.T @ a
    lam = alpha * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), a.T @ (2.0 * train_y - 1.0))
    return b @ w


def linear_probe(features: np.ndarray, present: np.ndarray, owner: np.ndarray, folds: int = 3) -> list[float]:
    """Out-of-fold AUC per class of a ridge classifier of presence, with folds by case."""
    cases = np.unique(owner)
    fold_of_case = {c: i % folds for i, c in enumerate(cases)}
    fold = np.array([fold_of_case[c] for c in owner])
    scores = np.zeros(present.shape, np.float64)
    for f in range(folds):
        test = fold == f
        if test.any() and (~test).any():
            scores[test] = ridge_scores(features[~test], present[~test].astype(np.float64), features[test])
    return [auc(scores[:, k], present[:, k]) for k in range(present.shape[1])]


def dense_probe(
    fmap: torch.Tensor, labels: torch.Tensor, train: np.ndarray, num_classes: int, seed: int, limit: int = 10000
) -> list[float]:
    """Dice per class (background excluded) on the held-out patches of a 1x1x1 linear classifier
    of the stage map trained to convergence on the training patches' coarse voxels (at most
    `limit` of them, `fit_linear_head`), its logits upsampled (trilinearly) to the patch.
    Upsampling and a 1x1x1 linear map commute (the interpolation weights sum to 1), so the
    classifier runs on the stage map and its logits are upsampled."""
    targets = coarse_targets(labels, fmap.shape[2:], num_classes)
    x, t = voxel_rows(fmap, targets, np.flatnonzero(train), limit, seed)
    test = torch.from_numpy(np.flatnonzero(~train))
    return dice_of(fit_linear_head(x, t), fmap[test], labels[test], num_classes)


# ============ label-efficiency probes: a converged linear head and k-NN on the coarse grid ============

FEATURE_SETS = {**{name: (k,) for k, name in enumerate(STAGE_NAMES)}, "stages1-3": (0, 1, 2)}


def stack_stages(maps: list[torch.Tensor], stages: tuple[int, ...]) -> torch.Tensor:
    """The listed stage maps side by side on the grid of the first (trilinear upsampling)."""
    size = maps[stages[0]].shape[2:]
    parts = [maps[k] if maps[k].shape[2:] == size else F.interpolate(maps[k], size=size, mode="trilinear") for k in stages]
    return torch.cat(parts, 1)


def coarse_targets(labels: torch.Tensor, size, num_classes: int) -> torch.Tensor:
    """Each class's share of every coarse voxel: (N, K, *size) from labels (N, D, H, W)."""
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()
    return F.adaptive_avg_pool3d(one_hot, tuple(size))


def voxel_rows(fmap: torch.Tensor, targets: torch.Tensor, patches: np.ndarray, limit: int, seed: int):
    """(features (M, C), soft targets (M, K)) of the coarse voxels of `patches`, at most `limit`
    of them: half drawn among voxels whose largest share is a foreground class (all of them when
    fewer), the rest among the others."""
    x = fmap[patches].permute(0, 2, 3, 4, 1).reshape(-1, fmap.shape[1])
    t = targets[patches].permute(0, 2, 3, 4, 1).reshape(-1, targets.shape[1])
    if len(x) <= limit:
        return x, t
    rng = np.random.default_rng(seed)
    fg = np.flatnonzero(t.argmax(1).numpy() > 0)
    bg = np.setdiff1d(np.arange(len(x)), fg)
    keep_fg = rng.choice(fg, min(len(fg), limit // 2), replace=False)
    keep_bg = rng.choice(bg, min(len(bg), limit - len(keep_fg)), replace=False)
    keep = torch.from_numpy(np.sort(np.concatenate([keep_fg, keep_bg])))
    return x[keep], t[keep]


def fit_linear_head(x: torch.Tensor, t: torch.Tensor, l2: float = 1e-4, max_iter: int = 100):
    """A linear classifier of soft targets `t` (M, K) on features `x` (M, C), trained to
    convergence (L-BFGS, full batch, up to `max_iter` iterations, cross-entropy with a small L2
    penalty); returns a function from (N, C, ...) feature maps to (N, K, ...) logits. Features
    are standardised on `x`."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = ((x - mean) / std).double()
    w = torch.zeros(x.shape[1], t.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(t.shape[1], dtype=torch.float64, device=x.device, requires_grad=True)
    target = t.double()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(target * F.log_softmax(z @ w + b, 1)).sum(1).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach().float(), b.detach().float()

    def head(fmap: torch.Tensor) -> torch.Tensor:
        fmap = fmap.to(mean.device)
        zmap = (fmap - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
        return torch.einsum("nc...,ck->nk...", zmap, w_) + b_.view(1, -1, 1, 1, 1)

    return head


def knn_head(x: torch.Tensor, t: torch.Tensor, k: int = 10, chunk: int = 4096, dims: int = 32, refs: int = 5000):
    """k-nearest-neighbour label transfer, no training: each voxel takes the mean soft target
    of its `k` most similar (cosine, on standardised features projected on their first `dims`
    principal axes) reference voxels, at most `refs` of the rows (evenly spaced among them);
    returns a function from feature maps to (N, K, ...) log class shares."""
    if len(x) > refs:
        pick = torch.linspace(0, len(x) - 1, refs, device=x.device).long()
        x, t = x[pick], t[pick]
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    basis = torch.linalg.svd(z, full_matrices=False).Vh[:dims].T if z.shape[1] > dims else None
    ref = F.normalize(z @ basis if basis is not None else z, dim=1)
    k = min(k, len(ref))

    def head(fmap: torch.Tensor) -> torch.Tensor:
        n, c, *grid = fmap.shape
        fmap = fmap.to(mean.device)
        q = (fmap.permute(0, 2, 3, 4, 1).reshape(-1, c) - mean) / std
        q = F.normalize(q @ basis if basis is not None else q, dim=1)
        votes = torch.cat([t[(q[i : i + chunk] @ ref.T).topk(k, dim=1).indices].mean(1) for i in range(0, len(q), chunk)])
        return votes.clamp_min(1e-6).log().reshape(n, *grid, -1).permute(0, 4, 1, 2, 3)

    return head


def dice_of(head, fmap: torch.Tensor, labels: torch.Tensor, num_classes: int, batch: int = 16, ignore: int | None = None) -> list[float]:
    """Dice per foreground class over all `labels` (N, D, H, W) of the head's coarse logits
    upsampled (trilinearly) to the patch; NaN for a class absent from prediction and truth.
    Voxels labelled `ignore` count neither way."""
    inter, total = torch.zeros(num_classes), torch.zeros(num_classes)
    with torch.no_grad():
        for i in range(0, len(fmap), batch):
            logits = F.interpolate(head(fmap[i : i + batch]), size=labels.shape[1:], mode="trilinear", align_corners=False)
            pred, truth = logits.argmax(1), labels[i : i + batch].to(logits.device)
            if ignore is not None:
                pred = torch.where(truth == ignore, ignore, pred)  # an ignored voxel matches no class of 1..K-1
            for c in range(1, num_classes):
                p, q = pred == c, truth == c
                inter[c] += (p & q).sum().item()
                total[c] += (p.sum() + q.sum()).item()
    return [float(2 * inter[c] / total[c]) if total[c] > 0 else math.nan for c in range(1, num_classes)]


def case_draws(pool: list[int], counts, draws: int, seed: int = 0) -> dict[int, list[list[int]]]:
    """For each label count, `draws` distinct subsets of the pool's cases (as many as there are
    where fewer exist; one when the count is the whole pool): the same for every encoder
    evaluated with the same seed."""
    out = {}
    for count in counts:
        count = min(int(count), len(pool))
        rng = np.random.default_rng([seed, count])
        n = min(draws, math.comb(len(pool), count))
        subsets: list[list[int]] = []
        while len(subsets) < n:
            subset = sorted(rng.choice(pool, count, replace=False).tolist())
            if subset not in subsets:
                subsets.append(subset)
        out[count] = subsets
    return out


def tiles(image: np.ndarray, label: np.ndarray, patch, pad_label: int, air: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole volume cut into non-overlapping patches, so that every voxel is scored once: the
    image (z, x, y) padded at the far ends with `air` (HU -1024 at this project's scaling) and
    the label with `pad_label`, to a multiple of `patch`: images (N, 1, *patch), labels (N, *patch)."""
    pad = [(0, -n % p) for n, p in zip(image.shape, patch)]
    img = np.pad(image, pad, constant_values=air)
    lab = np.pad(label, pad, constant_values=pad_label)
    grid = [n // p for n, p in zip(img.shape, patch)]

    def cut(a: np.ndarray) -> torch.Tensor:
        blocks = a.reshape(grid[0], patch[0], grid[1], patch[1], grid[2], patch[2]).transpose(0, 2, 4, 1, 3, 5)
        return torch.from_numpy(np.ascontiguousarray(blocks.reshape(-1, *patch)))

    return cut(img)[:, None], cut(lab).long()


def transfer_scores(
    train: tuple[torch.Tensor, torch.Tensor],
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    ignore: int,
    seed: int = 0,
    device="cpu",
    limit: int = 10000,
    max_iter: int = 100,
) -> dict:
    """Heads fitted on one scan's feature map and applied to others: the linear head (`fit_linear_head`)
    and k-NN transfer, on at most `limit` coarse voxels of `train` (feature map (N, C, ...),
    labels (N, D, H, W), no `ignore` there), each scored by Dice per foreground class on every
    test scan's tiles, the voxels labelled `ignore` left out: {"linear": {test: [dice per class]}, "knn": ...}."""
    fmap, labels = train
    x, t = voxel_rows(fmap, coarse_targets(labels, fmap.shape[2:], num_classes), np.arange(len(fmap)), limit, seed)
    x, t = x.to(device), t.to(device)
    out: dict = {}
    for kind, head in (("linear", fit_linear_head(x, t, max_iter=max_iter)), ("knn", knn_head(x, t))):
        out[kind] = {name: dice_of(head, f, lab, num_classes, ignore=ignore) for name, (f, lab) in tests.items()}
    return out


def histogram_maps(images: torch.Tensor, patch, bins: int = 18, hu_window=(-160.0, 240.0), stages: int = 3) -> torch.Tensor:
    """The no-network features of the dense probes: the share of each coarse voxel's
    region in each of `bins` intensity bins (equal widths over `hu_window`, the end bins open),
    at the grids of the first `stages` stages, upsampled to the first: (N, stages * bins, *grid)."""
    low, high = (v / HU_SCALE for v in hu_window)
    index = ((images - low) / (high - low) * bins).floor().clamp(0, bins - 1)
    grids = [tuple(max(1, p // s) for p, s in zip(patch, STAGE_REDUCTIONS[k])) for k in range(stages)]
    maps = []
    for grid in grids:
        shares = torch.cat([F.adaptive_avg_pool3d((index == k).float(), grid) for k in range(bins)], 1)
        maps.append(shares if grid == grids[0] else F.interpolate(shares, size=grids[0], mode="trilinear"))
    return torch.cat(maps, 1)


def histogram_features(images: torch.Tensor, bins: int = 32) -> np.ndarray:
    """The no-network features of a patch for the presence probe: the share of its voxels in each
    of `bins` equal intensity bins over [-1, 1] (N, bins)."""
    flat = images.reshape(len(images), -1).clamp(-1, 1)
    index = ((flat + 1) / 2 * bins).long().clamp_max(bins - 1)
    return np.stack([np.bincount(row.numpy(), minlength=bins) / row.numel() for row in index]).astype(np.float64)


def encoder_maps(
    arch: str, checkpoint: str | None, images: torch.Tensor, seed: int, device="cpu", part: str = "teacher"
) -> list[torch.Tensor]:
    """The stage maps of `images` under a checkpoint's teacher (or student) backbone, or under the
    random initialisation of `arch` drawn with `seed` (the seed-matched "none" encoder)."""
    torch.manual_seed(seed)
    backbone = create_model(arch)
    if checkpoint:
        load_pretrained_encoder(backbone, checkpoint, part=part)
    return stage_maps(backbone.to(torch.device(device)), images, torch.device(device))


@dataclasses.dataclass
class Bench:
    """The fixed ground on which encoders are compared: the patches, the held-out cases (a third
    of them), the draws of training cases per label count, and the classes present in enough
    patches for the presence AUC."""

    images: torch.Tensor  # (N, 1, D, H, W)
    labels: torch.Tensor  # (N, D, H, W)
    owner: np.ndarray  # the case of each patch
    class_names: list[str]
    held_out: list[int]
    draws: dict[int, list[list[int]]]
    present: np.ndarray  # (N, classes) organ in the patch
    scored: list[int]  # classes with a presence AUC

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1


def bench(
    cases, class_names, patch=(16, 64, 64), per_case=24, counts=(1, 2, 4, 8), draws=3, seed=0, min_present=0.1, split: int = 0
) -> Bench:
    """Sample the patches and draw the cases once, for every encoder to be scored on. `split`
    (0, 1 or 2) picks which third of the cases is held out: every third from the split-th."""
    images, labels, owner = sample_patches(cases, tuple(patch), per_case, seed)
    num_classes = len(class_names) + 1
    share = torch.stack([(labels == c).float().mean((1, 2, 3)) for c in range(1, num_classes)], 1).numpy()
    present = share >= PRESENT
    scored = [k for k in range(len(class_names)) if present[:, k].mean() >= min_present]
    b = Bench(images, labels, owner, list(class_names), [], {}, present, scored)
    return resplit(b, split, counts, draws, seed)


def resplit(b: Bench, split: int, counts=(1, 2, 4, 8), draws=3, seed=0) -> Bench:
    """The same patches with another third of the cases held out (every third from the
    split-th) and the training cases drawn again from the rest."""
    cases_idx = np.unique(b.owner).tolist()
    held_out = cases_idx[split::3]
    pool = [c for c in cases_idx if c not in held_out]
    return dataclasses.replace(b, held_out=held_out, draws=case_draws(pool, counts, draws, seed))


def label_efficiency(
    b: Bench, feature_maps: dict[str, torch.Tensor], seed: int = 0, knn_sets=None, device="cpu", limit: int = 10000, max_iter: int = 100
) -> dict:
    """Mean foreground Dice on the bench's held-out patches of a converged linear head and of k-NN
    transfer (on the feature sets in `knn_sets`, all when None), per feature set and label count,
    one value per draw of training cases (at most `limit` training voxels; the head:
    `fit_linear_head` with `max_iter`): {name: {"linear": {"count": [...]}, "knn": {...}}}, and
    each draw's Dice per foreground class under "per_class": {"linear": {"count": [[...], ...]}}.
    The heads are fitted and applied on `device`; the maps stay where they are."""
    test = np.isin(b.owner, b.held_out)
    out = {}
    for name, fmap in feature_maps.items():
        targets = coarse_targets(b.labels, fmap.shape[2:], b.num_classes)
        heads = [("linear", lambda x, t: fit_linear_head(x, t, max_iter=max_iter))] + (
            [("knn", knn_head)] if knn_sets is None or name in knn_sets else []
        )
        res: dict = {kind: {} for kind, _ in heads}
        res["per_class"] = {kind: {} for kind, _ in heads}
        for count, subsets in b.draws.items():
            count = str(count)  # as JSON keys are
            for kind, _ in heads:
                res[kind][count], res["per_class"][kind][count] = [], []
            for d, subset in enumerate(subsets):
                x, t = voxel_rows(fmap, targets, np.flatnonzero(np.isin(b.owner, subset)), limit, seed + d)
                x, t = x.to(device), t.to(device)
                for kind, make in heads:
                    dice = dice_of(make(x, t), fmap[torch.from_numpy(np.flatnonzero(test))], b.labels[test], b.num_classes)
                    res[kind][count].append(metrics.mean_or_nan(dice))
                    res["per_class"][kind][count].append(dice)
        out[name] = res
    return out


def encoder_row(
    b: Bench | list[Bench],
    maps: list[torch.Tensor],
    feature_sets=tuple(FEATURE_SETS),
    seed: int = 0,
    knn_sets=None,
    device="cpu",
    limit: int = 10000,
    max_iter: int = 100,
    every_count=None,
) -> dict:
    """One encoder's scores on the bench (or on several splits of it, `resplit`) from its stage
    maps (`encoder_maps` of `b.images`): the dense label-efficiency tables of each feature set
    (k-NN on `knn_sets`, all when None; at most `limit` training voxels and `max_iter` L-BFGS
    iterations a fit), the sets outside `every_count` (all when None) at the largest label count
    only, and the presence AUC of each stage. Several splits give one list per count, the
    splits' draws one after the other."""
    benches = b if isinstance(b, list) else [b]
    sets = {fs: stack_stages(maps, FEATURE_SETS[fs]) for fs in feature_sets}
    full = {k: v for k, v in sets.items() if every_count is None or k in every_count}
    top = {k: v for k, v in sets.items() if k not in full}
    parts = []
    for one in benches:
        part = label_efficiency(one, full, seed=seed, knn_sets=knn_sets, device=device, limit=limit, max_iter=max_iter)
        if top:
            last = max(one.draws)
            only_top = dataclasses.replace(one, draws={last: one.draws[last]})
            part.update(label_efficiency(only_top, top, seed=seed, knn_sets=knn_sets, device=device, limit=limit, max_iter=max_iter))
        parts.append(part)
    one = benches[0]
    return {
        "dense": merge_splits(parts),
        "auc": {
            STAGE_NAMES[k]: _mean_auc(m.mean((2, 3, 4)).double().numpy(), one.present, one.owner, one.scored) for k, m in enumerate(maps)
        },
    }


def merge_splits(parts: list[dict]) -> dict:
    """`label_efficiency` tables of several splits as one: per count, the draws of each split one
    after the other (a split's share is the length of its draws for that count)."""

    def merge(values: list):
        if isinstance(values[0], dict):
            return {k: merge([v[k] for v in values]) for k in values[0]}
        return [x for v in values for x in v]

    return merge(parts)


def floor_row(b: Bench | list[Bench], seed: int = 0, device="cpu", limit: int = 10000, max_iter: int = 100) -> dict:
    """The no-network row, the strongest floor at hand: the dense probes (linear and k-NN) on the
    intensity histograms of every coarse voxel at the first three stages' grids (`histogram_maps`,
    54 features on stages 1-3's grid), on each split given, and the presence AUC of the patch's
    intensity histogram."""
    benches = b if isinstance(b, list) else [b]
    maps = {"histogram": histogram_maps(benches[0].images, benches[0].images.shape[2:])}
    parts = [label_efficiency(one, maps, seed=seed, device=device, limit=limit, max_iter=max_iter) for one in benches]
    one = benches[0]
    return {
        "dense": merge_splits(parts),
        "auc": {"histogram": _mean_auc(histogram_features(one.images), one.present, one.owner, one.scored)},
    }


def sweep(
    cases,
    class_names: list[str],
    encoders: dict[str, list[torch.Tensor]] | None = None,
    patch=(16, 64, 64),
    per_case: int = 24,
    counts=(1, 2, 4, 8),
    draws: int = 3,
    seed: int = 0,
    min_present: float = 0.1,
) -> dict:
    """The label-efficiency tables of several encoders and of the no-network floor on one bench.
    `encoders`: name -> stage maps (`encoder_maps`) of the patches that
    `sample_patches(cases, patch, per_case, seed)` draws; None gives the no-network row alone.
    Presence AUC (secondary) is reported for classes present in at least `min_present` of the
    patches."""
    b = bench(cases, class_names, patch, per_case, counts, draws, seed, min_present)
    rows = {name: encoder_row(b, maps, seed=seed) for name, maps in (encoders or {}).items()}
    rows["no network"] = floor_row(b, seed)
    return {
        "held_out_cases": b.held_out,
        "draws": {str(c): v for c, v in b.draws.items()},
        "auc_classes": [class_names[k] for k in b.scored],
        "rows": rows,
    }


def _mean_auc(features: np.ndarray, present: np.ndarray, owner: np.ndarray, scored: list[int]) -> float:
    if not scored:
        return math.nan
    aucs = linear_probe(features, present[:, scored], owner)
    return float(np.nanmean(aucs))


def run_probe(
    cases, class_names: list[str], arch: str, checkpoint: str | None, patch=(16, 64, 64), per_case: int = 24, seed: int = 0, device="cpu"
) -> list[dict]:
    """The probe results of one encoder: one dict per stage."""
    b = bench(cases, class_names, patch, per_case, counts=(), seed=seed)
    maps = encoder_maps(arch, checkpoint, b.images, seed, device)
    train = ~np.isin(b.owner, b.held_out)
    results = []
    for k, fmap in enumerate(maps):
        aucs = linear_probe(fmap.mean((2, 3, 4)).double().numpy(), b.present, b.owner)
        dice = dense_probe(fmap, b.labels, train, b.num_classes, seed + k)
        results.append(
            {
                "stage": k + 1,
                "auc": dict(zip(class_names, aucs)),
                "auc_mean": metrics.mean_or_nan(aucs),
                "dense_dice": dict(zip(class_names, dice)),
                "dense_dice_mean": metrics.mean_or_nan(dice),
            }
        )
    return results


def table(results: list[dict]) -> str:
    names = list(results[0]["auc"])
    head = f"{'stage':<6}" + "".join(f"{'AUC ' + n:>14}" for n in names) + f"{'AUC mean':>10}" + f"{'dense Dice':>12}"
    rows = [head]
    for r in results:
        rows.append(
            f"{r['stage']:<6}"
            + "".join(f"{r['auc'][n]:>14.3f}" for n in names)
            + f"{r['auc_mean']:>10.3f}"
            + f"{r['dense_dice_mean']:>12.3f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Probe a DeSD encoder")
    parser.add_argument("--data_dir", required=True, help="A labelled set (Decathlon layout, dataset.json).")
    parser.add_argument("--checkpoint", default="", help="DeSD checkpoint whose teacher backbone is probed.")
    parser.add_argument("--random", action="store_true", help="Probe a random initialisation instead (the baseline).")
    parser.add_argument("--arch", default="res3d50", choices=list_models(), help="The encoder's depth (the checkpoint's).")
    parser.add_argument("--spacing", default=1.0, type=positive_float, help="The pretraining spacing in mm.")
    parser.add_argument("--patch", default=(16, 64, 64), type=int, nargs=3, help="Patch (depth, rows, cols).")
    parser.add_argument("--patches_per_case", default=24, type=int, help="Patches drawn from each labelled case.")
    parser.add_argument("--seed", default=0, type=int, help="Seed of the patches, the case draws and the random encoder.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where the encoder and heads run.")
    parser.add_argument("--json", default="", help="Also write the results here.")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == args.random:
        parser.error("give either --checkpoint or --random")
    cases, names = load_cases(args.data_dir, args.spacing)
    results = run_probe(cases, names, args.arch, args.checkpoint or None, args.patch, args.patches_per_case, args.seed, args.device)
    for r in results:
        print(json.dumps(utils.strict_json(r)))
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(utils.strict_json(results), f, indent=2)
    return 0


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
