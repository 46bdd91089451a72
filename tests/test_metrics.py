"""The scores of a prediction: Dice, HD95, NSD with nnU-Net's ignore label left out."""

import argparse
import math
import warnings

import pytest
import torch

import finetune
from downstream import metrics


def _truth_with_ignore() -> torch.Tensor:
    label = torch.zeros(12, 12, 12, dtype=torch.long)
    label[2:6, 2:6, 2:6] = 1
    label[7:11, 7:11, 7:11] = 2
    label[:, :, 0] = 3  # nnU-Net's ignore label: the highest value, one past the classes
    return label


def test_a_perfect_prediction_scores_one_whatever_it_says_on_ignored_voxels():
    label = _truth_with_ignore()
    for on_ignored in (0, 1, 2):
        pred = torch.where(label == 3, torch.full_like(label, on_ignored), label)
        scores = metrics.case_scores(pred, label, num_classes=3, ignore=3)
        assert scores[0].tolist() == [1.0, 1.0]  # Dice
        assert scores[1].tolist() == [0.0, 0.0] and scores[2].tolist() == [1.0, 1.0]  # HD95, NSD


def test_an_empty_prediction_scores_nan_hd95_in_silence():
    label = _truth_with_ignore()
    pred = torch.where(label == 2, torch.zeros_like(label), label)  # class 2 never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's "prediction of class 2 is all 0" would raise here
        scores = metrics.case_scores(pred, label, num_classes=3, ignore=3)
    assert scores[0, 1] == 0.0 and math.isnan(scores[1, 1]) and scores[2, 1] == 0.0


def test_a_label_value_outside_the_classes_is_refused_unless_it_is_the_ignore_label():
    label = _truth_with_ignore()
    with pytest.raises(ValueError, match="label value 3 outside the 3 classes"):
        metrics.case_scores(label.clamp(max=2), label, num_classes=3)


class _Oracle(torch.nn.Module):
    """Logits that pick the true class (background on ignored voxels)."""

    def __init__(self, label: torch.Tensor):
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = self.label.clamp(max=2) * (self.label != 3)
        return torch.nn.functional.one_hot(target, 3).permute(3, 0, 1, 2)[None].float().expand(x.shape[0], -1, -1, -1, -1)


def test_validation_with_an_ignore_label_gives_a_perfect_prediction_dice_one():
    label = _truth_with_ignore()
    loader = [
        {"image": torch.zeros(1, 1, 12, 12, 12), "label": label[None, None].to(torch.uint8), "id": ["c0"], "image_path": ["c0.nii.gz"]}
    ]
    args = argparse.Namespace(patch_size=[12, 12, 12], sw_batch_size=1, sw_overlap=0.0, use_bf16=False, spacing=1.0, nsd_tolerance=2.0)
    scores = finetune.evaluate(_Oracle(label), loader, 3, args, torch.device("cpu"), ignore=3)
    assert scores["dice"] == [1.0, 1.0] and scores["nsd"] == [1.0, 1.0]
    assert not any(math.isnan(v) for v in scores["hd95"])


def test_the_nan_aware_mean_skips_none_and_nan_and_is_nan_when_nothing_is_left():
    assert metrics.mean_or_nan([1.0, None, math.nan, 3.0]) == 2.0
    assert math.isnan(metrics.mean_or_nan([None, math.nan]))
