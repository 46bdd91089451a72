"""The intensity augmentation of the views (augment/intensity.py): each step against its
definition, the fused chain on every path against the steps one after the other, and the
drawn parameters against the published distributions (docs/method.md, section 3)."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from augment import intensity, native_chain
from augment.intensity import (
    GLOBAL_1,
    GLOBAL_2,
    LOCAL,
    IntensityProbs,
    apply_intensity,
    augment_intensity,
    draw_intensity_params,
    gaussian_blur_slices_,
)


def gaussian_blur_slices(x, sigma, apply):
    """`gaussian_blur_slices_` on a copy of x."""
    return gaussian_blur_slices_(x.clone(), sigma, apply)


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
        monkeypatch.setattr(intensity, "takes_cpu_path", lambda device: False)
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
        monkeypatch.setattr(intensity, "takes_cpu_path", lambda device: False)
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


def test_the_brightness_offset_sd_scales_the_offsets_and_nothing_else():
    """--brightness_add_sd: the same draws, the additive offsets scaled by sd / 0.4."""
    published = draw_intensity_params(500, 16, GLOBAL_1, torch.Generator().manual_seed(3))
    smaller = draw_intensity_params(500, 16, GLOBAL_1, torch.Generator().manual_seed(3), offset_sd=0.1)
    for name, values in published.items():
        expected = values * 0.25 if name == "brightness_add" else values
        assert torch.allclose(smaller[name].double(), expected.double()), name
    assert published["brightness_add"].abs().max() > 0.5  # the offsets were drawn at all


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
