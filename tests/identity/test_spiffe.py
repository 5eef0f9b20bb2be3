"""SPIFFE IDs: the generic SPIFFE ID rules, then the workload ``/ns/<ns>/sa/<sa>`` shape.

Property tests cover every valid identity (round trip) and every way of
breaking one (forbidden characters, empty and dot segments, uppercase trust
domains, arbitrary text): the only acceptable outcome for a bad string is
:class:`InvalidSpiffeId`, never another exception and never acceptance.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from identity.errors import GrpcCode, InvalidSpiffeId
from identity.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    MAX_TRUST_DOMAIN_BYTES,
    MAX_URI_BYTES,
    SpiffeId,
    split_spiffe_uri,
)

pytestmark = pytest.mark.unit

TD_CHARS = string.ascii_lowercase + string.digits + ".-_"
SEGMENT_CHARS = string.ascii_letters + string.digits + ".-_"

trust_domains = st.text(alphabet=TD_CHARS, min_size=1, max_size=63)
segments = st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=63).filter(
    lambda s: s not in (".", "..")
)
workload_parts = st.tuples(trust_domains, segments, segments)

# Any character at all, lone surrogates included (they cannot even be UTF-8 encoded).
any_char = st.characters(codec=None) | st.characters(categories=["Cs"])
td_forbidden = any_char.filter(lambda c: c not in TD_CHARS)
segment_forbidden = any_char.filter(lambda c: c not in SEGMENT_CHARS)


def uri_of(td: str, ns: str, sa: str) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


def insert(text: str, position: int, piece: str) -> str:
    position %= len(text) + 1
    return text[:position] + piece + text[position:]


# -- valid identities ---------------------------------------------------------------


@given(workload_parts)
@example(("cluster.local", "default", "default"))
@example(("a", "A", "_"))
@example(("x", "...", ".a"))
def test_format_then_parse_round_trips(parts: tuple[str, str, str]) -> None:
    td, ns, sa = parts
    ident = SpiffeId(td, ns, sa)
    assert ident.uri == uri_of(td, ns, sa)
    assert str(ident) == ident.uri
    assert ident.principal == f"{td}/ns/{ns}/sa/{sa}"
    parsed = SpiffeId.parse(ident.uri)
    assert parsed == ident
    assert (parsed.trust_domain, parsed.namespace, parsed.service_account) == parts
    assert SpiffeId.from_principal(ident.principal) == ident
    assert hash(parsed) == hash(ident)


def test_istio_default_identity() -> None:
    ident = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/bookinfo-productpage")
    assert ident == SpiffeId(DEFAULT_TRUST_DOMAIN, "default", "bookinfo-productpage")


def test_path_segments_may_use_uppercase_but_trust_domain_may_not() -> None:
    assert SpiffeId.parse("spiffe://td/ns/Prod/sa/Web_1").namespace == "Prod"
    with pytest.raises(InvalidSpiffeId, match="uppercase"):
        SpiffeId.parse("spiffe://Cluster.local/ns/a/sa/b")


def test_generic_ids_without_path_or_with_other_paths_split_but_are_not_workloads() -> None:
    assert split_spiffe_uri("spiffe://example.org") == ("example.org", [])
    assert split_spiffe_uri("spiffe://example.org/a/b/c") == ("example.org", ["a", "b", "c"])
    for uri in (
        "spiffe://example.org",
        "spiffe://example.org/a/b/c",
        "spiffe://example.org/ns/a/sa",
        "spiffe://example.org/ns/a/sa/b/c",
        "spiffe://example.org/sa/a/ns/b",
        "spiffe://example.org/NS/a/SA/b",
    ):
        with pytest.raises(InvalidSpiffeId, match="not a workload identity"):
            SpiffeId.parse(uri)


# -- the length limits --------------------------------------------------------------


def test_uri_of_exactly_2048_bytes_is_accepted_and_one_more_byte_is_not() -> None:
    td = "t" * MAX_TRUST_DOMAIN_BYTES
    fixed = len(uri_of(td, "", ""))
    ns = "n" * 1000
    sa = "s" * (MAX_URI_BYTES - fixed - len(ns))
    longest = uri_of(td, ns, sa)
    assert len(longest) == MAX_URI_BYTES
    assert SpiffeId.parse(longest) == SpiffeId(td, ns, sa)
    with pytest.raises(InvalidSpiffeId, match="2048 bytes"):
        SpiffeId.parse(longest + "s")
    with pytest.raises(InvalidSpiffeId, match="2048 bytes"):
        SpiffeId(td, ns, sa + "s")


def test_trust_domain_of_255_bytes_is_accepted_and_256_is_not() -> None:
    assert SpiffeId.parse(uri_of("t" * 255, "a", "b")).trust_domain == "t" * 255
    with pytest.raises(InvalidSpiffeId, match="255 bytes"):
        SpiffeId.parse(uri_of("t" * 256, "a", "b"))


def test_error_messages_quote_long_input_shortened() -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse("spiffe://td/ns/" + "x" * 5000 + "/sa/b")
    assert len(str(info.value)) < 300


# -- specific defects, each with the message an operator needs ----------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "does not start with 'spiffe://'"),
        ("cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
        ("https://cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
        ("spiffe:/cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "scheme must be lowercase"),
        ("Spiffe://cluster.local/ns/a/sa/b", "scheme must be lowercase"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe://cluster.local:8080/ns/a/sa/b", "port"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "user info"),
        ("spiffe://user:pw@cluster.local/ns/a/sa/b", "user info"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
        ("spiffe://cluster.local/ns/a%2Fb/sa/c", "percent-encoding"),
        ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
        ("spiffe://cluster.local/", "trailing slash"),
        ("spiffe://cluster.local//ns/a/sa/b", "path segment 1 is empty"),
        ("spiffe://cluster.local/ns//sa/b", "path segment 2 is empty"),
        ("spiffe://cluster.local/ns/./sa/b", "'.' and '..' are not allowed"),
        ("spiffe://cluster.local/ns/a/sa/..", "'.' and '..' are not allowed"),
        ("spiffe://cluster.local/ns/a b/sa/c", "contains ' '"),
        ("spiffe://cluster.local/ns/a/sa/caf\u00e9", "contains '\u00e9'"),
        ("spiffe://clus ter/ns/a/sa/b", "contains ' '"),
        ("spiffe://cluster.LOCAL/ns/a/sa/b", "uppercase"),
        ("spiffe://[::1]/ns/a/sa/b", "trust domain"),
    ],
)
def test_defect_is_named_in_the_error(uri: str, message: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(uri)
    assert message in str(info.value)
    assert info.value.grpc_code is GrpcCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (("", "a", "b"), "trust domain is empty"),
        (("td", "", "b"), "namespace is empty"),
        (("td", "a", ""), "service account is empty"),
        (("td", "..", "b"), "namespace is '..'"),
        (("td", "a", "."), "service account is '.'"),
        (("td", "a/b", "c"), "namespace 'a/b' contains '/'"),
        (("TD", "a", "b"), "uppercase"),
    ],
)
def test_constructor_validates_each_part(parts: tuple[str, str, str], message: str) -> None:
    with pytest.raises(InvalidSpiffeId, match=message):
        SpiffeId(*parts)


def test_non_string_input_is_an_invalid_spiffe_id() -> None:
    for value in (None, b"spiffe://td/ns/a/sa/b", 42):
        with pytest.raises(InvalidSpiffeId):
            SpiffeId.parse(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpiffeId):
        SpiffeId("td", None, "b")  # type: ignore[arg-type]


# -- properties: every broken identity is refused, with InvalidSpiffeId only ---------


def assert_rejected(uri: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId.parse(uri)


@given(workload_parts, td_forbidden, st.integers(min_value=0))
def test_forbidden_character_in_trust_domain_is_rejected(
    parts: tuple[str, str, str], bad: str, position: int
) -> None:
    td, ns, sa = parts
    broken = insert(td, position, bad)
    assert_rejected(uri_of(broken, ns, sa))
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(broken, ns, sa)


@given(workload_parts, segment_forbidden, st.integers(min_value=0), st.booleans())
def test_forbidden_character_in_namespace_or_service_account_is_rejected(
    parts: tuple[str, str, str], bad: str, position: int, in_namespace: bool
) -> None:
    td, ns, sa = parts
    if in_namespace:
        ns = insert(ns, position, bad)
    else:
        sa = insert(sa, position, bad)
    assert_rejected(uri_of(td, ns, sa))
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(td, ns, sa)


@given(workload_parts, st.sampled_from(["", ".", ".."]), st.sampled_from(range(4)))
def test_empty_or_dot_segment_anywhere_is_rejected(
    parts: tuple[str, str, str], bad: str, index: int
) -> None:
    td, ns, sa = parts
    path = ["ns", ns, "sa", sa]
    path[index] = bad
    assert_rejected(f"spiffe://{td}/" + "/".join(path))


@given(workload_parts, st.integers(min_value=0, max_value=5), st.integers(min_value=0))
def test_extra_empty_segment_is_rejected(
    parts: tuple[str, str, str], index: int, repeat: int
) -> None:
    td, ns, sa = parts
    path = ["ns", ns, "sa", sa]
    path.insert(index % 5, "")
    assert_rejected(f"spiffe://{td}/" + "/".join(path) + "/" * (repeat % 3))


@given(
    workload_parts,
    st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=3),
    st.integers(min_value=0),
)
def test_uppercase_trust_domain_is_rejected(
    parts: tuple[str, str, str], upper: str, position: int
) -> None:
    td, ns, sa = parts
    assert_rejected(uri_of(insert(td, position, upper), ns, sa))
    assert_rejected(uri_of(td.upper() + upper, ns, sa))


def check_arbitrary(text: str) -> None:
    """``parse`` either raises InvalidSpiffeId or accepts a canonical workload ID."""
    try:
        ident = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    # Accepted: it must be exactly the canonical form of what it parsed to.
    assert ident.uri == text
    assert SpiffeId(ident.trust_domain, ident.namespace, ident.service_account) == ident


@given(st.text(alphabet=any_char))
@example("\ud800")
@example("spiffe://td/ns/\udfff/sa/b")
@example("spiffe://" + "a" * 3000)
def test_parse_of_arbitrary_text_raises_only_invalid_spiffe_id(text: str) -> None:
    check_arbitrary(text)


# Text close to valid IDs, so that the property also explores deep into the parser.
near_alphabet = st.sampled_from([*"spife:/ns.a-_A0%?#@ \u00e9\ud800", "/ns/", "/sa/"])


@given(st.lists(near_alphabet, max_size=40).map("".join))
def test_parse_of_near_valid_text_raises_only_invalid_spiffe_id(tail: str) -> None:
    check_arbitrary("spiffe://" + tail)
    check_arbitrary(tail)


@given(st.text(alphabet=any_char))
def test_from_principal_of_arbitrary_text_raises_only_invalid_spiffe_id(text: str) -> None:
    try:
        ident = SpiffeId.from_principal(text)
    except InvalidSpiffeId:
        return
    assert ident.principal == text
