"""Pytest fixtures of the k8s tier (imported into ``tests/conftest.py``).

- ``kube_cluster``: one real etcd + kube-apiserver for the whole session
  (:class:`~tests.support.kubecluster.KubeCluster`: ``.kubeconfig`` is an admin
  kubeconfig path, ``.api`` an admin ``kubernetes.client.ApiClient``,
  ``.api_client_for_token(token)`` a client acting as someone else).
- ``kube_api``: that admin ``ApiClient``.

Started on first use, stopped and its directory removed when the session
ends, also after failures. The binaries come from the cache that
``make k8s-binaries`` fills; a missing cache is built here, with its progress
shown past pytest's capture. A build or start failure is an error of every
test that asks for the cluster (never a skip).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.kubeapi import Binaries, build, cached_binaries, print_progress
from tests.support.kubecluster import KubeCluster, start_cluster


def _binaries(config: pytest.Config) -> Binaries:
    found = cached_binaries()
    if found is not None:
        return found
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        return build()
    with capture.global_and_fixture_disabled():
        print_progress("the k8s tier's binaries are not cached yet (make k8s-binaries builds them)")
        return build()


@pytest.fixture(scope="session")
def kube_cluster(request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    cluster = start_cluster(_binaries(request.config))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_api(kube_cluster: KubeCluster) -> Any:
    return kube_cluster.api
