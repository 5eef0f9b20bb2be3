"""Kubernetes objects -> the discovery model: one parser for every registry that speaks them.

The Kubernetes registry parses what the API server sends; the lab registry
parses the policy files demos write in the same YAML shape. Input is a
Kubernetes object as JSON (a ``dict`` with ``apiVersion``, ``kind``,
``metadata``, ``spec``, ``status``, camelCase keys) or a model object of the
``kubernetes`` client (``V1Pod``, ...), which :func:`as_dict` turns into that
JSON. No I/O.

What is read
    Namespace, Node: name, labels.
    Pod: ``spec.nodeName``, service account (``spec.serviceAccountName``, else
    the deprecated ``spec.serviceAccount``, else ``default``), IPs from
    ``status.podIPs`` (else ``status.podIP``), ``status.phase`` (absent:
    Pending; not a known phase: Unknown), readiness from the ``Ready``
    condition, ``metadata.deletionTimestamp`` (terminating), ``hostNetwork``,
    the ports of its containers and of its restartable init containers
    (sidecars), the controlling owner reference, labels, annotations, uid.
    Service: ``spec.clusterIPs`` (else ``clusterIP``; ``None`` is headless),
    ports (``targetPort`` a number or a container port's name; absent: the
    port), ``spec.selector`` (absent or empty: selects no pods), labels.
    Gateway: ``gatewayClassName``, listeners, ``status.addresses``, labels.
    AuthorizationPolicy, PeerAuthentication (security.istio.io): the spec as
    written.

Failing closed
    A policy's spec is copied field by field. A field that is not part of the
    API (or has the wrong type) goes into ``unrecognized`` -- of the rule it is
    in, or of the policy -- with its path, and translation then fails closed
    (an ALLOW that cannot be read allows nothing; a DENY denies more).
    PeerAuthentication has no such list: a field it cannot read makes its
    mode :data:`UNREADABLE_MODE`, which translation enforces as STRICT and
    reports. Problems are also appended to the optional ``problems`` list for
    the registry to log. An object without a name (or namespace, for
    namespaced kinds) raises :class:`~discovery.errors.ModelError`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from discovery.errors import ModelError
from discovery.model import (
    AuthorizationPolicy,
    Condition,
    ContainerPort,
    Gateway,
    Listener,
    ModelObject,
    Namespace,
    Node,
    Operation,
    Owner,
    PeerAuthentication,
    Pod,
    PodPhase,
    Rule,
    Service,
    ServicePort,
    Source,
    TargetRef,
)

SECURITY_GROUP: Final = "security.istio.io"
GATEWAY_GROUP: Final = "gateway.networking.k8s.io"
#: The istio.io annotation that makes an AuthorizationPolicy dry-run.
DRY_RUN_ANNOTATION: Final = "istio.io/dry-run"
#: The mode given to a PeerAuthentication with a field that cannot be read (enforced STRICT).
UNREADABLE_MODE: Final = "UNREADABLE"

_PHASES: Final[dict[str, PodPhase]] = {
    "Pending": "Pending",
    "Running": "Running",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
    "Unknown": "Unknown",
}
_SOURCE_FIELDS: Final = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
}
_OPERATION_FIELDS: Final = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
_AUTHZ_SPEC_FIELDS: Final = frozenset(
    {"selector", "targetRef", "targetRefs", "action", "provider", "rules"}
)
_PEER_AUTHN_SPEC_FIELDS: Final = frozenset({"selector", "mtls", "portLevelMtls"})

Problems = list[str]


# -- plumbing ------------------------------------------------------------------------


def as_dict(obj: Any) -> dict[str, Any]:
    """A Kubernetes object as its JSON form (a dict is returned as is)."""
    if isinstance(obj, dict):
        return obj
    converted = _to_json(obj)
    if not isinstance(converted, dict):
        raise ModelError(f"not a Kubernetes object: {type(obj).__name__}")
    return converted


def _to_json(value: Any) -> Any:
    """What ``ApiClient.sanitize_for_serialization`` does, without an ApiClient."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    attribute_map = getattr(value, "attribute_map", None)
    types_map = getattr(value, "openapi_types", None)
    if isinstance(attribute_map, dict) and isinstance(types_map, dict):
        out = {}
        for attr in types_map:
            item = getattr(value, attr, None)
            if item is not None:
                out[attribute_map[attr]] = _to_json(item)
        return out
    raise ModelError(f"cannot read a {type(value).__name__} as part of a Kubernetes object")


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str_map(value: Any, where: str, problems: Problems | None) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _note(problems, f"{where}: not a mapping (ignored)")
        return {}
    out = {}
    for k, v in value.items():
        if isinstance(k, str) and isinstance(v, str):
            out[k] = v
        else:
            _note(problems, f"{where}.{k}: not a string (ignored)")
    return out


def _note(problems: Problems | None, text: str) -> None:
    if problems is not None:
        problems.append(text)


def _meta(doc: Mapping[str, Any], kind: str, *, namespaced: bool) -> tuple[str, str]:
    meta = _mapping(doc.get("metadata"))
    name = meta.get("name")
    namespace = meta.get("namespace", "") if namespaced else ""
    if not isinstance(name, str) or not name:
        raise ModelError(f"a {kind} without metadata.name")
    if namespaced and (not isinstance(namespace, str) or not namespace):
        raise ModelError(f"{kind} {name} has no metadata.namespace")
    return namespace, name


def _labels(doc: Mapping[str, Any], problems: Problems | None) -> dict[str, str]:
    return _str_map(_mapping(doc.get("metadata")).get("labels"), "metadata.labels", problems)


def _annotations(doc: Mapping[str, Any], problems: Problems | None) -> dict[str, str]:
    return _str_map(
        _mapping(doc.get("metadata")).get("annotations"), "metadata.annotations", problems
    )


def _timestamp(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def _port_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and 0 < value < 65536:
        return value
    if isinstance(value, str) and value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    return None


def is_terminating(obj: Any) -> bool:
    """Whether an object is being deleted (or, for a namespace, its phase is Terminating)."""
    doc = as_dict(obj)
    if _mapping(doc.get("metadata")).get("deletionTimestamp"):
        return True
    return bool(_mapping(doc.get("status")).get("phase") == "Terminating")


def resource_version(obj: Any) -> str:
    value = _mapping(as_dict(obj).get("metadata")).get("resourceVersion")
    return value if isinstance(value, str) else ""


# -- core kinds -------------------------------------------------------------------------


def parse_namespace(obj: Any, problems: Problems | None = None) -> Namespace:
    doc = as_dict(obj)
    _, name = _meta(doc, "Namespace", namespaced=False)
    return Namespace(name, _labels(doc, problems))


def parse_node(obj: Any, problems: Problems | None = None) -> Node:
    doc = as_dict(obj)
    _, name = _meta(doc, "Node", namespaced=False)
    return Node(name, _labels(doc, problems))


def _pod_ips(status: Mapping[str, Any]) -> tuple[str, ...]:
    ips = [
        entry["ip"]
        for entry in _list(status.get("podIPs"))
        if isinstance(entry, Mapping) and isinstance(entry.get("ip"), str) and entry["ip"]
    ]
    if not ips and isinstance(status.get("podIP"), str) and status["podIP"]:
        ips = [status["podIP"]]
    return tuple(dict.fromkeys(ips))


def _ready(status: Mapping[str, Any]) -> bool:
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in _list(status.get("conditions"))
    )


def _container_ports(spec: Mapping[str, Any], problems: Problems | None) -> list[ContainerPort]:
    containers = list(_list(spec.get("containers")))
    # Sidecar containers (init containers that keep running) serve ports too.
    containers += [
        c
        for c in _list(spec.get("initContainers"))
        if isinstance(c, Mapping) and c.get("restartPolicy") == "Always"
    ]
    out = []
    for container in containers:
        for raw in _list(_mapping(container).get("ports")):
            entry = _mapping(raw)
            number = _port_number(entry.get("containerPort"))
            if number is None:
                _note(problems, f"spec.containers.ports: bad containerPort {entry!r} (ignored)")
                continue
            name = entry.get("name")
            protocol = entry.get("protocol")
            out.append(
                ContainerPort(
                    name if isinstance(name, str) else "",
                    number,
                    protocol if isinstance(protocol, str) and protocol else "TCP",
                )
            )
    return out


def _owner(meta: Mapping[str, Any]) -> Owner | None:
    for ref in _list(meta.get("ownerReferences")):
        entry = _mapping(ref)
        if entry.get("controller") is True:
            kind, name = entry.get("kind"), entry.get("name")
            if isinstance(kind, str) and isinstance(name, str) and kind and name:
                return Owner(kind, name)
    return None


def parse_pod(obj: Any, problems: Problems | None = None) -> Pod:
    doc = as_dict(obj)
    namespace, name = _meta(doc, "Pod", namespaced=True)
    meta = _mapping(doc.get("metadata"))
    spec = _mapping(doc.get("spec"))
    status = _mapping(doc.get("status"))
    phase: PodPhase = _PHASES.get(status.get("phase") or "Pending", "Unknown")
    node = spec.get("nodeName")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    uid = meta.get("uid")
    return Pod(
        namespace=namespace,
        name=name,
        node=node if isinstance(node, str) else "",
        ips=_pod_ips(status),
        service_account=account if isinstance(account, str) else "default",
        labels=_labels(doc, problems),
        annotations=_annotations(doc, problems),
        phase=phase,
        ready=_ready(status),
        terminating=bool(meta.get("deletionTimestamp")),
        host_network=spec.get("hostNetwork") is True,
        ports=tuple(_container_ports(spec, problems)),
        owner=_owner(meta),
        uid=uid if isinstance(uid, str) else "",
    )


def _service_port(raw: Any, problems: Problems | None) -> ServicePort | None:
    entry = _mapping(raw)
    port = _port_number(entry.get("port"))
    if port is None:
        _note(problems, f"spec.ports: bad port {entry.get('port')!r} (port ignored)")
        return None
    target_raw = entry.get("targetPort")
    target: int | str
    if target_raw is None or target_raw == "" or target_raw == 0:
        target = 0  # defaults to the port
    elif (number := _port_number(target_raw)) is not None:
        target = number
    elif isinstance(target_raw, str):
        target = target_raw  # a container port's name
    else:
        _note(problems, f"spec.ports[{port}]: bad targetPort {target_raw!r} (port ignored)")
        return None
    protocol, name, app = entry.get("protocol"), entry.get("name"), entry.get("appProtocol")
    return ServicePort(
        port=port,
        target_port=target,
        protocol=protocol if isinstance(protocol, str) and protocol else "TCP",
        name=name if isinstance(name, str) else "",
        app_protocol=app if isinstance(app, str) else "",
    )


def parse_service(obj: Any, problems: Problems | None = None) -> Service:
    doc = as_dict(obj)
    namespace, name = _meta(doc, "Service", namespaced=True)
    spec = _mapping(doc.get("spec"))
    ips = [ip for ip in _list(spec.get("clusterIPs")) if isinstance(ip, str)]
    if not ips and isinstance(spec.get("clusterIP"), str):
        ips = [spec["clusterIP"]]
    vips = tuple(ip for ip in ips if ip and ip != "None")
    ports = tuple(
        p for p in (_service_port(raw, problems) for raw in _list(spec.get("ports"))) if p
    )
    selector = _str_map(spec.get("selector"), "spec.selector", problems)
    return Service(
        namespace=namespace,
        name=name,
        vips=vips,
        ports=ports,
        selector=selector or None,
        labels=_labels(doc, problems),
    )


def parse_gateway(obj: Any, problems: Problems | None = None) -> Gateway:
    doc = as_dict(obj)
    namespace, name = _meta(doc, "Gateway", namespaced=True)
    spec = _mapping(doc.get("spec"))
    listeners = []
    for raw in _list(spec.get("listeners")):
        entry = _mapping(raw)
        port = _port_number(entry.get("port"))
        lname, protocol = entry.get("name"), entry.get("protocol")
        if port is None or not isinstance(protocol, str):
            _note(problems, f"spec.listeners: bad listener {entry!r} (ignored)")
            continue
        listeners.append(Listener(lname if isinstance(lname, str) else "", port, protocol))
    addresses: list[str] = []
    hostname = ""
    for raw in _list(_mapping(doc.get("status")).get("addresses")):
        entry = _mapping(raw)
        value = entry.get("value")
        if not isinstance(value, str) or not value:
            continue
        kind = entry.get("type") or "IPAddress"
        if kind == "IPAddress":
            addresses.append(value)
        elif kind == "Hostname" and not hostname:
            hostname = value
    gateway_class = spec.get("gatewayClassName")
    return Gateway(
        namespace=namespace,
        name=name,
        gateway_class=gateway_class if isinstance(gateway_class, str) else "",
        labels=_labels(doc, problems),
        listeners=tuple(listeners),
        addresses=tuple(addresses),
        hostname=hostname,
    )


# -- security.istio.io ------------------------------------------------------------------


def _strings(value: Any) -> tuple[str, ...] | None:
    """A list of strings (numbers written unquoted become strings); None if not one."""
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
        else:
            return None
    return tuple(out)


def _fields(
    raw: Any, known: Mapping[str, str], where: str, unrecognized: list[str]
) -> dict[str, tuple[str, ...]]:
    """Copy the string-list fields of ``known`` from ``raw``; the rest is ``unrecognized``."""
    if not isinstance(raw, Mapping):
        unrecognized.append(where)
        return {}
    out = {}
    for key, value in raw.items():
        target = known.get(key)
        strings = _strings(value) if target is not None else None
        if target is None or strings is None:
            unrecognized.append(f"{where}.{key}")
            continue
        out[target] = strings
    return out


def _entries(rule: Mapping[str, Any], key: str, unrecognized: list[str]) -> list[Any]:
    value = rule.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        unrecognized.append(key)
        return []
    return value


def _rule(raw: Any) -> Rule:
    """One ``rules[]`` entry; paths in its ``unrecognized`` are relative to the rule."""
    unrecognized: list[str] = []
    if not isinstance(raw, Mapping):
        return Rule(unrecognized=("(not a mapping)",))
    for key in raw:
        if key not in ("from", "to", "when"):
            unrecognized.append(str(key))
    sources = []
    for i, entry in enumerate(_entries(raw, "from", unrecognized)):
        entry = _mapping(entry)
        for key in entry:
            if key != "source":
                unrecognized.append(f"from[{i}].{key}")
        if entry.get("source") is None:
            unrecognized.append(f"from[{i}].source")  # Istio requires it
            continue
        sources.append(
            Source(**_fields(entry["source"], _SOURCE_FIELDS, f"from[{i}].source", unrecognized))
        )
    operations = []
    for i, entry in enumerate(_entries(raw, "to", unrecognized)):
        entry = _mapping(entry)
        for key in entry:
            if key != "operation":
                unrecognized.append(f"to[{i}].{key}")
        if entry.get("operation") is None:
            unrecognized.append(f"to[{i}].operation")
            continue
        operations.append(
            Operation(
                **_fields(entry["operation"], _OPERATION_FIELDS, f"to[{i}].operation", unrecognized)
            )
        )
    conditions = []
    for i, entry in enumerate(_entries(raw, "when", unrecognized)):
        entry = _mapping(entry)
        key = entry.get("key")
        values = _strings(entry.get("values", []))
        not_values = _strings(entry.get("notValues", []))
        extra = [k for k in entry if k not in ("key", "values", "notValues")]
        unrecognized += [f"when[{i}].{k}" for k in extra]
        if not isinstance(key, str) or not key or values is None or not_values is None:
            unrecognized.append(f"when[{i}]")
            continue
        conditions.append(Condition(key, values, not_values))
    return Rule(
        sources=tuple(sources),
        operations=tuple(operations),
        conditions=tuple(conditions),
        unrecognized=tuple(unrecognized),
    )


def _selector(spec: Mapping[str, Any], unrecognized: list[str]) -> dict[str, str] | None:
    """``spec.selector.matchLabels``: None without a selector (or with an empty one)."""
    raw = spec.get("selector")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        unrecognized.append("selector")
        return None
    for key in raw:
        if key != "matchLabels":
            unrecognized.append(f"selector.{key}")  # Istio's selector has only matchLabels
    labels = raw.get("matchLabels")
    if labels is None:
        return None
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        unrecognized.append("selector.matchLabels")
        return None
    return dict(labels) or None


def _target_ref(raw: Any, where: str, unrecognized: list[str]) -> TargetRef | None:
    entry = _mapping(raw)
    kind, name = entry.get("kind"), entry.get("name")
    extra = [k for k in entry if k not in ("group", "kind", "name", "namespace")]
    unrecognized += [f"{where}.{k}" for k in extra]
    if not isinstance(kind, str) or not kind or not isinstance(name, str) or not name:
        unrecognized.append(where)
        return None
    group, namespace = entry.get("group"), entry.get("namespace")
    return TargetRef(
        kind=kind,
        name=name,
        group=group if isinstance(group, str) else "",
        namespace=namespace if isinstance(namespace, str) else "",
    )


def parse_authorization_policy(obj: Any, problems: Problems | None = None) -> AuthorizationPolicy:
    doc = as_dict(obj)
    namespace, name = _meta(doc, "AuthorizationPolicy", namespaced=True)
    raw_spec = doc.get("spec")
    unrecognized: list[str] = []
    if raw_spec is not None and not isinstance(raw_spec, Mapping):
        unrecognized.append("spec")
    spec = _mapping(raw_spec)
    unrecognized += [str(k) for k in spec if k not in _AUTHZ_SPEC_FIELDS]
    selector = _selector(spec, unrecognized)
    refs: list[TargetRef | None] = []
    if spec.get("targetRef") is not None:
        refs.append(_target_ref(spec["targetRef"], "targetRef", unrecognized))
    raw_refs = spec.get("targetRefs")
    if raw_refs is not None:
        if isinstance(raw_refs, list):
            refs += [
                _target_ref(r, f"targetRefs[{i}]", unrecognized) for i, r in enumerate(raw_refs)
            ]
        else:
            unrecognized.append("targetRefs")
    action = spec.get("action", "ALLOW")
    if not isinstance(action, str):
        unrecognized.append("action")
        action = "DENY"
    rules: list[Rule] = []
    raw_rules = spec.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        unrecognized.append("rules")
    else:
        rules = [_rule(r) for r in raw_rules or ()]
    for field in unrecognized:
        _note(problems, f"spec.{field}: not understood")
    for i, rule in enumerate(rules):
        for field in rule.unrecognized:
            _note(problems, f"spec.rules[{i}].{field}: not understood")
    return AuthorizationPolicy(
        namespace=namespace,
        name=name,
        selector=selector,
        target_refs=tuple(r for r in refs if r is not None),
        action=action or "ALLOW",
        rules=tuple(rules),
        dry_run=_annotations(doc, None).get(DRY_RUN_ANNOTATION, "").lower() == "true",
        unrecognized=tuple(unrecognized),
    )


def parse_peer_authentication(obj: Any, problems: Problems | None = None) -> PeerAuthentication:
    doc = as_dict(obj)
    namespace, name = _meta(doc, "PeerAuthentication", namespaced=True)
    raw_spec = doc.get("spec")
    unreadable: list[str] = []
    if raw_spec is not None and not isinstance(raw_spec, Mapping):
        unreadable.append("spec")
    spec = _mapping(raw_spec)
    unreadable += [str(k) for k in spec if k not in _PEER_AUTHN_SPEC_FIELDS]
    selector = _selector(spec, unreadable)
    mode = "UNSET"
    mtls = spec.get("mtls")
    if mtls is not None:
        if not isinstance(mtls, Mapping) or any(k != "mode" for k in mtls):
            unreadable.append("mtls")
        elif isinstance(mtls.get("mode"), str):
            mode = mtls["mode"] or "UNSET"  # an unknown value: translation enforces STRICT
        elif mtls.get("mode") is not None:
            unreadable.append("mtls.mode")
    port_level: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        if not isinstance(raw_ports, Mapping):
            unreadable.append("portLevelMtls")
        else:
            for key, value in raw_ports.items():
                number = _port_number(key)
                entry = _mapping(value)
                port_mode = entry.get("mode", "UNSET")
                if (
                    number is None
                    or not isinstance(value, Mapping)
                    or any(k != "mode" for k in entry)
                    or not isinstance(port_mode, str)
                ):
                    unreadable.append(f"portLevelMtls[{key}]")
                    continue
                port_level[number] = port_mode or "UNSET"
    for field in unreadable:
        _note(problems, f"spec.{field}: not understood; the policy is enforced as STRICT")
    return PeerAuthentication(
        namespace=namespace,
        name=name,
        selector=selector,
        mode=UNREADABLE_MODE if unreadable else mode,
        port_level=port_level,
        created=_timestamp(_mapping(doc.get("metadata")).get("creationTimestamp")),
    )


# -- by kind ------------------------------------------------------------------------------

#: (apiVersion group, kind) -> parser, for documents that say what they are.
_PARSERS: Final[dict[tuple[str, str], Callable[[Any, Problems | None], ModelObject]]] = {
    ("", "Namespace"): parse_namespace,
    ("", "Node"): parse_node,
    ("", "Pod"): parse_pod,
    ("", "Service"): parse_service,
    (GATEWAY_GROUP, "Gateway"): parse_gateway,
    (SECURITY_GROUP, "AuthorizationPolicy"): parse_authorization_policy,
    (SECURITY_GROUP, "PeerAuthentication"): parse_peer_authentication,
}


def parse_object(
    doc: Any, problems: Problems | None = None, *, kinds: Sequence[str] | None = None
) -> ModelObject:
    """Any supported object, by ``apiVersion`` and ``kind`` (optionally only of ``kinds``)."""
    data = as_dict(doc)
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise ModelError("an object without apiVersion and kind")
    group = api_version.rpartition("/")[0]
    parser = _PARSERS.get((group, kind))
    if parser is None or (kinds is not None and kind not in kinds):
        supported = ", ".join(kinds or sorted(k for _, k in _PARSERS))
        raise ModelError(f"{api_version} {kind} is not supported here (supported: {supported})")
    return parser(data, problems)


__all__ = [
    "DRY_RUN_ANNOTATION",
    "GATEWAY_GROUP",
    "SECURITY_GROUP",
    "UNREADABLE_MODE",
    "Problems",
    "as_dict",
    "is_terminating",
    "parse_authorization_policy",
    "parse_gateway",
    "parse_namespace",
    "parse_node",
    "parse_object",
    "parse_peer_authentication",
    "parse_pod",
    "parse_service",
    "resource_version",
]
