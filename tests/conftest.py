"""Shared fixtures; shared helpers live in tests/helpers.py."""

from __future__ import annotations

import pytest

from tests.helpers import write_patches


@pytest.fixture(autouse=True)
def _cache_root(tmp_path, monkeypatch):
    """Fine-tuning caches of a test go to its own folder, never to ~/.cache/desd."""
    monkeypatch.setenv("DESD_CACHE", str(tmp_path / "desd_cache"))


@pytest.fixture
def patch_root(tmp_path):
    return write_patches(str(tmp_path / "data"))


@pytest.fixture
def compiled_chain():
    """The compiled intensity chain, built on first use by a test that needs it (not at
    collection); the test is skipped where no C compiler can build it."""
    from augment import native_chain

    library = native_chain.library()
    if library is None:
        pytest.skip("no C compiler: the compiled chain cannot be built here")
    return library
