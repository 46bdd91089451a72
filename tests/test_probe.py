"""The probe's arithmetic on hand-made features with known answers."""

import numpy as np
import pytest
import torch

from downstream import probe


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


def planted(n=12, seed=0, strength=3.0):
    """Patches (N, D, H, W) of one foreground class and a coarse feature map (stride 2) whose
    channel 0 carries that class's share of each coarse voxel."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, 4, 4, 4, generator=g) < 0.3).long()
    labels = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)  # (n, 8, 8, 8)
    fmap = torch.randn(n, 4, 4, 4, 4, generator=g) * 0.1
    fmap[:, 0] += strength * coarse.float()
    return fmap, labels


def test_a_converged_linear_head_and_knn_find_a_class_written_into_one_channel():
    fmap, labels = planted()
    targets = probe.coarse_targets(labels, fmap.shape[2:], 2)
    assert torch.allclose(targets[:, 1], (labels[:, ::2, ::2, ::2]).float())  # each coarse voxel is one class here
    x, t = probe.voxel_rows(fmap, targets, np.arange(8), limit=10**6, seed=0)
    test = torch.arange(8, 12)
    assert probe.dice_of(probe.fit_linear_head(x, t), fmap[test], labels[test], 2)[0] > 0.9  # trilinear upsampling blurs edges
    assert probe.dice_of(probe.knn_head(x, t, k=5), fmap[test], labels[test], 2)[0] > 0.9
    noise = torch.randn_like(fmap)
    xn, tn = probe.voxel_rows(noise, targets, np.arange(8), limit=10**6, seed=0)
    assert probe.dice_of(probe.fit_linear_head(xn, tn), noise[test], labels[test], 2)[0] < 0.6
    assert probe.dice_of(probe.knn_head(xn, tn, k=5), noise[test], labels[test], 2)[0] < 0.6


def test_voxel_rows_keep_half_foreground_when_subsampling():
    fmap, labels = planted(seed=1)
    targets = probe.coarse_targets(labels, fmap.shape[2:], 2)
    x, t = probe.voxel_rows(fmap, targets, np.arange(12), limit=200, seed=0)
    assert x.shape == (200, 4) and int((t.argmax(1) > 0).sum()) == 100


def test_case_draws_are_distinct_subsets_of_the_pool_and_the_same_for_every_encoder():
    pool = [1, 2, 4, 5, 7, 8, 10, 11]
    draws = probe.case_draws(pool, (1, 2, 4, 8), 3, seed=0)
    assert [len(draws[c]) for c in (1, 2, 4, 8)] == [3, 3, 3, 1] and draws[8] == [pool]
    assert all(len(s) == c and set(s) <= set(pool) for c in (1, 2, 4) for s in draws[c])
    assert all(len({tuple(s) for s in draws[c]}) == len(draws[c]) for c in draws)  # no subset drawn twice
    assert probe.case_draws(pool, (1, 2, 4, 8), 3, seed=0) == draws
    assert sorted(probe.case_draws([3, 9], (1,), 3)[1]) == [[3], [9]]  # only two distinct subsets exist


def test_the_no_network_features_see_intensity_and_nothing_else():
    images = torch.zeros(2, 1, 4, 4, 4)
    images[1] = 0.5
    hist = probe.histogram_features(images, bins=4)
    assert np.allclose(hist.sum(1), 1) and hist[0, 2] == 1 and hist[1, 3] == 1


def test_stages_stack_on_the_first_ones_grid():
    maps = [torch.randn(2, 3, 4, 8, 8), torch.randn(2, 5, 2, 4, 4), torch.randn(2, 7, 1, 2, 2)]
    stacked = probe.stack_stages(maps, (0, 1, 2))
    assert stacked.shape == (2, 15, 4, 8, 8) and torch.equal(stacked[:, :3], maps[0])


def test_histogram_maps_give_each_coarse_voxels_bin_shares_at_three_grids():
    import torch

    from downstream import probe

    images = torch.linspace(-0.3, 0.4, 16 * 64 * 64).reshape(1, 1, 16, 64, 64).repeat(2, 1, 1, 1, 1)
    maps = probe.histogram_maps(images, (16, 64, 64))
    assert maps.shape == (2, 54, 8, 16, 16)  # 18 bins at stages 1-3, on the stage-1 grid
    sums = maps.view(2, 3, 18, 8, 16, 16).sum(2)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)  # shares of every region add up to 1
    assert maps[:, :18].argmax(1)[0, 0, 0, 0] == 0 and maps[:, :18].argmax(1)[0, -1, -1, -1] == 17  # air low, dense high


def test_three_splits_hold_out_disjoint_thirds_and_their_draws_follow_each_other():
    images = torch.zeros(12, 1, 4, 8, 8)
    labels = torch.zeros(12, 4, 8, 8, dtype=torch.long)
    labels[:, :2] = 1
    owner = np.repeat(np.arange(6), 2)
    b = probe.Bench(images, labels, owner, ["organ"], [], {}, np.ones((12, 1), bool), [0])
    splits = [probe.resplit(b, k, counts=(1, 4), draws=2) for k in range(3)]
    assert [s.held_out for s in splits] == [[0, 3], [1, 4], [2, 5]]
    for s in splits:  # the training draws never touch the held-out cases
        assert all(not set(d) & set(s.held_out) for subsets in s.draws.values() for d in subsets)
        assert len(s.draws[1]) == 2 and len(s.draws[4]) == 1
    a = {"linear": {"1": [0.1, 0.2], "4": [0.3]}, "per_class": {"linear": {"1": [[0.1], [0.2]], "4": [[0.3]]}}}
    c = {"linear": {"1": [0.4, 0.5], "4": [0.6]}, "per_class": {"linear": {"1": [[0.4], [0.5]], "4": [[0.6]]}}}
    merged = probe.merge_splits([{"x": a}, {"x": c}])
    assert merged["x"]["linear"] == {"1": [0.1, 0.2, 0.4, 0.5], "4": [0.3, 0.6]}
    assert merged["x"]["per_class"]["linear"]["4"] == [[0.3], [0.6]]


def test_tiles_cut_a_volume_into_patches_that_hold_every_voxel_once():
    rng = np.random.default_rng(0)
    image = rng.random((5, 9, 7)).astype(np.float32)
    label = rng.integers(0, 3, (5, 9, 7)).astype(np.uint8)
    imgs, labs = probe.tiles(image, label, (2, 4, 4), pad_label=9)
    assert imgs.shape == (3 * 3 * 2, 1, 2, 4, 4) and labs.shape == (18, 2, 4, 4)
    # the patches put back together give the padded volume: the image and label at their places
    whole = imgs[:, 0].reshape(3, 3, 2, 2, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(6, 12, 8)
    back = labs.reshape(3, 3, 2, 2, 4, 4).permute(0, 3, 1, 4, 2, 5).reshape(6, 12, 8)
    assert torch.equal(whole[:5, :9, :7], torch.from_numpy(image)) and torch.equal(back[:5, :9, :7], torch.from_numpy(label).long())
    assert (whole[5:] == -1).all() and (whole[:, 9:] == -1).all() and (whole[:, :, 7:] == -1).all()  # air
    assert int((back == 9).sum()) == 6 * 12 * 8 - 5 * 9 * 7  # the padding, and only it, has the pad label


def test_dice_leaves_out_ignored_voxels_on_both_sides():
    labels = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    labels[0, :, :2] = 1  # the class in the first half
    labels[0, :, 3] = 7  # an ignored row, which the head also calls the class
    fmap = torch.zeros(1, 1, 2, 4, 4)
    fmap[0, 0, :, :2] = 1.0
    fmap[0, 0, :, 3] = 1.0

    def head(f):
        return torch.cat([1 - f, f], 1)  # logits: class 1 where the channel is 1

    background = torch.where(labels == 7, 0, labels)
    assert probe.dice_of(head, fmap, background, 2)[0] == pytest.approx(2 * 16 / (24 + 16))  # the row a false positive
    assert probe.dice_of(head, fmap, labels, 2, ignore=7)[0] == pytest.approx(1.0)  # the row left out


def test_transfer_scores_fit_on_one_scan_and_score_each_other():
    fmap, labels = planted(n=16, seed=2)
    test_labels = labels[8:].clone()
    test_labels[:, :, :, :2] = 7  # a strip of unlabelled voxels
    out = probe.transfer_scores((fmap[:8], labels[:8]), {"a": (fmap[8:], labels[8:]), "b": (fmap[8:], test_labels)}, 2, ignore=7)
    assert set(out) == {"linear", "knn"} and set(out["linear"]) == {"a", "b"}
    assert all(out[h][s][0] > 0.9 for h in out for s in ("a", "b"))
    noise = torch.randn_like(fmap)
    assert probe.transfer_scores((noise[:8], labels[:8]), {"a": (noise[8:], labels[8:])}, 2, ignore=7)["linear"]["a"][0] < 0.6
