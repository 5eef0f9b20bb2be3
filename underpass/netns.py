"""Entering network namespaces from Python (3.11 has no ``os.setns``).

This module owns the one ctypes binding of ``setns(2)`` the project uses.
``setns`` moves only the calling *thread*; a socket created while a thread is
inside a namespace stays in that namespace for its whole life, wherever it is
used afterwards. So the pattern is: create sockets inside the pod netns with
:func:`run_in_netns` (a fresh thread that enters, runs one function, and ends:
no pooled thread is ever left in a foreign namespace), then use them from any
thread or from trio.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_setns = _libc.setns
_setns.argtypes = (ctypes.c_int, ctypes.c_int)
_setns.restype = ctypes.c_int


class NetnsError(OSError):
    """A network namespace could not be opened or entered."""


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace ``fd`` refers to."""
    if _setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(target: str | int) -> Iterator[None]:
    """Run the ``with`` body in the network namespace ``target`` (a path or an fd),
    on the calling thread, and move the thread back afterwards."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(target, int):
            setns(target)
        else:
            try:
                fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise NetnsError(exc.errno, f"cannot open netns {target}: {exc.strerror}") from None
            try:
                setns(fd)
            finally:
                os.close(fd)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)


def run_in_netns(target: str | int, fn: Callable[[], T]) -> T:
    """Call ``fn()`` on a fresh thread inside network namespace ``target``; return
    its result or raise its exception."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            with entered(target):
                result.append(fn())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=body, name="netns", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
