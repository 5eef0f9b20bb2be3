"""Network-namespace helpers for the lab.

Owns how the lab creates, opens, enters and removes named network namespaces
(``/run/netns/<name>``, the same files ``ip netns`` uses), how it runs a
command inside one and how it sets a per-namespace sysctl. (Finding the
processes living in a namespace is :func:`underpass.lab.procs.pids_in`.)
Netlink work goes through pyroute2; commands go through ``nsenter`` so the
child starts in the target namespace from its first instruction; work this
process does inside a namespace goes through :mod:`underpass.netns` (the
project's one ``setns`` binding).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from underpass import netns as core_netns
from underpass.lab.errors import NetnsError

NETNS_DIR = Path("/run/netns")


def _default_signals_in_child() -> None:
    """pyroute2 forks (without exec) to work inside other namespaces. Such a child
    must die of Ctrl-C or SIGTERM like any helper, not raise KeyboardInterrupt into
    its copy of our stack and go on running the lab's (or the demo's) code."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_signals_in_child)


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


def set_sysctl(name: str, key: str, value: str) -> None:
    """Write a net.* sysctl inside the named netns.

    /proc/sys/net resolves against the netns of the task that opens it, so a
    short-lived thread enters the namespace and writes there
    (:func:`underpass.netns.run_in_netns`); the rest of the process never
    leaves its own namespace.
    """
    target = Path("/proc/sys") / key.replace(".", "/")

    def write() -> None:
        target.write_text(f"{value}\n", encoding="ascii")

    try:
        core_netns.run_in_netns(path_of(name), write)
    except OSError as exc:
        raise NetnsError(f"cannot set {key}={value} in netns {name}: {exc}") from exc


def argv_in(netns_path: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside the netns at ``netns_path``."""
    return ["nsenter", f"--net={netns_path}", "--", *argv]


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
