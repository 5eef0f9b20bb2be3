"""A real etcd + kube-apiserver on loopback, for the k8s test tier.

:func:`start_cluster` runs the binaries from :mod:`tests.support.kubeapi` in a
fresh temporary directory:

- etcd on two free loopback ports (client, peer), fsync off (the data is thrown
  away);
- kube-apiserver on a free loopback port with serving certificates from a
  throwaway CA, client-certificate authentication (the admin is in
  ``system:masters``), ``--authorization-mode=RBAC``, and a service-account
  signing key so that TokenRequest and TokenReview work;
- the CRDs of :data:`CRDS` (Istio security, Gateway API), established.

The result, :class:`KubeCluster`, holds an admin kubeconfig and an admin
``kubernetes.client.ApiClient``; :meth:`KubeCluster.stop` stops both processes
and removes the directory. No kubelet, scheduler or controller manager runs:
tests create Node objects, set pod status through the status subresource as
a kubelet would, and create every ServiceAccount they use (there is no
``default`` one). Namespaces are never finalized, so give each test its own.

Both processes get ``PR_SET_PDEATHSIG`` (via util-linux ``setpriv``): if the
test process dies without cleaning up, they die too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.kubeapi import Binaries

#: The issuer (and default API audience) of service-account tokens, as in a real cluster.
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "underpass-test-admin"
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
START_ATTEMPTS = 3


class ClusterStartError(RuntimeError):
    """etcd or kube-apiserver did not come up; the message carries the log tail."""


# -- certificates --------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


@dataclass(frozen=True, slots=True)
class ClusterPki:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_public_key: Path
    sa_signing_key: Path


def make_pki(directory: Path) -> ClusterPki:
    """A CA, the apiserver's serving pair, an admin client pair and the SA signing key."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "underpass-test-kubernetes-ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        name: x509.Name, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    serving_key, serving_cert = leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
    )
    admin_key, admin_cert = leaf(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, ADMIN_USER),
            ]
        ),
        ExtendedKeyUsageOID.CLIENT_AUTH,
        None,
    )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    sa_public = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    directory.mkdir(mode=0o700)
    (directory / "ca.crt").write_bytes(_pem_cert(ca_cert))
    (directory / "apiserver.crt").write_bytes(_pem_cert(serving_cert))
    (directory / "admin.crt").write_bytes(_pem_cert(admin_cert))
    (directory / "sa.pub").write_bytes(sa_public)
    return ClusterPki(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "apiserver.crt",
        serving_key=_write_private(directory / "apiserver.key", _pem_key(serving_key)),
        admin_cert=directory / "admin.crt",
        admin_key=_write_private(directory / "admin.key", _pem_key(admin_key)),
        sa_public_key=directory / "sa.pub",
        sa_signing_key=_write_private(directory / "sa.key", _pem_key(sa_key)),
    )


# -- CRDs ------------------------------------------------------------------------------

_OPEN_OBJECT: dict[str, Any] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def minimal_crd(
    group: str,
    kind: str,
    plural: str,
    versions: tuple[str, ...],
    *,
    short_names: tuple[str, ...] = (),
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A namespaced CRD whose ``spec`` and ``status`` accept anything (structural schema).

    The first version is the storage version; all are served. Validation of the
    fields themselves is the real projects' CRDs' business, not the tests'.
    """
    schema = {
        "openAPIV3Schema": {
            "type": "object",
            "properties": {"spec": _OPEN_OBJECT, "status": _OPEN_OBJECT},
        }
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}", "annotations": dict(annotations or {})},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": list(short_names),
            },
            "versions": [
                {
                    "name": v,
                    "served": True,
                    "storage": i == 0,
                    "schema": schema,
                    "subresources": {"status": {}},
                }
                for i, v in enumerate(versions)
            ],
        },
    }


# Groups under k8s.io need an API-approval annotation; this is Gateway API's own.
_GATEWAY_API_APPROVAL = {
    "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"
}

#: The CRDs every test cluster has: Istio's security APIs and Gateway API (v1).
CRDS: tuple[dict[str, Any], ...] = (
    minimal_crd(
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
        ("v1", "v1beta1"),
        short_names=("ap",),
    ),
    minimal_crd(
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
        ("v1", "v1beta1"),
        short_names=("pa",),
    ),
    minimal_crd(
        "gateway.networking.k8s.io",
        "Gateway",
        "gateways",
        ("v1",),
        short_names=("gtw",),
        annotations=_GATEWAY_API_APPROVAL,
    ),
    minimal_crd(
        "gateway.networking.k8s.io",
        "HTTPRoute",
        "httproutes",
        ("v1",),
        annotations=_GATEWAY_API_APPROVAL,
    ),
)


def install_crds(api_client: Any, crds: tuple[dict[str, Any], ...] = CRDS) -> None:
    """Create ``crds`` and wait (on a watch) until each is Established."""
    from kubernetes import client, watch

    api: Any = client.ApiextensionsV1Api(api_client)
    watches: Any = watch  # untyped
    for crd in crds:
        api.create_custom_resource_definition(crd)
    for crd in crds:
        name = crd["metadata"]["name"]
        stream = watches.Watch()
        established = False
        for event in stream.stream(
            api.list_custom_resource_definition,
            field_selector=f"metadata.name={name}",
            timeout_seconds=30,
        ):
            conditions = event["object"].status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                established = True
                stream.stop()
        if not established:
            raise ClusterStartError(f"CRD {name} was not Established within 30 s")


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Process:
    name: str
    log: Path
    popen: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, argv: list[str], log: Path) -> _Process:
        setpriv = shutil.which("setpriv")
        # The child dies with this process even if it is killed without cleanup.
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches pytest, which stops us in order
            )
        return cls(name, log, popen)

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ClusterStartError(
                f"{self.name} exited with status {code}; last lines of its log:\n{_tail(self.log)}"
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def address_in_use(self) -> bool:
        return "address already in use" in _tail(self.log, 200)


def _wait_until(
    what: str, ready: Any, processes: list[_Process], timeout: float, log: Path
) -> None:
    """Poll ``ready()`` (no event exists for readiness) until True, a process dies or timeout."""
    deadline = time.monotonic() + timeout
    last_error = "not ready yet"
    while True:
        for proc in processes:
            proc.check_alive()
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise ClusterStartError(
                f"{what} not ready within {timeout:.0f} s ({last_error}); last lines of its "
                f"log:\n{_tail(log)}"
            )
        time.sleep(0.1)


# -- the cluster ----------------------------------------------------------------------------


@dataclass
class KubeCluster:
    """A running etcd + kube-apiserver; ``api`` is an admin ``kubernetes.client.ApiClient``."""

    binaries: Binaries
    workdir: Path
    server: str  # https://127.0.0.1:<port>
    kubeconfig: Path  # admin (system:masters) kubeconfig
    pki: ClusterPki
    etcd_url: str
    api: Any = None
    service_account_issuer: str = SERVICE_ACCOUNT_ISSUER
    _processes: list[_Process] = field(default_factory=list, repr=False)

    @property
    def version(self) -> str:
        return self.binaries.kubernetes_version

    def api_client_for_token(self, token: str) -> Any:
        """An ``ApiClient`` authenticating with a bearer token (e.g. a service account's)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.pki.ca_cert)
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(configuration)

    def log_tail(self, name: str = "kube-apiserver", lines: int = 30) -> str:
        return _tail(self.workdir / f"{name}.log", lines)

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd, and remove the working directory (idempotent)."""
        try:
            if self.api is not None:
                self.api.close()
                self.api = None
        finally:
            try:
                for proc in reversed(self._processes):
                    proc.stop()
            finally:
                self._processes.clear()
                shutil.rmtree(self.workdir, ignore_errors=True)


def _ssl_context(pki: ClusterPki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return context


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310
            return bool(response.status == 200)
    except urllib.error.HTTPError:  # 500 while post-start hooks run
        return False


def write_kubeconfig(path: Path, server: str, pki: ClusterPki) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "underpass-test",
                "cluster": {"server": server, "certificate-authority": str(pki.ca_cert)},
            }
        ],
        "users": [
            {
                "name": ADMIN_USER,
                "user": {
                    "client-certificate": str(pki.admin_cert),
                    "client-key": str(pki.admin_key),
                },
            }
        ],
        "contexts": [
            {"name": "underpass-test", "context": {"cluster": "underpass-test", "user": ADMIN_USER}}
        ],
        "current-context": "underpass-test",
    }
    return _write_private(path, yaml.safe_dump(config).encode())


def _start_processes(binaries: Binaries, workdir: Path, pki: ClusterPki) -> KubeCluster:
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd_dir = workdir / "etcd"
    shutil.rmtree(etcd_dir, ignore_errors=True)
    etcd = _Process.start(
        "etcd",
        [
            str(binaries.etcd),
            "--name=underpass-test",
            f"--data-dir={etcd_dir}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=underpass-test={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        workdir / "etcd.log",
    )
    server = f"https://127.0.0.1:{api_port}"
    cluster = KubeCluster(
        binaries=binaries,
        workdir=workdir,
        server=server,
        kubeconfig=workdir / "kubeconfig",
        pki=pki,
        etcd_url=etcd_url,
        _processes=[etcd],
    )
    try:
        _wait_until(
            "etcd",
            lambda: _http_ok(f"{etcd_url}/health"),
            [etcd],
            READY_TIMEOUT,
            etcd.log,
        )
        apiserver = _Process.start(
            "kube-apiserver",
            [
                str(binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_public_key}",
                f"--service-account-signing-key-file={pki.sa_signing_key}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                "--service-cluster-ip-range=10.96.0.0/16",
                # No kubelets: nothing to publish the `kubernetes` Service endpoints for.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
            workdir / "kube-apiserver.log",
        )
        cluster._processes.append(apiserver)
        context = _ssl_context(pki)
        _wait_until(
            "kube-apiserver",
            lambda: _http_ok(f"{server}/readyz", context),
            [etcd, apiserver],
            READY_TIMEOUT,
            apiserver.log,
        )
    except BaseException:
        for proc in reversed(cluster._processes):
            proc.stop()
        raise
    return cluster


def start_cluster(binaries: Binaries, *, crds: tuple[dict[str, Any], ...] = CRDS) -> KubeCluster:
    """Start etcd + kube-apiserver in a new temporary directory, ready and with ``crds``.

    Retries (with new ports) when a free port was taken before a process bound it.
    Raises :class:`ClusterStartError` with the failing process's log tail.
    """
    from kubernetes import config

    workdir = Path(tempfile.mkdtemp(prefix="underpass-k8s-"))
    try:
        pki = make_pki(workdir / "pki")
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                cluster = _start_processes(binaries, workdir, pki)
                break
            except ClusterStartError as exc:
                if attempt == START_ATTEMPTS or "address already in use" not in str(exc):
                    raise
        write_kubeconfig(cluster.kubeconfig, cluster.server, pki)
        try:
            configs: Any = config  # untyped
            cluster.api = configs.new_client_from_config(config_file=str(cluster.kubeconfig))
            install_crds(cluster.api)
        except BaseException:
            cluster.stop()
            raise
        return cluster
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


@contextlib.contextmanager
def running_cluster(binaries: Binaries) -> Iterator[KubeCluster]:
    cluster = start_cluster(binaries)
    try:
        yield cluster
    finally:
        cluster.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_forever(binaries: Binaries) -> int:
    """``python -m tests.support.kubeapi serve``: a cluster to poke at by hand."""
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on `kill` as on Ctrl-C
    with running_cluster(binaries) as cluster:
        print(
            json.dumps({"server": cluster.server, "kubeconfig": str(cluster.kubeconfig)}, indent=2),
            flush=True,
        )
        print(f"kubectl --kubeconfig {cluster.kubeconfig} ...; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0
