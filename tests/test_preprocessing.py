import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage as ndi

from preprocessing import DL_save_nifti as s1
from preprocessing import re_spacing_ITK as s2
from preprocessing import splitting_to_patches as s3
from preprocessing import synthetic_deeplesion as syn
from tests.helpers import make_volume, prepare_split_input, write_series


def test_png_value_minus_32768_is_hounsfield_int16(tmp_path):
    path = str(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 32768, 32768 + 1500]], np.uint16)).save(path)
    hu = s1.read_png_hu(path)
    assert hu.dtype == np.int16 and hu.tolist() == [[-32768, 0, 1500]]


def test_consecutive_slice_indices_form_runs():
    assert s1.split_runs([8, 1, 3, 2, 7, 12]) == [[1, 2, 3], [7, 8], [12]]


def test_series_becomes_one_volume_per_run_with_nih_names_affine_and_spacing(tmp_path):
    root = str(tmp_path)
    slices = write_series(root, "000001_01_01", [1, 2, 3, 7, 8], extra_rows=["0.5, 0.5, 1"])
    assert s1.main(["--data_root", root, "--workers", "1"]) == 0
    out = os.path.join(root, "Images_nifti")
    assert sorted(os.listdir(out)) == ["000001_01_01_001-003.nii.gz", "000001_01_01_007-008.nii.gz"]
    img = nib.load(os.path.join(out, "000001_01_01_001-003.nii.gz"))
    assert np.allclose(img.affine, [[0, -0.8, 0, 0], [-0.8, 0, 0, 0], [0, 0, -2.5, 0], [0, 0, 0, 1]])
    data = np.asarray(img.dataobj)
    assert data.dtype == np.int16 and data.shape == (20, 24, 3)  # (rows, cols, slices)
    assert np.array_equal(data[:, :, 1], slices[2])
    itk = sitk.ReadImage(os.path.join(out, "000001_01_01_001-003.nii.gz"))
    assert np.allclose(itk.GetSpacing(), (0.8, 0.8, 2.5))  # first CSV row of the series wins
    assert np.array_equal(sitk.GetArrayFromImage(itk)[1], slices[2].T)


def test_bad_inputs_are_reported_and_the_rest_goes_on(tmp_path, capsys):
    root = str(tmp_path)
    write_series(root, "000001_01_01", [1, 2])
    write_series(root, "000002_01_01", [1], spacing="0.8, 0.8")
    write_series(root, "000003_01_01", [1])
    with open(os.path.join(root, "Images_png", "000003_01_01", "001.png"), "wb") as f:
        f.write(b"garbage")
    write_series(root, "000004_01_01", [1])
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(os.path.join(root, "Images_png", "000004_01_01", "001.png"))
    os.makedirs(os.path.join(root, "Images_png", "000005_01_01"))
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(os.path.join(root, "Images_png", "000005_01_01", "001.png"))
    assert s1.main(["--data_root", root, "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "000002_01_01" in err and "malformed Spacing" in err
    assert "000003_01_01" in err
    assert "000004_01_01" in err and "not a 16-bit" in err
    assert "000005_01_01" in err and "no usable row in DL_info.csv" in err
    assert os.listdir(os.path.join(root, "Images_nifti")) == ["000001_01_01_001-002.nii.gz"]


def test_resampling_gives_reference_sizes_an_edge_aligned_grid_and_clipping(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    arr = np.full((7, 30, 33), 3000, np.int16)
    arr[:, :, :10] = -3000
    make_volume(str(src / "v.nii.gz"), arr, (0.7, 0.75, 2.5))
    assert s2.main(["--in_dir", str(src), "--out_dir", str(dst), "--workers", "1"]) == 0
    out = sitk.ReadImage(str(dst / "v.nii.gz"))
    size = (int(33 * 0.7), int(30 * 0.75), round(7 * 2.5))
    assert out.GetSize() == size
    # spacing: the input's extent over the output size (1 mm up to the size's rounding); origin:
    # the first sample, at input index 0.5 * n_in / n_out - 0.5 on each axis
    extent = np.array([33 * 0.7, 30 * 0.75, 7 * 2.5])
    assert np.allclose(out.GetSpacing(), extent / size) and np.allclose(out.GetSpacing(), 1.0, atol=0.03)
    first = (0.5 * np.array([33, 30, 7]) / size - 0.5) * np.array([0.7, 0.75, 2.5])
    assert np.allclose(out.GetOrigin(), np.array([3.0, -2.0, 7.0]) + first)
    a = sitk.GetArrayFromImage(out)
    # clipped to [-1024, 1024] before the cubic resampling and to that range after it
    assert out.GetPixelID() == sitk.sitkInt16 and a.min() == -1024 and a.max() == 1024
    assert a[3, 10, -3] == 1024 and a[3, 10, 1] == -1024


def test_output_size_rounds_the_spacing_ratio_as_the_reference_does():
    spacing = float(np.float32(0.7))  # 0.69999998...: 40 x that truncates to 27 without the rounding
    assert s2.target_size((40, 40, 7), (spacing, spacing, 2.5)) == [28, 28, 18]


def reference_resize(arr: np.ndarray, spacing_zyx) -> np.ndarray:
    """The reference's resampling, written independently: skimage-style edge-aligned cubic
    resize (output i samples (i + 0.5) * n_in / n_out - 0.5, mirrored boundary), clipped to the
    input's range; sizes: depth rounded, rows and cols truncated."""
    n_in = arr.shape
    n_out = [max(round(n_in[0] * spacing_zyx[0]), 1), max(int(n_in[1] * spacing_zyx[1]), 1), max(int(n_in[2] * spacing_zyx[2]), 1)]
    coords = np.meshgrid(*[(np.arange(o) + 0.5) * i / o - 0.5 for i, o in zip(n_in, n_out)], indexing="ij")
    out = ndi.map_coordinates(arr.astype(np.float64), coords, order=3, mode="mirror")
    return np.clip(out, arr.min(), arr.max())


@pytest.mark.parametrize(
    "shape,spacing_xyz",
    [((20, 48, 48), (0.7, 0.7, 2.5)), ((12, 40, 40), (1.3, 1.3, 0.8)), ((9, 31, 27), (0.8, 0.9, 5.0)), ((6, 3, 4), (1.5, 1.5, 1.5))],
)
def test_resampling_agrees_with_the_reference_everywhere_edges_included(shape, spacing_xyz):
    sp = spacing_xyz[::-1]
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    smooth = (300 * np.sin(x / 9) * np.cos(y / 11) + 200 * np.sin(z / 13)).astype(np.float32)
    img = sitk.GetImageFromArray(smooth)
    img.SetSpacing(spacing_xyz)
    out = sitk.GetArrayFromImage(s2.resample_volume(img)).astype(np.float64)
    ref = reference_resize(smooth, sp)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 0.51  # int16 rounding only
    assert out[-1].mean() > -1000  # the far end is tissue, not air


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_volumes_of_1_to_4_samples_on_an_axis_stay_within_the_input_range(tmp_path, axis, n):
    shape = [12, 14, 16]
    shape[axis] = n
    rng = np.random.default_rng(n + 10 * axis)
    arr = rng.integers(-900, 900, size=shape).astype(np.int16)
    make_volume(str(tmp_path / "v.nii.gz"), arr, (0.8, 0.8, 5.0))
    out = sitk.GetArrayFromImage(s2.resample_volume(sitk.ReadImage(str(tmp_path / "v.nii.gz"))))
    assert out.min() >= arr.min() and out.max() <= arr.max()
    for _ in range(3):  # ITK's spline on such axes read uninitialised memory, different each run
        sp = (5.0, 0.8, 0.8)
        grids = np.meshgrid(*[np.arange(k) * s for k, s in zip(shape, sp)], indexing="ij")
        smooth = (300 * np.sin(grids[2] / 9) * np.cos(grids[1] / 11) + 200 * np.sin(grids[0] / 13)).astype(np.float32)
        img = sitk.GetImageFromArray(smooth)
        img.SetSpacing(sp[::-1])
        assert np.abs(sitk.GetArrayFromImage(s2.resample_volume(img)) - reference_resize(smooth, sp)).max() <= 0.51


@pytest.mark.parametrize("depth,starts", [(10, [0]), (24, [0]), (25, [0, 1]), (36, [0, 12]), (40, [0, 12, 16]), (61, [0, 12, 24, 36, 37])])
def test_last_tile_is_flush_with_volume_end(depth, starts):
    got = s3.tile_starts(depth)
    assert got == starts
    assert len(got) == (1 if depth <= 24 else -(-(depth - 24) // 12) + 1)
    assert min(got[-1] + 24, depth) == depth


def test_volumes_shorter_than_24_slices_give_one_shorter_tile():
    tiles = s3.split_volume(np.zeros((9, 50, 50), np.int16))
    assert [t.shape for t in tiles] == [(9, 50, 50)]


def test_central_80_percent_kept_only_above_320_rows():
    vol = np.arange(2 * 400 * 350, dtype=np.int32).reshape(2, 400, 350)
    cropped = s3.central_crop(vol)
    assert cropped.shape == (2, 320, 280)
    assert cropped[0, 0, 0] == vol[0, 40, 35]
    assert s3.central_crop(vol[:, :320]).shape == (2, 320, 350)


def test_list_names_exactly_the_written_patches_and_a_rerun_writes_nothing(tmp_path, capsys):
    root = prepare_split_input(tmp_path)
    assert s3.main(["--data_root", root, "--workers", "1"]) == 0
    written = sorted(os.listdir(os.path.join(root, "DL_patches_v2")))
    listed = open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split()
    assert len(written) == 1 + 2 + 3
    assert listed == [f"DL_patches_v2/{n}" for n in written]
    patch = sitk.ReadImage(os.path.join(root, "DL_patches_v2", "000002_01_01_001-040_dep2.nii.gz"))
    assert patch.GetSize() == (272, 264, 24) and patch.GetPixelID() == sitk.sitkInt16
    mtimes = {n: os.stat(os.path.join(root, "DL_patches_v2", n)).st_mtime_ns for n in written}
    capsys.readouterr()
    assert s3.main(["--data_root", root, "--workers", "1"]) == 0
    assert "0 written, 6 skipped" in capsys.readouterr().out
    assert {n: os.stat(os.path.join(root, "DL_patches_v2", n)).st_mtime_ns for n in written} == mtimes
    assert open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split() == listed


def test_uncompressed_option_writes_and_lists_nii(tmp_path):
    root = prepare_split_input(tmp_path, n=1)
    assert s3.main(["--data_root", root, "--workers", "1", "--ext", ".nii"]) == 0
    assert open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split() == ["DL_patches_v2/000000_01_01_001-010_dep0.nii"]


def test_partial_output_of_an_interrupted_run_is_redone(tmp_path):
    root = prepare_split_input(tmp_path, n=2)
    out = os.path.join(root, "DL_patches_v2")
    os.makedirs(out)
    partial = os.path.join(out, ".000001_01_01_001-030_dep1.partial999.nii.gz")
    with open(partial, "wb") as f:
        f.write(b"half a file")
    assert s3.main(["--data_root", root, "--workers", "1"]) == 0
    assert not os.path.exists(partial)
    assert sitk.ReadImage(os.path.join(out, "000001_01_01_001-030_dep1.nii.gz")).GetSize()[2] == 24


def test_unreadable_nifti_is_reported_and_exit_is_nonzero(tmp_path, capsys):
    root = prepare_split_input(tmp_path, n=1)
    with open(os.path.join(root, "Images_nifti_spacing", "bad.nii.gz"), "wb") as f:
        f.write(b"not a nifti")
    assert s3.main(["--data_root", root, "--workers", "1"]) == 1
    assert "bad.nii.gz" in capsys.readouterr().err
    assert open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split() == ["DL_patches_v2/000000_01_01_001-010_dep0.nii.gz"]
    assert s2.main(["--in_dir", os.path.join(root, "Images_nifti_spacing"), "--out_dir", str(tmp_path / "r"), "--workers", "1"]) == 1


def test_synthetic_deeplesion_has_the_real_layout_and_plausible_values(tmp_path):
    root = str(tmp_path)
    syn.make_deeplesion(root, patients=2, size=128, seed=1, context_mm=6)
    with open(os.path.join(root, "DL_info.csv")) as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert tuple(header) == s1.CSV_COLUMNS and len(header) == 18
    folders = sorted(os.listdir(os.path.join(root, "Images_png")))
    assert all(len(f) == 12 and f[6] == "_" and f[9] == "_" for f in folders)
    per_series = {}
    for r in rows:
        per_series.setdefault(r[0][:12], []).append(r)
        sx, sy, sz = s1.parse_spacing(r[12])
        assert 0.6 * 4 <= sx == sy <= 1.0 * 4 + 1e-6 and 0.8 <= sz <= 5  # 128-px images: 4x DeepLesion's pixel size
        assert r[13] == "128, 128"
    assert set(per_series) == set(folders) and all(len(v) >= 2 for v in per_series.values())
    indices = sorted(int(f[:3]) for f in os.listdir(os.path.join(root, "Images_png", folders[0])))
    assert len(s1.split_runs(indices)) >= 2  # gaps between key-slice contexts
    png = np.asarray(Image.open(os.path.join(root, "Images_png", folders[0], f"{indices[0]:03d}.png")))
    assert png.dtype == np.uint16 and png.min() >= 32768 - 1024


def test_the_synthetic_decathlon_task_has_test_images_that_leave_its_training_cases_alone(tmp_path):
    syn.make_msd(str(tmp_path / "a"), cases=2, size=48, slices=8, seed=0)
    syn.make_msd(str(tmp_path / "b"), cases=2, size=48, slices=8, seed=0, test_cases=2)
    assert os.listdir(tmp_path / "a" / "imagesTs") == []  # still there, as nnU-Net's converter wants it
    assert sorted(os.listdir(tmp_path / "b" / "imagesTs")) == ["synth_test_000.nii.gz", "synth_test_001.nii.gz"]
    meta = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert meta["numTest"] == 2 and meta["test"] == ["./imagesTs/synth_test_000.nii.gz", "./imagesTs/synth_test_001.nii.gz"]
    for name in ("synth_000.nii.gz", "synth_001.nii.gz"):
        a = np.asarray(nib.load(str(tmp_path / "a" / "imagesTr" / name)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "b" / "imagesTr" / name)).dataobj)
        assert np.array_equal(a, b)
    test = np.asarray(nib.load(str(tmp_path / "b" / "imagesTs" / "synth_test_000.nii.gz")).dataobj)
    assert not np.array_equal(test, np.asarray(nib.load(str(tmp_path / "b" / "imagesTr" / "synth_000.nii.gz")).dataobj))


def test_the_portal_style_keeps_its_organs_in_portal_venous_hu_bands(tmp_path):
    """The former phantoms stay reachable by the flag, as they were, so that their figures can be
    reproduced."""
    syn.make_msd(str(tmp_path), cases=1, size=96, slices=40, seed=0, style="portal")
    img = np.asarray(nib.load(str(tmp_path / "imagesTr" / "synth_000.nii.gz")).dataobj)
    lab = np.asarray(nib.load(str(tmp_path / "labelsTr" / "synth_000.nii.gz")).dataobj)
    assert img.shape == lab.shape
    assert 90 < np.median(img[lab == 1]) < 140  # enhanced liver
    assert np.median(img[lab == 2]) < np.median(img[lab == 1])  # spleen a little below
    assert np.median(img[lab == 3]) > 120  # enhanced kidney
    assert (img < -950).mean() > 0.2  # air around the body


def test_varied_phantoms_draw_phase_hu_scanner_and_shape_per_scan():
    """The varied style: every phase appears, the spleen's HU sits -30 to +30 from the liver's,
    and calibration, noise and each organ's move, scale and turn stay within their stated ranges."""
    looks = [syn.varied_look(np.random.default_rng(k)) for k in range(60)]
    assert {look["phase"] for look in looks} == set(syn.PHASES)
    gaps = [look["spleen_minus_liver"] for look in looks]
    assert min(gaps) < -20 and max(gaps) > 20 and all(-30 <= g <= 30 for g in gaps)  # the spleen above the liver too
    assert all(-20 <= look["offset"] <= 20 and 5 <= look["noise"] <= 40 and 55 <= look["muscle"] <= 65 for look in looks)
    livers = [look["liver"] for look in looks]
    assert min(livers) < 45 and max(livers) > 100  # fatty, unenhanced and portal livers
    for look in looks:
        for dx, dy, scale, turn, lobes in look["geometry"].values():
            assert abs(dx) <= 0.15 and abs(dy) <= 0.15 and 0.85 <= scale <= 1.15 and abs(turn) <= 0.35 and len(lobes) == 2


def test_varied_phantoms_have_no_intensity_band_per_organ(tmp_path):
    """Across varied cases the organs' median HU overlap: the liver's of one case is another's
    spleen's, unlike the portal style's fixed order (spleen 10 HU below the liver)."""
    syn.make_msd(str(tmp_path), cases=8, size=64, slices=24, seed=0, style="varied")
    medians = {1: [], 2: []}
    for k in range(8):
        img = np.asarray(nib.load(str(tmp_path / "imagesTr" / f"synth_{k:03d}.nii.gz")).dataobj)
        lab = np.asarray(nib.load(str(tmp_path / "labelsTr" / f"synth_{k:03d}.nii.gz")).dataobj)
        for c in medians:
            if (lab == c).sum() > 50:
                medians[c].append(float(np.median(img[lab == c])))
    assert len(medians[1]) >= 4 and len(medians[2]) >= 2
    liver, spleen = medians[1], medians[2]
    assert max(liver) - min(liver) > 40  # phases: the liver's HU is no band
    assert min(spleen) < max(liver) and max(spleen) > min(liver)  # the spleen's HU inside the liver's range
    assert "phases" in json.loads((tmp_path / "dataset.json").read_text())["description"]


def test_the_generator_writes_varied_phantoms_unless_asked_for_the_portal_ones(tmp_path):
    def generate(folder, *flags):
        syn.main(["--out", str(tmp_path / "unused"), "--patients", "0", "--msd_dir", str(tmp_path / folder),
                  "--msd_cases", "1", "--msd_size", "32", "--msd_slices", "4", "--msd_test_cases", "0", *flags])  # fmt: skip
        description = json.loads((tmp_path / folder / "dataset.json").read_text())["description"]
        return description, np.asarray(nib.load(str(tmp_path / folder / "imagesTr" / "synth_000.nii.gz")).dataobj)

    syn.make_msd(str(tmp_path / "varied"), cases=1, size=32, slices=4, seed=0, style="varied")
    varied = np.asarray(nib.load(str(tmp_path / "varied" / "imagesTr" / "synth_000.nii.gz")).dataobj)
    description, image = generate("default")
    assert "phases" in description and np.array_equal(image, varied)
    description, image = generate("portal", "--style", "portal")
    assert "portal-venous" in description and not np.array_equal(image, varied)


def test_an_unknown_phantom_style_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="'venous'.*portal, varied"):
        syn.make_msd(str(tmp_path), cases=1, size=32, slices=4, style="venous")
    assert not os.listdir(tmp_path)  # refused before anything is written


def test_the_first_slice_depth_puts_the_organs_in_or_out_of_every_labelled_case(tmp_path):
    """`--msd_start LO HI` draws the first slice's depth from that part of the trunk: 45-55% puts
    liver, spleen and kidneys in every 24-slice case, 20-25% leaves the kidneys (47-83%) out of all."""

    def organs(folder, lo, hi):
        syn.main(["--out", str(tmp_path / "unused"), "--patients", "0", "--msd_dir", str(tmp_path / folder), "--msd_cases", "4",
                  "--msd_size", "48", "--msd_slices", "24", "--msd_test_cases", "0", "--msd_start", str(lo), str(hi)])  # fmt: skip
        return [set(np.unique(np.asarray(nib.load(str(tmp_path / folder / "labelsTr" / f"synth_{k:03d}.nii.gz")).dataobj)))
                for k in range(4)]  # fmt: skip

    assert all({1, 2, 3} <= found for found in organs("abdomen", 0.45, 0.55))
    assert all(3 not in found and 1 in found for found in organs("upper", 0.2, 0.25))


def test_a_labelled_case_can_cover_the_whole_trunk(tmp_path):
    """--msd_start 0 0 with 190 slices (at least 2.5 mm apart) spans the trunk, apex to pelvis."""
    syn.main(["--out", str(tmp_path / "unused"), "--patients", "0", "--msd_dir", str(tmp_path), "--msd_cases", "1",
              "--msd_size", "32", "--msd_slices", "190", "--msd_test_cases", "0", "--msd_start", "0", "0"])  # fmt: skip
    label = nib.load(str(tmp_path / "labelsTr" / "synth_000.nii.gz"))
    assert label.shape[2] * label.header.get_zooms()[2] >= syn.TRUNK_MM
    assert {1, 2, 3} <= set(np.unique(np.asarray(label.dataobj)))


def test_a_first_slice_depth_outside_the_trunk_is_refused_before_anything_is_written(tmp_path):
    code = syn.run_command(syn.main, ["--out", str(tmp_path / "dl"), "--patients", "1", "--size", "64",
                                      "--msd_dir", str(tmp_path / "msd"), "--msd_start", "0.6", "0.5"])  # fmt: skip
    assert code == 1 and not os.listdir(tmp_path)
    with pytest.raises(ValueError, match=r"\(0.5, 1.2\)"):
        syn.make_msd(str(tmp_path / "msd"), cases=1, size=32, slices=4, start=(0.5, 1.2))
    assert not os.listdir(tmp_path)
