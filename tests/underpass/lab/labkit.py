"""Helpers for tests that build real labs: a handle driving the CLI, leak checks.

Each lab gets a unique prefix and a state directory under pytest's temporary
directory, so tests never clash with another lab on the machine (the default
one, or another engineer's). :func:`teardown` runs ``underpass lab down`` and
then checks that nothing with the prefix survived; if something did, it
removes it by force and fails the test loudly, so a leak never goes unnoticed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from underpass.lab.cluster import host_ifname, leftovers
from underpass.lab.procs import processes_mentioning
from underpass.lab.registry import LabRegistry

ROOT = Path(__file__).resolve().parents[3]


def require_root() -> None:
    """netns tests need root: fail (never skip) when they cannot run."""
    if os.geteuid() != 0:
        pytest.fail("netns tests need root (network namespaces, veths, CNI plugins)")
    for tool in ("nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.fail(f"netns tests need `{tool}` on PATH")
    for plugin in ("bridge", "host-local", "loopback"):
        if not os.access(f"/usr/lib/cni/{plugin}", os.X_OK):
            pytest.fail(
                f"/usr/lib/cni/{plugin} missing: apt-get install containernetworking-plugins"
            )


def netns_names() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


@dataclass
class LabHandle:
    """A lab under test, driven through the real command line."""

    prefix: str
    state_dir: Path
    up_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def registry(self) -> LabRegistry:
        return LabRegistry(self.state_dir)

    def run(
        self, command: str, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        argv = [
            sys.executable,
            "-m",
            "underpass.cli.main",
            "--log-format",
            "json",
            "lab",
            command,
            "--state-dir",
            str(self.state_dir),
            *args,
        ]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={**os.environ, **self.extra_env},
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`underpass lab {command} {' '.join(args)}` exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def json(self, command: str, *args: str) -> Any:
        return json.loads(self.run(command, *args, "--json").stdout)

    def up(self, *args: str) -> Any:
        return self.json("up", "--prefix", self.prefix, *(args or self.up_args))

    def down(self) -> Any:
        return self.json("down")

    def app(self, pod: str, *args: str, check: bool = True) -> dict[str, Any]:
        """Run the sample app's client inside ``pod``; its JSON report."""
        proc = self.run(
            "exec", pod, "--", sys.executable, "-m", "underpass.lab.sampleapp", *args, check=check
        )
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    def pod_ip(self, namespace: str, name: str) -> str:
        pod = self.registry.pod(namespace, name)
        assert pod is not None and pod.ip is not None, f"pod {namespace}/{name} has no IP"
        return pod.ip

    def leftovers(self) -> list[str]:
        """Everything of this lab still on the machine (empty after a clean down)."""
        return leftovers(self.prefix, self.state_dir)

    def force_cleanup(self) -> None:
        for pid in processes_mentioning(f"lab={self.prefix}") + processes_mentioning(
            str(self.state_dir)
        ):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in netns_names():
            if name.startswith(f"{self.prefix}-"):
                subprocess.run(["ip", "netns", "del", name], check=False)
        if host_ifname(self.prefix) in root_links():
            subprocess.run(["ip", "link", "del", host_ifname(self.prefix)], check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def new_handle(base: Path, *up_args: str) -> LabHandle:
    prefix = "t" + secrets.token_hex(3)
    return LabHandle(prefix, base / "state", tuple(up_args))


def teardown(handle: LabHandle) -> None:
    """``lab down``, then fail loudly (after forcing it clean) if anything is left."""
    proc = handle.run("down", check=False)
    left = handle.leftovers()
    if left:
        handle.force_cleanup()
    if proc.returncode != 0:
        pytest.fail(f"lab down failed ({proc.returncode}): {proc.stderr}")
    if left:
        pytest.fail(f"lab down left things behind: {left}")
