import glob
import os

import pytest

from tests.helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_the_wheel_holds_one_top_level_package_with_every_subpackage_and_the_c_source(tmp_path):
    """`pip install .` puts only `desd` into site-packages (no generic top-level names such as
    `utils` or `dataset`), every package under it, and the C source that the CPU chain compiles."""
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = glob.glob(str(tmp_path / "desd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    packages = {
        os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, "/")
        for p in glob.glob(os.path.join(ROOT, "desd", "**", "__init__.py"), recursive=True)
    }
    assert tops == {"desd"}
    assert {f"{p}/__init__.py" for p in packages} <= set(names) and "desd/augment/intensity.c" in names


def test_every_command_names_a_function_that_exists():
    import importlib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"desd-pretrain", "desd-finetune", "desd-predict", "desd-probe", "desd-check-dataset", "desd-export-teacher"} <= set(scripts)
    for command, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), command
