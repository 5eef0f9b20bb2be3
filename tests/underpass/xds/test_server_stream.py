"""The sans-IO Delta ADS server stream: subscriptions, versions, nonces, ACK/NACK."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.underpass.xds.helpers import (
    NODE,
    A,
    Pair,
    Z,
    names_of,
    request,
    resources,
    snapshot,
    workload,
)
from underpass.xds.errors import XdsProtocolError
from underpass.xds.server import (
    MAX_PENDING_RESPONSES,
    MISSING,
    Acked,
    ClientIdentified,
    DeltaResponse,
    DeltaServerStream,
    HeldVersions,
    Nacked,
    Snapshot,
    StaleNonce,
    Subscribed,
    Unsubscribed,
)
from underpass.xds.wire import PreparedResource, content_version, encode_delta_response

pytestmark = pytest.mark.unit


def subscribed(stream: DeltaServerStream, snap: Snapshot, **kwargs: object) -> DeltaResponse:
    stream.receive(request(node=True, **kwargs))  # type: ignore[arg-type]
    [response] = stream.responses(snap)
    return response


def test_first_request_identifies_the_node_and_subscribes_wildcard() -> None:
    stream = DeltaServerStream()
    events = stream.receive(request(node=True))
    assert isinstance(events[0], ClientIdentified)
    assert events[0].node.node_name == "n1"
    assert events[0].node.pod_namespace == "istio-system"
    assert events[1] == Subscribed(A, True, (), True, 0)
    assert stream.is_wildcard(A)


def test_wildcard_subscription_gets_the_full_state_then_only_changes() -> None:
    stream = DeltaServerStream(nonce_prefix="x-")
    s1 = snapshot({"a": "1", "b": "1", "c": "1"})
    first = subscribed(stream, s1)
    assert names_of(first) == ["a", "b", "c"] and first.removed == ()
    assert first.nonce == "x-1" and first.system_version_info == "1"
    assert isinstance(stream.receive(request(nonce=first.nonce))[0], Acked)
    assert stream.responses(s1) == []  # nothing new

    s2 = snapshot({"a": "1", "b": "2", "d": "1"}, after=s1)
    [delta] = stream.responses(s2)
    assert names_of(delta) == ["b", "d"]
    assert delta.removed == ("c",)
    assert stream.held_versions(A) == {n: r.version for n, r in s2.of_type(A).items()}


def test_the_first_request_is_answered_even_when_there_is_nothing() -> None:
    stream = DeltaServerStream()
    [response] = subscribed_empty = [subscribed(stream, Snapshot.empty())]
    assert subscribed_empty and response.resources == () and response.removed == ()
    assert stream.responses(Snapshot.empty()) == []


def test_explicit_names_get_only_those_and_absence_is_said_once() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1", "b": "1"})
    first = subscribed(stream, s1, subscribe=("a", "missing"))
    assert names_of(first) == ["a"] and first.removed == ("missing",)
    assert not stream.is_wildcard(A)
    assert stream.responses(s1) == []  # "missing" is not said again
    # It appears later: sent.
    s2 = snapshot({"a": "1", "b": "1", "missing": "1"}, after=s1)
    [late] = stream.responses(s2)
    assert names_of(late) == ["missing"]
    # b changes: not subscribed, not sent.
    s3 = snapshot({"a": "1", "b": "2", "missing": "1"}, after=s2)
    assert stream.responses(s3) == []


def test_subscribing_more_names_sends_them_and_unsubscribing_forgets_them() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1", "b": "1"})
    subscribed(stream, s1, subscribe=("a",))
    events = stream.receive(request(subscribe=("b",)))
    assert events == [Subscribed(A, False, ("b",), False)]
    [more] = stream.responses(s1)
    assert names_of(more) == ["b"]
    events = stream.receive(request(unsubscribe=("a",)))
    assert events == [Unsubscribed(A, ("a",), False)]
    assert stream.held_versions(A).keys() == {"b"}
    s2 = snapshot({"a": "2", "b": "1"}, after=s1)
    assert stream.responses(s2) == []  # a is no longer wanted
    # Re-subscribing sends it again (the client dropped it).
    stream.receive(request(subscribe=("a",)))
    [again] = stream.responses(s2)
    assert names_of(again) == ["a"]


def test_wildcard_with_names_and_dropping_the_wildcard() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1", "b": "1"})
    first = subscribed(stream, s1, subscribe=("*", "a"))
    assert names_of(first) == ["a", "b"] and stream.is_wildcard(A)
    assert stream.subscribed_names(A) == {"a"}
    # Unsubscribing a name under the wildcard changes nothing the client receives.
    stream.receive(request(unsubscribe=("a",)))
    s2 = snapshot({"a": "2", "b": "1"}, after=s1)
    assert names_of(stream.responses(s2)[0]) == ["a"]
    stream.receive(request(subscribe=("b",)))
    stream.receive(request(unsubscribe=("*",)))
    assert not stream.is_wildcard(A)
    assert stream.held_versions(A).keys() == {"b"}
    s3 = snapshot({"a": "3", "b": "1", "c": "1"}, after=s2)
    assert stream.responses(s3) == []


def test_reconnect_with_initial_versions_sends_only_changes_and_removals() -> None:
    s1 = snapshot({"a": "1", "b": "1", "c": "1"})
    held = {n: r.version for n, r in s1.of_type(A).items()}
    s2 = snapshot({"a": "1", "b": "2", "d": "1"}, after=s1)
    stream = DeltaServerStream()
    events = stream.receive(request(node=True, initial=held))
    assert events[1] == Subscribed(A, True, (), True, 3)
    [response] = stream.responses(s2)
    assert names_of(response) == ["b", "d"]
    assert response.removed == ("c",)


def test_reconnect_with_everything_current_gets_an_empty_answer() -> None:
    s1 = snapshot({"a": "1"})
    stream = DeltaServerStream()
    stream.receive(request(node=True, initial={"a": s1.of_type(A)["a"].version}))
    [response] = stream.responses(s1)
    assert response.resources == () and response.removed == ()


def test_a_nack_keeps_the_stream_and_the_rejected_version_is_not_resent() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1", "b": "1"})
    first = subscribed(stream, s1)
    stream.receive(request(nonce=first.nonce))
    s2 = snapshot({"a": "bad", "b": "1"}, after=s1)
    [bad] = stream.responses(s2)
    events = stream.receive(request(nonce=bad.nonce, error="cannot apply a"))
    assert events == [Nacked(A, bad.nonce, 3, "cannot apply a", ("a",))]
    # The client still holds the old version; the rejected one is not pushed again.
    assert stream.held_versions(A)["a"] == s1.of_type(A)["a"].version
    assert stream.responses(s2) == []
    # Unrelated changes still flow, without the rejected resource.
    s3 = snapshot({"a": "bad", "b": "2"}, after=s2)
    [other] = stream.responses(s3)
    assert names_of(other) == ["b"]
    # A fixed version of the rejected resource is sent.
    s4 = snapshot({"a": "good", "b": "2"}, after=s3)
    [fixed] = stream.responses(s4)
    assert names_of(fixed) == ["a"]
    assert isinstance(stream.receive(request(nonce=fixed.nonce))[0], Acked)


def test_a_nacked_removal_is_not_repeated_until_the_resource_comes_back() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1"})
    first = subscribed(stream, s1)
    stream.receive(request(nonce=first.nonce))
    s2 = snapshot({}, after=s1)
    [removal] = stream.responses(s2)
    assert removal.removed == ("a",)
    stream.receive(request(nonce=removal.nonce, error="no"))
    assert stream.held_versions(A) == {"a": s1.of_type(A)["a"].version}
    assert stream.responses(s2) == []
    s3 = snapshot({"a": "2"}, after=s2)
    assert names_of(stream.responses(s3)[0]) == ["a"]


def test_nack_of_an_older_response_does_not_undo_a_newer_one() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1"})
    first = subscribed(stream, s1)
    s2 = snapshot({"a": "2"}, after=s1)
    [second] = stream.responses(s2)
    # The client NACKs the first response after the second was sent.
    stream.receive(request(nonce=first.nonce, error="late"))
    assert stream.held_versions(A)["a"] == s2.of_type(A)["a"].version
    assert stream.pending_nonces(A) == (second.nonce,)


def test_an_ack_accepts_older_unanswered_responses() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1"})
    first = subscribed(stream, s1)
    s2 = snapshot({"a": "2"}, after=s1)
    [second] = stream.responses(s2)
    assert stream.pending_nonces(A) == (first.nonce, second.nonce)
    stream.receive(request(nonce=second.nonce))
    assert stream.pending_nonces(A) == ()


def test_unknown_nonces_are_ignored() -> None:
    stream = DeltaServerStream()
    subscribed(stream, snapshot({"a": "1"}))
    assert stream.receive(request(nonce="nope")) == [StaleNonce(A, "nope", False)]
    assert stream.receive(request(nonce="nope", error="x")) == [StaleNonce(A, "nope", True)]


def test_pending_responses_are_bounded() -> None:
    stream = DeltaServerStream()
    snap = snapshot({"a": "0"})
    subscribed(stream, snap)
    for i in range(MAX_PENDING_RESPONSES + 10):
        snap = snapshot({"a": str(i + 1)}, after=snap)
        assert len(stream.responses(snap)) == 1
    assert len(stream.pending_nonces(A)) == MAX_PENDING_RESPONSES


def test_snapshots_arriving_together_coalesce_into_one_response() -> None:
    stream = DeltaServerStream()
    s1 = snapshot({"a": "1", "b": "1"})
    subscribed(stream, s1)
    s2 = snapshot({"a": "2", "b": "1"}, after=s1)
    s3 = snapshot({"a": "3", "c": "1"}, after=s2)
    # The stream was busy during s2: it sees s3 only, one response with the net change.
    [response] = stream.responses(s3)
    assert names_of(response) == ["a", "c"] and response.removed == ("b",)
    assert response.resources[0].version == s3.of_type(A)["a"].version


def test_snapshots_without_change_sets_give_the_same_answer() -> None:
    """The change-set shortcut is an optimisation only."""
    for shortcut in (True, False):
        stream = DeltaServerStream()
        s1 = snapshot({"a": "1", "b": "1"})
        subscribed(stream, s1)
        s2 = snapshot({"a": "2", "c": "1"}, after=s1)
        if not shortcut:
            s2 = Snapshot(s2.version, s2.resources)
        [response] = stream.responses(s2)
        assert names_of(response) == ["a", "c"] and response.removed == ("b",)


def test_several_types_on_one_stream() -> None:
    stream = DeltaServerStream()
    snap = snapshot({"a": "1"}, {"ns/p": "1"})
    stream.receive(request(A, node=True))
    stream.receive(request(Z))
    responses = stream.responses(snap)
    assert [(r.type_url, names_of(r)) for r in responses] == [(A, ["a"]), (Z, ["ns/p"])]
    assert stream.type_urls == (A, Z)


def test_unknown_types_are_answered_as_empty() -> None:
    stream = DeltaServerStream()
    stream.receive(request("type.googleapis.com/envoy.config.cluster.v3.Cluster", node=True))
    [response] = stream.responses(snapshot({"a": "1"}))
    assert response.resources == ()


def test_large_pushes_are_split() -> None:
    stream = DeltaServerStream(max_response_bytes=200)
    snap = snapshot({f"w{i}": "x" * 50 for i in range(10)})
    stream.receive(request(node=True))
    responses = stream.responses(snap)
    assert len(responses) > 1
    assert sorted(n for r in responses for n in names_of(r)) == sorted(snap.of_type(A))
    assert len({r.nonce for r in responses}) == len(responses)


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request(), "identify the node"),
        (request("", node=True), "type_url"),
        (request(node=True, subscribe=("",)), "empty resource name"),
    ],
)
def test_protocol_errors(req: discovery_pb2.DeltaDiscoveryRequest, message: str) -> None:
    with pytest.raises(XdsProtocolError, match=message) as info:
        DeltaServerStream().receive(req)
    assert info.value.grpc_status == "INVALID_ARGUMENT"


def test_encoded_response_equals_the_message_built_normally() -> None:
    resources = [PreparedResource.prepare(n, workload(n, "x" * 300)) for n in ("a", "b")]
    data = encode_delta_response(
        type_url=A, nonce="7", system_version_info="3", resources=resources, removed=["c"]
    )
    expected = discovery_pb2.DeltaDiscoveryResponse(
        type_url=A,
        nonce="7",
        system_version_info="3",
        removed_resources=["c"],
        resources=[r.to_message() for r in resources],
    )
    assert discovery_pb2.DeltaDiscoveryResponse.FromString(data) == expected
    resource = resources[0].to_message()
    assert resource.version == content_version(resource.resource.value)
    assert resource.resource.type_url == A


def test_versions_are_content_hashes() -> None:
    one = PreparedResource.prepare("a", workload("a", "x"))
    same = PreparedResource.prepare("a", workload("a", "x"))
    other = PreparedResource.prepare("a", workload("a", "y"))
    assert one.version == same.version != other.version
    assert len(one.version) == 16


def test_snapshot_successor_lists_changes() -> None:
    s1 = snapshot({"a": "1", "b": "1"}, {"p": "1"})
    s2 = snapshot({"a": "1", "b": "2", "c": "1"}, {}, after=s1)
    assert s2.version == 2 and s2.parent == 1
    assert s2.changes == {A: frozenset({"b", "c"}), Z: frozenset({"p"})}
    assert len(s2) == 3


# -- a client and a server in memory, driven by Hypothesis ---------------------------

NAMES = st.sampled_from(["a", "b", "c", "d"])
STATES = st.dictionaries(NAMES, st.sampled_from(["1", "2", "3"]), max_size=4)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("change"), STATES, STATES),
        st.tuples(st.just("reconnect"), st.just({}), st.just({})),
        st.tuples(st.just("subscribe"), st.just({}), st.just({})),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(first=STATES, steps=STEPS)
def test_a_client_always_ends_up_with_the_current_snapshot(
    first: dict[str, str], steps: list[tuple[str, dict[str, str], dict[str, str]]]
) -> None:
    snap = snapshot(first, {})
    pair = Pair()
    pair.connect(snap)
    assert pair.client.in_sync()
    for kind, addresses, policies in steps:
        if kind == "change":
            snap = snapshot(addresses, policies, after=snap)
            pair.push(snap)
        elif kind == "reconnect":
            pair.client.stream_ended()
            before = len(pair.events)
            pair.connect(snap)
            # Only what changed while away travels; the rest is in initial_resource_versions.
            sent = sum(len(getattr(e, "updated", ())) for e in pair.events[before:])
            assert sent == 0
        else:
            req = pair.client.subscribe(A, ["a"])
            if req is not None:
                pair.send(req, snap)
        for type_url in (A, Z):
            expected = {n: r.version for n, r in snap.of_type(type_url).items()}
            assert pair.held[type_url] == expected
            assert pair.client.versions(type_url) == expected
            assert pair.server.held_versions(type_url) == expected


@settings(max_examples=100, deadline=None)
@given(
    states=st.lists(STATES, min_size=1, max_size=8),
    verdicts=st.lists(st.sampled_from(["ack", "nack", "ignore"]), min_size=8, max_size=8),
)
def test_any_mix_of_acks_and_nacks_converges_once_content_is_accepted(
    states: list[dict[str, str]], verdicts: list[str]
) -> None:
    stream = DeltaServerStream()
    stream.receive(request(node=True, initial={}))
    snap = Snapshot.empty()
    client: dict[str, str] = {}
    for state, verdict in zip(states, verdicts, strict=False):
        snap = snapshot(state, after=snap)
        for response in stream.responses(snap):
            if verdict == "nack":
                stream.receive(request(nonce=response.nonce, error="no"))
                continue
            for r in response.resources:
                client[r.name] = r.version
            for name in response.removed:
                client.pop(name, None)
            if verdict == "ack":
                stream.receive(request(nonce=response.nonce))
    # Whatever happened, the server's idea of the client is what the client holds,
    # except for resources whose current version the client refused.
    held = stream.held_versions(A)
    assert held == client
    # A fresh version of everything brings the client fully up to date.
    final = snapshot({n: f"final-{n}" for n in "abcd"}, after=snap)
    for response in stream.responses(final):
        for r in response.resources:
            client[r.name] = r.version
        stream.receive(request(nonce=response.nonce))
    assert client == {n: r.version for n, r in final.of_type(A).items()}


def test_node_is_only_read_from_the_first_request() -> None:
    stream = DeltaServerStream()
    stream.receive(request(node=True))
    other = request(Z)
    other.node.id = "someone-else"
    assert not any(isinstance(e, ClientIdentified) for e in stream.receive(other))
    assert stream.node is not None and stream.node.id == NODE.id


# -- what a stream stores: the differences from the snapshot ------------------------------------

HELD = st.one_of(st.none(), st.sampled_from(["1", "2", "3"]))
HELD_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), NAMES, HELD),
        st.tuples(st.just("discard"), NAMES, st.none()),
        st.tuples(st.just("next"), STATES, st.none()),  # rebase to the successor snapshot
        st.tuples(st.just("jump"), STATES, st.none()),  # rebase to an unrelated snapshot
        st.tuples(st.just("forget"), st.just({}), st.none()),
    ),
    max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(initial=STATES, steps=HELD_STEPS)
def test_held_versions_read_like_a_dict_whatever_the_base(
    initial: dict[str, str], steps: list[tuple[str, Any, Any]]
) -> None:
    held = HeldVersions(initial)
    reference: dict[str, str | None] = dict(initial)
    snap = Snapshot.empty()
    for kind, arg, value in steps:
        if kind == "set":
            held[arg] = value
            reference[arg] = value
        elif kind == "discard":
            held.discard(arg)
            reference.pop(arg, None)
        elif kind == "next":
            snap = snapshot(arg, after=snap)
            held.rebase(snap, A)
        elif kind == "jump":
            snap = Snapshot(snap.version + 10, resources(arg))
            held.rebase(snap, A)
        else:
            held.forget_base()
        for name in "abcd":
            assert held.get(name) == reference.get(name, MISSING)
        assert dict(held.items()) == reference


def test_a_wildcard_stream_in_sync_stores_nothing_of_its_own() -> None:
    pair = Pair()
    first = snapshot({f"w{i}": "1" for i in range(100)}, {"p": "1"})
    pair.connect(first)
    assert len(pair.server.held_versions(A)) == 100
    assert pair.server.stored_held_entries(A) == 0 and pair.server.stored_held_entries(Z) == 0
    changed = {f"w{i}": "2" if i < 10 else "1" for i in range(100)}
    second = snapshot(changed, {"p": "1"}, after=first)
    pair.push(second)
    assert pair.held[A] == {n: r.version for n, r in second.of_type(A).items()}
    assert pair.server.stored_held_entries(A) == 0
    # A refused version is what the stream stores: the client keeps the old one.
    stream = DeltaServerStream()
    stream.receive(request(node=True))
    [response] = stream.responses(first)
    stream.receive(request(nonce=response.nonce))
    third = snapshot({**changed, "w0": "3"}, after=first)
    [response] = stream.responses(third)
    stream.receive(request(nonce=response.nonce, error="no"))
    assert stream.stored_held_entries(A) == 10  # w0 .. w9 refused: it keeps their old versions
    assert stream.held_versions(A)["w5"] == first.of_type(A)["w5"].version
