"""The one patch sampler: crops, corners, foreground oversampling, from the cache and from memory."""

import numpy as np
import pytest
import torch

from downstream import cache, labelled, patches
from tools.tiny_data import write_cube_task


@pytest.fixture
def task(tmp_path):
    write_cube_task(str(tmp_path / "task"), n=3)
    return labelled.read_dataset(str(tmp_path / "task"))


def test_crops_inside_and_across_the_border_match_a_padded_array(tmp_path):
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    np.save(tmp_path / "a.npy", arr)
    padded = np.pad(arr, 4)
    for start in [(0, 0, 0), (1, 2, 3), (-2, -1, 4), (3, 4, 5), (-4, -4, -4)]:
        got = patches.crop(np.load(tmp_path / "a.npy", mmap_mode="r"), start, (4, 4, 4))
        want = padded[tuple(slice(s + 4, s + 8) for s in start)]
        np.testing.assert_array_equal(got, want)


def test_patch_starts_stay_inside_and_centre_a_patch_larger_than_the_volume():
    assert patches.patch_start((0, 10, 99), (20, 50, 100), (8, 8, 8)) == [0, 6, 92]
    assert patches.patch_start((5, 5, 5), (10, 10, 10), (16, 10, 4)) == [-3, 0, 3]


def test_patches_come_from_the_cache_centred_on_foreground_as_often_as_asked(task, tmp_path):
    records = cache.build(task.cases, 2.0, str(tmp_path / "cache"))
    torch.manual_seed(0)
    only_fg = patches.PatchDataset(records, (4, 4, 4), samples_per_volume=8, pos_ratio=1e9)
    anywhere = patches.PatchDataset(records, (4, 4, 4), samples_per_volume=8, pos_ratio=0.0)
    fg_share = []
    for ds in (only_fg, anywhere):
        hits = []
        for i in range(len(records)):
            for item in ds[i]:
                assert item["image"].shape == item["label"].shape == (1, 4, 4, 4)
                hits.append(bool(item["label"][0, 2, 2, 2]))  # the centre voxel (the box is away from the borders)
        fg_share.append(np.mean(hits))
    box = np.mean([np.load(r["label"]).mean() for r in records])  # the share of the volume that is box
    assert fg_share[0] == 1.0  # every patch centred on a foreground voxel
    assert fg_share[1] < 0.5 and abs(fg_share[1] - box) < 0.3


def test_a_volume_from_the_cache_is_the_validation_input(task, tmp_path):
    records = cache.build(task.cases, 2.0, str(tmp_path / "cache"))
    item = patches.VolumeDataset(records)[0]
    assert item["image"].shape == item["label"].shape == (1, *records[0]["shape"]) and item["image_path"] == task.cases[0]["image"]


def test_uniform_corners_reach_both_ends_of_every_axis_and_centre_a_larger_patch():
    rng = np.random.default_rng(0)
    starts = np.array([patches.draw_start((10, 6, 3), (4, 4, 5), np.zeros((0, 4)), 0.9, rng) for _ in range(400)])
    assert starts[:, 0].min() == 0 and starts[:, 0].max() == 6 and starts[:, 1].min() == 0 and starts[:, 1].max() == 2
    assert (starts[:, 2] == -1).all()  # 5 slices on an axis of 3: centred, one padded each side


def test_in_memory_patches_share_the_cache_sampler_and_keep_their_owner():
    rng = np.random.default_rng(0)
    label = np.zeros((12, 12, 12), np.uint8)
    label[1, 1, 1] = 2  # one foreground voxel in a corner
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape)
    cases = [(image, label, cache.foreground_locations(label, rng)), (image + 1, np.zeros_like(label), np.zeros((0, 4), np.int32))]
    images, labels, owners = patches.sample(cases, (4, 4, 4), 50, fg_share=1.0, rng=rng, per_case=True)
    assert images.shape == labels.shape == (100, 4, 4, 4) and owners.tolist() == [0] * 50 + [1] * 50
    assert (labels[:50] == 2).sum(axis=(1, 2, 3)).tolist() == [1] * 50  # every patch of case 0 holds its voxel
    assert not labels[50:].any()  # a case without foreground gives patches from anywhere
    first = images[0]
    start = [int(v) for v in np.argwhere(image == first[0, 0, 0])[0]]
    np.testing.assert_array_equal(first, image[tuple(slice(s, s + 4) for s in start)])
