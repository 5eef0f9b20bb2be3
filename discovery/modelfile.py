"""A static model from a YAML file (``underpass discovery serve --model FILE``).

The file lists objects per kind, with the field names of :mod:`discovery.model`
(snake_case, or the camelCase Kubernetes spells)::

    namespaces: [{name: demo, labels: {istio.io/dataplane-mode: ambient}}]
    pods:
      - {namespace: demo, name: sleep-1, node: node-1, ips: [10.244.1.2],
         serviceAccount: sleep, labels: {app: sleep}, ports: [{name: http, port: 8080}]}
    services:
      - {namespace: demo, name: sleep, vips: [10.96.0.10], selector: {app: sleep},
         ports: [{port: 80, targetPort: http}]}
    gateways: [...]
    authorizationPolicies:
      - namespace: demo
        name: allow-sleep
        selector: {matchLabels: {app: sleep}}
        rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/sleep]}}],
                 to: [{operation: {ports: ["8080"]}}]}]
    peerAuthentications: [{namespace: istio-system, name: default, mode: STRICT}]

Unknown fields are errors (:class:`~discovery.errors.ModelError`) naming where
they are: a hand-written file should say what is wrong, not be half-read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from discovery.errors import ModelError
from discovery.model import (
    AuthorizationPolicy,
    Condition,
    ContainerPort,
    Gateway,
    Listener,
    Model,
    Namespace,
    Node,
    Operation,
    Owner,
    PeerAuthentication,
    Pod,
    Rule,
    Service,
    ServicePort,
    Source,
    TargetRef,
)

_KINDS: dict[str, type] = {
    "namespaces": Namespace,
    "nodes": Node,
    "pods": Pod,
    "services": Service,
    "gateways": Gateway,
    "authorization_policies": AuthorizationPolicy,
    "peer_authentications": PeerAuthentication,
}
_ALIASES = {
    "from": "sources",
    "to": "operations",
    "when": "conditions",
    "target_ref": "target_refs",
    "port_level_mtls": "port_level",
    "class": "gateway_class",
    "gateway_class_name": "gateway_class",
}


def _snake(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def _selector(value: Any, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: a selector is a mapping of labels")
    labels = value.get("matchLabels", value) if "matchLabels" in value else value
    return {str(k): str(v) for k, v in labels.items()}


def _unwrap(key: str) -> Callable[[Any, str], Any]:
    def unwrap(item: Any, path: str) -> Any:
        return item[key] if isinstance(item, dict) and set(item) == {key} else item

    return unwrap


def _list_of(cls: type, pre: Callable[[Any, str], Any] | None = None) -> Callable[[Any, str], Any]:
    def convert(value: Any, path: str) -> tuple[Any, ...]:
        if isinstance(value, dict) and cls is TargetRef:
            value = [value]  # targetRef: a single reference
        if not isinstance(value, list):
            raise ModelError(f"{path}: expected a list")
        items = [pre(v, path) if pre else v for v in value]
        return tuple(_build(cls, item, f"{path}[{i}]") for i, item in enumerate(items))

    return convert


def _port_level(value: Any, path: str) -> dict[int, str]:
    if not isinstance(value, dict):
        raise ModelError(f"{path}: expected a mapping of port -> mode")
    out = {}
    for port, mode in value.items():
        try:
            number = int(port)
        except ValueError:
            raise ModelError(f"{path}: {port!r} is not a port number") from None
        out[number] = str(mode["mode"] if isinstance(mode, dict) else mode)
    return out


_NESTED: dict[tuple[type, str], Callable[[Any, str], Any]] = {
    (Pod, "ports"): _list_of(ContainerPort),
    (Pod, "owner"): lambda v, p: _build(Owner, v, p),
    (Service, "ports"): _list_of(ServicePort),
    (Service, "selector"): _selector,
    (Gateway, "listeners"): _list_of(Listener),
    (AuthorizationPolicy, "rules"): _list_of(Rule),
    (AuthorizationPolicy, "target_refs"): _list_of(TargetRef),
    (AuthorizationPolicy, "selector"): _selector,
    (PeerAuthentication, "selector"): _selector,
    (PeerAuthentication, "port_level"): _port_level,
    (Rule, "sources"): _list_of(Source, _unwrap("source")),
    (Rule, "operations"): _list_of(Operation, _unwrap("operation")),
    (Rule, "conditions"): _list_of(Condition),
}


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(str(v) if isinstance(v, int | float) else v for v in value)
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    return value


def _build(cls: type, doc: Any, path: str) -> Any:
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: expected a mapping for a {cls.__name__}")
    if cls is PeerAuthentication and isinstance(doc.get("mtls"), dict):
        doc = {**{k: v for k, v in doc.items() if k != "mtls"}, "mode": doc["mtls"].get("mode")}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        name = _ALIASES.get(_snake(str(key)), _snake(str(key)))
        if name not in names:
            raise ModelError(f"{path}: unknown field {key!r} for a {cls.__name__}")
        convert = _NESTED.get((cls, name))
        kwargs[name] = convert(value, f"{path}.{key}") if convert else _plain(value)
    if cls in (ContainerPort, ServicePort, Listener):
        for field in ("port", "target_port"):
            if isinstance(kwargs.get(field), str) and kwargs[field].isdigit():
                kwargs[field] = int(kwargs[field])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ModelError(f"{path}: {exc}") from None


def parse_model(doc: Any, source: str = "model") -> Model:
    """A model from a parsed YAML/JSON document (see the module docstring)."""
    if doc is None:
        return Model()
    if not isinstance(doc, dict):
        raise ModelError(f"{source}: expected a mapping of kinds to lists")
    objects: dict[str, list[Any]] = {}
    for key, items in doc.items():
        kind = _snake(str(key))
        cls = _KINDS.get(kind)
        if cls is None:
            raise ModelError(f"{source}: unknown kind {key!r}; use {', '.join(_KINDS)}")
        if not isinstance(items, list):
            raise ModelError(f"{source}.{key}: expected a list")
        objects[kind] = [_build(cls, item, f"{source}.{key}[{i}]") for i, item in enumerate(items)]
    return Model.of(**objects)


def load_model(path: Path) -> Model:
    """Read a model file; :class:`ModelError` (or OSError) if it cannot be used."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not valid YAML: {exc}") from None
    return parse_model(doc, str(path))


__all__ = ["load_model", "parse_model"]
