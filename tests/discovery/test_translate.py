"""Model -> Workload / Service resources (issue 5 point 2), pure translation."""

from __future__ import annotations

import ipaddress

import pytest

from discovery.findings import INVALID_ADDRESS, WAYPOINT_NOT_FOUND
from discovery.model import (
    ContainerPort,
    Gateway,
    Labels,
    Listener,
    Model,
    Namespace,
    Node,
    Owner,
    Pod,
    Service,
    ServicePort,
)
from discovery.translate import (
    TranslateConfig,
    Translation,
    canonical_name,
    canonical_revision,
    is_enrolled,
    translate,
)
from underpass.proto import workload_pb2

pytestmark = pytest.mark.unit

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
DEMO = Namespace("demo", AMBIENT)
CONFIG = TranslateConfig(cluster_id="c1", trust_domain="td.example", network="net1")


def uid(name: str, ns: str = "demo") -> str:
    return f"c1//Pod/{ns}/{name}"


def pod(name: str = "app-1", namespace: str = "demo", **kwargs: object) -> Pod:
    fields: dict[str, object] = {"node": "node-1", "ips": ("10.1.0.5",), "labels": {"app": "app"}}
    fields.update(kwargs)
    return Pod(namespace, name, **fields)  # type: ignore[arg-type]


def run(*objects: object, config: TranslateConfig = CONFIG) -> Translation:
    model = Model().upsert(*objects)  # type: ignore[arg-type]
    return translate(model, config)


def workload_of(t: Translation, name: str = "app-1", ns: str = "demo") -> workload_pb2.Workload:
    return t.workloads[uid(name, ns)]


def ip(data: bytes) -> str:
    return str(ipaddress.ip_address(data))


def test_pod_becomes_a_workload() -> None:
    node = Node(
        "node-1", {"topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1"}
    )
    t = run(
        DEMO,
        node,
        pod(ips=("10.1.0.5", "fd00::5"), service_account="sleep", labels={"app": "sleep"}),
    )
    w = workload_of(t)
    assert w.uid == "c1//Pod/demo/app-1" and w.name == "app-1" and w.namespace == "demo"
    assert [ip(a) for a in w.addresses] == ["10.1.0.5", "fd00::5"]
    assert w.node == "node-1" and w.service_account == "sleep"
    assert w.trust_domain == "td.example" and w.cluster_id == "c1" and w.network == "net1"
    assert w.tunnel_protocol == workload_pb2.HBONE
    assert w.status == workload_pb2.HEALTHY
    assert w.workload_type == workload_pb2.POD and w.workload_name == "app-1"
    assert w.canonical_name == "sleep" and w.canonical_revision == "latest"
    assert (w.locality.region, w.locality.zone) == ("r1", "z1")
    assert w.network_mode == workload_pb2.STANDARD
    assert not w.HasField("waypoint")
    assert t.findings == ()


@pytest.mark.parametrize(
    ("namespace", "ns_labels", "pod_labels", "extra", "enrolled"),
    [
        ("demo", AMBIENT, {}, {}, True),
        ("demo", {}, {}, {}, False),
        ("demo", {"istio.io/dataplane-mode": "none"}, {}, {}, False),
        ("demo", AMBIENT, {"istio.io/dataplane-mode": "none"}, {}, False),
        ("istio-system", AMBIENT, {}, {}, False),
        ("kube-system", AMBIENT, {}, {}, False),
        ("demo", AMBIENT, {}, {"host_network": True}, False),
    ],
)
def test_enrolment(
    namespace: str,
    ns_labels: dict[str, str],
    pod_labels: dict[str, str],
    extra: dict[str, object],
    enrolled: bool,
) -> None:
    p = Pod(namespace, "p", ips=("10.0.0.1",), labels=pod_labels, **extra)  # type: ignore[arg-type]
    t = run(Namespace(namespace, ns_labels), p)
    w = t.workloads[uid("p", namespace)]
    assert (w.tunnel_protocol == workload_pb2.HBONE) is enrolled
    assert is_enrolled(p, Labels(ns_labels), CONFIG) is enrolled


def test_enrolment_with_excluded_namespaces_and_the_redirection_annotation() -> None:
    config = TranslateConfig(excluded_namespaces=frozenset({"demo"}))
    assert not is_enrolled(pod(), DEMO.labels, config)
    strict = TranslateConfig(require_redirection_annotation=True)
    assert not is_enrolled(pod(), DEMO.labels, strict)
    annotated = pod(annotations={"ambient.istio.io/redirection": "enabled"})
    assert is_enrolled(annotated, DEMO.labels, strict)


def test_host_network_pods_are_marked() -> None:
    w = workload_of(run(DEMO, pod(host_network=True)))
    assert w.network_mode == workload_pb2.HOST_NETWORK


@pytest.mark.parametrize(
    ("phase", "ready", "terminating", "status"),
    [
        ("Running", True, False, workload_pb2.HEALTHY),
        ("Running", False, False, workload_pb2.UNHEALTHY),
        ("Pending", False, False, workload_pb2.UNHEALTHY),
        ("Running", True, True, workload_pb2.UNHEALTHY),
    ],
)
def test_status_from_readiness(phase: str, ready: bool, terminating: bool, status: int) -> None:
    w = workload_of(run(DEMO, pod(phase=phase, ready=ready, terminating=terminating)))
    assert w.status == status


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_left_out(phase: str) -> None:
    assert run(DEMO, pod(phase=phase)).workloads == {}


def test_pending_pod_without_ip_is_still_a_workload() -> None:
    w = workload_of(run(DEMO, pod(ips=(), phase="Pending", ready=False)))
    assert list(w.addresses) == [] and w.status == workload_pb2.UNHEALTHY


def test_invalid_ip_is_reported_and_left_out() -> None:
    t = run(DEMO, pod(ips=("10.0.0.1", "not-an-ip")))
    assert [ip(a) for a in workload_of(t).addresses] == ["10.0.0.1"]
    assert [f.reason for f in t.findings] == [INVALID_ADDRESS]


@pytest.mark.parametrize(
    ("owner", "labels", "name", "wtype"),
    [
        (None, {}, "app-1", workload_pb2.POD),
        (
            Owner("ReplicaSet", "web-5d8f7"),
            {"pod-template-hash": "5d8f7"},
            "web",
            workload_pb2.DEPLOYMENT,
        ),
        (Owner("ReplicaSet", "bare-rs"), {}, "bare-rs", workload_pb2.DEPLOYMENT),
        (Owner("Job", "backup-28391234"), {}, "backup", workload_pb2.CRONJOB),
        (Owner("Job", "migrate"), {}, "migrate", workload_pb2.JOB),
        (Owner("StatefulSet", "db"), {}, "db", workload_pb2.DEPLOYMENT),
        (Owner("DaemonSet", "agent"), {}, "agent", workload_pb2.DEPLOYMENT),
    ],
)
def test_workload_name_and_type(
    owner: Owner | None, labels: dict[str, str], name: str, wtype: int
) -> None:
    w = workload_of(run(DEMO, pod(owner=owner, labels=labels)))
    assert (w.workload_name, w.workload_type) == (name, wtype)
    assert w.canonical_name == name  # no canonical labels: the workload name


def test_canonical_name_and_revision_precedence() -> None:
    labels = {
        "service.istio.io/canonical-name": "cn",
        "app.kubernetes.io/name": "k8s",
        "app": "app",
        "service.istio.io/canonical-revision": "cr",
        "app.kubernetes.io/version": "kv",
        "version": "v",
    }
    assert canonical_name(labels, "w") == "cn"
    assert canonical_revision(labels) == "cr"
    del labels["service.istio.io/canonical-name"], labels["service.istio.io/canonical-revision"]
    assert (canonical_name(labels, "w"), canonical_revision(labels)) == ("k8s", "kv")
    del labels["app.kubernetes.io/name"], labels["app.kubernetes.io/version"]
    assert (canonical_name(labels, "w"), canonical_revision(labels)) == ("app", "v")
    assert (canonical_name({}, "w"), canonical_revision({})) == ("w", "latest")


# -- services --------------------------------------------------------------------------


def web_service(**kwargs: object) -> Service:
    fields: dict[str, object] = {
        "vips": ("10.96.0.10",),
        "ports": (
            ServicePort(80, 8080, app_protocol="http"),
            ServicePort(443, "https"),
            ServicePort(53, 53, protocol="UDP"),
        ),
        "selector": {"app": "app"},
    }
    fields.update(kwargs)
    return Service("demo", "web", **fields)  # type: ignore[arg-type]


def test_service_becomes_a_service() -> None:
    t = run(DEMO, web_service(subject_alt_names=("spiffe://td.example/ns/demo/sa/web",)))
    s = t.services["demo/web.demo.svc.cluster.local"]
    assert (s.name, s.namespace, s.hostname) == ("web", "demo", "web.demo.svc.cluster.local")
    assert [ip(a.address) for a in s.addresses] == ["10.96.0.10"]
    assert s.addresses[0].network == "net1"
    assert [(p.service_port, p.target_port, p.app_protocol) for p in s.ports] == [
        (80, 8080, workload_pb2.HTTP11),
        (443, 0, workload_pb2.UNKNOWN),  # named target port: resolved per workload
    ]
    assert list(s.subject_alt_names) == ["spiffe://td.example/ns/demo/sa/web"]
    assert s.ip_families == workload_pb2.IPV4_ONLY


@pytest.mark.parametrize(
    ("vips", "family"),
    [
        ((), workload_pb2.AUTOMATIC),
        (("fd00::10",), workload_pb2.IPV6_ONLY),
        (("10.96.0.10", "fd00::10"), workload_pb2.DUAL),
    ],
)
def test_ip_families(vips: tuple[str, ...], family: int) -> None:
    s = run(DEMO, web_service(vips=vips)).services["demo/web.demo.svc.cluster.local"]
    assert s.ip_families == family


def test_workload_services_map_resolves_target_ports() -> None:
    t = run(
        DEMO,
        web_service(),
        Service("demo", "other", ports=(ServicePort(9000),), selector={"app": "other"}),
        Service("demo", "manual", ports=(ServicePort(1),)),  # no selector
        Service("elsewhere", "web", ports=(ServicePort(1),), selector={"app": "app"}),
        pod(ports=(ContainerPort("https", 8443),)),
        pod("no-https"),
        config=TranslateConfig(cluster_id="c1", domain_suffix="corp.local"),
    )
    w = workload_of(t)
    assert list(w.services) == ["demo/web.demo.svc.corp.local"]
    ports = w.services["demo/web.demo.svc.corp.local"].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 8080), (443, 8443)]
    # A pod without the named port has no endpoint for it.
    other = workload_of(t, "no-https").services["demo/web.demo.svc.corp.local"].ports
    assert [(p.service_port, p.target_port) for p in other] == [(80, 8080)]


def test_target_port_defaults_to_the_service_port() -> None:
    t = run(DEMO, web_service(ports=(ServicePort(7000),)), pod())
    assert workload_of(t).services["demo/web.demo.svc.cluster.local"].ports[0].target_port == 7000


# -- waypoints ------------------------------------------------------------------------

WAYPOINT = Gateway(
    "demo",
    "wp",
    "istio-waypoint",
    labels={"istio.io/waypoint-for": "all"},
    listeners=(Listener("mesh", 15008, "HBONE"),),
    addresses=("10.1.0.99",),
)


def test_namespace_waypoint_applies_to_pods_and_services() -> None:
    ns = Namespace("demo", {**AMBIENT, "istio.io/use-waypoint": "wp"})
    t = run(ns, WAYPOINT, pod(), web_service())
    w = workload_of(t)
    assert ip(w.waypoint.address.address) == "10.1.0.99" and w.waypoint.hbone_mtls_port == 15008
    assert w.waypoint.address.network == "net1"
    s = t.services["demo/web.demo.svc.cluster.local"]
    assert s.waypoint == w.waypoint


def test_pod_label_beats_namespace_label_and_none_opts_out() -> None:
    ns = Namespace("demo", {**AMBIENT, "istio.io/use-waypoint": "wp"})
    other = Gateway("demo", "wp2", "istio-waypoint", labels={"istio.io/waypoint-for": "all"})
    t = run(
        ns,
        WAYPOINT,
        other,
        pod("own", labels={"istio.io/use-waypoint": "wp2"}),
        pod("out", labels={"istio.io/use-waypoint": "none"}),
    )
    assert workload_of(t, "own").waypoint.hostname.hostname == "wp2.demo.svc.cluster.local"
    assert workload_of(t, "own").waypoint.hostname.namespace == "demo"
    assert not workload_of(t, "out").HasField("waypoint")


def test_waypoint_for_decides_who_uses_it() -> None:
    ns = Namespace("demo", {**AMBIENT, "istio.io/use-waypoint": "wp"})
    for waypoint_for, pods, services in [
        ("service", False, True),
        ("workload", True, False),
        ("all", True, True),
        ("none", False, False),
    ]:
        gw = Gateway("demo", "wp", "istio-waypoint", labels={"istio.io/waypoint-for": waypoint_for})
        t = run(ns, gw, pod(), web_service())
        assert workload_of(t).HasField("waypoint") is pods, waypoint_for
        assert t.services["demo/web.demo.svc.cluster.local"].HasField("waypoint") is services
    default = Gateway("demo", "wp", "istio-waypoint")  # no label: service
    t = run(ns, default, pod(), web_service())
    assert not workload_of(t).HasField("waypoint")


def test_waypoint_in_another_namespace_and_custom_port() -> None:
    gw = Gateway(
        "infra",
        "shared",
        "istio-waypoint",
        labels={"istio.io/waypoint-for": "all"},
        listeners=(Listener("mesh", 15999, "HBONE"),),
        hostname="shared.infra.example",
    )
    p = pod(labels={"istio.io/use-waypoint": "shared", "istio.io/use-waypoint-namespace": "infra"})
    w = workload_of(run(DEMO, gw, p))
    assert w.waypoint.hostname.namespace == "infra"
    assert w.waypoint.hostname.hostname == "shared.infra.example"
    assert w.waypoint.hbone_mtls_port == 15999


@pytest.mark.parametrize(
    "gateways",
    [(), (Gateway("demo", "wp", "some-ingress-class"),)],
    ids=["missing", "not-a-waypoint"],
)
def test_missing_waypoint_fails_closed_and_is_reported(gateways: tuple[Gateway, ...]) -> None:
    t = run(DEMO, *gateways, pod(labels={"istio.io/use-waypoint": "wp"}))
    w = workload_of(t)
    assert w.waypoint.hostname.hostname == "wp.demo.svc.cluster.local"
    assert w.waypoint.hbone_mtls_port == 15008
    assert [(f.kind, f.name, f.reason) for f in t.findings] == [
        ("Gateway", "wp", WAYPOINT_NOT_FOUND)
    ]


def test_the_waypoint_itself_does_not_use_a_waypoint() -> None:
    ns = Namespace("demo", {**AMBIENT, "istio.io/use-waypoint": "wp"})
    own = {"gateway.networking.k8s.io/gateway-name": "wp"}
    t = run(ns, WAYPOINT, pod("wp-1", labels=own), Service("demo", "wp", labels=own))
    assert not workload_of(t, "wp-1").HasField("waypoint")
    assert not t.services["demo/wp.demo.svc.cluster.local"].HasField("waypoint")


def test_translation_is_deterministic_and_pure() -> None:
    objects = (DEMO, WAYPOINT, pod(), pod("b"), web_service())
    first, second = run(*objects), run(*objects)
    assert first.addresses == second.addresses
    assert list(first.addresses) == list(second.addresses)
