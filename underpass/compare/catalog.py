"""The names of the deployment modes, importable without loading anything else.

Owns the mode names the command line offers (``underpass compare --modes``),
the default order, the baseline and the modes still planned. It imports
nothing: every ``underpass`` command builds the full argument parser, and
the parser must not load the comparison's dependencies into, say, a ztunnel
process. :data:`underpass.compare.modes.MODES` maps the same names to classes.
"""

from __future__ import annotations

from typing import Final

#: Modes available, in their default order.
AVAILABLE: Final = ("node", "sidecar-envoy", "sidecar-envoy-default")
DEFAULT_MODES: Final = ("node", "sidecar-envoy")
#: The mode every ratio is taken against: what people run today.
BASELINE: Final = "sidecar-envoy"
#: Modes of issue 6 not built yet: named so that asking for one says so.
PLANNED: Final = {
    "sidecar-ztunnel": "1a, our ztunnel in dedicated mode as a sidecar in every pod",
    "service-account": "3, one ztunnel worker per service account per node",
    "waypoint": "4, ztunnel plus a remote L7 hop (waypoint)",
}
