"""The plugin <-> node agent messages: one JSON object per line, one exchange
per connection on the agent's unix stream socket.

Request (plugin -> agent)::

    {"v": 1, "command": "ADD" | "DEL" | "CHECK" | "STATUS",
     "pod": {"namespace", "name", "uid", "netns", "containerId", "ifname", "ips": [...]}}

Response (agent -> plugin)::

    {"v": 1, "ok": true, "enrolled": bool, "reason": str}
    {"v": 1, "ok": false, "error": str, "temporary": bool}

Both sides validate everything they read and raise :class:`~cni.errors.WireError`;
this module is imported by the plugin on every pod start, so it is stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cni.errors import WireError

VERSION = 1
#: Largest message either side reads; anything longer is refused.
MAX_MESSAGE = 64 * 1024
COMMANDS = frozenset({"ADD", "DEL", "CHECK", "STATUS"})
DEFAULT_AGENT_SOCKET = "/var/run/underpass/cni.sock"


@dataclass(frozen=True, slots=True)
class PodRef:
    """The pod as the CNI runtime describes it."""

    namespace: str
    name: str
    uid: str = ""
    netns: str = ""
    container_id: str = ""
    ifname: str = ""
    ips: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class AgentRequest:
    command: str
    pod: PodRef


@dataclass(frozen=True, slots=True)
class AgentResponse:
    ok: bool
    enrolled: bool = False
    reason: str = ""
    error: str = ""
    temporary: bool = True


def _str(obj: dict[str, Any], key: str, required: bool = False) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise WireError(f"field {key!r} must be a {'non-empty ' if required else ''}string")
    return value


def _object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("message is not a JSON object")
    if obj.get("v") != VERSION:
        raise WireError(f"unsupported message version {obj.get('v')!r} (want {VERSION})")
    return obj


def _line(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise WireError(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data


def encode_request(request: AgentRequest) -> bytes:
    pod = asdict(request.pod)
    pod["containerId"] = pod.pop("container_id")
    pod["ips"] = list(request.pod.ips)
    return _line({"v": VERSION, "command": request.command, "pod": pod})


def decode_request(data: bytes) -> AgentRequest:
    obj = _object(data)
    command = obj.get("command")
    if command not in COMMANDS:
        raise WireError(f"unknown command {command!r}")
    pod = obj.get("pod")
    if not isinstance(pod, dict):
        raise WireError("field 'pod' must be an object")
    ips = pod.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
        raise WireError("field 'ips' must be a list of strings")
    required = command != "STATUS"
    return AgentRequest(
        command,
        PodRef(
            namespace=_str(pod, "namespace", required),
            name=_str(pod, "name", required),
            uid=_str(pod, "uid"),
            netns=_str(pod, "netns"),
            container_id=_str(pod, "containerId"),
            ifname=_str(pod, "ifname"),
            ips=tuple(ips),
        ),
    )


def encode_response(response: AgentResponse) -> bytes:
    if response.ok:
        body: dict[str, Any] = {
            "ok": True,
            "enrolled": response.enrolled,
            "reason": response.reason,
        }
    else:
        body = {"ok": False, "error": response.error, "temporary": response.temporary}
    return _line({"v": VERSION, **body})


def decode_response(data: bytes) -> AgentResponse:
    obj = _object(data)
    ok = obj.get("ok")
    if ok is True:
        enrolled = obj.get("enrolled")
        if not isinstance(enrolled, bool):
            raise WireError("field 'enrolled' must be a boolean")
        return AgentResponse(True, enrolled=enrolled, reason=_str(obj, "reason"))
    if ok is False:
        temporary = obj.get("temporary", True)
        if not isinstance(temporary, bool):
            raise WireError("field 'temporary' must be a boolean")
        return AgentResponse(False, error=_str(obj, "error", True), temporary=temporary)
    raise WireError("field 'ok' must be a boolean")
