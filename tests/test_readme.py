"""The README's commands and snippet work as written: its Python snippet loads a teacher, and every
script it runs as a file (`python preprocessing/DL_save_nifti.py ...`) runs from the root."""

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


def test_the_evidence_tables_are_those_of_the_recorded_run():
    """The README's and docs/evidence.md's headline table is rebuilt from the recorded run's
    results.json, so that no figure drifts from its run."""
    import evaluate

    results = evaluate.load_results(os.path.join(ROOT, "benchmarks", "results", "evidence_cpu_3splits", "results.json"))
    table = evaluate.summary_table(results)
    assert "histogram, 54 features (no network)" in table  # the floor is in the recorded run
    with open(os.path.join(ROOT, "docs", "evidence.md")) as f:
        evidence = f.read()
    assert table in readme(), "README's table differs from evaluate.summary_table of the recorded run"
    assert table in evidence, "docs/evidence.md's table differs from evaluate.summary_table of the recorded run"
    with open(os.path.join(ROOT, "benchmarks", "results", "evidence_cpu_3splits", "results.md")) as f:
        assert table in f.read()  # and results.md was written from the same results.json


def readme_shell_lines() -> list[str]:
    """Every command of the README's sh blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", readme(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


# Lines the test does not run, and why: they need GPUs, several nodes, a scheduler, the whole
# suite itself, or a trained res3d50 and a labelled set (fine-tuning, prediction, nnU-Net,
# whose commands other tests run with their own data).
NOT_RUN = {
    "make demo": "the demo itself",
    "make test": "the suite itself",
    "make evaluate": "an hour",
    "NPROC_PER_NODE=1 DATA_PATH": "one GPU",
    "DATA_PATH=data/DeepLesion OUTPUT_DIR": "every GPU of the node",
    "NNODES=2": "two nodes",
    "MASTER_ADDR=$(scontrol": "SLURM",
    "DATA_DIR=": "a labelled set and a res3d50 teacher (tests/test_commands.py checks what run_finetune.sh passes on)",
    "python tools/compare_dice.py": "two fine-tuning runs (tests/test_finetune.py)",
    "python predict.py": "a fine-tuned model (tests/test_predict.py)",
    "nnUNetv2_": "nnU-Net (tests/test_nnunet.py)",
    "desd-nnunet-plans": "nnU-Net (tests/test_nnunet.py)",
}


def test_the_readme_preprocessing_and_cpu_pretraining_lines_run_as_typed(tmp_path):
    """The README's shell lines run in a view of the checkout (its entries linked into a new
    folder, with data/ and snapshots/ there): the DeepLesion scripts on a synthetic DeepLesion,
    the own-CT lines on the real DICOM series, and the CPU pretraining line with its budget
    turned down. Every other line is named in NOT_RUN."""
    from preprocessing.synthetic_deeplesion import make_deeplesion
    from tests.helpers import realct_files

    realct_files()
    for name in os.listdir(ROOT):
        if name not in {".git", ".venv", "data", "snapshots"}:
            os.symlink(os.path.join(ROOT, name), tmp_path / name)
    make_deeplesion(str(tmp_path / "data" / "DeepLesion"), patients=1, size=128, seed=1)
    budget = " --epochs 1 --max_iters_per_epoch 2 --arch res3d10 --out_dim 256 --head_hidden_dim 256 --global_crop_size 48"
    budget += " --local_crop_size 32 --crop_depth 16 --saveckp_freq 1"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], "PYTHON": sys.executable}
    ran = []
    for line in readme_shell_lines():
        if any(line.startswith(k) for k in NOT_RUN):
            continue
        command = line.replace("--workers 16", "--workers 2").replace(
            "~/.cache/desd/realct", os.path.dirname(os.path.dirname(realct_files()))
        )
        if command.startswith("sh run_ssl.sh"):
            command += budget
        out = subprocess.run(
            ["sh", "-c", command], cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=600
        )  # progress bars print non-ASCII whatever the locale says
        assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        ran.append(line)
    assert len(ran) == 7, ran  # three DeepLesion lines, three own-CT lines, the CPU pretraining
    for root in ("DeepLesion", "MyCT"):
        assert (tmp_path / "data" / root / "SSL_data_deeplesion.txt").read_text().split()
    assert (tmp_path / "snapshots" / "DeSD_res3d50" / "checkpoint.pth").is_file()
