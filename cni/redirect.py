"""The redirection rules inside a pod's network namespace (PROTOCOLS.md section 6).

This module owns our one nftables table, ``inet underpass``, in each captured
pod's netns: it renders the table (pure, :func:`render_table`), and applies,
removes and inspects it with ``nft`` run inside the pod netns through
``nsenter --net=<path>`` (blocking: the agent calls these from a thread).
Nothing is ever written to the node's own tables.

Mechanism: NAT ``redirect`` (not TPROXY). ztunnel recovers the original
destination of outbound connections with ``SO_ORIGINAL_DST``, which only the
conntrack NAT path provides (TPROXY keeps the destination on the socket and
needs transparent sockets plus a policy route). With NAT, replies are
un-NATed by conntrack and never see the nat chains again, so no
``fwmark 0x111 lookup 100`` route is needed; the connmark 0x111 is still set
on connections handed to ztunnel's inbound listener and restored onto their
packets, as the convention asks, so that the mark can be seen and relied on.

Semantics (for TCP only; everything else is untouched):

* packets of sockets marked 0x539 (ztunnel's own) are never captured;
* inbound (nat prerouting): not to 127.0.0.1/::1, not to 15008, not from the
  kubelet probe address 169.254.7.127, unmarked -> redirect to 15006 (ct mark 0x111);
* outbound (nat output): leaving on a non-loopback interface, unmarked, not to
  169.254.7.127, not part of a 0x111 connection -> redirect to 15001. A pod
  talking to itself (its own IP or 127.0.0.1) routes over ``lo`` and is left alone.

Node side (opt-in, :func:`apply_node`): kubelet probes come from the node
itself; a second table, ``ip underpass_node`` in the *node's* netns, SNATs TCP
that the node originates (``fib saddr type local``) towards a captured pod's IP
to 169.254.7.127, which the pod rules accept without capture. It holds only the
set of captured pod IPs and one rule, and is replaced atomically like the pod table.

Applying is atomic and idempotent: one ``nft -f -`` transaction declares the
table, deletes it and declares it again with its chains, so a re-apply (agent
restart, reconcile) replaces whatever was there - no duplicate rules, no stale
ones - and removal (declare + delete) succeeds whether or not the table exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from cni.errors import NetnsGone, RedirectError

TABLE_FAMILY = "inet"
TABLE_NAME = "underpass"
#: The comment on our table: what tells our table from anyone else's.
TABLE_COMMENT = "underpass ambient redirection"
_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class RedirectConfig:
    """Ports, marks and addresses of the capture rules (PROTOCOLS.md sections 1 and 6)."""

    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    ztunnel_mark: int = 0x539
    connmark: int = 0x111
    probe_address: str = "169.254.7.127"

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port", "hbone_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port, got {port!r}")
        for name in ("ztunnel_mark", "connmark"):
            mark = getattr(self, name)
            if not isinstance(mark, int) or not 0 < mark < 2**32:
                raise ValueError(f"{name} must be a non-zero 32-bit mark, got {mark!r}")
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
		meta l4proto tcp ct mark set {c.connmark:#x} redirect to :{c.inbound_port}
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

	chain restore_mark {{
		type filter hook output priority mangle; policy accept;
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


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise RedirectError(f"{name} is not installed (apt-get install nftables util-linux)")
    return found


def _nft_in(
    netns: str | None, args: list[str], script: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``nft args`` inside the network namespace at path ``netns`` (None: our own)."""
    if netns is None:
        cmd = [_tool("nft"), *args]
        netns = "the agent's own netns"
    elif not os.path.exists(netns):
        raise NetnsGone(f"network namespace {netns} does not exist (pod gone?)")
    else:
        cmd = [_tool("nsenter"), f"--net={netns}", "--", _tool("nft"), *args]
    try:
        proc = subprocess.run(
            cmd, input=script, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise RedirectError(f"nft in {netns} did not finish within {_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise RedirectError(f"cannot run nft in {netns}: {exc}") from None
    if proc.returncode != 0 and netns.startswith("/") and not os.path.exists(netns):
        raise NetnsGone(f"network namespace {netns} disappeared (pod gone?)")
    return proc


def apply(netns: str, config: RedirectConfig = RedirectConfig()) -> None:
    """Install (or atomically replace) the redirection table in the pod netns."""
    proc = _nft_in(netns, ["-f", "-"], render_apply(config))
    if proc.returncode != 0:
        raise RedirectError(f"nft refused the redirection rules in {netns}: {proc.stderr.strip()}")


def remove(netns: str) -> None:
    """Remove the redirection table from the pod netns (absent table: fine)."""
    proc = _nft_in(netns, ["-f", "-"], render_remove())
    if proc.returncode != 0:
        raise RedirectError(f"nft could not remove our table in {netns}: {proc.stderr.strip()}")


def listing(netns: str) -> str | None:
    """Our table as ``nft list`` prints it, or None when it is not installed."""
    proc = _nft_in(netns, ["list", "table", TABLE_FAMILY, TABLE_NAME])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise RedirectError(f"nft could not list our table in {netns}: {proc.stderr.strip()}")
    return proc.stdout


def installed(netns: str, config: RedirectConfig = RedirectConfig()) -> bool:
    """Whether our table is installed with every chain and its capture rules."""
    text = listing(netns)
    if text is None:
        return False
    wanted = (
        TABLE_COMMENT,
        "chain inbound",
        "chain outbound",
        "chain restore_mark",
        f"redirect to :{config.inbound_port}",
        f"redirect to :{config.outbound_port}",
    )
    return all(w in text for w in wanted)


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
