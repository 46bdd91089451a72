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
