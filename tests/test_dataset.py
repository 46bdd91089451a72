import os

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

import augment
import native_chain
from augment import (
    GLOBAL_1,
    GLOBAL_2,
    LOCAL,
    IntensityProbs,
    apply_intensity,
    augment_intensity,
    draw_intensity_params,
    gaussian_blur_slices_,
)
from dataset import TO_FILE_ORDER, EpochSampler, SSLDataset, ViewConfig, collate, open_volume, read_list, read_slices, views_from_crops
from tests.conftest import write_patches


def read_block(volume, rows, cols, depths, flips=()):
    """volume[rows, cols, depths] of the zero-padded (x, y, z) volume as float32 (z, x, y) / 1024,
    flipped along the given output axes: `read_slices` in the network's in-plane order."""
    read_flips = [TO_FILE_ORDER[a] for a in flips]
    return np.ascontiguousarray(read_slices(volume, rows, cols, depths, read_flips).transpose(0, 2, 1))


def gaussian_blur_slices(x, sigma, apply):
    """`gaussian_blur_slices_` on a copy of x."""
    return gaussian_blur_slices_(x.clone(), sigma, apply)


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
    ds = SSLDataset(patch_root, "SSL_data_deeplesion.txt", ViewConfig(intensity=not crops_only, crops_only=crops_only))
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
    cfg = ViewConfig(local_crops_number=2, intensity=False)
    worker = SSLDataset(root, "SSL_data_deeplesion.txt", cfg)
    raw = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig(local_crops_number=2, intensity=False, crops_only=True))
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
    ds = SSLDataset(str(root), "list.txt", ViewConfig(global_size=48, depth=8, intensity=False))
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
    views, _ = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig(intensity=False))[(0, 0)]
    assert views[0].abs().max() <= 1.0
    assert views[0].max().item() <= arr.max() / 1024 + 1e-6


def blur_probs(**kw):
    base = dict(
        blur=1.0, blur_slice=1.0, brightness_mul=0.0, brightness_add=0.0, brightness_add_slice=0.0, gamma=0.0, noise=0.0, contrast=0.0
    )
    base.update(kw)
    return IntensityProbs(**base)


# wider than two kernel radii (several row blocks of the band), narrower, narrower than one
@pytest.mark.parametrize("side", [(96, 96), (40, 48), (20, 24), (11, 9), (5, 3)])
@pytest.mark.parametrize("accelerator_path", [False, True])
def test_slice_blur_equals_scipy_gaussian_filter_per_slice(side, accelerator_path, monkeypatch):
    if accelerator_path:  # every slice filtered, identity kernels where no blur applies
        monkeypatch.setattr(augment, "host_reads_are_free", lambda device: False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, *side)).astype(np.float32)
    sigma = rng.uniform(0.1, 2.0, size=(2, 3))
    apply = np.array([[True, False, True], [True, True, False]])
    out = gaussian_blur_slices(torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(apply)).numpy()
    for b in range(2):
        for d in range(3):
            ref = ndi.gaussian_filter(x[b, d].astype(np.float64), sigma[b, d], mode="reflect", truncate=4.0) if apply[b, d] else x[b, d]
            assert np.allclose(out[b, d], ref, atol=1e-5)


@pytest.mark.parametrize("per_slice", [True, False])
@pytest.mark.parametrize("path", ["compiled", "torch", "torch, accelerator"])
def test_fused_intensity_chain_equals_the_steps_one_after_the_other(per_slice, path, monkeypatch):
    if path == "compiled" and native_chain.library() is None:
        pytest.skip("no C compiler: the compiled chain cannot be built here")
    if path == "torch, accelerator":  # the code path of CUDA (no host reads), run on the CPU
        monkeypatch.setattr(augment, "host_reads_are_free", lambda device: False)
    b, d = 3, 16
    x = torch.rand(b, d, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    g = torch.Generator().manual_seed(3)
    params = draw_intensity_params(b, d, [GLOBAL_1, GLOBAL_2, LOCAL], g, per_slice)
    noise = torch.randn(x.shape, generator=g)
    fused = apply_intensity(x.clone(), params, noise.clone(), native=path == "compiled").double().numpy()
    # docs/method.md, section 3, step by step in float64, per unit (a slice, or the whole view)
    p = {k: v.double().numpy() if v.dtype != torch.bool else v.numpy() for k, v in params.items()}
    ref = x.double().numpy() + noise.double().numpy() * p["noise_std"].reshape(b, 1, 1, 1)
    units = p["blur_sigma"].shape[1]
    for i in range(b):
        for s in range(d):
            u = s * units // d
            if p["blur_on"][i, u]:
                ref[i, s] = ndi.gaussian_filter(ref[i, s], p["blur_sigma"][i, u], mode="reflect", truncate=4.0)
    ref = ref.reshape(b, units, -1)
    for i in range(b):
        for u in range(units):
            v = ref[i, u] * p["brightness_mul"][i, u] + p["brightness_add"][i, u]
            lo, hi, mean = v.min(), v.max(), v.mean()
            v = np.clip((v - mean) * p["contrast"][i, u] + mean, lo, hi)
            if p["gamma_on"][i, u]:
                lo, span, mean, std = v.min(), v.max() - v.min(), v.mean(), v.std()
                v = ((v - lo) / span) ** p["gamma"][i, u] * span + lo
                v = (v - v.mean()) / v.std() * std + mean
            ref[i, u] = v
    assert np.abs(fused - ref.reshape(fused.shape)).max() < 2e-4


def test_per_slice_mode_draws_per_slice_and_volume_mode_once_per_view():
    x = torch.zeros(1, 16, 32, 32) + torch.linspace(-0.5, 0.5, 32)
    only_mul = blur_probs(blur=0.0, brightness_mul=1.0)
    g = torch.Generator().manual_seed(0)
    per_slice = augment_intensity(x, only_mul, g, per_slice=True)
    factors = per_slice[0, :, 0, -1] / x[0, :, 0, -1]
    assert factors.unique().numel() == 16
    per_view = augment_intensity(x, only_mul, torch.Generator().manual_seed(0), per_slice=False)
    assert (per_view[0, :, 0, -1] / x[0, :, 0, -1]).unique().numel() == 1


def test_gamma_keeps_each_slice_mean_and_std_and_contrast_keeps_its_range():
    x = torch.rand(4, 8, 24, 24, generator=torch.Generator().manual_seed(1))
    gamma_only = blur_probs(blur=0.0, gamma=1.0)
    y = augment_intensity(x, gamma_only, torch.Generator().manual_seed(0))
    assert torch.allclose(y.mean((-1, -2)), x.mean((-1, -2)), atol=1e-5)
    assert torch.allclose(y.std((-1, -2), unbiased=False), x.std((-1, -2), unbiased=False), atol=1e-5)
    assert not torch.allclose(y, x)
    contrast_only = blur_probs(blur=0.0, contrast=1.0)
    z = augment_intensity(x, contrast_only, torch.Generator().manual_seed(0))
    assert (z.amin((-1, -2)) >= x.amin((-1, -2)) - 1e-6).all() and (z.amax((-1, -2)) <= x.amax((-1, -2)) + 1e-6).all()


def test_view_probabilities_show_in_the_fraction_of_blurred_views():
    x = torch.randn(400, 1, 16, 16)
    only_blur = blur_probs(blur=0.8, blur_slice=1.0)
    y = augment_intensity(x, only_blur, torch.Generator().manual_seed(0))
    blurred = (y - x).abs().flatten(1).amax(1) > 1e-6
    assert 0.72 < blurred.float().mean().item() < 0.88


def test_noise_std_is_uniform_up_to_point_one():
    x = torch.zeros(2000, 8, 32, 32)  # 8192 voxels a view: a view's sample std is within 0.8% of its std
    noise_only = blur_probs(blur=0.0, noise=1.0)
    stds = augment_intensity(x, noise_only, torch.Generator().manual_seed(0)).flatten(1).std(1)
    assert stds.max().item() < 0.104 and abs(stds.mean().item() - 0.05) < 0.003


@pytest.mark.parametrize("probs", [GLOBAL_1, GLOBAL_2, LOCAL], ids=["global 1", "global 2", "local"])
def test_drawn_parameters_follow_the_published_distributions(probs):
    """docs/method.md section 3's table, parameter by parameter, on 4,000 views of 16 slices (a
    proportion's standard error is below 0.008 even per view; the tolerance is 0.03)."""
    n, d = 4000, 16
    p = {k: v.double() for k, v in draw_intensity_params(n, d, probs, torch.Generator().manual_seed(5)).items()}

    def close(values, expected):  # the mean of values (a fraction, for flags)
        mean = values.double().mean().item()
        assert abs(mean - expected) < 0.03, (mean, expected)

    assert ((p["noise_std"] >= 0) & (p["noise_std"] < 0.1)).all()
    close(p["noise_std"] / 0.1, 0.5)
    # blur: p per view, then slice p per slice; sigma U(0.1, 2)
    close(p["blur_on"], probs.blur * probs.blur_slice)
    close((~p["blur_on"].bool()).all(1), 1 - probs.blur + probs.blur * (1 - probs.blur_slice) ** d)
    assert ((p["blur_sigma"] >= 0.1) & (p["blur_sigma"] < 2.0)).all()
    close((p["blur_sigma"] - 0.1) / 1.9, 0.5)
    # brightness x: per view p, a factor U(0.75, 1.25) per slice
    scaled = p["brightness_mul"] != 1
    close(scaled.all(1), probs.brightness_mul)
    assert (scaled.all(1) | ~scaled.any(1)).all()
    assert ((p["brightness_mul"] >= 0.75) & (p["brightness_mul"] < 1.25)).all()
    close(p["brightness_mul"][scaled], 1.0)
    # brightness +: per view p, slice p, N(0, 0.4)
    shifted = p["brightness_add"] != 0
    close(shifted, probs.brightness_add * probs.brightness_add_slice)
    close(p["brightness_add"][shifted].std() / 0.4, 1.0)
    close(p["brightness_add"][shifted], 0.0)
    # contrast: every view; per slice half the time U(0.75, 1), else U(1, 1.25)
    c = p["contrast"]
    assert ((c >= 0.75) & (c <= 1.25)).all()
    close(c < 1, 0.5)
    close(c[c < 1], 0.875)
    close(c[c >= 1], 1.125)
    # gamma: per view p; per slice half the time U(0.7, 1), else U(1, 1.5)
    gm = p["gamma"]
    close(p["gamma_on"].bool().all(1), probs.gamma)
    assert (p["gamma_on"].bool().all(1) | ~p["gamma_on"].bool().any(1)).all()
    assert ((gm >= 0.7) & (gm <= 1.5)).all()
    close(gm < 1, 0.5)
    close(gm[gm < 1], 0.85)
    close(gm[gm >= 1] - 1.0, 0.25)


def test_full_chain_is_finite_and_changes_the_view():
    x = torch.rand(3, 16, 32, 32) * 2 - 1
    y = augment_intensity(x, GLOBAL_1, torch.Generator().manual_seed(0))
    assert torch.isfinite(y).all() and not torch.allclose(x, y)


def test_list_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_list(str(tmp_path / "missing"), "list.txt")
    with pytest.raises(FileNotFoundError, match="list file"):
        read_list(str(tmp_path), "list.txt")
    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_list(str(tmp_path), "list.txt")
    (tmp_path / "list.txt").write_text("DL_patches_v2/nope.nii.gz\n")
    with pytest.raises(FileNotFoundError, match="entry 1.*nope.nii.gz"):
        read_list(str(tmp_path), "list.txt")


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

    from augment import augment_views

    root = write_patches(str(tmp_path), n=1, shape=(130, 130, 24))
    n = 150
    worker = SSLDataset(root, "SSL_data_deeplesion.txt", ViewConfig(global_size=48, depth=8))
    cfg = ViewConfig(global_size=48, depth=8, intensity=False, crops_only=True)
    raw = SSLDataset(root, "SSL_data_deeplesion.txt", cfg)
    per_sample = [worker[(0, e)][0] for e in range(n)]
    (crops, geometry), _ = collate([raw[(0, e)] for e in range(n)])  # what the training device gets
    batched = augment_views(views_from_crops(crops, geometry, cfg), torch.Generator().manual_seed(0))
    for k in range(2):  # each view position keeps its own probabilities
        a = torch.stack([s[k] for s in per_sample]).flatten(1)
        b = batched[k].flatten(1)
        for stat in (lambda t: t.mean(1), lambda t: t.std(1), lambda t: t.amax(1) - t.amin(1)):
            assert stats.ks_2samp(stat(a).numpy(), stat(b).numpy()).pvalue > 0.001
