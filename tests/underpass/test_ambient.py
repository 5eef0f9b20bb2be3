"""The one enrolment rule (underpass.ambient), and that the CNI side and discovery use it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni.enrolment import Policy
from discovery.model import Pod
from discovery.translate import TranslateConfig
from discovery.translate import is_enrolled as discovery_is_enrolled
from underpass import ambient
from underpass.ambient import (
    DATAPLANE_MODE_LABEL,
    REDIRECTION_ANNOTATION,
    Enrolment,
    is_enrolled,
    redirected,
)

pytestmark = pytest.mark.unit

AMBIENT = {DATAPLANE_MODE_LABEL: "ambient"}
OPT_OUT = {DATAPLANE_MODE_LABEL: "none"}


def test_the_conventions_are_istios() -> None:
    assert ambient.DATAPLANE_MODE_LABEL == "istio.io/dataplane-mode"
    assert (ambient.DATAPLANE_MODE_AMBIENT, ambient.DATAPLANE_MODE_NONE) == ("ambient", "none")
    assert ambient.USE_WAYPOINT_LABEL == "istio.io/use-waypoint"
    assert ambient.REDIRECTION_ANNOTATION == "ambient.istio.io/redirection"
    assert {"kube-system"} == ambient.ALWAYS_EXCLUDED_NAMESPACES


@pytest.mark.parametrize(
    ("namespace", "ns_labels", "pod_labels", "enrolled"),
    [
        ("demo", AMBIENT, {}, True),
        ("demo", AMBIENT, None, True),  # pod labels not known yet: no opt-out seen
        ("demo", AMBIENT, {"app": "x"}, True),
        ("demo", AMBIENT, OPT_OUT, False),
        ("demo", {}, {}, False),
        ("demo", {DATAPLANE_MODE_LABEL: "none"}, {}, False),
        ("demo", {DATAPLANE_MODE_LABEL: "Ambient"}, {}, False),  # values are exact
        ("demo", {}, AMBIENT, False),  # the namespace label is what enrols
        ("kube-system", AMBIENT, {}, False),
        ("istio-system", AMBIENT, {}, False),  # the mesh's own namespace
        ("legacy", AMBIENT, {}, False),  # excluded below
    ],
)
def test_the_rule(
    namespace: str,
    ns_labels: dict[str, str],
    pod_labels: dict[str, str] | None,
    enrolled: bool,
) -> None:
    rule = Enrolment.build(None, ["legacy"])
    decision = rule.decide(namespace, ns_labels, pod_labels)
    assert decision.enrol is enrolled and decision.reason
    assert is_enrolled(ns_labels, pod_labels, namespace, excluded_namespaces=["legacy"]) is enrolled


def test_the_mesh_namespace_is_configurable() -> None:
    assert is_enrolled(AMBIENT, {}, "istio-system", mesh_namespace="mesh")
    assert not is_enrolled(AMBIENT, {}, "mesh", mesh_namespace="mesh")
    assert Enrolment.build("", ()) == Enrolment()  # empty means the default


def test_redirected() -> None:
    assert redirected({REDIRECTION_ANNOTATION: "enabled"})
    assert not redirected({REDIRECTION_ANNOTATION: "disabled"}) and not redirected({})


def test_the_cni_names_are_the_core_rule() -> None:
    assert Policy is Enrolment
    assert Policy.build("mesh", ["legacy"]) == Enrolment("mesh", frozenset({"legacy"}))


names = st.sampled_from(["demo", "kube-system", "istio-system", "mesh", "legacy", "other"])
label_values = st.sampled_from(["ambient", "none", "Ambient", "", "x"])
label_maps = st.dictionaries(
    st.sampled_from([DATAPLANE_MODE_LABEL, "app", REDIRECTION_ANNOTATION]), label_values
)


@given(
    namespace=names,
    mesh=st.sampled_from(["istio-system", "mesh"]),
    excluded=st.frozensets(names, max_size=2),
    ns_labels=label_maps,
    pod_labels=label_maps,
)
def test_cni_and_discovery_decide_alike(
    namespace: str,
    mesh: str,
    excluded: frozenset[str],
    ns_labels: dict[str, str],
    pod_labels: dict[str, str],
) -> None:
    """The node agent captures exactly the pods discovery marks HBONE (non-host-network)."""
    cni_says = Policy.build(mesh, excluded).decide(namespace, ns_labels, pod_labels).enrol
    config = TranslateConfig(mesh_namespace=mesh, excluded_namespaces=excluded)
    pod = Pod(namespace, "p", labels=pod_labels)
    assert discovery_is_enrolled(pod, ns_labels, config) is cni_says
    host = Pod(namespace, "p", labels=pod_labels, host_network=True)
    assert not discovery_is_enrolled(host, ns_labels, config)
