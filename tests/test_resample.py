"""The separable resampler against scipy's general interpolation, on every axis length, in
every memory layout and orientation, with its memory bound measured in a process of its own."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from preprocessing.resample import axis_map, edge_aligned_positions, resample_axes, resample_to_grid
from tests.helpers import ROOT


def smooth(shape, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (300 * np.sin(grids[0] / 3 + rng.random()) * np.cos(grids[1] / 4) + 100 * np.sin(grids[2] / 2)).astype(np.float32)


def map_coordinates(arr, positions, order, mode):
    """The same sampling by scipy's general 3-D interpolation at every point of the grid."""
    return ndi.map_coordinates(arr.astype(np.float64), np.meshgrid(*positions, indexing="ij"), order=order, mode=mode)


@pytest.mark.parametrize("shape", [(9, 31, 27), (1, 5, 7), (2, 6, 4), (3, 8, 9), (4, 4, 4)])
@pytest.mark.parametrize("order,mode", [(3, "mirror"), (3, "nearest"), (1, "nearest")])
def test_values_are_scipys_at_the_same_positions_edges_and_short_axes_included(shape, order, mode):
    arr = np.random.default_rng(1).normal(0, 300, shape).astype(np.float32)
    n_out = [max(1, int(n * 1.37)) for n in shape]
    if mode == "mirror":  # the DeepLesion script's edge-aligned grid
        positions = [edge_aligned_positions(n, m) for n, m in zip(shape, n_out)]
    else:  # MONAI's grid: first sample on the first voxel, some samples beyond the last
        positions = [np.arange(m) * (n / m) * 1.1 - 0.3 for n, m in zip(shape, n_out)]
    out = resample_axes(arr, positions, order, mode)
    assert out.dtype == np.float32 and out.shape == tuple(n_out)
    assert np.abs(out - map_coordinates(arr, positions, order, mode)).max() < 1e-3  # of values up to ~1000: float32 rounding


def test_nearest_keeps_the_label_set_and_dtype_and_is_scipys_order_0():
    labels = np.random.default_rng(2).integers(0, 4, (10, 12, 7)).astype(np.uint8)
    positions = [np.arange(m) * (n / m) for n, m in zip(labels.shape, (13, 9, 15))]
    out = resample_axes(labels, positions, order=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= set(np.unique(labels))
    assert np.array_equal(out, map_coordinates(labels, positions, 0, "nearest").astype(np.uint8))


def test_a_fortran_order_or_flipped_volume_gives_the_same_values_in_its_own_layout():
    arr = smooth((20, 17, 13))
    positions = [np.arange(m) * (n / m) for n, m in zip(arr.shape, (15, 21, 26))]
    expected = resample_axes(arr, positions)
    fortran = resample_axes(np.asfortranarray(arr), positions)
    assert fortran.flags.f_contiguous and np.allclose(fortran, expected, atol=1e-4)
    flipped = resample_axes(arr[:, ::-1], [positions[0], arr.shape[1] - 1 - positions[1], positions[2]])
    assert np.allclose(flipped, expected, atol=1e-4)


def test_a_grid_with_permuted_and_flipped_axes_reads_the_source_along_them():
    src = smooth((12, 10, 8))
    src_affine = np.diag([0.8, 0.9, 1.5, 1.0])
    # destination axes: source axis 2 backwards, source axis 0, source axis 1; 1 mm
    dst_affine = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [-1.0, 0, 0, 10.5], [0, 0, 0, 1]])
    dst_shape = (11, 10, 9)
    axes, positions = axis_map(src_affine, dst_affine, dst_shape)
    assert axes == [2, 0, 1]
    out = resample_to_grid(src, src_affine, dst_affine, dst_shape, order=1)
    world = np.stack([*np.meshgrid(*[np.arange(n) for n in dst_shape], indexing="ij"), np.ones(dst_shape)], -1) @ dst_affine.T
    index = world @ np.linalg.inv(src_affine).T  # every destination voxel's source index, directly
    direct = ndi.map_coordinates(src.astype(np.float64), np.moveaxis(index[..., :3], -1, 0), order=1, mode="nearest")
    assert out.shape == dst_shape and np.abs(out - direct).max() < 1e-3


def test_an_oblique_grid_is_refused():
    c, s = np.cos(0.3), np.sin(0.3)
    rotated = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="not axis-aligned"):
        axis_map(np.eye(4), rotated, (4, 4, 4))


def test_the_fine_tuning_preprocessing_matches_monais_spacing_it_replaces(tmp_path):
    """The network input and label of an oblique, LPS-stored case are those of MONAI's
    Orientationd + Spacingd (mode 3, border padding; nearest for labels) + the HU scaling, on
    the same grid, to 1e-3 of the HU range."""
    from monai.transforms import Compose, Orientationd, ScaleIntensityRanged, Spacingd

    from downstream import labelled

    image = smooth((40, 36, 20)) * 2
    label = (image > 200).astype(np.uint8) + (image > 500)
    c, s = np.cos(0.35), np.sin(0.35)
    affine = np.array([[-0.8 * c, 0.8 * s, 0, 10], [-0.8 * s, -0.8 * c, 0, 5], [0, 0, 1.5, -3], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "l.nii.gz")
    keys = ["image", "label"]
    monai_steps = [
        labelled.LoadCT(keys),
        Orientationd(keys, axcodes=labelled.PRETRAINING_AXCODES, labels=labelled.RAS_LABELS),
        Spacingd(keys, pixdim=(1.0,) * 3, mode=(3, "nearest")),
        ScaleIntensityRanged("image", a_min=-1024.0, a_max=1024.0, b_min=-1.0, b_max=1.0, clip=True),
    ]
    case = {"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")}
    ref = Compose(monai_steps)(case)
    ours = Compose(labelled.preprocessing(1.0, grid_only=True))(case)
    assert ours["image"].shape == ref["image"].shape
    assert torch.allclose(ours["image"].affine, ref["image"].affine.to(torch.float64), atol=1e-6)
    assert (ours["image"] - ref["image"]).abs().max().item() < 1e-3 * 2  # of the range [-1, 1]
    assert (ours["label"].to(torch.uint8) == ref["label"].to(torch.uint8)).float().mean().item() > 0.999
    assert set(torch.unique(ours["label"]).tolist()) == {0, 1, 2}


MEASURE = r"""
import json, sys
from downstream import cache

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

case = json.loads(sys.argv[1])
from downstream import labelled  # everything the build imports, before the baseline
from monai.transforms import Compose
before = rss("VmRSS:")
import os
os.makedirs(sys.argv[2], exist_ok=True)
result = cache.preprocess_case(case, 1.0, sys.argv[2])
assert result.error is None, result.error
print(json.dumps({"increase": rss("VmHWM:") - before, "voxels": cache.output_voxels(case, 1.0)}))
"""


@pytest.mark.slow
def test_one_case_builds_within_the_memory_the_build_plans_for(tmp_path):
    """A CT-sized case (256 x 256 x 150 at 0.8 x 0.8 x 1.5 mm) preprocessed in a process of its
    own: its peak RSS grows by no more than the bound that `processes_for` schedules with."""
    from downstream import cache

    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 400, (256, 256, 150)).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "i.nii")
    nib.save(nib.Nifti1Image((image > 300).astype(np.uint8), affine), tmp_path / "l.nii")
    case = {"id": "i", "image": str(tmp_path / "i.nii"), "label": str(tmp_path / "l.nii")}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(case), str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    bound = measured["voxels"] * cache.BYTES_PER_OUTPUT_VOXEL + cache.BYTES_PER_CASE
    assert measured["increase"] < bound, (measured, bound)
    assert os.path.isfile(tmp_path / "cache" / "i.json")


def test_the_input_is_left_as_it_was():
    arr = smooth((6, 5, 4))
    before = arr.copy()
    for axis in range(3):
        positions = [np.arange(n, dtype=float) for n in arr.shape]
        positions[axis] = np.arange(7) * 0.6
        resample_axes(arr, positions, 3, "mirror")
    assert np.array_equal(arr, before)
