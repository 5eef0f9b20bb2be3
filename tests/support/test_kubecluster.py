"""The k8s tier's cluster fixture itself: a real, pinned kube-apiserver with our CRDs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.support.kubeapi import KUBERNETES_VERSION, cached_binaries
from tests.support.kubecluster import (
    ADMIN_USER,
    CRDS,
    ClusterStartError,
    KubeCluster,
    _http_ok,
    _Process,
    _ssl_context,
    running_cluster,
)
from tests.support.kubeobjects import ensure_namespace, unique_name

pytestmark = pytest.mark.k8s


def test_the_pinned_apiserver_is_ready(kube_cluster: KubeCluster) -> None:
    version: Any = client.VersionApi(kube_cluster.api).get_code()
    assert version.git_version == KUBERNETES_VERSION
    assert _http_ok(f"{kube_cluster.server}/readyz", _ssl_context(kube_cluster.pki))


def test_the_kubeconfig_is_an_admins(kube_cluster: KubeCluster) -> None:
    loader: Any = config
    api = loader.new_client_from_config(config_file=str(kube_cluster.kubeconfig))
    try:
        review: Any = client.AuthenticationV1Api(api).create_self_subject_review(
            client.V1SelfSubjectReview()
        )
    finally:
        api.close()
    assert review.status.user_info.username == ADMIN_USER
    assert "system:masters" in review.status.user_info.groups


@pytest.mark.parametrize("crd", CRDS, ids=lambda crd: crd["spec"]["names"]["kind"])
def test_each_crd_stores_and_serves_its_objects(kube_cluster: KubeCluster, crd: Any) -> None:
    namespace = unique_name("crds")
    ensure_namespace(kube_cluster.api, namespace)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    plural = crd["spec"]["names"]["plural"]
    spec = {"selector": {"matchLabels": {"app": "web"}}, "rules": [{"from": [{"x": 1}]}]}
    objects: Any = client.CustomObjectsApi(kube_cluster.api)
    for version in (v["name"] for v in crd["spec"]["versions"]):
        name = f"sample-{version}"
        body = {
            "apiVersion": f"{group}/{version}",
            "kind": kind,
            "metadata": {"name": name},
            "spec": spec,
        }
        objects.create_namespaced_custom_object(group, version, namespace, plural, body)
        stored = objects.get_namespaced_custom_object(group, version, namespace, plural, name)
        assert stored["spec"] == spec  # unknown fields preserved


def test_a_cluster_stops_its_processes_and_removes_its_directory() -> None:
    binaries = cached_binaries()
    assert binaries is not None, "the session cluster's binaries must be cached by now"
    with running_cluster(binaries) as cluster:
        workdir = cluster.workdir
        processes = list(cluster._processes)
        assert [p.name for p in processes] == ["etcd", "kube-apiserver"]
        assert workdir.is_dir()
    assert all(p.popen.poll() is not None for p in processes)
    assert not workdir.exists()
    cluster.stop()  # idempotent


def test_a_process_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "dies.log"
    proc = _Process.start("dies", ["sh", "-c", "echo bad flag --frobnicate; exit 3"], log)
    proc.popen.wait()
    with pytest.raises(ClusterStartError, match=r"(?s)dies exited with status 3.*--frobnicate"):
        proc.check_alive()
    assert os.path.exists(log)
