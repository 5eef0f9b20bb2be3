"""Test-suite wide rules.

Every test belongs to exactly one tier (unit, netns, k8s, interop), set with a
module-level ``pytestmark``; a test without a tier fails collection so that no
test silently falls outside `make test`'s tiers.
"""

from __future__ import annotations

import pytest

# The k8s tier's session fixtures (a real kube-apiserver + etcd), for any test directory.
from tests.support.k8s_fixtures import kube_api, kube_cluster  # noqa: F401

TIERS = ("unit", "netns", "k8s", "interop")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t) is not None]
        if len(tiers) != 1:
            raise pytest.UsageError(
                f"{item.nodeid} must carry exactly one tier marker of {TIERS}, has {tiers}"
            )
