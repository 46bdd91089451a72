"""Shared fixtures: tiny patch sets written the way the preprocessing writes them."""

from __future__ import annotations

import os

import pytest

from tools.tiny_data import TINY_TRAIN_ARGS, write_cube_task, write_patches  # noqa: F401 - the tests import them from here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def patch_root(tmp_path):
    return write_patches(str(tmp_path / "data"))


def run_main_desd(argv: list[str]) -> None:
    """Run main_desd in this process with the given command line."""
    import argparse

    import main_desd

    parser = argparse.ArgumentParser("DeSD", parents=[main_desd.get_args_parser()])
    main_desd.train_desd(parser.parse_args(argv))
