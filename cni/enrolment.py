"""Who is captured: the enrolment rule of PROTOCOLS.md section 7, as the CNI side names it.

The rule itself lives in the core (:mod:`underpass.ambient`), shared with
discovery so that the pods the node agent captures are exactly the workloads
discovery marks HBONE. This module keeps the names the node agent and the
plugin use: :class:`Policy` (the rule with the deployment's mesh namespace
and exclusions) and :class:`Decision`. Pure, no I/O: the node agent decides
with it, and the CNI plugin uses it to know, when the agent is unreachable,
whether a pod may start without it.
"""

from __future__ import annotations

from underpass.ambient import (
    ALWAYS_EXCLUDED_NAMESPACES,
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE,
    DEFAULT_MESH_NAMESPACE,
    REDIRECTION_ANNOTATION,
    REDIRECTION_ENABLED,
    Decision,
    Enrolment,
)

AMBIENT = DATAPLANE_MODE_AMBIENT
NONE = DATAPLANE_MODE_NONE
#: Namespaces that are never captured, whatever their labels.
ALWAYS_EXCLUDED = ALWAYS_EXCLUDED_NAMESPACES
#: The enrolment rule with the deployment's mesh namespace and excluded namespaces.
Policy = Enrolment

__all__ = [
    "ALWAYS_EXCLUDED",
    "AMBIENT",
    "DATAPLANE_MODE_LABEL",
    "DEFAULT_MESH_NAMESPACE",
    "NONE",
    "REDIRECTION_ANNOTATION",
    "REDIRECTION_ENABLED",
    "Decision",
    "Policy",
]
