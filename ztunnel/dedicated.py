"""Dedicated mode: ztunnel as one pod's own proxy (a sidecar), inside the pod's netns.

``underpass ztunnel --dedicated NS/NAME`` runs in the pod's network namespace
(deployment mode 1 with our own proxy, and the waypoint stand-in of mode 4):
there is no node agent to hand the pod over, so the process serves the netns
it runs in, as if ZDS had added it, and holds that one pod's identity only,
fetched from the CA with the pod's own token (no impersonation). The same
in-pod redirection rules apply; everything else is shared mode's code.
"""

from __future__ import annotations

import os

import trio

from underpass import zds
from ztunnel.errors import ZtunnelError
from ztunnel.pod import Shared
from ztunnel.pods import PodManager

DEDICATED_UID = "dedicated"


class DedicatedPod(PodManager):
    """Serves the pod whose netns this process runs in (see the module docstring)."""

    def __init__(self, shared: Shared, info: zds.WorkloadInfo) -> None:
        super().__init__(shared, zds_socket="")
        self._info = info

    async def _zds_forever(self) -> None:
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        error = await self._add(zds.Add(DEDICATED_UID, self._info), fd)
        if error:
            raise ZtunnelError(f"cannot serve the pod this ztunnel runs in: {error}")
        self.snapshot_processed = True
        self.snapshot_event.set()
        await trio.sleep_forever()
