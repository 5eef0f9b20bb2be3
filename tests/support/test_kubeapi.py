"""The k8s binaries' cache: what counts as a usable, stamped build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.kubeapi import (
    KUBERNETES_VERSION,
    RECIPE,
    KubernetesModule,
    cache_dir,
    cache_root,
    cached_binaries,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNDERPASS_K8S_CACHE", str(tmp_path))
    return tmp_path / KUBERNETES_VERSION


def fake_build(directory: Path, **stamp_overrides: object) -> None:
    (directory / "bin").mkdir(parents=True)
    sizes = {}
    for name in ("kube-apiserver", "etcd"):
        path = directory / "bin" / name
        path.write_bytes(b"\x7fELF" + name.encode())
        path.chmod(0o755)
        sizes[name] = path.stat().st_size
    stamp = {"recipe": RECIPE, "kubernetes": KUBERNETES_VERSION, "etcd": "v3.6.8", "sizes": sizes}
    stamp.update(stamp_overrides)
    (directory / "stamp.json").write_text(json.dumps(stamp))


def test_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNDERPASS_K8S_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "underpass" / "k8s"
    monkeypatch.setenv("UNDERPASS_K8S_CACHE", "/somewhere")
    assert cache_dir("v1.2.3") == Path("/somewhere/v1.2.3")


def test_a_stamped_build_is_used(cache: Path) -> None:
    fake_build(cache)
    found = cached_binaries()
    assert found is not None
    assert found.kube_apiserver == cache / "bin" / "kube-apiserver"
    assert found.etcd_version == "v3.6.8"


def test_nothing_is_cached_without_a_stamp(cache: Path) -> None:
    fake_build(cache)
    (cache / "stamp.json").unlink()
    assert cached_binaries() is None


@pytest.mark.parametrize("overrides", [{"recipe": RECIPE + 1}, {"kubernetes": "v1.0.0"}])
def test_a_stamp_of_another_build_is_ignored(cache: Path, overrides: dict[str, object]) -> None:
    fake_build(cache, **overrides)
    assert cached_binaries() is None


def test_a_truncated_binary_is_ignored(cache: Path) -> None:
    fake_build(cache)
    (cache / "bin" / "etcd").write_bytes(b"x")
    assert cached_binaries() is None


def test_an_unexecutable_binary_is_ignored(cache: Path) -> None:
    fake_build(cache)
    (cache / "bin" / "kube-apiserver").chmod(0o644)
    assert cached_binaries() is None


def test_staging_modules_take_the_matching_zero_version() -> None:
    k8s = KubernetesModule("v1.36.3", "1.26.0", ("k8s.io/api",), "v3.6.8")
    assert k8s.staging_version == "v0.36.3"
