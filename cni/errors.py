"""Errors raised by :mod:`cni`.

The plugin's errors carry the CNI error code they are reported with (CNI spec
1.0.0: 1 incompatible version, 4 bad environment, 6 undecodable input, 7 invalid
network config, 11 try again later; 100 and up are ours). The agent's errors say
what failed and what the operator can do; the plugin turns an agent failure into
"try again later" so that no mesh pod ever starts uncaptured.

This module is imported by the plugin on every pod start: keep it dependency-free.
"""

from __future__ import annotations

# CNI error codes (spec 1.0.0, section "Error"; 50/51 are 1.1's STATUS codes).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
#: Our own: the node agent answered that it could not capture the pod.
CAPTURE_FAILED = 100
#: Our own: a bug in the plugin (reported as CNI error JSON, never a traceback).
INTERNAL_ERROR = 101


class CniError(Exception):
    """Base class of every :mod:`cni` error."""


class PluginError(CniError):
    """A failure the plugin reports to the runtime as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, object]:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


class WireError(CniError):
    """A plugin <-> agent message is malformed (bad JSON, wrong fields, too large)."""


class AgentUnreachable(CniError):
    """The node agent's socket could not be reached or did not answer in time."""


class AgentError(CniError):
    """Base class of the node agent's own failures."""

    #: True when the same call may succeed later (tell the plugin to retry).
    temporary = True


class RedirectError(AgentError):
    """Installing, removing or inspecting the redirection rules in a pod netns failed."""


class NetnsGone(RedirectError):
    """The pod's network namespace no longer exists (the pod is gone)."""

    temporary = False


class CaptureMismatch(AgentError):
    """CHECK found a pod captured when it should not be, or the other way round."""

    temporary = False


class SourceError(AgentError):
    """The pod registry (lab registry or Kubernetes) could not be read or updated."""
