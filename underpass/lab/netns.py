"""Network-namespace helpers for the lab.

Owns how the lab creates, opens, enters and removes named network namespaces
(``/run/netns/<name>``, the same files ``ip netns`` uses), how it runs a
command inside one, how it sets a per-namespace sysctl, and how it finds the
processes living in a namespace (so that ``lab down`` can stop them).
Netlink work goes through pyroute2; commands go through ``nsenter`` so the
child starts in the target namespace from its first instruction.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from underpass.lab.errors import NetnsError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def path_of(name: str) -> str:
    """The bind-mount path of the named netns."""
    return str(NETNS_DIR / name)


def exists(name: str) -> bool:
    return os.path.exists(path_of(name))


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> bool:
    """Create the named netns; False if it already existed."""
    from pyroute2 import netns as p2netns

    if exists(name):
        return False
    try:
        p2netns.create(name)
    except FileExistsError:
        return False
    except OSError as exc:
        raise NetnsError(f"cannot create network namespace {name}: {exc}") from exc
    return True


def remove(name: str) -> bool:
    """Remove the named netns; False if it did not exist."""
    from pyroute2 import netns as p2netns

    try:
        p2netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NetnsError(f"cannot remove network namespace {name}: {exc}") from exc
    return True


@contextlib.contextmanager
def ipr(name: str | None) -> Iterator[Any]:
    """A pyroute2 netlink handle in the named netns (None: the current one).

    Netlink errors inside the block become :class:`NetnsError` naming the netns.
    """
    from pyroute2 import IPRoute, NetlinkError, NetNS

    if name is not None and not exists(name):
        raise NetnsError(f"network namespace {name} does not exist")
    handle = IPRoute() if name is None else NetNS(name, flags=0)
    try:
        yield handle
    except NetlinkError as exc:
        where = f"network namespace {name}" if name else "the root network namespace"
        raise NetnsError(f"netlink request failed in {where}: {exc}") from exc
    finally:
        handle.close()


def setns(path: str) -> None:
    """Move the *calling thread* into the netns at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def set_sysctl(name: str, key: str, value: str) -> None:
    """Write a net.* sysctl inside the named netns.

    /proc/sys/net resolves against the netns of the task that opens it, so a
    short-lived thread enters the namespace and writes there; the rest of the
    process never leaves its own namespace.
    """
    errors: list[BaseException] = []
    target = Path("/proc/sys") / key.replace(".", "/")

    def worker() -> None:
        try:
            setns(path_of(name))
            target.write_text(f"{value}\n", encoding="ascii")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker, name=f"sysctl-{name}")
    thread.start()
    thread.join()
    if errors:
        raise NetnsError(f"cannot set {key}={value} in netns {name}: {errors[0]}")


def argv_in(netns_path: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside the netns at ``netns_path``."""
    return ["nsenter", f"--net={netns_path}", "--", *argv]


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def pids_in(inodes: set[int]) -> list[int]:
    """Processes whose network namespace is one of ``inodes`` (never this process)."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            link = os.readlink(f"/proc/{entry}/ns/net")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH, errno.EACCES):
                continue
            raise
        # "net:[4026532288]"
        if link.startswith("net:[") and int(link[5:-1]) in inodes:
            found.append(int(entry))
    return found
