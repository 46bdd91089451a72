"""The compiled CPU intensity chain (augment/native_chain.py, augment/intensity.c) against the torch
chain it reproduces, and the fallback where it cannot be built."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from augment import intensity, native_chain
from augment.intensity import GLOBAL_1, GLOBAL_2, LOCAL, apply_intensity, draw_intensity_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_library = pytest.mark.usefixtures("compiled_chain")  # built when such a test runs, not at collection


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
    expected = intensity.apply_intensity_torch(x, params, noise.clone())
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
        expected = intensity.apply_intensity_torch(x, p, noise.clone())
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
    assert torch.equal(out, intensity.apply_intensity_torch(x, params, noise.clone()).transpose(-1, -2).contiguous())
    with pytest.raises(RuntimeError, match="unavailable"):
        apply_intensity(x, params, noise.clone(), native=True)


@needs_library
def test_the_build_leaves_one_library_and_is_reused(tmp_path, monkeypatch):
    source = tmp_path / "native" / "intensity.c"
    source.parent.mkdir()
    source.write_bytes(open(native_chain.SOURCE, "rb").read())
    monkeypatch.setattr(native_chain, "SOURCE", str(source))
    path = native_chain._build()
    name = os.path.basename(path)  # the library and the record of its SHA-256; no temporary file left
    assert sorted(os.listdir(tmp_path / "native" / "build")) == [name, name + ".sha256"]
    built = os.stat(path).st_mtime_ns
    assert native_chain._build() == path and os.stat(path).st_mtime_ns == built  # found, not built again


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) % 2**64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return state, z ^ (z >> 31)


def _xoshiro128plus_lanes(n: int, stream: int, key: int, lanes: int = 8) -> list[int]:
    """The published algorithms, one generator at a time, interleaved as augment/intensity.c
    documents: word j from generator j % lanes."""
    seed, states = key ^ (stream * 0xD1B54A32D192ED03) % 2**64, []
    for _ in range(lanes):
        seed, a = _splitmix64(seed)
        seed, b = _splitmix64(seed)
        states.append([a & 0xFFFFFFFF, a >> 32, b & 0xFFFFFFFF, b >> 32])
    words = []
    for _ in range(n // lanes):
        for s in states:
            words.append((s[0] + s[3]) & 0xFFFFFFFF)
            t = (s[1] << 9) & 0xFFFFFFFF
            s[2] ^= s[0]
            s[3] ^= s[1]
            s[1] ^= s[2]
            s[0] ^= s[3]
            s[2] ^= t
            s[3] = ((s[3] << 11) | (s[3] >> 21)) & 0xFFFFFFFF
    return words


@needs_library
@pytest.mark.parametrize("stream, key", [(0, 0), (5, 2**62 - 1), (123, 987654321)])
def test_noise_words_are_xoshiro128plus_seeded_by_splitmix64(stream, key):
    assert native_chain.random_words(64, stream, key).tolist() == _xoshiro128plus_lanes(64, stream, key)


@needs_library
def test_noise_is_the_box_muller_transform_of_those_words():
    count, stream, key = 100, 3, 42  # count not a multiple of the 16 numbers a step makes
    z = native_chain.standard_normal(count, stream, key).double()
    half = (count + 15) // 16 * 8
    w = native_chain.random_words(2 * half, stream, key).double()
    radius = torch.sqrt(-2 * torch.log((torch.div(w[:half], 256, rounding_mode="floor") + 1) / 2**24))
    angle = 2 * torch.pi * torch.div(w[half:], 256, rounding_mode="floor") / 2**24
    expected = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
    assert torch.allclose(z, expected, atol=2e-5)


@needs_library
def test_compiled_noise_is_standard_normal_and_independent():
    z = torch.stack([native_chain.standard_normal(9216, s, 7) for s in range(64)]).double()  # 64 slices of 96 x 96
    flat = z.flatten().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 0.005 and abs(flat.std() - 1) < 0.005 and abs((abs(flat) > 3).mean() - 0.0027) < 0.0005

    def corr(a, b):
        return float(np.corrcoef(a.flatten(), b.flatten())[0, 1])

    # neighbours in a slice (both halves of a Box-Muller pair among them), slice to slice, key to key: |r| < 0.01, ~7 sd
    assert abs(corr(z[:, :-1], z[:, 1:])) < 0.01 and abs(corr(z[:, :4608], z[:, 4608:])) < 0.01
    assert abs(corr(z[:-1], z[1:])) < 0.01
    other = torch.stack([native_chain.standard_normal(9216, s, 8) for s in range(64)]).double()
    assert abs(corr(z, other)) < 0.01
    assert torch.equal(native_chain.standard_normal(9216, 5, 7).double(), z[5])  # the same stream and key: the same noise


@needs_library
def test_processes_building_at_once_each_get_a_whole_library(tmp_path):
    source = tmp_path / "native" / "intensity.c"
    source.parent.mkdir()
    source.write_bytes(open(native_chain.SOURCE, "rb").read())
    code = (
        "import ctypes, sys; from augment import native_chain; native_chain.SOURCE = sys.argv[1]; "
        "path = native_chain._build(); ctypes.CDLL(path).desd_normal_room; print(path)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.Popen([sys.executable, "-c", code, str(source)], cwd=root, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    paths = {run.communicate(timeout=300)[0].strip() for run in runs}
    assert all(run.returncode == 0 for run in runs) and len(paths) == 1
    name = os.path.basename(paths.pop())
    assert sorted(os.listdir(tmp_path / "native" / "build")) == [name, name + ".sha256"]
    assert native_chain._intact(str(tmp_path / "native" / "build" / name))


@needs_library
def test_compiled_chain_refuses_what_it_cannot_take():
    x, params, noise = draws((2, 4, 16, 16), True)
    with pytest.raises(ValueError, match="on the CPU"):
        native_chain.apply_intensity(x.to("meta"), params, None)
    with pytest.raises(ValueError, match="float32"):
        native_chain.apply_intensity(x.double(), params, noise.double())
    with pytest.raises(ValueError, match="one shape"):
        native_chain.apply_intensity(x, params, noise[:, :2])


@needs_library
def test_loading_the_library_leaves_the_floating_point_environment_alone():
    code = (
        "import numpy as np, torch\nfrom augment import native_chain\n"
        "assert native_chain.library() is not None\n"
        "print(float(np.float32(1e-38) / np.float32(100)), (torch.tensor(1e-38) / 100).item())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert [float(v) for v in out] != [0.0, 0.0] and all(0 < float(v) < 1e-39 for v in out)  # float32 denormals survive
