import glob
import os

import pytest

from tests.helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


# what a non-editable `pip install .` puts into site-packages: the design card's names, nothing more
WHEEL_TOP_LEVEL = {
    "main_desd.py", "finetune.py", "predict.py", "evaluate.py", "utils.py", "loss.py", "dataset.py",
    "models", "preprocessing", "augment", "downstream", "tools",
}  # fmt: skip


def test_the_wheel_installs_exactly_the_cards_top_level_names_every_package_and_the_c_source(tmp_path):
    """A new generic top-level name cannot slip into site-packages unnoticed: the set is pinned.
    Every package of the checkout is inside, and so is the C source that the CPU chain compiles."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"  # built from a copy: setuptools leaves build/ in the folder it builds
    leave = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "demo_*", "bench_data", "evidence*", "snapshots")
    shutil.copytree(ROOT, source, ignore=leave)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = glob.glob(str(tmp_path / "desd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    packages = {
        os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, "/")
        for top in WHEEL_TOP_LEVEL
        for p in glob.glob(os.path.join(ROOT, top, "**", "__init__.py"), recursive=True)
    }
    assert tops == WHEEL_TOP_LEVEL
    assert {f"{p}/__init__.py" for p in packages} <= set(names) and "augment/intensity.c" in names


def test_every_package_at_the_root_is_in_the_wheel():
    """A new folder of library code at the root must be added to the pinned set (or be a leaf)."""
    leaves = {"tests", "benchmarks", "docs", "build"}
    found = {
        name
        for name in os.listdir(ROOT)
        if os.path.isfile(os.path.join(ROOT, name, "__init__.py")) and name not in leaves and not name.startswith(".")
    }
    assert found == {t for t in WHEEL_TOP_LEVEL if not t.endswith(".py")}


def test_every_command_names_a_function_that_exists():
    import importlib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"desd-pretrain", "desd-finetune", "desd-predict", "desd-probe", "desd-check-dataset", "desd-export-teacher"} <= set(scripts)
    for command, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), command
