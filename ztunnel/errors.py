"""Errors raised by ztunnel's state, local configuration and L4 authorization.

Owns the error types of :mod:`ztunnel.state`, :mod:`ztunnel.local_config` and
:mod:`ztunnel.policy`. Every message says what was wrong and what the operator
can do about it, because these end up in ztunnel's log, in an xDS NACK that the
control plane logs, or on the terminal of whoever started ztunnel.

- :class:`InvalidResource`: a workload, service or policy (from xDS or the
  local config) that ztunnel cannot use. A subclass of :class:`ValueError` so
  that the xDS client's decoders turn it into a NACK of the whole response.
- :class:`InvalidBatch`: a batch of updates that contradicts itself (a name
  both updated and removed); a bug in the caller, never applied.
- :class:`WriterAlreadyClaimed`: a second component tried to write the state.
- :class:`LocalConfigError`: the ``--local-config`` file is unreadable or
  wrong; carries the file, the path of the bad field and what is wrong.
"""

from __future__ import annotations

from pathlib import Path


class ZtunnelError(Exception):
    """Base class of ztunnel's own errors."""


class InvalidResource(ZtunnelError, ValueError):
    """A resource (workload, service or authorization policy) that ztunnel cannot use.

    ``resource`` names it (its xDS resource name when known), ``field`` is the
    path of the offending field inside it (``addresses[1]``), ``problem`` says
    what is wrong with it.
    """

    def __init__(self, problem: str, *, resource: str = "", field: str = "") -> None:
        self.problem = problem
        self.resource = resource
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        where = " ".join(
            part
            for part in (
                f"resource {self.resource!r}" if self.resource else "",
                f"field {self.field}" if self.field else "",
            )
            if part
        )
        if not where:
            return self.problem
        advice = ""
        if self.resource and "upgrade ztunnel" not in self.problem:
            advice = (
                "; ztunnel rejected it and keeps the previous state: fix the object the "
                "control plane generated it from"
            )
        return f"{where}: {self.problem}{advice}"

    def within(self, *, resource: str | None = None, field: str | None = None) -> InvalidResource:
        """The same error located inside an outer resource or field (prefixes the path)."""
        inner = join_path(field, self.field) if field else self.field
        return InvalidResource(
            self.problem,
            resource=resource if resource is not None else self.resource,
            field=inner,
        )


def join_path(outer: str, inner: str) -> str:
    """``outer.inner``, or ``outer[i]`` when ``inner`` is an index; either may be empty."""
    if not outer:
        return inner
    if not inner:
        return outer
    return outer + inner if inner.startswith("[") else f"{outer}.{inner}"


class InvalidBatch(ZtunnelError, ValueError):
    """A batch of state updates contradicts itself; nothing of it was applied.

    This is a bug in the updater that built the batch (the xDS client or the
    local config loader), not in the control plane's data: report it.
    """


class WriterAlreadyClaimed(ZtunnelError, RuntimeError):
    """A second updater asked for the state store's one writer."""

    def __init__(self, holder: str, claimant: str) -> None:
        super().__init__(
            f"the proxy state already has a writer ({holder}); {claimant} cannot also write it. "
            "ztunnel runs one state updater: configure either --local-config or an xDS "
            "address, not both"
        )
        self.holder = holder
        self.claimant = claimant


class LocalConfigError(ZtunnelError):
    """The ``--local-config`` file cannot be used.

    ``path`` is the path of the bad field inside the document
    (``workloads[2].addresses[0]``, empty for the file as a whole); ``line``
    is the 1-based line when known.
    """

    def __init__(self, file: Path | str, path: str, problem: str, line: int | None = None) -> None:
        self.file = Path(file)
        self.path = path
        self.problem = problem
        self.line = line
        location = str(self.file) + (f":{line}" if line is not None else "")
        field = f" at {path}" if path else ""
        super().__init__(
            f"local config {location}{field}: {problem}. "
            "Fix the file; while it is wrong ztunnel keeps the last good configuration "
            "(or does not start, if there is none)"
        )
