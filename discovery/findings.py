"""What translation could not honour, and what it did instead.

Translation is pure: it returns :class:`Finding` values next to the resources
instead of logging. The pipeline (:mod:`discovery.pipeline`) logs each new
finding once and counts it by ``reason`` in
``underpass_discovery_unsupported_total``. Every finding's ``effect`` is a
fail-closed choice: an ALLOW that cannot be checked never matches, a DENY
that cannot be checked exactly denies more, a waypoint that cannot be found
still captures the traffic (which then fails).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Reasons (a bounded label set for the metric).
HTTP_ONLY_FIELD: Final = "http_only_field"
UNSUPPORTED_CONDITION: Final = "unsupported_condition"
UNSUPPORTED_ACTION: Final = "unsupported_action"
INVALID_VALUE: Final = "invalid_value"
UNRECOGNIZED_FIELD: Final = "unrecognized_field"
WAYPOINT_NOT_FOUND: Final = "waypoint_not_found"
PORT_LEVEL_WITHOUT_SELECTOR: Final = "port_level_mtls_without_selector"
INVALID_ADDRESS: Final = "invalid_address"

REASONS: Final = (
    HTTP_ONLY_FIELD,
    UNSUPPORTED_CONDITION,
    UNSUPPORTED_ACTION,
    INVALID_VALUE,
    UNRECOGNIZED_FIELD,
    WAYPOINT_NOT_FOUND,
    PORT_LEVEL_WITHOUT_SELECTOR,
    INVALID_ADDRESS,
)


@dataclass(frozen=True, slots=True, order=True)
class Finding:
    """One thing of one object that translation could not honour as written."""

    kind: str  # AuthorizationPolicy, PeerAuthentication, Pod, Service
    namespace: str
    name: str
    field: str  # e.g. "rules[0].to[0].operation.methods"
    reason: str  # one of REASONS
    effect: str  # what translation did instead (always fail-closed)

    def log_fields(self) -> dict[str, str]:
        return {
            "object": f"{self.kind} {self.namespace}/{self.name}",
            "field": self.field,
            "reason": self.reason,
            "effect": self.effect,
        }
