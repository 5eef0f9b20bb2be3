"""Mode 3's worker factory: a credential-free process that forks workers sharing its memory.

A per-service-account worker is a whole ztunnel: started as a new interpreter
it costs ~26 MiB of its own, almost all of it the same modules every other
worker and the supervisor load. So the supervisor forks a *zygote* once, at
start, after ztunnel's modules are imported and before it reads its token or
talks to anyone, and the zygote forks each worker. Pages the processes only
read stay shared (``gc.freeze`` keeps the collector from writing to them);
a worker pays for what it changes.

Owns :class:`Zygote` (the supervisor's handle: :meth:`Zygote.fork` and
:meth:`Zygote.spawn`), :class:`ForkedWorker` (a worker as the supervisor
sees it: pid, ``wait``, signals, through a pidfd) and the zygote's own loop.

Protocol on a SOCK_SEQPACKET socketpair, one JSON object per message:

- supervisor -> zygote: ``{"argv": [...]}`` with the worker's two sockets in
  SCM_RIGHTS; the values of ``--worker-zds-fd`` / ``--worker-signer-fd`` in
  ``argv`` are replaced by the numbers the fds have in the zygote;
- zygote -> supervisor: ``{"pid": N}`` with a pidfd of the new worker (opened
  by its parent, so it can never name another process), or ``{"error": ...}``;
  later ``{"exited": N, "status": S}`` when the zygote reaps a worker.

Fail closed: the zygote exits when the supervisor goes (EOF, and a parent-
death signal), taking its workers with it; a worker dies with the zygote.
What the zygote holds is what the supervisor held when it forked: command-line
options and public roots, never the node token (read only later, on use).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import gc
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Sequence
from typing import Any, Final, NoReturn

import structlog
import trio

log = structlog.get_logger("ztunnel.zygote")

_MAX_MESSAGE: Final = 65536
_PR_SET_PDEATHSIG: Final = 1
_FD_FLAGS: Final = ("--worker-zds-fd", "--worker-signer-fd")
#: How long a worker that was told to stop, or whose zygote went, may take.
_STOP_GRACE: Final = 5.0


class ZygoteError(OSError):
    """The zygote could not start a worker, or is gone."""


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def worker_words(argv: Sequence[str], zds_fd: int, signer_fd: int) -> list[str]:
    """The ``underpass`` words of a worker command line, its socket options set to these fds."""
    argv = list(argv)
    try:
        start = argv.index("underpass.cli.main") + 1
    except ValueError:
        raise ZygoteError("a worker command line must run underpass.cli.main") from None
    words = argv[start:]
    for flag, fd in zip(_FD_FLAGS, (zds_fd, signer_fd), strict=True):
        if words.count(flag) != 1:
            raise ZygoteError(f"a worker command line needs {flag} once")
        words[words.index(flag) + 1] = str(fd)
    return words


# -- the zygote (blocking, no trio: it never runs an event loop) ----------------------------


def _serve(control: socket.socket) -> NoReturn:
    """The zygote's loop: fork a worker per request, reap them, exit with the supervisor."""
    _die_with_parent()
    keep = control.fileno()
    # Nothing of the supervisor's but the standard streams (the lab's readiness pipe,
    # sockets, files): a copy here would keep them open after the supervisor closed them.
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    children: set[int] = set()
    poller = select.poll()
    poller.register(keep, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap(control, children)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(control, _MAX_MESSAGE, 2)
            except OSError:
                data, fds = b"", []
            if not data:
                _stop_children(children)
                os._exit(0)
            try:
                pid = _fork_worker(control, data, fds, (wake_r, wake_w))
            except Exception as exc:
                _send(control, {"error": f"{type(exc).__name__}: {exc}"})
            else:
                children.add(pid)
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def _fork_worker(
    control: socket.socket, data: bytes, fds: list[int], private: tuple[int, int]
) -> int:
    request = json.loads(data)
    if len(fds) != 2 or not isinstance(request.get("argv"), list):
        raise ZygoteError("a worker request is {argv} with two sockets")
    words = worker_words(request["argv"], fds[0], fds[1])
    pid = os.fork()
    if pid == 0:  # the worker
        _become_worker(control, private, words)
    pidfd = os.pidfd_open(pid)
    try:
        _send(control, {"pid": pid}, [pidfd])
    finally:
        os.close(pidfd)
    return pid


def _become_worker(control: socket.socket, private: tuple[int, int], words: list[str]) -> NoReturn:
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        control.close()
        for fd in private:
            os.close(fd)
        _die_with_parent()
        from underpass.cli.main import main

        code = main(words)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(control: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):
            _send(control, {"exited": pid, "status": os.waitstatus_to_exitcode(status)})


def _stop_children(children: set[int]) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    # They drain on SIGTERM; the zygote's parent is gone, so nobody else will wait.
    signal.alarm(int(_STOP_GRACE) + 1)
    for _ in list(children):
        with contextlib.suppress(ChildProcessError):
            os.wait()


def _send(control: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    socket.send_fds(control, [json.dumps(message).encode()], list(fds))


# -- the supervisor's side --------------------------------------------------------------------


class ForkedWorker:
    """A worker forked by the zygote, as the supervisor sees it (what ``trio.Process`` offers).

    The pidfd came from the worker's parent before it could be reaped, so
    signals always reach this worker, never a process that took its pid later.
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.returncode: int | None = None
        self._status: int | None = None
        self._reported = trio.Event()
        self._watching = False
        self._watch_ended = trio.Event()

    def _exited(self, status: int) -> None:
        self._status = status
        self._reported.set()

    async def wait(self) -> int:
        """Until the worker has exited; its exit status (as the zygote reaped it).

        Any number of tasks may wait: one watches the pidfd (trio allows one
        reader per fd), the others wait for it, and take over if it is cancelled.
        """
        while self.returncode is None:
            if self._watching:
                await self._watch_ended.wait()
                continue
            self._watching = True
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
                # The zygote reports the status when it reaps; if it is gone, none comes.
                with trio.move_on_after(_STOP_GRACE):
                    await self._reported.wait()
                self.returncode = self._status if self._status is not None else -1
            finally:
                self._watching = False
                self._watch_ended.set()
                self._watch_ended = trio.Event()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._pidfd)


class Zygote:
    """The supervisor's handle on its zygote (see the module docstring)."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self._control = trio.socket.from_stdlib_socket(control)
        self._lock = trio.Lock()
        self._reply: trio.MemorySendChannel[tuple[dict[str, Any], list[int]]]
        self._replies: trio.MemoryReceiveChannel[tuple[dict[str, Any], list[int]]]
        self._reply, self._replies = trio.open_memory_channel(1)
        self._workers: dict[int, ForkedWorker] = {}
        self._closing = False

    @classmethod
    def fork(cls) -> Zygote:
        """Fork the zygote now. Call it before any thread or event loop starts, and
        before reading any credential: the zygote keeps a copy of this process."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gc.collect()
        gc.freeze()  # the collector would otherwise write into every shared page
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            try:
                _serve(child_end)
            finally:
                os._exit(1)
        child_end.close()
        # Frozen here too: the supervisor's collector must not copy the shared pages either.
        return cls(pid, parent_end)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the zygote's messages until it goes (then every worker is gone too).

        A zygote that goes without :meth:`close` raises :class:`ZygoteError`: the
        supervisor cannot start workers any more, so it fails (and is restarted)
        rather than serve on without them.
        """
        task_status.started()
        try:
            while True:
                try:
                    data, fds = await _recv(self._control)
                except (OSError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                message = json.loads(data)
                if "exited" in message:
                    worker = self._workers.pop(int(message["exited"]), None)
                    if worker is not None:
                        worker._exited(int(message["status"]))
                    for fd in fds:
                        os.close(fd)
                else:
                    await self._reply.send((message, fds))
        finally:
            self._reply.close()
        if not self._closing:
            raise ZygoteError(f"the zygote (pid {self.pid}) exited: no worker can start any more")

    async def spawn(self, argv: Sequence[str], fds: tuple[int, int]) -> ForkedWorker:
        """A new worker running ``argv`` (``python -m underpass.cli.main ... ztunnel ...``)
        with ``fds`` as its ZDS and signer sockets."""
        async with self._lock:
            message = json.dumps({"argv": list(argv)}).encode()
            try:
                await self._control.sendmsg(
                    [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
                reply, pidfds = await self._replies.receive()
            except (OSError, trio.EndOfChannel, trio.ClosedResourceError) as exc:
                raise ZygoteError(f"the zygote is gone: {exc}") from None
            if "error" in reply or len(pidfds) != 1:
                for fd in pidfds:
                    os.close(fd)
                raise ZygoteError(f"the zygote could not start the worker: {reply.get('error')}")
            worker = ForkedWorker(int(reply["pid"]), pidfds[0])
            self._workers[worker.pid] = worker
            return worker

    def close(self) -> None:
        """Close the control socket: the zygote stops its workers and exits."""
        self._closing = True
        self._control.close()


async def _recv(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = await sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


__all__ = ["ForkedWorker", "Zygote", "ZygoteError", "worker_words"]
