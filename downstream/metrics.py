"""The segmentation loss and the scores of a prediction, for fine-tuning, the experiment and
the tools: Dice + cross-entropy with nnU-Net's ignore label left out, per-class Dice, HD95 and
NSD of one volume (MONAI's metrics), the NaN-aware mean and the per-class table."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F


def masked_dice_ce(logits: torch.Tensor, label: torch.Tensor, ignore: int | None) -> torch.Tensor:
    """Dice + cross-entropy, leaving out the voxels labelled `ignore` (nnU-Net's ignore label)."""
    if ignore is None:
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    target = label[:, 0].long()
    keep = target != ignore
    target = torch.where(keep, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits, target, reduction="none")[keep].mean()
    probs = F.softmax(logits, 1) * keep[:, None]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3) * keep[:, None]
    dims = (0, 2, 3, 4)
    dice = 1 - (2 * (probs * onehot).sum(dims) + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
    return ce + dice.mean()


def case_scores(
    pred: torch.Tensor,
    label: torch.Tensor,
    num_classes: int,
    ignore: int | None = None,
    spacing: float = 1.0,
    tolerance: float | None = 2.0,
) -> torch.Tensor:
    """Per-class Dice, HD95 and NSD (mm) of one predicted class map against its truth, both
    (D, H, W); (3, num_classes - 1), background excluded. Voxels whose truth is `ignore` count
    for neither (they are background in both before scoring). A class absent from the truth
    scores NaN; HD95 is NaN unless both surfaces exist. tolerance=None skips HD95 and NSD (NaN)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    label = label.long()
    if ignore is not None:
        keep = label != ignore
        pred, label = pred * keep, label * keep
    if int(label.max()) >= num_classes:
        raise ValueError(f"label value {int(label.max())} outside the {num_classes} classes")
    pred = F.one_hot(pred.long()[None], num_classes).permute(0, 4, 1, 2, 3)
    truth = F.one_hot(label[None], num_classes).permute(0, 4, 1, 2, 3)
    dice = compute_dice(pred, truth, include_background=False, ignore_empty=True).float().cpu()[0]
    if tolerance is None:
        return torch.stack([dice, torch.full_like(dice, math.nan), torch.full_like(dice, math.nan)])
    absent = truth[0, 1:].flatten(1).sum(-1).cpu() == 0
    predicted_empty = pred[0, 1:].flatten(1).sum(-1).cpu() == 0
    with warnings.catch_warnings():
        # an empty prediction or truth is handled below (NaN, explained under the table), and MONAI
        # 1.5 warns about an argument its own metrics pass: neither is the user's to act on
        warnings.filterwarnings("ignore", message=r"the (prediction|ground truth) of class", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(pred, truth, include_background=False, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(pred, truth, [tolerance] * (num_classes - 1), include_background=False, spacing=spacing)
    hd, nsd = hd.float().cpu()[0], nsd.float().cpu()[0]
    hd[absent | predicted_empty | ~torch.isfinite(hd)] = math.nan  # undefined without both surfaces
    nsd[absent] = math.nan
    return torch.stack([dice, hd, nsd])


def mean_or_nan(values) -> float:
    """The mean of the values that are neither None nor NaN; NaN where none is."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def dice_table(columns: dict[str, list[float]], names: list[str]) -> str:
    """Per-class values of one or more runs (or metrics), side by side; None prints as nan."""
    width = max(len(n) for n in [*names, "mean"]) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{c:>14}" for c in columns)]
    values = {k: [math.nan if x is None else x for x in v] for k, v in columns.items()}
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}" + "".join(f"{v[i]:>14.4f}" for v in values.values()))
    lines.append(f"{'mean':<{width}}" + "".join(f"{mean_or_nan(v):>14.4f}" for v in values.values()))
    if any(math.isnan(x) for v in values.values() for x in v):
        lines.append("nan: undefined for that case or class (HD95 needs a surface in both the prediction and the truth)")
    return "\n".join(lines)
