import glob
import os

import pytest

from tests.helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_top_level_module_and_package_is_installed():
    """The editable install maps only the modules pyproject.toml lists: a module left out would
    import in the tests (run from the root) but not in scripts run from their own folders."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setup = tomllib.load(f)["tool"]["setuptools"]
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    packages = {os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, "*", "__init__.py"))} - {"tests"}
    assert set(setup["py-modules"]) == modules and set(setup["packages"]) == packages


def test_every_command_names_a_function_that_exists():
    import importlib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert {"desd-pretrain", "desd-finetune", "desd-predict", "desd-probe", "desd-check-dataset", "desd-export-teacher"} <= set(scripts)
    for command, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), command
