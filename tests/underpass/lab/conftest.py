"""Fixtures that build real labs (root only) and always tear them down."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.underpass.lab.labkit import LabHandle, new_handle, require_root, teardown


@pytest.fixture
def make_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A factory of labs; every lab it made is torn down, pass or fail."""
    require_root()
    labs: list[LabHandle] = []

    def make(*up_args: str) -> LabHandle:
        handle = new_handle(tmp_path_factory.mktemp("lab"), *up_args)
        labs.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in labs:
            teardown(handle)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """One 2-node x 2-pod lab shared by a module's tests (each test undoes its changes)."""
    require_root()
    handle = new_handle(tmp_path_factory.mktemp("lab"), "--nodes", "2", "--pods-per-node", "2")
    try:
        handle.up()
        yield handle
    finally:
        teardown(handle)
