"""Folders for stores that a test cannot take from pytest's tmp_path: hypothesis runs a
test function many times over one set of fixtures, so such tests open a fresh store per
example. They all go under one folder of this test process, removed when it exits,
rather than piling up in the system's temporary folder run after run."""

from __future__ import annotations

import atexit
import shutil
import tempfile

_base: str | None = None


def scratch_folder(prefix: str = "bitseg-") -> str:
    """A new empty folder, gone when the test process exits."""
    global _base
    if _base is None:
        _base = tempfile.mkdtemp(prefix="bitseg-tests-")
        atexit.register(shutil.rmtree, _base, True)
    return tempfile.mkdtemp(prefix=prefix, dir=_base)
