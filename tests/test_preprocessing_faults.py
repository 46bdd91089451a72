"""Hostile but realistic inputs to the three preprocessing scripts: each finding injected."""

import csv
import gzip
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from preprocessing import DL_save_nifti as s1
from preprocessing import re_spacing_ITK as s2
from preprocessing import splitting_to_patches as s3
from tests.helpers import make_volume, prepare_split_input, write_series


def cut_short(path: str, keep: float = 0.6) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_truncated_volumes_are_refused_by_resampling_and_splitting_naming_the_file(tmp_path, capsys, name):
    src = tmp_path / "Images_nifti_spacing"
    src.mkdir()
    make_volume(str(src / name), np.full((30, 40, 40), 100, np.int16), (1.0, 1.0, 1.0))
    cut_short(str(src / name))
    assert s2.main(["--in_dir", str(src), "--out_dir", str(tmp_path / "r"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert name in err and ("truncated" in err or "corrupt" in err)
    assert os.listdir(tmp_path / "r") == []
    assert s3.main(["--data_root", str(tmp_path), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert name in err and ("truncated" in err or "corrupt" in err)
    assert os.listdir(tmp_path / "DL_patches_v2") == []


def test_the_list_keeps_every_complete_patch_when_inputs_come_in_batches(tmp_path, capsys):
    root = prepare_split_input(tmp_path, n=3)  # 1 + 2 + 3 patches
    assert s3.main(["--data_root", root, "--workers", "1"]) == 0
    full = open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split()
    assert len(full) == 6
    for f in os.listdir(os.path.join(root, "Images_nifti_spacing"))[:2]:  # free disk, as users do
        os.remove(os.path.join(root, "Images_nifti_spacing", f))
    capsys.readouterr()
    assert s3.main(["--data_root", root, "--workers", "1"]) == 0
    assert open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split() == full
    assert "0 added, 6 kept from the earlier list, 0 dropped" in capsys.readouterr().out
    for f in os.listdir(os.path.join(root, "Images_nifti_spacing")):  # an empty input folder
        os.remove(os.path.join(root, "Images_nifti_spacing", f))
    assert s3.main(["--data_root", root, "--workers", "1"]) == 0
    assert open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split() == full
    # a patch cut short on disk leaves the list, and the run says so
    cut_short(os.path.join(root, full[0]))
    capsys.readouterr()
    s3.main(["--data_root", root, "--workers", "1"])
    captured = capsys.readouterr()
    assert open(os.path.join(root, "SSL_data_deeplesion.txt")).read().split() == full[1:]
    assert "1 dropped" in captured.out and os.path.basename(full[0]) in captured.err


def test_a_second_run_leaves_the_temporaries_of_a_live_run_alone(tmp_path):
    root = prepare_split_input(tmp_path, n=1)
    out = tmp_path / "DL_patches_v2"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".x_dep0.partial{sleeper.pid}.nii.gz"
        dead = out / ".y_dep0.partial999999999.nii.gz"
        live.write_bytes(b"in progress")
        dead.write_bytes(b"left by a killed run")
        assert s3.main(["--data_root", root, "--workers", "1"]) == 0
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()


def test_pool_workers_die_with_a_killed_parent(tmp_path):
    src = tmp_path / "Images_nifti"
    src.mkdir()
    for i in range(12):
        make_volume(str(src / f"{i:06d}_01_01_001-040.nii.gz"), np.zeros((40, 160, 160), np.int16), (0.7, 0.7, 2.5))
    cmd = [sys.executable, "-m", "preprocessing.re_spacing_ITK", "--data_root", str(tmp_path), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.time() + 60
    while time.time() < deadline and len(children) < 2:
        time.sleep(0.1)
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
        children = [int(p) for p in out.split()]
    assert len(children) == 2, "the pool did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(
        os.path.exists(f"/proc/{c}") and "Z" not in open(f"/proc/{c}/stat").read().split()[2] for c in children
    ):
        time.sleep(0.1)
    alive = [c for c in children if os.path.exists(f"/proc/{c}") and open(f"/proc/{c}/stat").read().split()[2] != "Z"]
    assert not alive, f"workers {alive} outlived their parent"


def test_two_slice_series_from_consecutive_pngs_resample_within_range(tmp_path):
    root = str(tmp_path)
    slices = write_series(root, "000001_01_01", [4, 5], spacing="0.8, 0.8, 5")
    assert s1.main(["--data_root", root, "--workers", "1"]) == 0
    assert s2.main(["--data_root", root, "--workers", "1"]) == 0
    out = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(root, "Images_nifti_spacing", "000001_01_01_004-005.nii.gz")))
    lo = max(min(s.min() for s in slices.values()), -1024)
    hi = min(max(s.max() for s in slices.values()), 1024)
    assert out.shape[0] == 10 and out.min() >= lo and out.max() <= hi


def write_csv_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=s1.CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def test_bad_csv_rows_are_named_by_line_and_the_rest_is_converted(tmp_path, capsys):
    root = str(tmp_path)
    write_series(root, "000001_01_01", [1, 2])
    write_series(root, "000002_01_01", [1, 2])
    rows = list(csv.DictReader(open(os.path.join(root, "DL_info.csv"))))
    bad = dict(rows[0], Patient_index="1a")
    conflicting = dict(rows[1], Spacing_mm_px_="0.5, 0.5, 1", Key_slice_index="2")
    write_csv_rows(os.path.join(root, "DL_info.csv"), [rows[0], bad, rows[0], rows[1], conflicting])
    with open(os.path.join(root, "DL_info.csv"), "ab") as f:  # one Latin-1 byte, as an edited file may have
        f.write('000002_01_01_001.png,2,1,1,1,,,,,caf\xe9,,,"0.8, 0.8, 2.5",,,,,\n'.encode("latin-1"))
    assert s1.main(["--data_root", root, "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "line 3" in err and "not integers" in err  # the header is line 1
    assert "line 4: duplicate" in err
    assert "not UTF-8 (first at line 7)" in err
    assert "000002_01_01 has rows with different spacings" in err
    assert sorted(os.listdir(os.path.join(root, "Images_nifti"))) == ["000001_01_01_001-002.nii.gz", "000002_01_01_001-002.nii.gz"]


def test_slices_of_two_sizes_name_the_odd_slice_and_both_sizes(tmp_path, capsys):
    root = str(tmp_path)
    write_series(root, "000001_01_01", [1, 2, 3, 8, 9])
    Image.fromarray(np.full((30, 24), 32768, np.uint16)).save(os.path.join(root, "Images_png", "000001_01_01", "002.png"))
    assert s1.main(["--data_root", root, "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "002.png is 30 x 24" in err and "001.png is 20 x 24" in err
    assert "1 written" in out  # the other run (8-9) was written, and counted
    assert os.listdir(os.path.join(root, "Images_nifti")) == ["000001_01_01_008-009.nii.gz"]


def test_a_truncated_png_is_named(tmp_path, capsys):
    root = str(tmp_path)
    write_series(root, "000001_01_01", [1, 2], shape=(64, 64))
    cut_short(os.path.join(root, "Images_png", "000001_01_01", "002.png"), keep=0.5)
    assert s1.main(["--data_root", root, "--workers", "1"]) == 1
    assert os.path.join("000001_01_01", "002.png") in capsys.readouterr().err


def test_an_empty_png_folder_says_nothing_was_found_and_fails(tmp_path, capsys):
    os.makedirs(tmp_path / "Images_png")
    write_csv_rows(str(tmp_path / "DL_info.csv"), [])
    assert s1.main(["--data_root", str(tmp_path), "--workers", "1"]) == 1
    assert "no series folder found" in capsys.readouterr().err


def test_implausible_geometry_is_warned_about(tmp_path, capsys):
    root = str(tmp_path)
    write_series(root, "000001_01_01", [1, 2], spacing="0.8, 0.8, 12")
    assert s1.main(["--data_root", root, "--workers", "1"]) == 0
    assert "implausible spacing (0.8, 0.8, 12.0)" in capsys.readouterr().err
    src = tmp_path / "in"
    src.mkdir()
    make_volume(str(src / "big.nii.gz"), np.zeros((3, 4, 1100), np.int16), (1.0, 1.0, 1.0))
    img = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    sitk.WriteImage(img, str(src / "zero.nii"))
    with open(src / "zero.nii", "r+b") as f:  # pixdim[1] = 0
        f.seek(80)
        f.write(np.float32(0).tobytes())
    assert s2.main(["--in_dir", str(src), "--out_dir", str(tmp_path / "r"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "exceeds 1024" in err and "big.nii.gz" in err
    assert "zero.nii: pixdim" in err and "read as 1 mm" in err


def test_gzip_trailer_check_accepts_what_nibabel_and_simpleitk_write(tmp_path):
    from preprocessing.runner import nifti_problem

    make_volume(str(tmp_path / "a.nii.gz"), np.zeros((5, 6, 7), np.int16), (1.0, 1.0, 1.0))
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((7, 6, 5), np.float32), np.eye(4)), str(tmp_path / "b.nii.gz"))
    assert nifti_problem(str(tmp_path / "a.nii.gz")) is None and nifti_problem(str(tmp_path / "b.nii.gz")) is None
    with gzip.open(tmp_path / "c.nii.gz", "wb") as f:  # a whole gzip stream that holds too little
        f.write(gzip.decompress((tmp_path / "a.nii.gz").read_bytes())[:-10])
    assert "gzip stream holds" in nifti_problem(str(tmp_path / "c.nii.gz"))


def test_a_zombie_owner_counts_as_gone():
    from preprocessing.files import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)  # exited, not yet reaped: a zombie
    try:
        assert not pid_alive(child.pid) and pid_alive(os.getpid())
    finally:
        child.wait()


def test_unusable_csv_files_are_named_with_their_problem_and_no_traceback(tmp_path):
    root = tmp_path / "dl"
    write_series(str(root), "000001_01_01", [1, 2])
    csv_path = root / "DL_info.csv"
    header = csv_path.read_text().splitlines()[0]
    cases = {
        "": "the file is empty",
        header.replace(",", ";") + "\n": "separated by ';', not commas",
    }
    for text, message in cases.items():
        csv_path.write_text(text)
        with pytest.raises(SystemExit, match=message):
            s1.main(["--data_root", str(root), "--workers", "1"])
    csv_path.unlink()
    csv_path.mkdir()
    with pytest.raises(SystemExit, match="is a folder"):
        s1.main(["--data_root", str(root), "--workers", "1"])


def test_a_csv_header_with_trailing_spaces_is_read(tmp_path):
    root = tmp_path / "dl"
    write_series(str(root), "000001_01_01", [1, 2])
    csv_path = root / "DL_info.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([",".join(f"{c} " for c in lines[0].split(",")), *lines[1:]]) + "\n")
    assert s1.main(["--data_root", str(root), "--workers", "1"]) == 0
    assert os.listdir(root / "Images_nifti") == ["000001_01_01_001-002.nii.gz"]


def test_nan_voxels_all_nan_and_single_slice_volumes_are_warned_about_or_refused(tmp_path, capsys):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    arr = np.full((5, 40, 40), 40.0, np.float32)
    arr[2, 3:6, 3:6] = np.nan
    make_volume(str(src / "000001_01_01_001-005.nii.gz"), arr, (1.0, 1.0, 1.0))
    make_volume(str(src / "000002_01_01_001-005.nii.gz"), np.full((5, 40, 40), np.nan, np.float32), (1.0, 1.0, 1.0))
    make_volume(str(src / "000003_01_01_001-001.nii.gz"), np.zeros((1, 40, 40), np.int16), (1.0, 1.0, 1.0))
    assert s2.main(["--in_dir", str(src), "--out_dir", str(dst), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "000001_01_01_001-005.nii.gz: 9 NaN or infinite voxels, read as -1024 HU (air)" in err
    assert "000002_01_01_001-005.nii.gz: no finite voxel" in err and "000003_01_01_001-001.nii.gz: a single slice" in err
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(dst / "000001_01_01_001-005.nii.gz")))
    assert out.min() >= -1024 and out[2, 4, 4] < 0  # the NaNs became air, not 0 HU
    assert sorted(os.listdir(dst)) == ["000001_01_01_001-005.nii.gz", "000003_01_01_001-001.nii.gz"]


def test_an_output_folder_that_cannot_be_made_is_named_with_the_flag(tmp_path):
    (tmp_path / "file").write_text("")
    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(SystemExit, match=r"cannot create the output folder .*file/out.*--out_dir"):
        s2.main(["--in_dir", str(src), "--out_dir", str(tmp_path / "file" / "out"), "--workers", "1"])
