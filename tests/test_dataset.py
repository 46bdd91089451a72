import os

import nibabel as nib
import numpy as np
import pytest
import torch

from dataset import TO_FILE_ORDER, EpochSampler, SSLDataset, ViewConfig, collate, open_volume, read_list, read_slices, views_from_crops
from tests.helpers import write_patches


def read_block(volume, rows, cols, depths, flips=()):
    """volume[rows, cols, depths] of the zero-padded (x, y, z) volume as float32 (z, x, y) / 1024,
    flipped along the given output axes: `read_slices` in the network's in-plane order."""
    read_flips = [TO_FILE_ORDER[a] for a in flips]
    return np.ascontiguousarray(read_slices(volume, rows, cols, depths, read_flips).transpose(0, 2, 1))


def test_views_have_the_published_shapes_and_dtype(patch_root):
    ds = SSLDataset(patch_root, "SSL_data_deeplesion.txt", ViewConfig(local_crops_number=2))
    views, replaced = ds[(0, 0)]
    assert replaced == 0
    assert [tuple(v.shape) for v in views] == [(1, 16, 96, 96)] * 2 + [(1, 16, 48, 48)] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_small_patches_are_padded_to_the_view_size(tmp_path):
    root = write_patches(str(tmp_path), n=1, shape=(50, 40, 9))
    views, _ = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig())[(0, 0)]
    assert [tuple(v.shape) for v in views] == [(1, 16, 96, 96)] * 2


def test_views_are_reproducible_for_a_seed_epoch_and_index_and_change_with_the_epoch(patch_root):
    ds = SSLDataset(patch_root, "SSL_data_deeplesion.txt", ViewConfig(), seed=3)
    a, _ = ds[(1, 0)]
    b, _ = ds[(1, 0)]
    c, _ = ds[(1, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def _collate_and_report_sharing(batch):
    """collate, and whether its tensors are in shared memory where it ran (a loader worker)."""
    out, bad = collate(batch)
    tensors = [*out[0], out[1]] if isinstance(out, tuple) else out
    return out, [t.is_shared() for t in tensors]


@pytest.mark.parametrize("crops_only", [False, True])
def test_a_loader_worker_collates_into_shared_memory(patch_root, crops_only):
    ds = SSLDataset(patch_root, "SSL_data_deeplesion.txt", ViewConfig(output="crops" if crops_only else "views"))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=[(0, 0), (1, 0)], num_workers=1, collate_fn=_collate_and_report_sharing)
    (batch, shared_in_worker), *_ = list(loader)
    assert all(shared_in_worker)  # made in shared memory: handed to this process without another copy
    expected, _ = collate([ds[(0, 0)], ds[(1, 0)]])  # in this process: the same views
    if crops_only:  # the crop buffers' unused corners are left uninitialised: compare the views made from them
        batch, expected = views_from_crops(*batch, ds.cfg), views_from_crops(*expected, ds.cfg)
    assert all(torch.equal(a, b) for a, b in zip(batch, expected))


def test_a_rewritten_patch_is_read_anew(tmp_path):
    path = str(tmp_path / "p.nii")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), path)
    assert open_volume(path).shape == (4, 5, 6)
    nib.save(nib.Nifti1Image(np.ones((7, 5, 3), np.int16), np.eye(4)), path)  # the header is cached per file version
    vol = open_volume(path)
    assert vol.shape == (7, 5, 3) and np.all(vol == 1)


@pytest.mark.parametrize("shape", [(80, 70, 20), (200, 180, 30), (60, 50, 9)])  # padded in-plane, enlarged; shrunk; padded in depth too
def test_views_made_on_the_device_from_raw_crops_equal_the_worker_views(tmp_path, shape):
    root = write_patches(str(tmp_path), n=2, shape=shape, ext=".nii")
    cfg = ViewConfig(local_crops_number=2, output="plain")
    worker = SSLDataset(root, "SSL_data_deeplesion.txt", cfg)
    raw = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig(local_crops_number=2, output="crops"))
    keys = [(i, e) for i in range(2) for e in range(8)]
    (crops, geometry), _ = collate([raw[key] for key in keys])
    assert crops[0].dtype == torch.int16 and tuple(geometry.shape) == (len(keys), 4, 5)
    assert set(geometry[:, :, 2:].flatten().tolist()) == {0, 1}  # both ways of every flip occur
    made = views_from_crops(crops, geometry, cfg)
    expected, _ = collate([worker[key] for key in keys])
    assert [tuple(v.shape) for v in made] == [tuple(v.shape) for v in expected]
    for a, b in zip(made, expected):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()  # float rounding of the sample positions; a misplaced sample is ~0.1


def test_network_input_is_z_x_y_as_nibabel_reads_it(tmp_path):
    x, y, z = np.meshgrid(np.arange(30), np.arange(20), np.arange(10), indexing="ij")
    arr = (x * 30 + y + z * 1000).astype(np.int16)  # nibabel order (x, y, z)
    path = str(tmp_path / "p.nii")
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    region = read_block(open_volume(path), (2, 27), (3, 18), (0, 10)) * 1024
    assert region.shape == (10, 25, 15) and region[0, 0, 0] == 2 * 30 + 3
    assert np.all(np.diff(region, axis=0) == 1000)  # depth (z) first
    assert np.all(np.diff(region, axis=1) == 30)  # then x
    assert np.all(np.diff(region, axis=2) == 1)  # then y


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_views_keep_the_z_x_y_orientation_through_resize_and_flips(tmp_path, axis):
    grids = np.meshgrid(np.arange(100), np.arange(100), np.arange(12), indexing="ij")  # (x, y, z)
    root = tmp_path / "data"
    (root / "DL_patches_v2").mkdir(parents=True)
    nib.save(nib.Nifti1Image(grids[axis].astype(np.int16), np.eye(4)), str(root / "DL_patches_v2" / "p.nii"))
    (root / "list.txt").write_text("DL_patches_v2/p.nii\n")
    ds = SSLDataset(str(root), "list.txt", ViewConfig(global_size=48, depth=8, output="plain"))
    view_axis = {0: 1, 1: 2, 2: 0}[axis]  # volume x -> view H, y -> W, z -> D
    for epoch in range(6):  # different crops, sizes and flips
        for view in ds[(0, epoch)][0]:
            v = view[0].numpy()
            for a in range(3):
                steps = np.abs(np.diff(v, axis=a))
                assert (steps.mean() > 0.5 / 1024) if a == view_axis else (steps.max() < 1e-6), (epoch, a)


def test_blocks_outside_the_volume_read_as_zero_and_flips_reverse_axes(tmp_path):
    arr = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "p.nii.gz"))
    vol = open_volume(str(tmp_path / "p.nii.gz"))
    block = read_block(vol, (-1, 5), (0, 5), (-1, 4)) * 1024
    assert block.shape == (5, 6, 5)
    assert np.all(block[0] == 0) and np.all(block[-1] == 0) and np.all(block[:, 0] == 0) and np.all(block[:, -1] == 0)
    assert np.array_equal(block[1:4, 1:5], arr.transpose(2, 0, 1))
    flipped = read_block(vol, (0, 4), (0, 5), (0, 3), flips=[0, 2]) * 1024
    assert np.array_equal(flipped, arr.transpose(2, 0, 1)[::-1, :, ::-1])


def test_intensities_are_scaled_by_1024_without_augmentation(tmp_path):
    root = write_patches(str(tmp_path), n=1, shape=(100, 100, 16))
    arr = np.asarray(nib.load(os.path.join(root, "DL_patches_v2", os.listdir(os.path.join(root, "DL_patches_v2"))[0])).dataobj)
    views, _ = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig(output="plain"))[(0, 0)]
    assert views[0].abs().max() <= 1.0
    assert views[0].max().item() <= arr.max() / 1024 + 1e-6


def test_list_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_list(str(tmp_path / "missing"), "list.txt")
    with pytest.raises(FileNotFoundError, match="list file"):
        read_list(str(tmp_path), "list.txt")
    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_list(str(tmp_path), "list.txt")
    (tmp_path / "list.txt").write_text("DL_patches_v2/nope.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="line 1.*nope.nii.gz"):
        read_list(str(tmp_path), "list.txt")


def test_list_files_skip_comments_and_a_byte_order_mark_and_name_folders_and_repeats(tmp_path, capsys):
    root = write_patches(str(tmp_path / "d"), n=2)
    names = open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split()
    listing = "\ufeff" + "# written by hand\n" + "\n".join([names[0], names[1], names[0]]) + "\n"
    (tmp_path / "d" / "hand.txt").write_text(listing, encoding="utf-8")
    assert read_list(root, "hand.txt") == [os.path.join(root, n) for n in (names[0], names[1], names[0])]
    assert "names 1 entry more than once" in capsys.readouterr().out
    (tmp_path / "d" / "hand.txt").write_text(names[0] + "\nDL_patches_v2\n")
    with pytest.raises(IsADirectoryError, match="line 2: .*DL_patches_v2' is a folder"):
        read_list(root, "hand.txt")


def test_unreadable_patch_stops_by_default_and_is_replaced_when_asked(tmp_path):
    root = write_patches(str(tmp_path), n=3)
    bad = os.path.join(root, "DL_patches_v2", sorted(os.listdir(os.path.join(root, "DL_patches_v2")))[0])
    with open(bad, "wb") as f:
        f.write(b"not a nifti")
    with pytest.raises(RuntimeError, match="cannot read patch.*000000"):
        SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig())[(0, 0)]
    views, replaced = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig(), skip_bad_patches=True)[(0, 0)]
    assert replaced == 1 and len(views) == 2


def test_sampler_splits_one_permutation_across_ranks_and_resumes_mid_epoch():
    shares = [list(EpochSampler(10, rank, 3, seed=0)) for rank in range(3)]
    flat = [i for share in shares for i, _ in share]
    assert len(flat) == 9 and len(set(flat)) == 9
    s = EpochSampler(10, 1, 3, seed=0)
    s.set_epoch(0, start=2)
    assert list(s) == shares[1][2:]
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in shares[1]] and all(e == 1 for _, e in s)


def test_batched_device_augmentation_matches_the_per_sample_path_in_distribution(tmp_path):
    from scipy import stats

    from augment.intensity import augment_views

    root = write_patches(str(tmp_path), n=1, shape=(130, 130, 24))
    n = 150
    worker = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig(global_size=48, depth=8))
    cfg = ViewConfig(global_size=48, depth=8, output="crops")
    raw = SSLDataset(root, "SSL_data_deeplesion.txt", cfg)
    per_sample = [worker[(0, e)][0] for e in range(n)]
    (crops, geometry), _ = collate([raw[(0, e)] for e in range(n)])  # what the training device gets
    batched = augment_views(views_from_crops(crops, geometry, cfg), torch.Generator().manual_seed(0))
    for k in range(2):  # each view position keeps its own probabilities
        a = torch.stack([s[k] for s in per_sample]).flatten(1)
        b = batched[k].flatten(1)
        for stat in (lambda t: t.mean(1), lambda t: t.std(1), lambda t: t.amax(1) - t.amin(1)):
            assert stats.ks_2samp(stat(a).numpy(), stat(b).numpy()).pvalue > 0.001
