"""The README's commands and snippet work as written: its Python snippet loads a teacher, and every
script it runs as a file (`python preprocessing/DL_save_nifti.py ...`) runs from the root."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from models import create_model
from tests.helpers import ROOT


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_scripts() -> list[str]:
    """The `python <file>.py` scripts of the README's shell blocks and inline commands."""
    return sorted(set(re.findall(r"python ((?:[\w]+/)*\w+\.py)\b", readme())))


def test_the_readme_snippet_loads_every_tensor_of_a_released_format_teacher(tmp_path):
    (snippet,) = re.findall(r"```python\n(.*?)```", readme(), flags=re.S)
    import argparse

    torch.manual_seed(0)
    backbone = create_model("res3d50").state_dict()
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in backbone.items()}, "args": argparse.Namespace(arch="res3d50"), "epoch": 300}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "159 of 159 tensors loaded" in out.stdout


def test_the_readme_names_the_scripts_of_the_layout():
    scripts = readme_scripts()
    assert {"preprocessing/DL_save_nifti.py", "preprocessing/re_spacing_ITK.py", "preprocessing/splitting_to_patches.py"} <= set(scripts)
    assert all(os.path.isfile(os.path.join(ROOT, s)) for s in scripts), scripts


@pytest.mark.parametrize("script", readme_scripts())
def test_every_script_the_readme_names_runs_as_a_file_from_the_root(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_a_preprocessing_script_runs_as_a_module_from_another_folder(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "preprocessing.splitting_to_patches", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "--data_root" in out.stdout, out.stderr


def recorded_summary_table(run: str) -> tuple[dict, str]:
    """A recorded run's results.json and the headline table rebuilt from it, checked to be the
    table of the run's own results.md."""
    import evaluate

    folder = os.path.join(ROOT, "benchmarks", "results", run)
    results = evaluate.load_results(os.path.join(folder, "results.json"))
    table = evaluate.summary_table(results)
    with open(os.path.join(folder, "results.md")) as f:
        assert table in f.read()  # results.md was written from the same results.json
    return results, table


def evidence() -> str:
    with open(os.path.join(ROOT, "docs", "evidence.md")) as f:
        return f.read()


def test_the_evidence_tables_are_those_of_the_recorded_run():
    """The README's and docs/evidence.md's headline table is rebuilt from the recorded run's
    results.json, a run of `make evaluate`'s configuration on the default phantoms, so that no
    figure drifts from its run."""
    import evaluate

    results, table = recorded_summary_table("evidence_cpu_varied_fresh")
    assert "histogram, 54 features (no network)" in table  # the floor is in the recorded run
    assert results["settings"] == json.loads(json.dumps(dataclasses.asdict(evaluate.CONFIGS["cpu"])))  # make evaluate's now
    assert table in readme(), "README's table differs from evaluate.summary_table of the recorded run"
    assert table in evidence(), "docs/evidence.md's table differs from evaluate.summary_table of the recorded run"


def test_the_portal_phantoms_table_is_that_of_its_recorded_run():
    """docs/evidence.md's table of the former, portal phantoms is rebuilt from that run's
    results.json too (a run from before the style was recorded, so it names none)."""
    results, table = recorded_summary_table("evidence_cpu_fresh")
    assert results["settings"].get("phantoms", "portal") == "portal"
    assert table in evidence(), "docs/evidence.md's portal table differs from evaluate.summary_table of the recorded run"


@pytest.mark.parametrize("run, phantoms", [("evidence_cpu_varied", "varied"), ("evidence_cpu_rerun", "portal")])
def test_the_real_ct_tables_are_those_of_their_recorded_runs(run, phantoms):
    """docs/evidence.md's real-CT tables, of teachers pretrained on each phantom style, are rebuilt
    from their runs' results.json too, and say whose labels they score against."""
    import evaluate

    results = evaluate.load_results(os.path.join(ROOT, "benchmarks", "results", run, "results.json"))
    assert results["settings"].get("phantoms", "portal") == phantoms
    table = evaluate.real_ct_table(results)
    assert "upperabdomen liver" in table and "chestcta aorta" in table
    text = evidence()
    assert table in text, f"docs/evidence.md's real-CT table differs from evaluate.real_ct_table of {run}"
    section = text[text.index("## Real CT") : text.index(table)]
    assert "predicted by TotalSegmentator" in section and f"benchmarks/results/{run}/" in section
    with open(os.path.join(ROOT, "benchmarks", "results", run, "results.md")) as f:
        assert table in f.read()


def readme_shell_lines() -> list[str]:
    """Every command of the README's sh blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", readme(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


# Lines the tests below do not run, and why: they need GPUs, several nodes, a scheduler, the
# whole suite itself or an hour; nnU-Net's five run in tests/test_nnunet.py.
NOT_RUN = {
    "make demo": "the demo itself",
    "make test": "the suite itself",
    "make evaluate": "an hour",
    "NPROC_PER_NODE=1 DATA_PATH": "one GPU",
    "DATA_PATH=data/DeepLesion OUTPUT_DIR": "every GPU of the node",
    "NNODES=2": "two nodes",
    "MASTER_ADDR=$(scontrol": "SLURM",
    "nnUNetv2_": "tests/test_nnunet.py runs the five on the real-CT set, a res3d10 teacher and a coarse grid",
    "desd-nnunet-plans": "tests/test_nnunet.py, as above",
}


def checkout_view(folder) -> None:
    """The checkout's entries linked into `folder`, which keeps data/ and snapshots/ of its own."""
    for name in os.listdir(ROOT):
        if name not in {".git", ".venv", "data", "snapshots"}:
            os.symlink(os.path.join(ROOT, name), os.path.join(folder, name))


def run_line(command: str, cwd, line: str) -> None:
    """One README line through sh, with this environment's python first on PATH."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable}
    out = subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600
    )  # progress bars print non-ASCII whatever the locale says
    assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


# The fine-tuning section's lines, run by their own test below on a labelled set it writes.
FINETUNING_LINES = ("DATA_DIR=", "python tools/compare_dice.py", "python predict.py")


def test_the_readme_preprocessing_and_cpu_pretraining_lines_run_as_typed(tmp_path):
    """The README's shell lines run in a view of the checkout (its entries linked into a new
    folder, with data/ and snapshots/ there): the DeepLesion scripts on a synthetic DeepLesion,
    the own-CT lines on the real DICOM series, and the CPU pretraining line with its budget
    turned down. Every other line is named in NOT_RUN."""
    from preprocessing.synthetic_deeplesion import make_deeplesion
    from tests.helpers import realct_files

    realct_files()
    checkout_view(tmp_path)
    make_deeplesion(str(tmp_path / "data" / "DeepLesion"), patients=1, size=128, seed=1)
    budget = " --epochs 1 --max_iters_per_epoch 2 --arch res3d10 --out_dim 256 --head_hidden_dim 256 --global_crop_size 48"
    budget += " --local_crop_size 32 --crop_depth 16 --saveckp_freq 1"
    ran = []
    for line in readme_shell_lines():
        if any(line.startswith(k) for k in (*NOT_RUN, *FINETUNING_LINES)):
            continue
        command = line.replace("--workers 16", "--workers 2").replace(
            "~/.cache/desd/realct", os.path.dirname(os.path.dirname(realct_files()))
        )
        if command.startswith("sh run_ssl.sh"):
            command += budget
        run_line(command, tmp_path, line)
        ran.append(line)
    assert len(ran) == 7, ran  # three DeepLesion lines, three own-CT lines, the CPU pretraining
    for root in ("DeepLesion", "MyCT"):
        assert (tmp_path / "data" / root / "SSL_data_deeplesion.txt").read_text().split()
    assert (tmp_path / "snapshots" / "DeSD_res3d50" / "checkpoint.pth").is_file()


@pytest.mark.slow
def test_the_readme_fine_tuning_comparison_and_prediction_lines_run_as_typed(tmp_path):
    """The fine-tuning section's lines in a view of the checkout: data/Dataset003_Liver is a small
    nnU-Net v2 set with its splits_final.json and imagesTs/, snapshots/desd/checkpoint.pth a
    res3d50 teacher in the checkpoint layout. The two run_finetune.sh lines get their budget
    turned down (flags appended, so the last value wins); compare_dice and predict run as written."""
    import json
    import shutil

    from tests.helpers import write_nnunet

    checkout_view(tmp_path)
    data = tmp_path / "data" / "Dataset003_Liver"
    write_nnunet(str(data), n=5)
    (data / "imagesTs").mkdir()
    for i in (3, 4):
        shutil.copy(data / "imagesTr" / f"liver_{i:03d}_0000.nii.gz", data / "imagesTs" / f"test_{i:03d}_0000.nii.gz")
    split = [{"train": [f"liver_{i:03d}" for i in (0, 1, 2, 3)], "val": ["liver_004"]}]
    (data / "splits_final.json").write_text(json.dumps(split))
    (tmp_path / "snapshots" / "desd").mkdir(parents=True)
    backbone = create_model("res3d50").state_dict()
    torch.save(
        {"teacher": {f"module.backbone.{k}": v for k, v in backbone.items()}, "epoch": 1},
        tmp_path / "snapshots" / "desd" / "checkpoint.pth",
    )

    budget = " --epochs 1 --max_iters_per_epoch 2 --patch_size 32 64 64 --batch_size 2 --num_workers 0 --sw_batch_size 4"
    lines = [line for line in readme_shell_lines() if line.startswith(FINETUNING_LINES)]
    assert len(lines) == 4, lines  # fine-tune from the teacher, from scratch, compare, predict
    for line in lines:
        run_line(line + budget if line.startswith("DATA_DIR=") else line, tmp_path, line)

    desd = json.loads((tmp_path / "snapshots" / "finetune_res3d50_desd" / "dice.json").read_text())
    assert [c["case"] for c in desd["per_case"]] == ["liver_004"]  # the split file's fold 0
    assert (tmp_path / "snapshots" / "finetune_res3d50_scratch" / "dice.json").is_file()
    log = (tmp_path / "snapshots" / "finetune_res3d50_desd" / "console.log").read_text()
    assert "Loaded 159 of 159 encoder tensors from the teacher" in log
    for i in (3, 4):
        assert (tmp_path / "preds" / f"test_{i:03d}.nii.gz").is_file()
