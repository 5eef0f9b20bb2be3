"""The redirection rules inside a pod's network namespace (PROTOCOLS.md section 6).

This module owns what the node agent installs in each captured pod's netns:
our one nftables table, ``inet underpass``, and the policy routing that hands
packets of ztunnel's transparent connections back to ztunnel (one ``ip rule``
and one local route per address family, in routing table 100). It renders the
table (pure, :func:`render_table`), and applies, removes and inspects all of
it with ``nft`` and ``ip`` run inside the pod netns through
``nsenter --net=<path>`` (blocking: the agent calls these from a thread).
Nothing is ever written to the node's own tables, except by the opt-in
:func:`apply_node` below.

Capture mechanism: NAT ``redirect`` (not TPROXY). ztunnel recovers the
original destination of captured connections with ``SO_ORIGINAL_DST``, which
only the conntrack NAT path provides; replies of redirected connections are
un-NATed by conntrack and need no routing help.

Transparent upstream: ztunnel's inbound path connects to the application from
inside the pod netns *with the client's source IP* (a socket with
``IP_TRANSPARENT`` and ``SO_MARK`` 0x539 bound to the foreign client address).
The application's replies are addressed to that foreign IP, so the main table
would send them out of eth0. As Istio does in the pod netns:

* packets arriving (prerouting, mangle priority) with mark 0x539 - ztunnel's
  own, looping over ``lo`` to the local application - set the connmark 0x111;
* in output, a ``type route`` chain (one that makes the kernel route the packet
  again when its mark changes; a ``filter`` chain would not) copies the
  connmark 0x111 onto the packets of those connections;
* ``fwmark 0x111 lookup 100`` with ``local 0.0.0.0/0 dev lo table 100`` (and
  ``local ::/0`` when IPv6 is on in the pod) delivers them locally, to
  ztunnel's transparent socket.

Connections redirected to 15006 are deliberately *not* given 0x111: the
replies of ztunnel's 15006-accepted sockets must leave through eth0.

Semantics (capture is TCP only; everything else is untouched):

* packets of sockets marked 0x539 (ztunnel's own) are never captured;
* inbound (nat prerouting): not to 127.0.0.1/::1, not to 15008, not from the
  kubelet probe address 169.254.7.127, unmarked -> redirect to 15006;
* outbound (nat output): leaving on a non-loopback interface, unmarked, not to
  169.254.7.127, not part of a 0x111 connection -> redirect to 15001. A pod
  talking to itself (its own IP or 127.0.0.1) routes over ``lo`` and is left alone.

Node side (opt-in, :func:`apply_node`): kubelet probes come from the node
itself; a second table, ``ip underpass_node`` in the *node's* netns, SNATs TCP
that the node originates (``fib saddr type local``) towards a captured pod's IP
to 169.254.7.127, which the pod rules accept without capture. It holds only the
set of captured pod IPs and one rule, and is replaced atomically like the pod table.

Applying is idempotent. The table: one ``nft -f -`` transaction declares it,
deletes it and declares it again with its chains, so a re-apply (agent restart,
reconcile) replaces whatever was there - no duplicate rules, no stale ones -
and removal (declare + delete) succeeds whether or not it exists. The routing:
the local route is ``ip route replace``d, the rule is added only when a listing
shows it missing (extra copies are deleted). Order: routes, rule, then the
table on apply (nothing is marked before it can be delivered); the reverse on
removal, which deletes only what a listing shows, so it succeeds when parts or
all of it are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Final

from cni.errors import NetnsGone, RedirectError
from underpass.netns import NetnsError, run_in_netns

TABLE_FAMILY = "inet"
TABLE_NAME = "underpass"
#: The comment on our table: what tells our table from anyone else's.
TABLE_COMMENT = "underpass ambient redirection"
_TIMEOUT = 10.0
#: Routing tables the kernel itself owns (unspec, default, main, local).
_RESERVED_TABLES: Final = frozenset({0, 253, 254, 255})
#: The main table's rule priority: ours must come before it.
_MAIN_RULE_PRIORITY: Final = 32766
#: Where the kernel says whether IPv6 is off on ``lo`` (read inside the pod netns).
_LO_DISABLE_IPV6: Final = "/proc/sys/net/ipv6/conf/lo/disable_ipv6"


@dataclass(frozen=True, slots=True)
class RedirectConfig:
    """Ports, marks, addresses and routing of the capture rules (PROTOCOLS.md sections 1, 6)."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    ztunnel_mark: int = 0x539
    connmark: int = 0x111
    probe_address: str = "169.254.7.127"
    #: The routing table holding the ``local`` route for transparent sockets.
    route_table: int = 100
    #: Priority of the ``fwmark <connmark> lookup <route_table>`` rule (before main's).
    rule_priority: int = 32764

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port", "hbone_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port, got {port!r}")
        for name in ("ztunnel_mark", "connmark"):
            mark = getattr(self, name)
            if not isinstance(mark, int) or not 0 < mark < 2**32:
                raise ValueError(f"{name} must be a non-zero 32-bit mark, got {mark!r}")
        table = self.route_table
        if not isinstance(table, int) or not 0 < table < 2**32 or table in _RESERVED_TABLES:
            raise ValueError(
                f"route_table must be a routing table number other than "
                f"{sorted(_RESERVED_TABLES)}, got {table!r}"
            )
        priority = self.rule_priority
        if not isinstance(priority, int) or not 0 < priority < _MAIN_RULE_PRIORITY:
            raise ValueError(
                f"rule_priority must be between 1 and {_MAIN_RULE_PRIORITY - 1} "
                f"(before the main table), got {priority!r}"
            )
        IPv4Address(self.probe_address)  # raises ValueError when it is not one


def render_table(config: RedirectConfig = RedirectConfig()) -> str:
    """The table's definition (chains and rules), without the replace preamble."""
    c = config
    return f"""table {TABLE_FAMILY} {TABLE_NAME} {{
	comment "{TABLE_COMMENT}"

	chain inbound {{
		type nat hook prerouting priority dstnat; policy accept;
		meta l4proto != tcp return
		meta mark {c.ztunnel_mark:#x} accept
		ip saddr {c.probe_address} accept
		ip daddr 127.0.0.1 accept
		ip6 daddr ::1 accept
		tcp dport {c.hbone_port} accept
		meta l4proto tcp redirect to :{c.inbound_port}
	}}

	chain outbound {{
		type nat hook output priority -100; policy accept;
		meta l4proto != tcp return
		meta mark {c.ztunnel_mark:#x} accept
		ct mark {c.connmark:#x} accept
		ip daddr {c.probe_address} accept
		oifname "lo" accept
		meta l4proto tcp redirect to :{c.outbound_port}
	}}

	chain mark_transparent {{
		type filter hook prerouting priority mangle; policy accept;
		meta mark {c.ztunnel_mark:#x} ct mark set {c.connmark:#x}
	}}

	chain restore_mark {{
		type route hook output priority mangle; policy accept;
		ct mark {c.connmark:#x} meta mark set ct mark
	}}
}}
"""


def render_apply(config: RedirectConfig = RedirectConfig()) -> str:
    """One atomic transaction that replaces our table by a fresh one."""
    return (
        f"table {TABLE_FAMILY} {TABLE_NAME}\n"
        f"delete table {TABLE_FAMILY} {TABLE_NAME}\n" + render_table(config)
    )


def render_remove() -> str:
    """One transaction that removes our table, whether or not it exists."""
    return f"table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"


NODE_TABLE_FAMILY = "ip"
NODE_TABLE_NAME = "underpass_node"
NODE_TABLE_COMMENT = "underpass kubelet probe SNAT"


def render_node_apply(pod_ips: Iterable[str], config: RedirectConfig = RedirectConfig()) -> str:
    """One transaction that replaces the node-side probe SNAT table (IPv4 pod IPs)."""
    ips = sorted({str(IPv4Address(ip)) for ip in pod_ips if ":" not in ip}, key=IPv4Address)
    elements = f"\t\telements = {{ {', '.join(ips)} }}\n" if ips else ""
    name = f"{NODE_TABLE_FAMILY} {NODE_TABLE_NAME}"
    return (
        f"table {name}\n"
        f"delete table {name}\n"
        f"table {name} {{\n"
        f'\tcomment "{NODE_TABLE_COMMENT}"\n'
        "\tset captured_pods {\n"
        "\t\ttype ipv4_addr\n"
        f"{elements}"
        "\t}\n"
        "\tchain probe_snat {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        "\t\tip daddr @captured_pods fib saddr type local meta l4proto tcp"
        f" snat to {config.probe_address}\n"
        "\t}\n"
        "}\n"
    )


# ------------------------------------------------------------- policy routing


def _family_flag(family: int) -> str:
    if family not in (4, 6):
        raise ValueError(f"address family must be 4 or 6, got {family!r}")
    return f"-{family}"


def rule_args(config: RedirectConfig = RedirectConfig()) -> list[str]:
    """``ip`` arguments naming our policy rule (same in both families), after ``rule add``
    or ``rule del``."""
    return [
        "pref",
        str(config.rule_priority),
        "fwmark",
        f"{config.connmark:#x}",
        "table",
        str(config.route_table),
    ]


def local_route_args(family: int, config: RedirectConfig = RedirectConfig()) -> list[str]:
    """``ip`` arguments naming our local route, after ``route replace`` / ``route del``."""
    _family_flag(family)
    everything = "0.0.0.0/0" if family == 4 else "::/0"
    return ["local", everything, "dev", "lo", "table", str(config.route_table)]


def count_rules(rules: list[dict[str, Any]], config: RedirectConfig = RedirectConfig()) -> int:
    """How many of ``rules`` (``ip -N -j rule show`` entries) are our rule."""

    def ours(rule: dict[str, Any]) -> bool:
        try:
            mark = int(str(rule.get("fwmark", "0")), 0)
            mask = int(str(rule.get("fwmask", "0xffffffff")), 0)
        except ValueError:
            return False
        return (
            rule.get("priority") == config.rule_priority
            and mark == config.connmark
            and mask == 0xFFFFFFFF
            and str(rule.get("table")) == str(config.route_table)
        )

    return sum(1 for rule in rules if ours(rule))


def has_local_route(routes: list[dict[str, Any]]) -> bool:
    """Whether ``routes`` (``ip -j route show table N`` entries) hold ``local <all> dev lo``."""
    return any(
        route.get("type") == "local"
        and route.get("dst") in ("default", "0.0.0.0/0", "::/0")
        and route.get("dev") == "lo"
        for route in routes
    )


@dataclass(frozen=True, slots=True)
class LocalDelivery:
    """The policy routing of one address family that delivers connmarked replies to
    ztunnel's transparent sockets: what is there, as listed in the pod netns."""

    family: int
    #: How many ``fwmark <connmark> lookup <table>`` rules at our priority (1 when right).
    rules: int
    #: Whether ``local <all> dev lo`` is in our routing table.
    local_route: bool

    @property
    def complete(self) -> bool:
        return self.rules == 1 and self.local_route

    @property
    def absent(self) -> bool:
        return self.rules == 0 and not self.local_route


@dataclass(frozen=True, slots=True)
class Inspection:
    """Everything of ours found in a pod netns."""

    #: Our nftables table as ``nft list`` prints it, or None when it is absent.
    table: str | None
    #: IPv4's policy routing, then IPv6's when the pod's kernel has IPv6.
    delivery: tuple[LocalDelivery, ...]
    #: Whether IPv6 is on in the pod netns (then its policy routing is required).
    ipv6: bool

    def table_complete(self, config: RedirectConfig = RedirectConfig()) -> bool:
        """Whether our table is there with every chain and its capture rules."""
        if self.table is None:
            return False
        wanted = (
            TABLE_COMMENT,
            "chain inbound",
            "chain outbound",
            "chain mark_transparent",
            "chain restore_mark",
            "type route hook output",
            f"redirect to :{config.inbound_port}",
            f"redirect to :{config.outbound_port}",
        )
        return all(w in self.table for w in wanted)

    def complete(self, config: RedirectConfig = RedirectConfig()) -> bool:
        """Whether everything :func:`apply` installs is there (IPv6 routing when IPv6 is on)."""
        required = (4, 6) if self.ipv6 else (4,)
        by_family = {d.family: d for d in self.delivery}
        return self.table_complete(config) and all(
            f in by_family and by_family[f].complete for f in required
        )

    @property
    def absent(self) -> bool:
        """Whether nothing of ours is left (no table, no rule, no route)."""
        return self.table is None and all(d.absent for d in self.delivery)


# ------------------------------------------------------------- running tools


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise RedirectError(
            f"{name} is not installed (apt-get install nftables iproute2 util-linux)"
        )
    return found


def _run_in(
    netns: str | None, program: str, args: list[str], script: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``program args`` inside the network namespace at path ``netns`` (None: our own)."""
    if netns is None:
        cmd = [_tool(program), *args]
        netns = "the agent's own netns"
    elif not os.path.exists(netns):
        raise NetnsGone(f"network namespace {netns} does not exist (pod gone?)")
    else:
        cmd = [_tool("nsenter"), f"--net={netns}", "--", _tool(program), *args]
    try:
        proc = subprocess.run(
            cmd, input=script, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise RedirectError(
            f"{program} in {netns} did not finish within {_TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:
        raise RedirectError(f"cannot run {program} in {netns}: {exc}") from None
    if proc.returncode != 0 and netns.startswith("/") and not os.path.exists(netns):
        raise NetnsGone(f"network namespace {netns} disappeared (pod gone?)")
    return proc


def _nft_in(
    netns: str | None, args: list[str], script: str | None = None
) -> subprocess.CompletedProcess[str]:
    return _run_in(netns, "nft", args, script)


def _ip_in(netns: str, family: int, args: list[str], what: str) -> str:
    """Run ``ip -<family> args`` in the pod netns; its stdout, or RedirectError saying ``what``
    failed."""
    proc = _run_in(netns, "ip", [_family_flag(family), *args])
    if proc.returncode != 0:
        raise RedirectError(f"{what} in {netns} failed: {proc.stderr.strip()}")
    return proc.stdout


def _json_list(text: str, what: str, netns: str) -> list[dict[str, Any]]:
    try:
        entries = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise RedirectError(f"{what} in {netns}: unreadable output of ip ({exc})") from None
    if not isinstance(entries, list):
        raise RedirectError(f"{what} in {netns}: ip printed {type(entries).__name__}, not a list")
    return [entry for entry in entries if isinstance(entry, dict)]


def _ipv6_state(netns: str) -> tuple[bool, bool]:
    """(the pod's kernel has IPv6, IPv6 is on for ``lo``), read inside the pod netns."""

    def read() -> str | None:
        try:
            with open(_LO_DISABLE_IPV6, encoding="ascii") as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    try:
        value = run_in_netns(netns, read)
    except NetnsError as exc:
        if not os.path.exists(netns):
            raise NetnsGone(f"network namespace {netns} does not exist (pod gone?)") from None
        raise RedirectError(f"cannot enter {netns} to see whether IPv6 is on: {exc}") from None
    except OSError as exc:
        raise RedirectError(f"cannot read {_LO_DISABLE_IPV6} in {netns}: {exc}") from None
    return value is not None, value == "0"


def _rule_count(netns: str, family: int, config: RedirectConfig) -> int:
    what = f"listing IPv{family} rules"
    # -N: tables by number, whatever names /etc/iproute2 gives them
    return count_rules(
        _json_list(_ip_in(netns, family, ["-N", "-j", "rule", "show"], what), what, netns), config
    )


def _has_route(netns: str, family: int, config: RedirectConfig) -> bool:
    table = str(config.route_table)
    what = f"listing IPv{family} routing table {table}"
    proc = _run_in(netns, "ip", [_family_flag(family), "-j", "route", "show", "table", table])
    if proc.returncode != 0:
        # an IPv4 table without routes does not exist for the kernel: nothing of ours
        if "table does not exist" in proc.stderr:
            return False
        raise RedirectError(f"{what} in {netns} failed: {proc.stderr.strip()}")
    return has_local_route(_json_list(proc.stdout, what, netns))


def _delivery(netns: str, family: int, config: RedirectConfig) -> LocalDelivery:
    return LocalDelivery(
        family, _rule_count(netns, family, config), _has_route(netns, family, config)
    )


def _families(netns: str) -> tuple[tuple[int, ...], bool]:
    """(the families whose routing we inspect and remove, IPv6 is on)."""
    has_ipv6, ipv6_on = _ipv6_state(netns)
    return ((4, 6) if has_ipv6 else (4,)), ipv6_on


# ------------------------------------------------------------- pod netns


def apply(netns: str, config: RedirectConfig = RedirectConfig()) -> None:
    """Install (or replace) the redirection table and the policy routing for transparent
    sockets in the pod netns; a re-apply leaves exactly one of each."""
    _, ipv6_on = _families(netns)
    for family in (4, 6) if ipv6_on else (4,):
        _ip_in(
            netns,
            family,
            ["route", "replace", *local_route_args(family, config)],
            # IPv6 refuses a route via a down lo: say where to look
            f"adding the IPv{family} local route for transparent sockets (needs lo up)",
        )
        present = _rule_count(netns, family, config)
        if present == 0:
            proc = _run_in(netns, "ip", [_family_flag(family), "rule", "add", *rule_args(config)])
            # "File exists": the kernel already has an identical rule - what we want
            if proc.returncode != 0 and "File exists" not in proc.stderr:
                raise RedirectError(
                    f"adding the IPv{family} rule 'fwmark {config.connmark:#x} lookup "
                    f"{config.route_table}' in {netns} failed: {proc.stderr.strip()}"
                )
        for _ in range(present - 1):  # duplicates left by someone else: keep one
            _ip_in(
                netns,
                family,
                ["rule", "del", *rule_args(config)],
                f"deleting a duplicate IPv{family} rule",
            )
    proc = _nft_in(netns, ["-f", "-"], render_apply(config))
    if proc.returncode != 0:
        raise RedirectError(f"nft refused the redirection rules in {netns}: {proc.stderr.strip()}")


def remove(netns: str, config: RedirectConfig = RedirectConfig()) -> None:
    """Remove the redirection table and the policy routing from the pod netns; whatever
    of it is absent already is fine."""
    proc = _nft_in(netns, ["-f", "-"], render_remove())
    if proc.returncode != 0:
        raise RedirectError(f"nft could not remove our table in {netns}: {proc.stderr.strip()}")
    families, _ = _families(netns)
    for family in families:
        found = _delivery(netns, family, config)
        for _ in range(found.rules):
            _ip_in(
                netns,
                family,
                ["rule", "del", *rule_args(config)],
                f"deleting the IPv{family} rule for transparent sockets",
            )
        if found.local_route:
            _ip_in(
                netns,
                family,
                ["route", "del", *local_route_args(family, config)],
                f"deleting the IPv{family} local route for transparent sockets",
            )


def listing(netns: str) -> str | None:
    """Our table as ``nft list`` prints it, or None when it is not installed."""
    proc = _nft_in(netns, ["list", "table", TABLE_FAMILY, TABLE_NAME])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise RedirectError(f"nft could not list our table in {netns}: {proc.stderr.strip()}")
    return proc.stdout


def inspect(netns: str, config: RedirectConfig = RedirectConfig()) -> Inspection:
    """What of ours is in the pod netns: the table, and each family's rule and route."""
    table = listing(netns)
    families, ipv6_on = _families(netns)
    delivery = tuple(_delivery(netns, family, config) for family in families)
    return Inspection(table, delivery, ipv6_on)


def installed(netns: str, config: RedirectConfig = RedirectConfig()) -> bool:
    """Whether our table is installed with every chain and its capture rules, and the
    policy routing for transparent sockets with it."""
    return inspect(netns, config).complete(config)


# ------------------------------------------------------------- node netns


def apply_node(
    node_netns: str | None, pod_ips: Iterable[str], config: RedirectConfig = RedirectConfig()
) -> None:
    """Install (or atomically replace) the probe SNAT table in the node's netns
    (``node_netns`` None: the netns the agent runs in)."""
    proc = _nft_in(node_netns, ["-f", "-"], render_node_apply(pod_ips, config))
    if proc.returncode != 0:
        raise RedirectError(f"nft refused the node probe SNAT table: {proc.stderr.strip()}")


def remove_node(node_netns: str | None) -> None:
    """Remove the node-side probe SNAT table (absent: fine)."""
    name = f"{NODE_TABLE_FAMILY} {NODE_TABLE_NAME}"
    proc = _nft_in(node_netns, ["-f", "-"], f"table {name}\ndelete table {name}\n")
    if proc.returncode != 0:
        raise RedirectError(f"nft could not remove the node probe SNAT table: {proc.stderr}")
