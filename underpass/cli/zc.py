"""``underpass zc``: look inside a running ztunnel through its admin endpoint.

Owns the ``zc`` command (named after ``istioctl ztunnel-config``): it GETs
``/config_dump`` (or ``/connections``) from ztunnel's admin endpoint
(127.0.0.1:15000 by default) with the standard library, and prints one view
as a table (the columns of PROTOCOLS.md section 7), or the view's raw JSON or
YAML. The JSON keys read here are those of :mod:`ztunnel.dump` and of
ztunnel's connection tracker; this module imports neither (the core does not
depend on components), so a key renamed there must be renamed here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from underpass.cli import table

DEFAULT_ADMIN: Final = "127.0.0.1:15000"
REQUEST_TIMEOUT: Final = 10.0  # seconds; the admin answers from memory
OUTPUTS: Final = ("table", "json", "yaml")

JSON = dict[str, Any]

ZC_DESCRIPTION = """\
Inspect a running ztunnel through its admin endpoint (default 127.0.0.1:15000,
reachable from the ztunnel's own node only). Views, in the style of
istioctl ztunnel-config:

  workloads      NAMESPACE, POD NAME, ADDRESS, NODE, WAYPOINT, PROTOCOL
  services       NAMESPACE, SERVICE NAME, SERVICE VIP, WAYPOINT, ENDPOINTS
  policies       NAMESPACE, POLICY NAME, ACTION, SCOPE
  certificates   CERTIFICATE NAME, TYPE, STATUS, VALID CERT, SERIAL, NOT AFTER,
                 NOT BEFORE (one row per certificate of each identity's chain)
  connections    SOURCE, DESTINATION, SOURCE IDENTITY, DESTINATION IDENTITY,
                 DIRECTION, PROTOCOL, BYTES SENT/RECV, AGE (open connections)

Options (after the view):
  --admin HOST:PORT     ztunnel's admin endpoint (default 127.0.0.1:15000)
  -o table|json|yaml    output format (default table); json and yaml print the
                        view's part of /config_dump (or /connections) as served
  -n, --namespace NS    only this namespace's entries

Examples:
  underpass zc workloads
  underpass zc certificates --admin 127.0.0.1:15000
  underpass zc services -n demo -o yaml
  underpass lab exec --node node-1 -- underpass zc connections   (in the lab)
"""

UNREACHABLE_HINT: Final = "is ztunnel running? (`underpass lab status`)"


class AdminError(Exception):
    """The admin endpoint could not be asked, or answered something unusable."""


# -- talking to the admin endpoint -------------------------------------------------


def parse_admin_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port); argparse type."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:15000 or [::1]:15000)"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def fetch_json(admin: tuple[str, int], path: str, *, timeout: float = REQUEST_TIMEOUT) -> Any:
    """GET ``path`` from the admin endpoint and decode its JSON; :class:`AdminError` if not."""
    host, port = admin
    where = _show_address(admin)
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        try:
            connection.request("GET", path, headers={"Accept": "application/json"})
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise AdminError(
                f"cannot reach ztunnel admin at {where}: {UNREACHABLE_HINT}\n"
                f"  ({type(exc).__name__}: {exc})"
            ) from None
    finally:
        connection.close()
    if response.status != 200:
        message = body.decode("utf-8", "replace").strip()
        raise AdminError(
            f"ztunnel admin at {where} answered {response.status} {response.reason} "
            f"for {path}: {message}"
        )
    try:
        return json.loads(body)
    except ValueError as exc:
        raise AdminError(f"ztunnel admin at {where} sent invalid JSON for {path}: {exc}") from None


def _show_address(admin: tuple[str, int]) -> str:
    host, port = admin
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- small formatting helpers --------------------------------------------------------


def waypoint_text(gateway: JSON | None) -> str | None:
    """A waypoint as people name it: the service's short name, or its IP."""
    if not gateway:
        return None
    if "hostname" in gateway:
        hostname = str(gateway["hostname"].get("hostname", ""))
        return hostname.split(".")[0] or None
    if "address" in gateway:
        return str(gateway["address"].get("address", "")) or None
    return None


def tunnel_text(protocol: str | None) -> str:
    return "HBONE" if protocol == "HBONE" else "TCP"


def principal_text(identity: str | None) -> str | None:
    """``spiffe://td/ns/x/sa/y`` shortened to Istio's principal ``td/ns/x/sa/y``."""
    if not identity:
        return None
    return identity.removeprefix("spiffe://")


def bytes_text(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def age_text(seconds: float) -> str:
    """``42s``, ``3m12s``, ``2h05m``, ``4d03h``: two units at most, like kubectl."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def identity_namespace(identity: str | None) -> str | None:
    """The namespace in ``spiffe://td/ns/<ns>/sa/<sa>``, if the identity has that shape."""
    if not identity:
        return None
    parts = identity.removeprefix("spiffe://").split("/")
    if len(parts) == 5 and parts[1] == "ns":
        return parts[2]
    return None


# -- views: (fetch path, rows of the view, filter, table) -------------------------------


def _workloads_table(items: list[JSON], _now: float) -> str:
    rows = [
        (
            w.get("namespace"),
            w.get("name"),
            ",".join(w.get("addresses") or []),
            w.get("node"),
            waypoint_text(w.get("waypoint")),
            tunnel_text(w.get("tunnel_protocol")),
        )
        for w in sorted(items, key=lambda w: (w.get("namespace", ""), w.get("name", "")))
    ]
    return table.render(("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"), rows)


def _services_table(items: list[JSON], endpoints: dict[str, int]) -> str:
    rows = [
        (
            s.get("namespace"),
            s.get("name") or s.get("hostname"),
            ",".join(str(a.get("address", "")) for a in s.get("addresses") or []),
            waypoint_text(s.get("waypoint")),
            endpoints.get(f"{s.get('namespace')}/{s.get('hostname')}", 0),
        )
        for s in sorted(items, key=lambda s: (s.get("namespace", ""), s.get("hostname", "")))
    ]
    return table.render(("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"), rows)


def _policies_table(items: list[JSON], _now: float) -> str:
    def action(policy: JSON) -> str:
        text = policy.get("action") or "unknown"
        return f"{text} (dry run)" if policy.get("dry_run") else text

    rows = [
        (p.get("namespace"), p.get("name"), action(p), p.get("scope") or "unknown")
        for p in sorted(items, key=lambda p: (p.get("namespace", ""), p.get("name", "")))
    ]
    return table.render(("NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"), rows)


def _certificates_table(items: list[JSON], _now: float) -> str:
    rows: list[tuple[object, ...]] = []
    for identity in sorted(items, key=lambda c: c.get("identity", "")):
        name = identity.get("identity")
        state = identity.get("state")
        chain = identity.get("chain") or []
        if not chain:  # no certificate held (yet): one row for the identity
            rows.append(
                (
                    name,
                    None,
                    state,
                    bool(identity.get("valid")),
                    identity.get("serial"),
                    identity.get("not_after"),
                    identity.get("not_before"),
                )
            )
            continue
        for cert in chain:
            rows.append(
                (
                    name,
                    cert.get("type"),
                    state,
                    bool(cert.get("valid")),
                    cert.get("serial"),
                    cert.get("not_after"),
                    cert.get("not_before"),
                )
            )
    return table.render(
        (
            "CERTIFICATE NAME",
            "TYPE",
            "STATUS",
            "VALID CERT",
            "SERIAL",
            "NOT AFTER",
            "NOT BEFORE",
        ),
        rows,
    )


def _connections_table(items: list[JSON], now: float) -> str:
    rows = [
        (
            c.get("source"),
            c.get("destination"),
            principal_text(c.get("source_identity")),
            principal_text(c.get("destination_identity")),
            c.get("direction"),
            c.get("protocol"),
            f"{bytes_text(int(c.get('bytes_sent') or 0))}/"
            f"{bytes_text(int(c.get('bytes_received') or 0))}",
            age_text(now - float(c.get("started") or now)),
        )
        for c in sorted(items, key=lambda c: float(c.get("started") or 0.0))
    ]
    return table.render(
        (
            "SOURCE",
            "DESTINATION",
            "SOURCE IDENTITY",
            "DESTINATION IDENTITY",
            "DIRECTION",
            "PROTOCOL",
            "BYTES SENT/RECV",
            "AGE",
        ),
        rows,
    )


def _in_namespace(view: str, item: JSON, namespace: str) -> bool:
    if view in ("workloads", "services", "policies"):
        return bool(item.get("namespace") == namespace)
    if view == "certificates":
        return identity_namespace(item.get("identity")) == namespace
    # connections: either end in the namespace (workloads are "namespace/name")
    ends = (item.get("source_workload"), item.get("destination_workload"))
    return any(isinstance(end, str) and end.split("/")[0] == namespace for end in ends)


VIEW_HELP: Final = {
    "workloads": "workloads (pods) ztunnel knows, with address, node, waypoint and protocol",
    "services": "services with their VIPs, waypoint and number of endpoints",
    "policies": "L4 authorization policies ztunnel enforces",
    "certificates": "the identities ztunnel holds for its pods, one row per chain certificate",
    "connections": "connections open through this ztunnel now",
}

Renderer = Callable[[list[JSON], float], str]
_RENDERERS: Final[dict[str, Renderer]] = {
    "workloads": _workloads_table,
    "policies": _policies_table,
    "certificates": _certificates_table,
    "connections": _connections_table,
}


def view_items(view: str, admin: tuple[str, int]) -> tuple[list[JSON], JSON | None]:
    """The view's list (and the whole dump it came from, for cross references)."""
    if view == "connections":
        data = fetch_json(admin, "/connections")
        if not isinstance(data, list):
            raise AdminError("ztunnel's /connections did not answer a JSON list")
        return data, None
    dump = fetch_json(admin, "/config_dump")
    if not isinstance(dump, dict) or not isinstance(dump.get(view), list):
        raise AdminError(
            f"ztunnel's /config_dump has no {view!r} list; is it an Underpass ztunnel?"
        )
    return dump[view], dump


def render_view(view: str, items: list[JSON], dump: JSON | None, now: float) -> str:
    if view == "services":
        endpoints: dict[str, int] = {}
        for workload in (dump or {}).get("workloads", []):
            for key in workload.get("services") or {}:
                endpoints[key] = endpoints.get(key, 0) + 1
        return _services_table(items, endpoints)
    return _RENDERERS[view](items, now)


def run(args: argparse.Namespace) -> int:
    view: str = args.zc_view
    try:
        items, dump = view_items(view, args.admin)
    except AdminError as exc:
        print(f"underpass zc: {exc}", file=sys.stderr)
        return 1
    if args.namespace:
        items = [item for item in items if _in_namespace(view, item, args.namespace)]
    if args.output == "json":
        print(json.dumps(items, indent=2))
    elif args.output == "yaml":
        import yaml  # only this output needs it

        print(yaml.safe_dump(items, sort_keys=False, default_flow_style=False), end="")
    else:
        print(render_view(view, items, dump, time.time()), end="")
    return 0


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "zc",
        help="inspect a running ztunnel: workloads, services, policies, certificates, connections",
        description=ZC_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--admin",
        type=parse_admin_address,
        default=parse_admin_address(DEFAULT_ADMIN),
        metavar="HOST:PORT",
        help=f"ztunnel's admin endpoint (default {DEFAULT_ADMIN})",
    )
    common.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default="table",
        help="table (default), or the view's raw json or yaml",
    )
    common.add_argument(
        "-n", "--namespace", default=None, metavar="NS", help="only entries of this namespace"
    )
    views = parser.add_subparsers(dest="zc_view", metavar="VIEW", required=True)
    for view, help_text in VIEW_HELP.items():
        views.add_parser(view, parents=[common], help=help_text, description=help_text)
    parser.set_defaults(func=run)
