"""Processes the lab starts inside its namespaces, tracked so that ``down`` stops them.

Owns finding processes (by network namespace, by command line), starting a
long-running process inside a netns (detached into its own session, output to a
log file, readiness reported on an inherited pipe), the record kept for it under
``<state>/procs/<key>.json`` (pid plus the kernel's start time, so a recycled
pid is never signalled), and stopping processes: SIGTERM, wait on a pidfd,
SIGKILL if they linger.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from underpass.lab import netns
from underpass.lab.errors import LabError
from underpass.lab.registry import write_json_atomic

READY_FD = 3  # where the child finds the write end of the readiness pipe

log = structlog.get_logger("underpass.lab.procs")


@dataclass(frozen=True)
class ProcRecord:
    key: str
    pid: int
    starttime: int  # field 22 of /proc/<pid>/stat: tells a recycled pid apart
    argv: tuple[str, ...]
    netns: str
    log: str


def starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":  # exited, waiting for its parent to reap it
        return None
    return int(fields[19])


def is_alive(record: ProcRecord) -> bool:
    return starttime(record.pid) == record.starttime


def _other_pids() -> Iterator[int]:
    """Every process id but this process's own."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            yield int(entry)


def pids_in(inodes: set[int]) -> list[int]:
    """Processes whose network namespace is one of ``inodes`` (never this process)."""
    found = []
    for pid in _other_pids():
        try:
            link = os.readlink(f"/proc/{pid}/ns/net")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH, errno.EACCES):
                continue
            raise
        # "net:[4026532288]"
        if link.startswith("net:[") and int(link[5:-1]) in inodes:
            found.append(pid)
    return found


def processes_mentioning(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (never this process)."""
    found = []
    for pid in _other_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ")
        except OSError:
            continue
        if needle.encode() in cmdline:
            found.append(pid)
    return found


def record_path(procs_dir: Path, key: str) -> Path:
    return procs_dir / f"{key}.json"


def read_record(procs_dir: Path, key: str) -> ProcRecord | None:
    try:
        doc = json.loads(record_path(procs_dir, key).read_text(encoding="utf-8"))
        return ProcRecord(
            key=str(doc["key"]),
            pid=int(doc["pid"]),
            starttime=int(doc["starttime"]),
            argv=tuple(str(a) for a in doc["argv"]),
            netns=str(doc["netns"]),
            log=str(doc["log"]),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("procs.record.corrupt", proc=key, error=str(exc))
        return None


def read_records(procs_dir: Path) -> list[ProcRecord]:
    try:
        names = sorted(os.listdir(procs_dir))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            record = read_record(procs_dir, name[: -len(".json")])
            if record is not None:
                records.append(record)
    return records


def _start(
    procs_dir: Path,
    argv: Sequence[str],
    netns_path: str,
    log_path: Path,
    env: Mapping[str, str] | None,
) -> tuple[int, int]:
    """posix_spawn the child (returns at once); (pid, read end of the readiness pipe)."""
    procs_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    read_end, write_end = os.pipe()
    full_argv = netns.argv_in(netns_path, argv)
    log_flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    try:
        # posix_spawn rather than subprocess: the child must outlive this process,
        # and a Popen object nobody waits for warns when it is collected.
        pid = os.posix_spawnp(
            full_argv[0],
            full_argv,
            full_env,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log_path), log_flags, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
                (os.POSIX_SPAWN_DUP2, write_end, READY_FD),
            ],
            setsid=True,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return pid, read_end


async def spawn(
    procs_dir: Path,
    key: str,
    argv: Sequence[str],
    *,
    netns_path: str,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 15.0,
) -> ProcRecord:
    """Start ``argv`` inside the netns and wait until it reports ready.

    The child inherits the write end of a pipe as fd 3 and must write a line
    there once it serves (then close it). It runs in its own session so that a
    Ctrl-C of ``lab up`` does not take it down; the record is written only
    once it is ready.
    """
    pid, read_end = _start(procs_dir, argv, netns_path, log_path, env)
    ready = b""
    stream = trio.lowlevel.FdStream(read_end)
    try:
        with trio.move_on_after(ready_timeout):
            while b"\n" not in ready:
                chunk = await stream.receive_some(256)
                if not chunk:
                    break
                ready += chunk
    finally:
        await stream.aclose()
    start = starttime(pid)
    if not ready.startswith(b"ready") or start is None:
        await terminate([pid], timeout=2.0)
        tail = _tail(log_path)
        raise LabError(
            f"{key}: process {' '.join(argv)} did not become ready in {ready_timeout}s"
            + (f"; its log ({log_path}) ends with:\n{tail}" if tail else "")
        )
    record = ProcRecord(key, pid, start, tuple(argv), netns_path, str(log_path))
    write_json_atomic(
        record_path(procs_dir, key),
        {
            "key": key,
            "pid": pid,
            "starttime": start,
            "argv": list(argv),
            "netns": netns_path,
            "log": str(log_path),
        },
    )
    log.debug("procs.started", proc=key, pid=pid)
    return record


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _wait_exit(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until the processes exit (pidfd readable); return those still running."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
    left: list[int] = []
    try:
        with trio.move_on_after(timeout):
            for fd in fds.values():
                await trio.lowlevel.wait_readable(fd)
        for pid in fds:
            # a pidfd polls readable once the process has exited (zombie or reaped)
            if starttime(pid) is None:
                with contextlib.suppress(ChildProcessError):
                    # WNOHANG never blocks; it reaps the child if it is ours
                    os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222
            else:
                left.append(pid)
    finally:
        for fd in fds.values():
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
    return left


async def terminate(pids: Sequence[int], timeout: float = 3.0) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL what is left (and reap children)."""
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    left = await _wait_exit(pids, timeout)
    for pid in left:
        log.warning("procs.kill", pid=pid, reason=f"still running {timeout}s after SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        still = await _wait_exit(left, timeout)
        if still:
            raise LabError(f"processes {still} survived SIGKILL")


async def stop(procs_dir: Path, key: str, timeout: float = 3.0) -> bool:
    """Stop the tracked process ``key``; False if there was none running."""
    record = read_record(procs_dir, key)
    if record is None:
        return False
    running = is_alive(record)
    if running:
        await terminate([record.pid], timeout)
    with contextlib.suppress(FileNotFoundError):
        record_path(procs_dir, key).unlink()
    return running
