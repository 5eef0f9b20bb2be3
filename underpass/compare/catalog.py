"""The names of the deployment modes, importable without loading anything else.

Owns the mode names the command line offers (``underpass compare --modes``),
the default order, the baseline and the modes still planned. It imports
nothing: every ``underpass`` command builds the full argument parser, and
the parser must not load the comparison's dependencies into, say, a ztunnel
process. :data:`underpass.compare.modes.MODES` maps the same names to classes.
"""

from __future__ import annotations

from typing import Final

#: Modes available, in their default order: the ambient ones (issue 6 modes 2, 3, 4),
#: then the sidecar ones (1a, 1b, and 1b with Envoy's default workers).
AVAILABLE: Final = (
    "node",
    "service-account",
    "waypoint",
    "sidecar-ztunnel",
    "sidecar-envoy",
    "sidecar-envoy-default",
)
#: ``underpass compare`` without ``--modes`` runs them all.
DEFAULT_MODES: Final = AVAILABLE
#: The mode every ratio is taken against: what people run today.
BASELINE: Final = "sidecar-envoy"
#: Modes named but not built yet (asking for one says so): none left of issue 6.
PLANNED: Final[dict[str, str]] = {}
