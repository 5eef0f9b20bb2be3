"""Fixtures for the HBONE tests: a real CA and real workload certificates."""

from __future__ import annotations

import pytest

from tests.underpass.hbone.support import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A self-signed CA (identity.ca, on disk in a temporary directory) and its certificates."""
    return make_pki(tmp_path_factory.mktemp("hbone-ca"))
