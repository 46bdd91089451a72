"""The compiled CPU intensity chain (native_chain.py, native/intensity.c) against the torch
chain it reproduces, and the fallback where it cannot be built."""

import os

import pytest
import torch

import augment
import native_chain
from augment import GLOBAL_1, GLOBAL_2, LOCAL, apply_intensity, draw_intensity_params

needs_library = pytest.mark.skipif(native_chain.library() is None, reason="no C compiler: the compiled chain cannot be built here")


def draws(shape, per_slice, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    params = draw_intensity_params(shape[0], shape[1], [GLOBAL_1, GLOBAL_2, LOCAL][: shape[0]], g, per_slice)
    return x, params, torch.randn(shape, generator=g)


@needs_library
@pytest.mark.parametrize("per_slice", [True, False])
@pytest.mark.parametrize("shape", [(2, 16, 96, 96), (3, 16, 48, 48), (2, 4, 20, 24), (2, 3, 5, 3)])  # views; uneven; narrower than a kernel
@pytest.mark.parametrize("swap_hw", [False, True])
def test_compiled_chain_equals_the_torch_chain(per_slice, shape, swap_hw):
    x, params, noise = draws(shape, per_slice)
    x_before = x.clone()
    expected = augment.apply_intensity_torch(x, params, noise.clone())
    out = apply_intensity(x, params, noise.clone(), swap_hw=swap_hw, native=True)
    if swap_hw:
        assert out.is_contiguous() and out.shape == (*shape[:2], shape[3], shape[2])
        out = out.transpose(-1, -2)
    assert torch.equal(x, x_before)
    assert torch.allclose(out, expected, atol=5e-5), (out - expected).abs().max()  # float32 sums in another order


@needs_library
def test_compiled_chain_takes_every_transform_both_ways():
    # all flags on, then all off: the branches for blur and gamma, and a constant view (range 0)
    x, params, noise = draws((2, 16, 32, 32), True)
    x[1] = 0.25
    for on in (True, False):
        p = dict(params, blur_on=torch.tensor([[on] * 16, [False] * 16]), gamma_on=torch.full_like(params["gamma_on"], on))
        p["noise_std"] = p["noise_std"] * torch.tensor([[1.0], [0.0]])  # the constant view stays constant
        expected = augment.apply_intensity_torch(x, p, noise.clone())
        out = apply_intensity(x, p, noise.clone(), native=True)
        assert torch.isfinite(out).all() and torch.allclose(out, expected, atol=5e-5)
        assert (out[1].flatten(1).amax(1) == out[1].flatten(1).amin(1)).all()


def test_without_a_compiler_the_torch_chain_runs(monkeypatch):
    monkeypatch.setattr(native_chain, "_library", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(UserWarning, match="unavailable"):
        assert native_chain.library() is None
    x, params, noise = draws((2, 4, 16, 16), True)
    out = apply_intensity(x, params, noise.clone(), swap_hw=True)
    assert torch.equal(out, augment.apply_intensity_torch(x, params, noise.clone()).transpose(-1, -2).contiguous())
    with pytest.raises(RuntimeError, match="unavailable"):
        apply_intensity(x, params, noise.clone(), native=True)


def test_the_build_leaves_one_library_and_is_reused(tmp_path, monkeypatch):
    if native_chain.library() is None:
        pytest.skip("no C compiler: the compiled chain cannot be built here")
    source = tmp_path / "native" / "intensity.c"
    source.parent.mkdir()
    source.write_bytes(open(native_chain.SOURCE, "rb").read())
    monkeypatch.setattr(native_chain, "SOURCE", str(source))
    path = native_chain._build()
    assert os.listdir(tmp_path / "native" / "build") == [os.path.basename(path)]  # no temporary file left
    built = os.stat(path).st_mtime_ns
    assert native_chain._build() == path and os.stat(path).st_mtime_ns == built  # found, not built again
