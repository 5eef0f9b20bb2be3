"""Model -> workload discovery resources: one pure code path for every registry.

:func:`translate` takes a :class:`~discovery.model.Model` and a
:class:`TranslateConfig` and returns a :class:`Translation`: ``Address``
resources (workloads and services), ``Authorization`` resources, and the
:class:`~discovery.findings.Finding` values for what could not be honoured.
No I/O, no clock, no logging: the same model always gives the same resources.

A translation is assembled (:func:`assemble`) from parts: the policies'
(:func:`translate_policies`), and one :class:`AddressTranslation` per service
and per pod, made by a :class:`TranslationContext` (the model's indexes).
Each part carries its own findings and the PeerAuthentication resources it
refers to, whatever else is translated in the same run, so that
:mod:`discovery.incremental` can redo only the parts a change affects and
get the same result.

Pod -> Workload
    uid ``<cluster>//Pod/<ns>/<name>``; IPs as bytes; node; service account;
    trust domain; network; ``tunnel_protocol`` HBONE when the pod is enrolled
    (namespace label ``istio.io/dataplane-mode=ambient``, no pod opt-out
    ``istio.io/dataplane-mode=none``, not host network; the mesh's namespace,
    ``kube-system`` and configured exclusions never; optionally only once the
    node agent annotated ``ambient.istio.io/redirection: enabled``); waypoint
    from ``istio.io/use-waypoint`` (see below); ``services``: the TCP ports of
    every Service of its namespace whose selector selects it, named target
    ports resolved against the pod's container ports; ``authorization_policies``:
    the WORKLOAD_SELECTOR policies that select it plus its PeerAuthentication
    policy (see :mod:`discovery.authorization`); status HEALTHY when ready;
    canonical name from ``service.istio.io/canonical-name``,
    ``app.kubernetes.io/name``, ``app``, else the workload name; canonical
    revision from ``service.istio.io/canonical-revision``,
    ``app.kubernetes.io/version``, ``version``, else ``latest``; workload name
    and type from the owner (ReplicaSet -> its Deployment, Job -> its CronJob
    when named like one, other controllers by name, none -> the pod); locality
    from the node's topology labels. Pods that finished (Succeeded, Failed)
    are left out.

Service -> Service
    hostname ``<name>.<ns>.svc.<domain suffix>`` (unless the model sets one);
    VIPs; TCP ports with their numeric target port (0 for a named one, which
    each workload resolves); subject alt names; waypoint; IP families from
    the VIPs.

Waypoints
    ``istio.io/use-waypoint=<gateway>`` on the pod or service beats the same
    label on its namespace; ``none`` opts out; ``istio.io/use-waypoint-namespace``
    names another namespace. The Gateway must be of the waypoint class; its
    ``istio.io/waypoint-for`` label (``service`` by default, ``workload``,
    ``all``, ``none``) says whether workloads and/or services use it. It is
    reached at its status IP address, else its hostname, on its HBONE listener's
    port (15008). A waypoint that does not exist is reported and still set, as
    a hostname that resolves to nothing, so the traffic fails instead of
    bypassing the waypoint's policy. A waypoint's own pods and service never
    use a waypoint.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.message import Message

from discovery.authorization import (
    PeerAuthnTranslator,
    index_peer_authentications,
    translate_authorization_policy,
)
from discovery.findings import INVALID_ADDRESS, WAYPOINT_NOT_FOUND, Finding
from discovery.model import (
    TERMINAL_PHASES,
    Gateway,
    Model,
    ObjectKey,
    Pod,
    Service,
    ServicePort,
)
from underpass.ambient import (
    ALWAYS_EXCLUDED_NAMESPACES,
    DATAPLANE_MODE_LABEL,
    REDIRECTION_ANNOTATION,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_FOR_LABEL,
    Enrolment,
    redirected,
)
from underpass.proto import authorization_pb2, workload_pb2
from underpass.xds.types import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    authorization_resource_name,
    service_resource_name,
    workload_uid,
)

GATEWAY_NAME_LABEL: Final = "gateway.networking.k8s.io/gateway-name"
DEFAULT_WAYPOINT_CLASS: Final = "istio-waypoint"
HBONE_PORT: Final = 15008

_CANONICAL_NAME_LABELS: Final = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS: Final = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)
_CRONJOB_JOB_NAME: Final = re.compile(r"^(.+)-\d{8,10}$")
_APP_PROTOCOLS: Final = {
    "http": workload_pb2.HTTP11,
    "http2": workload_pb2.HTTP2,
    "kubernetes.io/h2c": workload_pb2.HTTP2,
    "grpc": workload_pb2.GRPC,
    "tcp": workload_pb2.TCP,
    "tls": workload_pb2.TLS,
}


@dataclass(frozen=True, slots=True)
class TranslateConfig:
    """The mesh's settings that translation depends on."""

    cluster_id: str = "Kubernetes"
    trust_domain: str = "cluster.local"
    domain_suffix: str = "cluster.local"
    #: Policies here without a selector are GLOBAL; mesh-wide PeerAuthentication lives here.
    root_namespace: str = "istio-system"
    #: The mesh's own namespace: never captured.
    mesh_namespace: str = "istio-system"
    excluded_namespaces: frozenset[str] = frozenset()
    network: str = ""
    waypoint_class: str = DEFAULT_WAYPOINT_CLASS
    #: HBONE only once the node agent annotated the pod as redirected (as Istio does).
    require_redirection_annotation: bool = False


@dataclass(frozen=True, slots=True)
class Translation:
    """The resources of one model, by resource name, and the findings."""

    addresses: Mapping[str, workload_pb2.Address]
    authorizations: Mapping[str, authorization_pb2.Authorization]
    findings: tuple[Finding, ...] = ()
    #: The waypoint policies (``targetRefs``) left to waypoints, by resource name.
    waypoint_policies: tuple[str, ...] = field(default=())

    def resources(self) -> dict[str, Mapping[str, Message]]:
        """Type URL -> name -> message, as the xDS snapshot wants them."""
        return {ADDRESS_TYPE_URL: self.addresses, AUTHORIZATION_TYPE_URL: self.authorizations}

    @property
    def workloads(self) -> dict[str, workload_pb2.Workload]:
        return {n: a.workload for n, a in self.addresses.items() if a.HasField("workload")}

    @property
    def services(self) -> dict[str, workload_pb2.Service]:
        return {n: a.service for n, a in self.addresses.items() if a.HasField("service")}


def is_enrolled(pod: Pod, namespace_labels: Mapping[str, str], config: TranslateConfig) -> bool:
    """Whether the pod is captured: the core rule (:mod:`underpass.ambient`, which the CNI
    agent applies too), never for host-network pods, and, when configured, only once
    the node agent annotated the pod as redirected."""
    if pod.host_network:
        return False
    rule = Enrolment(config.mesh_namespace, config.excluded_namespaces)
    if not rule.is_enrolled(namespace_labels, pod.labels, pod.namespace):
        return False
    return not config.require_redirection_annotation or redirected(pod.annotations)


def canonical_name(labels: Mapping[str, str], workload_name: str) -> str:
    return next((labels[k] for k in _CANONICAL_NAME_LABELS if labels.get(k)), workload_name)


def canonical_revision(labels: Mapping[str, str]) -> str:
    return next((labels[k] for k in _CANONICAL_REVISION_LABELS if labels.get(k)), "latest")


def workload_name_and_type(pod: Pod) -> tuple[str, workload_pb2.WorkloadType]:
    """The controller a pod belongs to, as Istio names it."""
    owner = pod.owner
    if owner is None:
        return pod.name, workload_pb2.POD
    if owner.kind == "ReplicaSet":
        template_hash = pod.labels.get("pod-template-hash", "")
        if template_hash and owner.name.endswith("-" + template_hash):
            return owner.name[: -len(template_hash) - 1], workload_pb2.DEPLOYMENT
        return owner.name, workload_pb2.DEPLOYMENT
    if owner.kind == "Job":
        cron = _CRONJOB_JOB_NAME.match(owner.name)
        if cron:
            return cron.group(1), workload_pb2.CRONJOB
        return owner.name, workload_pb2.JOB
    return owner.name, workload_pb2.DEPLOYMENT


def _packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def _app_protocol(port: ServicePort) -> workload_pb2.AppProtocol:
    return _APP_PROTOCOLS.get(port.app_protocol.lower(), workload_pb2.UNKNOWN)


@dataclass(frozen=True, slots=True)
class SelectorPolicy:
    """A WORKLOAD_SELECTOR Authorization and the workloads it applies to."""

    resource: str
    #: The namespace whose workloads it selects; None: every namespace (a root-namespace policy).
    namespace: str | None
    selector: Mapping[str, str]

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        return (self.namespace is None or self.namespace == namespace) and all(
            labels.get(k) == v for k, v in self.selector.items()
        )


@dataclass(frozen=True, slots=True)
class PolicyTranslation:
    """The AuthorizationPolicies' share of a translation (they depend on nothing else)."""

    authorizations: Mapping[str, authorization_pb2.Authorization]
    selector_policies: tuple[SelectorPolicy, ...]
    waypoint_policies: tuple[str, ...]
    findings: frozenset[Finding]


@dataclass(frozen=True, slots=True)
class AddressTranslation:
    """One pod's or service's share of a translation: its Address resource, the findings
    it caused, and what it looked up beyond its own namespace (so that incremental
    translation knows when to redo it)."""

    name: str
    address: workload_pb2.Address
    findings: frozenset[Finding] = frozenset()
    #: The PeerAuthentication-derived Authorization resources a workload refers to.
    authorizations: tuple[tuple[str, authorization_pb2.Authorization], ...] = ()
    #: The waypoint Gateway (namespace, name) it looked up, if any.
    gateway: ObjectKey | None = None


def translate_policies(model: Model, config: TranslateConfig) -> PolicyTranslation:
    """Every AuthorizationPolicy of ``model`` -> Authorization resources (and their selectors)."""
    authorizations: dict[str, authorization_pb2.Authorization] = {}
    waypoint_policies: list[str] = []
    selector_policies: list[SelectorPolicy] = []
    findings: list[Finding] = []
    for key in sorted(model.authorization_policies):
        policy = model.authorization_policies[key]
        resource = authorization_resource_name(policy.namespace, policy.name)
        translated, found = translate_authorization_policy(policy, config.root_namespace)
        findings += found
        if translated is None:
            if policy.target_refs:
                waypoint_policies.append(resource)
            continue
        authorizations[resource] = translated
        if translated.scope == authorization_pb2.WORKLOAD_SELECTOR and policy.selector is not None:
            scope_ns = None if policy.namespace == config.root_namespace else policy.namespace
            selector_policies.append(SelectorPolicy(resource, scope_ns, policy.selector))
    return PolicyTranslation(
        types.MappingProxyType(authorizations),
        tuple(selector_policies),
        tuple(waypoint_policies),
        frozenset(findings),
    )


class TranslationContext:
    """One model's indexes, shared by the per-object translations of one run.

    Each per-object method returns everything that object contributes (its
    resource, its findings, the PeerAuthentication resources it refers to), so
    that the result of translating an object does not depend on which other
    objects were translated in the same run: what incremental translation
    (:mod:`discovery.incremental`) relies on.
    """

    def __init__(self, model: Model, config: TranslateConfig) -> None:
        self.model = model
        self.config = config
        # namespace -> one (key, value) of a selector -> the services with that selector.
        # A pod can only be selected by services indexed under one of its own labels.
        self._selecting: dict[str, dict[tuple[str, str], list[Service]]] = {}
        for svc in model.services.values():
            if svc.selector:  # no or an empty selector: no endpoints from pods
                item = min(svc.selector.items())
                by_item = self._selecting.setdefault(svc.namespace, {})
                by_item.setdefault(item, []).append(svc)
        self.peer_authn_index = index_peer_authentications(
            model.peer_authentications.values(), config.root_namespace
        )
        # (kind, gateway namespace, gateway name) -> (address, findings of the lookup)
        self._waypoints: dict[
            tuple[str, str, str], tuple[workload_pb2.GatewayAddress | None, tuple[Finding, ...]]
        ] = {}

    def hostname(self, namespace: str, name: str) -> str:
        return f"{name}.{namespace}.svc.{self.config.domain_suffix}"

    def service_hostname(self, svc: Service) -> str:
        return svc.hostname or self.hostname(svc.namespace, svc.name)

    # -- waypoints ------------------------------------------------------------

    def waypoint(
        self, kind: str, namespace: str, labels: Mapping[str, str], findings: list[Finding]
    ) -> tuple[workload_pb2.GatewayAddress | None, ObjectKey | None]:
        """The waypoint a workload or service (``kind``) in ``namespace`` with ``labels``
        uses, and the Gateway it looked up (None: it uses none by its labels)."""
        if USE_WAYPOINT_LABEL in labels:
            name = labels[USE_WAYPOINT_LABEL]
            gw_ns = labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace
        else:
            ns_labels = self.model.namespace_labels(namespace)
            name = ns_labels.get(USE_WAYPOINT_LABEL, "")
            gw_ns = ns_labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace
        if not name or name == "none":
            return None, None
        if labels.get(GATEWAY_NAME_LABEL) == name and gw_ns == namespace:
            return None, None  # the waypoint itself
        key = (kind, gw_ns, name)
        if key not in self._waypoints:
            lookup: list[Finding] = []
            self._waypoints[key] = (
                self._resolve_waypoint(kind, gw_ns, name, lookup),
                tuple(lookup),
            )
        address, found = self._waypoints[key]
        findings += found  # every user of a missing waypoint carries the finding
        return address, (gw_ns, name)

    def _resolve_waypoint(
        self, kind: str, gw_ns: str, name: str, findings: list[Finding]
    ) -> workload_pb2.GatewayAddress | None:
        gateway = self.model.gateways.get((gw_ns, name))
        if gateway is None or gateway.gateway_class != self.config.waypoint_class:
            what = "does not exist" if gateway is None else "is not of the waypoint class"
            findings.append(
                Finding(
                    "Gateway",
                    gw_ns,
                    name,
                    f"{USE_WAYPOINT_LABEL} ({kind}s)",
                    WAYPOINT_NOT_FOUND,
                    f"the waypoint {what}; {kind}s using it get an unresolvable waypoint, "
                    "so their traffic fails instead of bypassing it",
                )
            )
            return workload_pb2.GatewayAddress(
                hostname=workload_pb2.NamespacedHostname(
                    namespace=gw_ns, hostname=self.hostname(gw_ns, name)
                ),
                hbone_mtls_port=HBONE_PORT,
            )
        waypoint_for = gateway.labels.get(WAYPOINT_FOR_LABEL, "service")
        if waypoint_for not in (kind, "all"):
            return None
        return self._gateway_address(gateway)

    def _gateway_address(self, gateway: Gateway) -> workload_pb2.GatewayAddress:
        port = next((lst.port for lst in gateway.listeners if lst.protocol == "HBONE"), HBONE_PORT)
        for ip in gateway.addresses:
            try:
                packed = _packed(ip)
            except ValueError:
                continue
            return workload_pb2.GatewayAddress(
                address=workload_pb2.NetworkAddress(network=self.config.network, address=packed),
                hbone_mtls_port=port,
            )
        return workload_pb2.GatewayAddress(
            hostname=workload_pb2.NamespacedHostname(
                namespace=gateway.namespace,
                hostname=gateway.hostname or self.hostname(gateway.namespace, gateway.name),
            ),
            hbone_mtls_port=port,
        )

    # -- services -------------------------------------------------------------

    @staticmethod
    def addresses(
        kind: str, namespace: str, name: str, ips: tuple[str, ...], findings: list[Finding]
    ) -> list[bytes]:
        out = []
        for ip in ips:
            try:
                out.append(_packed(ip))
            except ValueError:
                findings.append(
                    Finding(kind, namespace, name, "addresses", INVALID_ADDRESS, f"{ip!r} left out")
                )
        return out

    def service(self, svc: Service) -> AddressTranslation:
        """Service -> its Address resource."""
        findings: list[Finding] = []
        vips = self.addresses("Service", svc.namespace, svc.name, svc.vips, findings)
        hostname = self.service_hostname(svc)
        out = workload_pb2.Service(
            name=svc.name,
            namespace=svc.namespace,
            hostname=hostname,
            addresses=[
                workload_pb2.NetworkAddress(network=self.config.network, address=a) for a in vips
            ],
            ports=[
                workload_pb2.Port(
                    service_port=p.port,
                    target_port=p.target if isinstance(p.target, int) else 0,
                    app_protocol=_app_protocol(p),
                )
                for p in svc.ports
                if p.protocol.upper() == "TCP"
            ],
            subject_alt_names=list(svc.subject_alt_names),
        )
        v4 = any(len(a) == 4 for a in vips)
        v6 = any(len(a) == 16 for a in vips)
        out.ip_families = (
            workload_pb2.DUAL
            if v4 and v6
            else workload_pb2.IPV4_ONLY
            if v4
            else workload_pb2.IPV6_ONLY
            if v6
            else workload_pb2.AUTOMATIC
        )
        waypoint, gateway = self.waypoint("service", svc.namespace, svc.labels, findings)
        if waypoint is not None:
            out.waypoint.CopyFrom(waypoint)
        return AddressTranslation(
            service_resource_name(svc.namespace, hostname),
            workload_pb2.Address(service=out),
            frozenset(findings),
            gateway=gateway,
        )

    def pod_services(self, pod: Pod) -> dict[str, workload_pb2.PortList]:
        named = {p.name: p.port for p in pod.ports if p.name}
        out: dict[str, workload_pb2.PortList] = {}
        by_item = self._selecting.get(pod.namespace)
        if not by_item:
            return out
        candidates = {svc.key: svc for item in pod.labels.items() for svc in by_item.get(item, ())}
        # In key order: when two services share a resource name, the last one wins.
        for _key, svc in sorted(candidates.items()):
            assert svc.selector is not None
            if not all(pod.labels.get(k) == v for k, v in svc.selector.items()):
                continue
            ports = []
            for p in svc.ports:
                if p.protocol.upper() != "TCP":
                    continue
                target = p.target
                if isinstance(target, str):
                    resolved = named.get(target)
                    if resolved is None:
                        continue  # the pod has no such port: no endpoint for it
                    target = resolved
                ports.append(
                    workload_pb2.Port(
                        service_port=p.port, target_port=target, app_protocol=_app_protocol(p)
                    )
                )
            out[service_resource_name(svc.namespace, self.service_hostname(svc))] = (
                workload_pb2.PortList(ports=ports)
            )
        return out

    # -- workloads ------------------------------------------------------------

    def workload(
        self, pod: Pod, selector_policies: Sequence[SelectorPolicy]
    ) -> AddressTranslation | None:
        """Pod -> its Workload Address resource; None for a pod that finished."""
        if pod.phase in TERMINAL_PHASES:
            return None
        config = self.config
        findings: list[Finding] = []
        name, wtype = workload_name_and_type(pod)
        enrolled = is_enrolled(pod, self.model.namespace_labels(pod.namespace), config)
        out = workload_pb2.Workload(
            uid=workload_uid(config.cluster_id, pod.namespace, pod.name),
            name=pod.name,
            namespace=pod.namespace,
            addresses=self.addresses("Pod", pod.namespace, pod.name, pod.ips, findings),
            network=config.network,
            tunnel_protocol=workload_pb2.HBONE if enrolled else workload_pb2.NONE,
            trust_domain=config.trust_domain,
            service_account=pod.service_account,
            node=pod.node,
            canonical_name=canonical_name(pod.labels, name),
            canonical_revision=canonical_revision(pod.labels),
            workload_type=wtype,
            workload_name=name,
            status=workload_pb2.HEALTHY
            if pod.ready and pod.phase == "Running" and not pod.terminating
            else workload_pb2.UNHEALTHY,
            cluster_id=config.cluster_id,
            network_mode=workload_pb2.HOST_NETWORK if pod.host_network else workload_pb2.STANDARD,
        )
        node = self.model.nodes.get(pod.node)
        if node is not None:
            region = node.labels.get("topology.kubernetes.io/region", "")
            zone = node.labels.get("topology.kubernetes.io/zone", "")
            subzone = node.labels.get("topology.istio.io/subzone", "")
            if region or zone or subzone:
                out.locality.CopyFrom(
                    workload_pb2.Locality(region=region, zone=zone, subzone=subzone)
                )
        waypoint, gateway = self.waypoint("workload", pod.namespace, pod.labels, findings)
        if waypoint is not None:
            out.waypoint.CopyFrom(waypoint)
        for key, ports in self.pod_services(pod).items():
            out.services[key].CopyFrom(ports)
        policies = [p.resource for p in selector_policies if p.selects(pod.namespace, pod.labels)]
        # A translator per workload: the resources and findings it reports are this pod's.
        peer_authn = PeerAuthnTranslator(self.peer_authn_index)
        decision = peer_authn.decide(pod.namespace, pod.labels)
        if decision.policy is not None:
            policies.append(decision.policy)
        out.authorization_policies.extend(sorted(set(policies)))
        return AddressTranslation(
            out.uid,
            workload_pb2.Address(workload=out),
            frozenset(findings + peer_authn.findings),
            tuple(peer_authn.resources.items()),
            gateway,
        )


def assemble(
    policies: PolicyTranslation,
    services: Iterable[AddressTranslation],
    workloads: Iterable[AddressTranslation],
) -> Translation:
    """The translation made of its parts (services first: on a name clash a workload wins)."""
    addresses: dict[str, workload_pb2.Address] = {}
    authorizations = dict(policies.authorizations)
    findings = set(policies.findings)
    for part in itertools.chain(services, workloads):
        addresses[part.name] = part.address
        if part.authorizations:
            authorizations.update(part.authorizations)
        if part.findings:
            findings |= part.findings
    return Translation(
        addresses=types.MappingProxyType(addresses),
        authorizations=types.MappingProxyType(authorizations),
        findings=tuple(sorted(findings)),
        waypoint_policies=policies.waypoint_policies,
    )


def translate(model: Model, config: TranslateConfig | None = None) -> Translation:
    """The workload discovery resources of ``model`` (see the module docstring)."""
    config = config or TranslateConfig()
    context = TranslationContext(model, config)
    policies = translate_policies(model, config)
    services = [context.service(model.services[key]) for key in sorted(model.services)]
    workloads = [
        part
        for key in sorted(model.pods)
        if (part := context.workload(model.pods[key], policies.selector_policies)) is not None
    ]
    return assemble(policies, services, workloads)


__all__ = [
    "ALWAYS_EXCLUDED_NAMESPACES",
    "DATAPLANE_MODE_LABEL",
    "DEFAULT_WAYPOINT_CLASS",
    "GATEWAY_NAME_LABEL",
    "HBONE_PORT",
    "REDIRECTION_ANNOTATION",
    "USE_WAYPOINT_LABEL",
    "USE_WAYPOINT_NAMESPACE_LABEL",
    "WAYPOINT_FOR_LABEL",
    "AddressTranslation",
    "PolicyTranslation",
    "SelectorPolicy",
    "TranslateConfig",
    "Translation",
    "TranslationContext",
    "assemble",
    "canonical_name",
    "canonical_revision",
    "is_enrolled",
    "translate",
    "translate_policies",
    "workload_name_and_type",
]
