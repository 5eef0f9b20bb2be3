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

- supervisor -> zygote: ``{"id": N, "argv": [...]}`` with the worker's two
  sockets in SCM_RIGHTS; the values of ``--worker-zds-fd`` /
  ``--worker-signer-fd`` in ``argv`` are replaced by the numbers the fds have
  in the zygote;
- zygote -> supervisor: ``{"id": N, "pid": P}`` with a pidfd of the new worker
  (opened by its parent before it could reap, so it can never name another
  process), or ``{"id": N, "error": ...}``; later ``{"exited": P, "status": S}``
  when the zygote reaps a worker. An answer nobody waits for any more (the
  request was cancelled or timed out) gets its worker killed.

Fail closed: the zygote stops its workers (SIGTERM, then SIGKILL after a grace)
and exits when the supervisor closes it or dies (EOF, a parent-death SIGTERM);
a worker also dies with the zygote. What the zygote holds is what the
supervisor held when it forked: command-line options and public roots, never
the node token (read only later, on use). The price of sharing pages: the
supervisor, the zygote and the workers also share their address-space layout,
stack canary and hash seed, so a memory disclosure in one tells an attacker
those of the others.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import gc
import itertools
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import structlog
import trio

log = structlog.get_logger("ztunnel.zygote")

_MAX_MESSAGE: Final = 65536
_PR_SET_PDEATHSIG: Final = 1
_FD_FLAGS: Final = ("--worker-zds-fd", "--worker-signer-fd")
#: How long the zygote lets its workers drain when it stops before killing them.
_STOP_GRACE: Final = 35.0
#: How long the supervisor waits for the zygote's answer to a request, or for the
#: exit status of a worker it saw exit.
_REPLY_TIMEOUT: Final = 10.0


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
    stopping: list[bool] = []
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # SIGTERM (also what the supervisor's death sends) stops the workers first, as EOF does.
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
                stopping.append(True)
                break
            try:
                _fork_worker(control, data, fds, (wake_r, wake_w), children)
            except Exception as exc:
                with contextlib.suppress(OSError):
                    _send(
                        control, {"id": _request_id(data), "error": f"{type(exc).__name__}: {exc}"}
                    )
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        if stopping:
            _stop_children(children)
            os._exit(0)


def _request_id(data: bytes) -> object:
    try:
        return json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None


def _fork_worker(
    control: socket.socket,
    data: bytes,
    fds: list[int],
    private: tuple[int, int],
    children: set[int],
) -> None:
    request = json.loads(data)
    if len(fds) != 2 or not isinstance(request.get("argv"), list):
        raise ZygoteError("a worker request is {id, argv} with two sockets")
    words = worker_words(request["argv"], fds[0], fds[1])
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        _become_worker(control, private, words, parent)
    children.add(pid)  # reaped whatever happens next
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        raise
    try:
        _send(control, {"id": request.get("id"), "pid": pid}, [pidfd])
    except OSError:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(pidfd)


def _become_worker(
    control: socket.socket, private: tuple[int, int], words: list[str], parent: int
) -> NoReturn:
    code: int = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        control.close()
        for fd in private:
            os.close(fd)
        _die_with_parent()
        if os.getppid() != parent:  # the zygote died before the death signal was set
            os._exit(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        from underpass.cli.main import main

        code = main(words)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(control: socket.socket, children: set[int]) -> None:
    while True:
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
    """SIGTERM every worker (they drain), SIGKILL what is left after the grace, reap all."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE
    while children and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid:
            children.discard(pid)
        else:
            time.sleep(0.05)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
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
                with trio.move_on_after(_REPLY_TIMEOUT):
                    await self._reported.wait()
                self.returncode = self._status if self._status is not None else -1
            finally:
                self._watching = False
                self._watch_ended.set()
                self._watch_ended = trio.Event()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self._pidfd < 0:
            raise ProcessLookupError(f"worker {self.pid} is no longer watched")
        signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        pidfd, self._pidfd = self._pidfd, -1
        if pidfd >= 0:
            os.close(pidfd)


@dataclass
class _Pending:
    """A spawn request waiting for the zygote's answer."""

    done: trio.Event = field(default_factory=trio.Event)
    worker: ForkedWorker | None = None
    error: str | None = None


class Zygote:
    """The supervisor's handle on its zygote (see the module docstring)."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self._control = trio.socket.from_stdlib_socket(control)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._workers: dict[int, ForkedWorker] = {}
        self._closing = False
        self._gone = False

    @classmethod
    def fork(cls) -> Zygote:
        """Fork the zygote now. Call it before any thread or event loop starts, and
        before reading any credential: the zygote keeps a copy of this process."""
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()  # else what is buffered is written again by the zygote
        sys.stderr.flush()
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
                self._dispatch(json.loads(data), fds)
        finally:
            self._gone = True
            for pending in self._pending.values():
                pending.error = "the zygote is gone"
                pending.done.set()
        if not self._closing:
            raise ZygoteError(f"the zygote (pid {self.pid}) exited: no worker can start any more")

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        if "exited" in message:
            for fd in fds:
                os.close(fd)
            worker = self._workers.pop(int(message["exited"]), None)
            if worker is not None:
                worker._exited(int(message["status"]))
            return
        request_id = message.get("id")
        pending = self._pending.pop(request_id, None) if isinstance(request_id, int) else None
        if "pid" in message and len(fds) == 1:
            # Registered here, before any exit report of it can be read (the zygote
            # answers before it can reap).
            worker = ForkedWorker(int(message["pid"]), fds[0])
            self._workers[worker.pid] = worker
            if pending is None:  # its requester gave up: nobody will watch this one
                log.warning("a worker nobody waits for any more; killing it", pid=worker.pid)
                with contextlib.suppress(ProcessLookupError):
                    worker.kill()
                worker.close()
                return
            pending.worker = worker
        else:
            for fd in fds:
                os.close(fd)
            if pending is None:
                return
            pending.error = str(message.get("error") or "an answer without a worker")
        pending.done.set()

    async def spawn(self, argv: Sequence[str], fds: tuple[int, int]) -> ForkedWorker:
        """A new worker running ``argv`` (``python -m underpass.cli.main ... ztunnel ...``)
        with ``fds`` as its ZDS and signer sockets."""
        if self._gone or self._closing:
            raise ZygoteError("the zygote is gone")
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending()
        message = json.dumps({"id": request_id, "argv": list(argv)}).encode()
        try:
            with trio.CancelScope(shield=True):  # a request is sent whole or not at all
                await self._control.sendmsg(
                    [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            with trio.fail_after(_REPLY_TIMEOUT):
                await pending.done.wait()
        except trio.TooSlowError:
            raise ZygoteError(f"the zygote did not answer within {_REPLY_TIMEOUT:g} s") from None
        except (OSError, trio.ClosedResourceError) as exc:
            raise ZygoteError(f"the zygote is gone: {exc}") from None
        except BaseException:
            if pending.worker is not None:  # answered, but we were cancelled meanwhile
                with contextlib.suppress(ProcessLookupError):
                    pending.worker.kill()
                pending.worker.close()
            raise
        finally:
            # Gone from the table: an answer arriving later kills the worker it names.
            self._pending.pop(request_id, None)
        if pending.worker is None:
            raise ZygoteError(f"the zygote could not start the worker: {pending.error}")
        return pending.worker

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
