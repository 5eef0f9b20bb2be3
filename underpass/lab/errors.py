"""Errors of the lab: each says what went wrong and what the operator can do.

Owns the lab's error types; :mod:`underpass.lab.registry` re-exports the ones
that registry readers (other components) need to catch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class LabError(Exception):
    """Base class of every error the lab raises on purpose."""


class LabStateError(LabError):
    """The lab's state directory is missing, unreadable or corrupt."""


class ObjectNotFound(LabError, LookupError):
    """A registry object (pod, namespace, node, service) does not exist."""


class InvalidObject(LabError, ValueError):
    """A name, label or field that Kubernetes would reject."""


class NetnsError(LabError):
    """A network namespace operation failed."""


class CniError(LabError):
    """A CNI plugin failed; carries the plugin's error code, message and details."""

    def __init__(
        self,
        plugin: str,
        command: str,
        code: int,
        msg: str,
        details: str = "",
        *,
        stderr: str = "",
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        self.stderr = stderr
        text = f"CNI {command} failed in plugin {plugin!r}: code {code}: {msg}"
        if details:
            text += f" ({details})"
        if stderr:
            text += f"; stderr: {stderr.strip()[-500:]}"
        super().__init__(text)

    @classmethod
    def from_output(cls, plugin: str, command: str, doc: Mapping[str, Any]) -> CniError:
        """Build from a plugin's spec error document (``code``, ``msg``, ``details``)."""
        code = doc.get("code")
        return cls(
            plugin,
            command,
            code if isinstance(code, int) else 999,
            str(doc.get("msg", "no message")),
            str(doc.get("details", "")),
        )
