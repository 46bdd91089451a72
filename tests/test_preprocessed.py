import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

import labelled
import preprocessed
from tools.tiny_data import write_cube_task


@pytest.fixture
def task(tmp_path):
    write_cube_task(str(tmp_path / "task"), n=3)
    return labelled.read_dataset(str(tmp_path / "task"))


def test_the_cache_holds_what_the_preprocessing_computes(task, tmp_path):
    records = preprocessed.build(task.cases, 2.0, str(tmp_path / "cache"))
    for case, record in zip(task.cases, records):
        item = Compose(labelled.preprocessing(2.0))({"image": case["image"], "label": case["label"]})
        image, label = np.load(record["image"], mmap_mode="r"), np.load(record["label"], mmap_mode="r")
        assert image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_array_equal(image, item["image"][0].numpy())
        np.testing.assert_array_equal(label, item["label"][0].numpy())
        assert record["shape"] == list(image.shape) and record["classes_present"] == [1]
        rows = np.load(record["locations"])
        assert len(rows) > 0 and (label[tuple(rows[:, 1:].T)] == rows[:, 0]).all()  # every stored location is of its class


def test_a_second_build_reuses_the_cache_and_a_changed_input_is_preprocessed_again(task, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    preprocessed.build(task.cases, 2.0, cache)
    assert "3 written, 0 skipped" in capsys.readouterr().out
    before = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    preprocessed.build(task.cases, 2.0, cache)
    assert "0 written, 3 skipped" in capsys.readouterr().out
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)} == before

    # an edited label: only its case is redone, and the cache holds the new content
    path = task.cases[1]["label"]
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), path)
    records = preprocessed.build(task.cases, 2.0, cache)
    assert "1 written, 2 skipped" in capsys.readouterr().out
    assert not np.load(records[1]["label"]).any() and records[1]["classes_present"] == []

    # other settings (a new preprocessing version) are not taken for these
    meta = os.path.join(cache, f"{task.cases[0]['id']}.json")
    with open(meta) as f:
        record = json.load(f)
    record["settings"]["version"] = -1
    with open(meta, "w") as f:
        json.dump(record, f)
    preprocessed.build(task.cases, 2.0, cache)
    assert "1 written, 2 skipped" in capsys.readouterr().out


def test_an_interrupted_build_is_redone_and_its_temporaries_removed(task, tmp_path, capsys):
    cache = tmp_path / "cache"
    preprocessed.build(task.cases, 2.0, str(cache))
    os.remove(cache / f"{task.cases[2]['id']}.json")  # killed before its record was written
    (cache / f".{task.cases[2]['id']}.image.partial999999999.npy").write_bytes(b"half")
    capsys.readouterr()
    preprocessed.build(task.cases, 2.0, str(cache))
    assert "1 written, 2 skipped" in capsys.readouterr().out
    assert not [f for f in os.listdir(cache) if ".partial" in f]


def test_a_case_that_cannot_be_preprocessed_is_named(task, tmp_path):
    with open(task.cases[0]["image"], "wb") as f:
        f.write(b"not a volume")
    with pytest.raises(RuntimeError, match=rf"(?s)1 case\(s\) could not be preprocessed.*{task.cases[0]['id']}.*{task.cases[0]['image']}"):
        preprocessed.build(task.cases, 2.0, str(tmp_path / "cache"))


def test_crops_inside_and_across_the_border_match_a_padded_array(tmp_path):
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    np.save(tmp_path / "a.npy", arr)
    padded = np.pad(arr, 4)
    for start in [(0, 0, 0), (1, 2, 3), (-2, -1, 4), (3, 4, 5), (-4, -4, -4)]:
        got = preprocessed.crop(str(tmp_path / "a.npy"), start, (4, 4, 4))
        want = padded[tuple(slice(s + 4, s + 8) for s in start)]
        np.testing.assert_array_equal(got, want)


def test_patch_starts_stay_inside_and_centre_a_patch_larger_than_the_volume():
    assert preprocessed.patch_start((0, 10, 99), (20, 50, 100), (8, 8, 8)) == [0, 6, 92]
    assert preprocessed.patch_start((5, 5, 5), (10, 10, 10), (16, 10, 4)) == [-3, 0, 3]


def test_patches_come_from_the_cache_centred_on_foreground_as_often_as_asked(task, tmp_path):
    records = preprocessed.build(task.cases, 2.0, str(tmp_path / "cache"))
    torch.manual_seed(0)
    only_fg = preprocessed.PatchDataset(records, (4, 4, 4), samples_per_volume=8, pos_ratio=1e9)
    anywhere = preprocessed.PatchDataset(records, (4, 4, 4), samples_per_volume=8, pos_ratio=0.0)
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
    records = preprocessed.build(task.cases, 2.0, str(tmp_path / "cache"))
    item = preprocessed.VolumeDataset(records)[0]
    assert item["image"].shape == item["label"].shape == (1, *records[0]["shape"]) and item["image_path"] == task.cases[0]["image"]


def test_the_build_runs_no_more_processes_than_memory_holds(task, monkeypatch, capsys):
    voxels = preprocessed.output_voxels(task.cases[0], 2.0)
    assert voxels == 24 * 48 * 48  # 48 x 48 x 24 at 2 mm stays so
    need = voxels * preprocessed.BYTES_PER_OUTPUT_VOXEL + preprocessed.BYTES_PER_CASE
    monkeypatch.setattr(preprocessed, "available_memory", lambda: int(2.5 * need))
    assert preprocessed.processes_for(task.cases, 2.0, 4) == 2
    assert "with 2 of 4 processes" in capsys.readouterr().out
    monkeypatch.setattr(preprocessed, "available_memory", lambda: need // 2)
    assert preprocessed.processes_for(task.cases, 2.0, 4) == 1
    monkeypatch.setattr(preprocessed, "available_memory", lambda: 100 * need)
    assert preprocessed.processes_for(task.cases, 2.0, 4) == 4


def test_a_parallel_build_after_torch_has_run_finishes(task, tmp_path):
    """Workers forked from a process whose OpenMP threads ran hung in their first resampling
    (the demo's fine-tuning stalled at 0/10): the build starts them fresh."""
    import subprocess
    import sys

    code = (
        "import torch, labelled, preprocessed\n"
        "torch.ones(512, 512) @ torch.ones(512, 512)  # the thread pool is up\n"
        f"cases = labelled.read_dataset({task.root!r}).cases\n"
        f"print(len(preprocessed.build(cases, 2.0, {str(tmp_path / 'cache')!r}, workers=2)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3"
