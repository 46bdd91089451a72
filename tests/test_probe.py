"""The probe's arithmetic on hand-made features with known answers."""

import numpy as np
import pytest
import torch

import probe


def test_auc_is_the_mann_whitney_statistic():
    assert probe.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert np.isnan(probe.auc(np.array([1.0, 2.0]), np.array([True, True])))


def test_linear_probe_gives_auc_1_on_separable_classes_and_about_half_on_shuffled_labels():
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(12), 20)  # 12 cases of 20 patches
    present = rng.random((240, 2)) < 0.4
    features = rng.normal(size=(240, 16))
    features[:, 0] += 4.0 * present[:, 0]  # class 0 is written into feature 0, class 1 into feature 1
    features[:, 1] += 4.0 * present[:, 1]
    assert probe.linear_probe(features, present, owner) == pytest.approx([1.0, 1.0], abs=0.01)
    shuffled = [probe.linear_probe(features, rng.permutation(present), owner) for _ in range(20)]
    assert abs(np.mean(shuffled) - 0.5) < 0.05


def test_linear_probe_folds_never_hold_one_case_in_both_train_and_test(monkeypatch):
    owner = np.repeat(np.arange(7), 5)
    seen = []
    original = probe.ridge_scores

    def spy(train_x, train_y, test_x, alpha=1.0):
        seen.append((set(train_x[:, -1].astype(int)), set(test_x[:, -1].astype(int))))
        return original(train_x, train_y, test_x, alpha)

    monkeypatch.setattr(probe, "ridge_scores", spy)
    features = np.c_[np.random.default_rng(1).normal(size=(35, 3)), owner]  # the last column names the case
    probe.linear_probe(features, np.random.default_rng(2).random((35, 1)) < 0.5, owner)
    assert len(seen) == 3 and all(not (tr & te) for tr, te in seen)
    assert set().union(*(te for _, te in seen)) == set(range(7))


def test_dense_probe_finds_a_class_written_into_one_channel():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(8, 4, 8, 8, generator=g) < 0.3).long()  # (N, D, H, W), one foreground class
    fmap = torch.randn(8, 3, 4, 8, 8, generator=g) * 0.1
    fmap[:, 0] += 3.0 * labels.float()  # a stage map at the patch resolution, the class in channel 0
    train = np.array([True] * 6 + [False] * 2)
    assert probe.dense_probe(fmap, labels, train, 2, seed=0)[0] > 0.95
    noise = torch.randn(8, 3, 4, 8, 8, generator=g)
    assert probe.dense_probe(noise, labels, train, 2, seed=0)[0] < 0.6
