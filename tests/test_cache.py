import json
import os

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Compose

from downstream import cache, labelled
from tools.tiny_data import write_cube_task


@pytest.fixture
def task(tmp_path):
    write_cube_task(str(tmp_path / "task"), n=3)
    return labelled.read_dataset(str(tmp_path / "task"))


def test_the_cache_holds_what_the_preprocessing_computes(task, tmp_path):
    records = cache.build(task.cases, 2.0, str(tmp_path / "cache"))
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
    folder = str(tmp_path / "cache")
    cache.build(task.cases, 2.0, folder)
    assert "3 written, 0 skipped" in capsys.readouterr().out
    before = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    cache.build(task.cases, 2.0, folder)
    assert "0 written, 3 skipped" in capsys.readouterr().out
    assert {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)} == before

    # an edited label: only its case is redone, and the cache holds the new content
    path = task.cases[1]["label"]
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), path)
    records = cache.build(task.cases, 2.0, folder)
    assert "1 written, 2 skipped" in capsys.readouterr().out
    assert not np.load(records[1]["label"]).any() and records[1]["classes_present"] == []

    # other settings (a new preprocessing version) are not taken for these
    meta = os.path.join(folder, f"{task.cases[0]['id']}.json")
    with open(meta) as f:
        record = json.load(f)
    record["settings"]["version"] = -1
    with open(meta, "w") as f:
        json.dump(record, f)
    cache.build(task.cases, 2.0, folder)
    assert "1 written, 2 skipped" in capsys.readouterr().out


def test_an_interrupted_build_is_redone_and_its_temporaries_removed(task, tmp_path, capsys):
    folder = tmp_path / "cache"
    cache.build(task.cases, 2.0, str(folder))
    os.remove(folder / f"{task.cases[2]['id']}.json")  # killed before its record was written
    (folder / f".{task.cases[2]['id']}.image.partial999999999.npy").write_bytes(b"half")
    capsys.readouterr()
    cache.build(task.cases, 2.0, str(folder))
    assert "1 written, 2 skipped" in capsys.readouterr().out
    assert not [f for f in os.listdir(folder) if ".partial" in f]


def test_a_case_that_cannot_be_preprocessed_is_named(task, tmp_path):
    with open(task.cases[0]["image"], "wb") as f:
        f.write(b"not a volume")
    with pytest.raises(RuntimeError, match=rf"(?s)1 case\(s\) could not be preprocessed.*{task.cases[0]['id']}.*{task.cases[0]['image']}"):
        cache.build(task.cases, 2.0, str(tmp_path / "cache"))


def test_the_build_runs_no_more_processes_than_memory_holds(task, monkeypatch, capsys):
    voxels = cache.output_voxels(task.cases[0], 2.0)
    assert voxels == 24 * 48 * 48  # 48 x 48 x 24 at 2 mm stays so
    need = voxels * cache.BYTES_PER_OUTPUT_VOXEL + cache.BYTES_PER_CASE
    monkeypatch.setattr(cache, "available_memory", lambda: int(2.5 * need))
    assert cache.processes_for(task.cases, 2.0, 4) == 2
    assert "with 2 of 4 processes" in capsys.readouterr().out
    monkeypatch.setattr(cache, "available_memory", lambda: need // 2)
    assert cache.processes_for(task.cases, 2.0, 4) == 1
    monkeypatch.setattr(cache, "available_memory", lambda: 100 * need)
    assert cache.processes_for(task.cases, 2.0, 4) == 4


def test_a_parallel_build_after_torch_has_run_finishes(task, tmp_path):
    """Workers forked from a process whose OpenMP threads ran hung in their first resampling
    (the demo's fine-tuning stalled at 0/10): the build starts them fresh."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom downstream import cache, labelled\n"
        "torch.ones(512, 512) @ torch.ones(512, 512)  # the thread pool is up\n"
        f"cases = labelled.read_dataset({task.root!r}).cases\n"
        f"print(len(cache.build(cases, 2.0, {str(tmp_path / 'cache')!r}, workers=2)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3"


def test_a_cut_short_or_foreign_array_in_the_cache_is_redone_naming_it(task, tmp_path, capsys):
    folder = tmp_path / "cache"
    records = cache.build(task.cases, 2.0, str(folder))
    image = folder / f"{task.cases[0]['id']}.image.npy"
    with open(image, "r+b") as f:
        f.truncate(os.path.getsize(image) // 2)  # a copy or a disk that gave out half-way
    np.save(folder / f"{task.cases[1]['id']}.label.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    capsys.readouterr()
    rebuilt = cache.build(task.cases, 2.0, str(folder))
    out = capsys.readouterr().out
    assert "2 written, 1 skipped" in out
    assert f"{image} " in out and "cut short" in out and "a pickle" in out
    for old, new in zip(records, rebuilt):
        assert np.array_equal(np.load(old["image"]), np.load(new["image"])) and np.load(new["label"]).dtype == np.uint8


def test_an_edit_that_keeps_size_and_time_is_seen(tmp_path, capsys):
    write_cube_task(str(tmp_path / "task"), n=3)
    meta = json.loads((tmp_path / "task" / "dataset.json").read_text())
    label = tmp_path / "task" / "labelsTr" / "c1.nii"
    img = nib.load(tmp_path / "task" / "labelsTr" / "c1.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.uint8), img.affine), label)  # uncompressed: an edit keeps the size
    meta["training"][1]["label"] = "./labelsTr/c1.nii"
    (tmp_path / "task" / "dataset.json").write_text(json.dumps(meta))
    data = labelled.read_dataset(str(tmp_path / "task"))
    cache.build(data.cases, 2.0, str(tmp_path / "cache"))
    st = os.stat(label)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), label)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(label).st_size == st.st_size and os.stat(label).st_mtime_ns == st.st_mtime_ns
    capsys.readouterr()
    records = cache.build(data.cases, 2.0, str(tmp_path / "cache"))
    assert "1 written, 2 skipped" in capsys.readouterr().out
    assert not np.load(records[1]["label"]).any()


def test_an_unchanged_case_that_passed_the_check_is_not_read_again(task, tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    assert cache.checked_cases(task.cases, 2.0, folder) == set()
    cache.build(task.cases, 2.0, folder)  # built without a check (a benchmark, say): no verdict kept
    assert cache.checked_cases(task.cases, 2.0, folder) == set()
    cache.build(task.cases, 2.0, folder, checked=True)  # after a passed check: the records keep it
    known = cache.checked_cases(task.cases, 2.0, folder)
    assert known == {c["id"] for c in task.cases}
    reads = []

    def read_volume(path):
        reads.append(path)
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(labelled, "read_volume", read_volume)
    assert labelled.check_integrity(task, known_good=known) == [] and reads == []
    path = task.cases[2]["label"]
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), path)  # rewritten: new time, so the record no longer matches
    monkeypatch.undo()
    assert cache.checked_cases(task.cases, 2.0, folder) == known - {task.cases[2]["id"]}


def test_the_default_cache_is_never_beside_the_dataset_and_a_former_one_is_used_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DESD_CACHE", str(tmp_path / "root"))
    data = tmp_path / "nnUNet_raw" / "Dataset003_Liver"
    first = cache.default_dir(str(data), 1.0)
    assert first.startswith(str(tmp_path / "root" / "preprocessed" / "Dataset003_Liver-")) and first.endswith("1mm")
    assert cache.default_dir(str(tmp_path / "elsewhere" / "Dataset003_Liver"), 1.0) != first  # same name, another dataset
    former = cache.former_dir(str(data), 1.0)
    os.makedirs(former)
    (tmp_path / former / "c0.json").write_text("{}")
    assert cache.default_dir(str(data), 1.0) == former
    assert "nnU-Net's commands fail on such a sibling folder" in capsys.readouterr().out
