"""SPIFFE IDs.

A workload identity in Underpass is ``spiffe://<trust-domain>/ns/<namespace>/sa/<sa>``.
Parsing follows the SPIFFE ID specification (scheme, trust domain and path
rules, 2048-byte limit) first, then requires the Kubernetes ``ns/<ns>/sa/<sa>``
path shape. Errors say exactly what is wrong, because they end up in front of
an operator (CA refusals, policy errors).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from identity.errors import InvalidSpiffeId

SCHEME_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
MAX_URI_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
_SHOWN_CHARS = 80  # how much of an offending string an error message quotes


def _show(text: str) -> str:
    """``repr`` of ``text`` for an error message, shortened if it is long."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} characters)"


def _byte_length(text: str) -> int:
    """UTF-8 length; lone surrogates (unencodable) count as 3 bytes rather than raising."""
    return len(text.encode("utf-8", "surrogatepass"))


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is valid, else raise :class:`InvalidSpiffeId`."""
    if not isinstance(trust_domain, str):
        raise InvalidSpiffeId(f"trust domain must be a string, not {type(trust_domain).__name__}")
    if not trust_domain:
        raise InvalidSpiffeId("trust domain is empty")
    if _byte_length(trust_domain) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(
            f"trust domain {_show(trust_domain)} is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
        )
    for ch in trust_domain:
        if ch not in _TRUST_DOMAIN_CHARS:
            hint = " (uppercase letters are not allowed)" if ch.isupper() else ""
            raise InvalidSpiffeId(
                f"trust domain {_show(trust_domain)} contains {ch!r}{hint}: only lowercase "
                "letters, digits, '.', '-' and '_' are allowed"
            )
    return trust_domain


def validate_path_segment(segment: str, what: str = "path segment") -> str:
    """Return ``segment`` if it is a valid SPIFFE path segment."""
    if not isinstance(segment, str):
        raise InvalidSpiffeId(f"{what} must be a string, not {type(segment).__name__}")
    if not segment:
        raise InvalidSpiffeId(f"{what} is empty")
    if segment in (".", ".."):
        raise InvalidSpiffeId(f"{what} is {segment!r}: '.' and '..' are not allowed")
    for ch in segment:
        if ch not in _PATH_SEGMENT_CHARS:
            raise InvalidSpiffeId(
                f"{what} {_show(segment)} contains {ch!r}: only letters, digits, '.', '-' "
                "and '_' are allowed"
            )
    return segment


def split_spiffe_uri(uri: str) -> tuple[str, list[str]]:
    """Check ``uri`` against the generic SPIFFE ID rules.

    Returns the trust domain and the path segments (possibly none). Raises
    :class:`InvalidSpiffeId`, and nothing else, for any string that is not a
    SPIFFE ID.
    """
    if not isinstance(uri, str):
        raise InvalidSpiffeId(f"a SPIFFE ID must be a string, not {type(uri).__name__}")
    if _byte_length(uri) > MAX_URI_BYTES:
        raise InvalidSpiffeId(f"SPIFFE ID {_show(uri)} is longer than {MAX_URI_BYTES} bytes")
    if not uri.startswith(SCHEME_PREFIX):
        if uri[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
            raise InvalidSpiffeId(f"{_show(uri)}: the scheme must be lowercase 'spiffe://'")
        raise InvalidSpiffeId(f"{_show(uri)} does not start with 'spiffe://'")
    rest = uri[len(SCHEME_PREFIX) :]
    for bad, name in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if bad in rest:
            raise InvalidSpiffeId(
                f"{_show(uri)} contains {name} ({bad!r}), which SPIFFE IDs forbid"
            )
    trust_domain, slash, path = rest.partition("/")
    if "@" in trust_domain:
        raise InvalidSpiffeId(f"{_show(uri)}: the trust domain must not have user info ('@')")
    if ":" in trust_domain:
        raise InvalidSpiffeId(f"{_show(uri)}: the trust domain must not have a port (':')")
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as exc:
        raise InvalidSpiffeId(f"{_show(uri)}: {exc}") from None
    if not slash:
        return trust_domain, []
    if not path or path.endswith("/"):
        raise InvalidSpiffeId(f"{_show(uri)} ends with '/': trailing slashes are not allowed")
    segments = path.split("/")
    for number, segment in enumerate(segments, 1):
        try:
            validate_path_segment(segment, f"path segment {number}")
        except InvalidSpiffeId as exc:
            raise InvalidSpiffeId(f"{_show(uri)}: {exc}") from None
    return trust_domain, segments


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity: ``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_path_segment(self.namespace, "namespace")
        validate_path_segment(self.service_account, "service account")
        if _byte_length(self.uri) > MAX_URI_BYTES:
            raise InvalidSpiffeId(
                f"SPIFFE ID {_show(self.uri)} is longer than {MAX_URI_BYTES} bytes"
            )

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``; raise :class:`InvalidSpiffeId`."""
        trust_domain, segments = split_spiffe_uri(uri)
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidSpiffeId(
                f"{_show(uri)} is a SPIFFE ID but not a workload identity: the path must be "
                "/ns/<namespace>/sa/<service-account>"
            )
        return cls(trust_domain, segments[1], segments[3])

    @classmethod
    def from_principal(cls, principal: str) -> SpiffeId:
        """Parse an Istio principal, a SPIFFE ID without ``spiffe://``."""
        if not isinstance(principal, str):
            raise InvalidSpiffeId(f"a principal must be a string, not {type(principal).__name__}")
        return cls.parse(SCHEME_PREFIX + principal)

    @property
    def uri(self) -> str:
        return f"{SCHEME_PREFIX}{self.principal}"

    @property
    def principal(self) -> str:
        """The ID without its scheme, as authorization policies name it."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri
