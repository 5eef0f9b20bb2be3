"""Helper processes of a comparison inside lab pods, tracked like the lab's own.

Owns starting and stopping processes that cannot report readiness on the
lab's pipe (:func:`underpass.lab.procs.spawn` wants a ``ready`` line on fd 3,
which Envoy and Fortio do not write): :func:`spawn_tracked` starts one inside
a netns in its own session (like the lab's processes: a Ctrl-C of the
comparison does not hit it; the clean-up stops it), writes the lab's process
record for it *at once* (``<state>/procs/<key>.json``, pid plus start time),
so that ``lab down`` stops it whatever happens to the comparison, and then
waits for a readiness check the caller gives, bounded, failing early with the
log's tail if the process exits. :func:`stop_tracked` stops them.

Also the small HTTP GETs the comparison makes to proxies' admin endpoints:
over a Unix socket (:func:`http_get_unix`, Envoy's admin) and over TCP from
inside a netns (:func:`http_get_in_netns`, ztunnel's admin and metrics on a
node's 127.0.0.1). Both block: call them through ``trio.to_thread``.
"""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import trio

from underpass import netns as core_netns
from underpass.compare.errors import LaunchError
from underpass.lab import netns, procs
from underpass.lab.registry import LabPaths, write_json_atomic

#: Set in the environment of every helper process to the lab's prefix, so that a
#: helper whose command line names no lab path (a Fortio server) can still be found.
LAB_ENV: Final = "UNDERPASS_COMPARE_LAB"
#: Seconds between two readiness checks.
READY_POLL_INTERVAL: Final = 0.05
LOG_TAIL_LINES: Final = 15


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _start(
    argv: Sequence[str], netns_path: str, log_path: Path, env: Mapping[str, str] | None
) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_argv = netns.argv_in(netns_path, argv)  # nsenter execs: the pid is the program's
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    # posix_spawn, not subprocess: the process outlives this call (the lab's clean-up
    # or stop_tracked stops and reaps it), and no Popen object is left to warn.
    return os.posix_spawnp(
        full_argv[0],
        full_argv,
        {**os.environ, **(env or {})},
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, str(log_path), flags, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )


def _write_record(paths: LabPaths, record: procs.ProcRecord) -> None:
    paths.procs_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        procs.record_path(paths.procs_dir, record.key),
        {
            "key": record.key,
            "pid": record.pid,
            "starttime": record.starttime,
            "argv": list(record.argv),
            "netns": record.netns,
            "log": record.log,
        },
    )


async def spawn_tracked(
    paths: LabPaths,
    key: str,
    argv: Sequence[str],
    *,
    netns_path: str,
    log_path: Path,
    ready: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    lab_prefix: str,
) -> procs.ProcRecord:
    """Start ``argv`` in the netns, record it for ``lab down``, wait until ``ready()``.

    ``ready`` is polled every :data:`READY_POLL_INTERVAL` up to ``timeout``
    seconds; it returns False (or raises ``OSError``) while the process is not
    ready yet. On failure or cancellation the process is stopped again. The
    process carries ``UNDERPASS_COMPARE_LAB=<lab_prefix>`` (:func:`marked`).
    """
    pid = _start(argv, netns_path, log_path, {LAB_ENV: lab_prefix})
    start = procs.starttime(pid)
    if start is None:
        await procs.terminate([pid], timeout=1.0)  # reaps it
        raise LaunchError(f"{what} exited at once; its log ({log_path}):\n{log_tail(log_path)}")
    record = procs.ProcRecord(key, pid, start, tuple(argv), netns_path, str(log_path))
    _write_record(paths, record)
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    if await ready():
                        return record
                except OSError:
                    pass
                if not procs.is_alive(record):
                    raise LaunchError(
                        f"{what} exited before it was ready; its log ({log_path}) ends with:\n"
                        f"{log_tail(log_path)}"
                    )
                await trio.sleep(READY_POLL_INTERVAL)
    except trio.TooSlowError:
        with trio.CancelScope(shield=True):
            await stop_tracked(paths, [record])
        raise LaunchError(
            f"{what} was not ready within {timeout:g} s; its log ({log_path}) ends with:\n"
            f"{log_tail(log_path)}"
        ) from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await stop_tracked(paths, [record])
        raise


async def stop_tracked(paths: LabPaths, records: Sequence[procs.ProcRecord]) -> None:
    """SIGTERM (then SIGKILL) the processes still running, reap them, drop their records."""
    await procs.terminate([r.pid for r in records if procs.is_alive(r)])
    for record in records:
        procs.record_path(paths.procs_dir, record.key).unlink(missing_ok=True)


def marked(lab_prefix: str) -> list[int]:
    """Helper processes started for the lab ``lab_prefix`` still running (never this one)."""
    needle = f"\0{LAB_ENV}={lab_prefix}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = b"\0" + fh.read()
        except OSError:
            continue
        if needle in environ + b"\0" and procs.starttime(int(entry)) is not None:
            found.append(int(entry))
    return found


# --------------------------------------------------------------------------- HTTP GET


class _ConnectedHTTP(http.client.HTTPConnection):
    """``http.client`` over a socket connected beforehand (Unix, or made in a netns)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.sock = sock

    def connect(self) -> None:  # pragma: no cover - the socket is connected already
        raise OSError("connection closed")


def _get(sock: socket.socket, target: str, timeout: float) -> tuple[int, bytes]:
    connection = _ConnectedHTTP(sock, timeout)
    try:
        connection.request("GET", target, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer: {exc!r}") from exc
    finally:
        connection.close()


def http_get_unix(path: Path, target: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """``GET target`` over the Unix socket at ``path``: (status, body)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return _get(sock, target, timeout)


def http_get_in_netns(
    netns_path: str, host: str, port: int, target: str, timeout: float = 5.0
) -> tuple[int, bytes]:
    """``GET target`` on ``host:port`` as seen from inside the netns: (status, body)."""
    sock = core_netns.run_in_netns(
        netns_path, lambda: socket.create_connection((host, port), timeout=timeout)
    )
    return _get(sock, target, timeout)


def listening_in_netns(netns_path: str, host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connect to ``host:port`` from inside the netns succeeds."""
    try:
        sock = core_netns.run_in_netns(
            netns_path, lambda: socket.create_connection((host, port), timeout=timeout)
        )
    except OSError:
        return False
    sock.close()
    return True
