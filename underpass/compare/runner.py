"""One comparison run: labs, modes, load, measurements, results, clean-up.

Owns the order of things and what is left on the machine:

1. the load generator (:func:`underpass.compare.loadgen.ensure_fortio`);
2. for each pod count, a lab of its own (a unique prefix ``<base>-<pods>``,
   its state under the run's private work directory, mesh on, no sample
   apps): ``lab up``; then ``fortio server`` as every pod's app (an HTTP echo
   on :data:`~underpass.compare.modes.APP_PORT`, tracked so ``lab down``
   stops it);
3. for each mode, in the same lab: set up; read every proxy's idle memory and
   CPU counters; run one ``fortio load`` per client pod at the same time
   (``--rps`` shared out evenly, one keep-alive connection each, for
   ``--duration``) while sampling the proxies' memory; read them again;
   check that the traffic went through the proxies with mTLS; tear down;
4. ``lab down`` and a check that nothing of the lab is left;
5. results: JSON (every raw number and the machine's facts), rewritten after
   every run so an interrupted comparison keeps what it measured; then the
   table and the chart (:mod:`underpass.compare.report`).

:meth:`Comparison.cleanup` (the command calls it on every exit path, with
Ctrl-C and SIGTERM ignored) takes down every lab still up, unless
``--keep-lab``, and removes the work directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import trio

from underpass import __version__
from underpass.compare import loadgen, report
from underpass.compare.catalog import BASELINE, DEFAULT_MODES
from underpass.compare.errors import CompareError, LoadGenError
from underpass.compare.launch import listening_in_netns, marked, spawn_tracked
from underpass.compare.measure import ProcessGone, Sampler, read_memory
from underpass.compare.modes import (
    APP_PORT,
    Mode,
    ModeContext,
    Pair,
    ProxyProcess,
    Workload,
    plan_pairs,
    resolve_modes,
)
from underpass.lab import netns, procs
from underpass.lab.cluster import Lab, UpOptions, leftovers
from underpass.lab.registry import Pod

SCHEMA: Final = "underpass.compare/v1"
NAMESPACE: Final = "compare"
#: Seconds between two memory samples of the proxies during the load.
SAMPLE_INTERVAL: Final = 0.5
#: Seconds a pod's Fortio server gets to listen.
APP_READY_TIMEOUT: Final = 20.0
#: Seconds a load run may take beyond ``--duration`` (start-up, warm-up, slow answers).
LOAD_GRACE: Final = 30.0
PARALLEL_STARTS: Final = 8
#: --prefix: the lab prefixes are ``<prefix>-<pods per node>`` (at most 20 characters).
MAX_PREFIX: Final = 15
REPO_ROOT: Final = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class CompareOptions:
    out_dir: Path
    nodes: int = 2
    pods_per_node: tuple[int, ...] = (5, 20)
    modes: tuple[str, ...] = DEFAULT_MODES
    rps: float = 100.0
    duration: float = 10.0
    service_accounts: int = 2
    keep_lab: bool = False
    prefix: str | None = None

    def check(self) -> None:
        if self.nodes < 1:
            raise CompareError("--nodes must be at least 1")
        if not self.pods_per_node or any(n < 1 for n in self.pods_per_node):
            raise CompareError("--pods-per-node takes positive counts, e.g. 5,10,20,50")
        if len(set(self.pods_per_node)) != len(self.pods_per_node):
            raise CompareError("--pods-per-node names a count twice")
        if max(self.pods_per_node) > 250:
            raise CompareError("at most 250 pods per node (a /24 per node)")
        if self.nodes * min(self.pods_per_node) < 2:
            raise CompareError("traffic needs at least two pods: more --nodes or --pods-per-node")
        if self.rps <= 0 or self.duration <= 0:
            raise CompareError("--rps and --duration must be positive")
        if self.service_accounts < 1:
            raise CompareError("--service-accounts must be at least 1")
        if self.prefix is not None and (
            len(self.prefix) > MAX_PREFIX
            or not self.prefix[:1].isalpha()
            or not all(c.islower() or c.isdigit() or c == "-" for c in self.prefix)
        ):
            raise CompareError(
                f"--prefix {self.prefix!r}: a lower-case letter, then letters, digits or '-', "
                f"at most {MAX_PREFIX} characters"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "nodes": self.nodes,
            "pods_per_node": list(self.pods_per_node),
            "modes": list(self.modes),
            "rps": self.rps,
            "duration_s": self.duration,
            "service_accounts": self.service_accounts,
            "keep_lab": self.keep_lab,
            "prefix": self.prefix,
        }


class Progress:
    """Progress lines: ``[elapsed] what``, and how long each step took."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        self.say(f"{text} ...")
        began = time.monotonic()
        yield
        self.say(f"  done: {text} ({time.monotonic() - began:.1f} s)")


@dataclass
class _LabUp:
    lab: Lab
    prefix: str


@dataclass
class Comparison:
    """One ``underpass compare``; every resource it makes is released by :meth:`cleanup`."""

    options: CompareOptions
    progress: Progress = field(default_factory=Progress)
    workdir: Path = field(init=False)
    base_prefix: str = field(init=False)
    modes: list[Mode] = field(init=False)
    runs: list[dict[str, Any]] = field(default_factory=list)
    labs: list[_LabUp] = field(default_factory=list)  # up, or maybe half up
    kept: list[_LabUp] = field(default_factory=list)
    document: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.options.check()
        self.modes = resolve_modes(self.options.modes)
        self.base_prefix = self.options.prefix or _unique_prefix()
        taken = [n for n in netns.list_names() if n.startswith(f"{self.base_prefix}-")]
        if taken:
            raise CompareError(
                f"network namespaces with prefix {self.base_prefix}- exist already ({taken[0]}, "
                "...): another lab uses it; choose another --prefix"
            )
        # Short and private: Unix socket paths (agents, ztunnel, Envoy admin) live under it.
        self.workdir = Path(tempfile.mkdtemp(prefix="underpass-compare-"))
        os.chmod(self.workdir, 0o700)

    # ------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        say = self.progress.say
        opts = self.options
        say(
            f"underpass compare: {opts.nodes} nodes x {','.join(map(str, opts.pods_per_node))} "
            f"pods/node; modes {', '.join(m.name for m in self.modes)}; {opts.rps:g} rps for "
            f"{opts.duration:g} s each; work directory {self.workdir}"
        )
        fortio = await trio.to_thread.run_sync(loadgen.ensure_fortio, say)
        self.document = {
            "schema": SCHEMA,
            "started": _now(),
            "finished": None,
            "complete": False,
            "command": sys.argv,
            "options": opts.to_dict(),
            "baseline": BASELINE,
            "machine": await trio.to_thread.run_sync(machine_facts),
            "tools": {
                "fortio": await trio.to_thread.run_sync(loadgen.fortio_version, fortio),
                "underpass": __version__,
                "git": await trio.to_thread.run_sync(_git_commit),
            },
            "modes": [await trio.to_thread.run_sync(m.describe) for m in self.modes],
            "method": {
                "memory": "PSS and RSS from /proc/<pid>/smaps_rollup of every proxy process, "
                f"sampled every {SAMPLE_INTERVAL:g} s during the load; per node: the highest "
                "PSS total of the node's proxies in one sample",
                "cpu": "utime + stime from /proc/<pid>/stat, difference over the load",
                "load": "one `fortio load` per client pod, all at once, one keep-alive "
                "connection each, HTTP GET to `fortio server` in the paired pod on the next node "
                "(mode waypoint: to the namespace's service VIP, which the client's ztunnel "
                "sends through the waypoint to one of the service's pods)",
            },
            "labs": [],
            "runs": self.runs,
        }
        for pods_per_node in opts.pods_per_node:
            await self._pod_count(pods_per_node, fortio)
        self.document["finished"] = _now()
        self.document["complete"] = True
        self.document["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        self._write_json()
        return self.document

    async def _pod_count(self, pods_per_node: int, fortio: Path) -> None:
        opts = self.options
        prefix = f"{self.base_prefix}-{pods_per_node}"
        lab = Lab(self.workdir / f"lab-{pods_per_node}")
        up = _LabUp(lab, prefix)
        self.labs.append(up)  # before `up`: a half-built lab is taken down too
        pods_total = opts.nodes * pods_per_node
        with self.progress.step(
            f"{pods_per_node} pods/node: lab up ({opts.nodes} nodes, {pods_total} pods, "
            f"prefix {prefix})"
        ):
            await lab.up(
                UpOptions(
                    nodes=opts.nodes,
                    pods_per_node=pods_per_node,
                    namespaces=(NAMESPACE,),
                    service_accounts=tuple(f"sa-{i}" for i in range(1, opts.service_accounts + 1)),
                    prefix=prefix,
                    mesh=True,
                    apps=False,
                )
            )
        workload = self._workload(lab)
        with self.progress.step(f"{pods_per_node} pods/node: an HTTP echo (fortio server) per pod"):
            await self._start_apps(lab, workload, fortio)
        self.document["labs"].append(
            {
                "pods_per_node": pods_per_node,
                "prefix": prefix,
                "state_dir": str(lab.state_dir),
                "infrastructure": _infrastructure(lab),
            }
        )
        for mode in self.modes:
            await self._mode(lab, workload, mode, pods_per_node, fortio)
        if opts.keep_lab:
            self.labs.remove(up)
            self.kept.append(up)
            self.progress.say(
                f"{pods_per_node} pods/node: lab kept: underpass lab down --state-dir "
                f"{lab.state_dir}"
            )
            return
        with self.progress.step(f"{pods_per_node} pods/node: lab down"):
            await lab.down(prefix)
            self.labs.remove(up)
            left = await trio.to_thread.run_sync(lab_leftovers, prefix, lab.state_dir)
            if left:
                raise CompareError(f"lab down left things behind: {left}")

    def _workload(self, lab: Lab) -> Workload:
        snap = lab.registry.snapshot()
        nodes = tuple(sorted(snap.nodes.values(), key=lambda n: n.name))
        pods = tuple(
            sorted((p for p in snap.pods.values() if p.namespace == NAMESPACE), key=lambda p: p.key)
        )
        broken = [f"{p.namespace}/{p.name}" for p in pods if p.phase != "Running" or not p.ip]
        if broken:
            raise CompareError(f"pods not running with an IP: {', '.join(broken)}")
        by_node = {n.name: [p for p in pods if p.node == n.name] for n in nodes}
        return Workload(NAMESPACE, nodes, pods, tuple(plan_pairs(by_node)))

    async def _start_apps(self, lab: Lab, workload: Workload, fortio: Path) -> None:
        limiter = trio.CapacityLimiter(PARALLEL_STARTS)
        prefix = lab.config().prefix

        async def start(pod: Pod) -> None:
            async with limiter:

                async def ready() -> bool:
                    return await trio.to_thread.run_sync(
                        listening_in_netns, pod.netns, "127.0.0.1", APP_PORT
                    )

                key = f"compare-app.{pod.namespace}.{pod.name}"
                await spawn_tracked(
                    lab.paths,
                    key,
                    loadgen.server_argv(fortio, APP_PORT),
                    netns_path=pod.netns,
                    log_path=lab.paths.logs_dir / f"{key}.log",
                    ready=ready,
                    timeout=APP_READY_TIMEOUT,
                    what=f"the HTTP echo (fortio server) of {pod.namespace}/{pod.name}",
                    lab_prefix=prefix,
                )

        async with trio.open_nursery() as nursery:
            for pod in workload.pods:
                nursery.start_soon(start, pod)

    async def _mode(
        self, lab: Lab, workload: Workload, mode: Mode, pods_per_node: int, fortio: Path
    ) -> None:
        say = self.progress.say
        ctx = ModeContext(lab, workload, lab.state_dir / "compare" / mode.name, say=say)
        label = f"{pods_per_node} pods/node, mode {mode.name}"
        began = time.monotonic()
        with self.progress.step(f"{label}: set up ({mode.title})"):
            await mode.setup(ctx)
        setup_seconds = time.monotonic() - began
        proxies = mode.proxies(ctx)
        sampler = Sampler({p.pid: p.node for p in proxies})
        before = await mode.snapshot(ctx)
        qps = self.options.rps / len(workload.pairs)
        with self.progress.step(
            f"{label}: load, {len(workload.pairs)} clients x {qps:.3g} rps for "
            f"{self.options.duration:g} s, memory of {len(proxies)} proxies sampled"
        ):
            await trio.to_thread.run_sync(_guarded, sampler.start, proxies)
            clients = await self._drive(ctx, mode, fortio, sampler, proxies)
            await trio.to_thread.run_sync(_guarded, sampler.finish, proxies)
        verification = await mode.verify(ctx, before)
        run = run_record(
            pods_per_node=pods_per_node,
            nodes=self.options.nodes,
            mode=mode,
            setup_seconds=setup_seconds,
            proxies=proxies,
            sampler=sampler,
            clients=clients,
            verification=verification,
            rps=self.options.rps,
            duration=self.options.duration,
        )
        self.runs.append(run)
        report.add_ratios(self.runs, BASELINE)
        self._write_json()
        s = run["summary"]
        say(
            f"  {mode.name}: {s['proxies']} proxies, PSS per node "
            f"{report.mib(s['pss_per_node_kib'])}, p50/p99 {s.get('p50_ms')}/{s.get('p99_ms')} "
            f"ms, {s['errors']} errors of {s['requests']} requests"
        )
        with self.progress.step(f"{label}: tear down"):
            await mode.teardown(ctx)

    async def _drive(
        self,
        ctx: ModeContext,
        mode: Mode,
        fortio: Path,
        sampler: Sampler,
        proxies: Sequence[ProxyProcess],
    ) -> list[dict[str, Any]]:
        pairs = ctx.workload.pairs
        qps = self.options.rps / len(pairs)
        seconds = self.options.duration
        load_dir = ctx.lab.state_dir / "compare" / f"load-{mode.name}"
        load_dir.mkdir(parents=True, exist_ok=True)
        results: list[dict[str, Any] | None] = [None] * len(pairs)

        async def client(index: int, pair: Pair) -> None:
            json_path = load_dir / f"{index}.json"
            url = mode.url(ctx, pair)
            argv = netns.argv_in(
                pair.client.netns,
                loadgen.load_argv(fortio, url, qps=qps, seconds=seconds, json_path=json_path),
            )
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
            who = f"{pair.client.namespace}/{pair.client.name} -> {url}"
            if done.returncode != 0 or not json_path.exists():
                tail = done.stderr.decode(errors="replace")[-1500:]
                raise LoadGenError(f"fortio in {who} exited {done.returncode}:\n{tail}")
            result = loadgen.parse_result(json.loads(json_path.read_text()))
            if result.ok == 0:
                raise LoadGenError(f"fortio in {who}: no request answered 200 ({result.requests})")
            server, server_node = mode.destination(ctx, pair)
            results[index] = {
                "client": f"{pair.client.namespace}/{pair.client.name}",
                "client_node": pair.client.node,
                "server": server,
                "server_node": server_node,
                **result.to_dict(),
            }

        async with trio.open_nursery() as nursery:
            sampling = trio.CancelScope()

            async def sample() -> None:
                with sampling:
                    while True:
                        await trio.to_thread.run_sync(_guarded, sampler.sample, proxies)
                        await trio.sleep(SAMPLE_INTERVAL)

            nursery.start_soon(sample)
            with trio.fail_after(seconds + LOAD_GRACE):
                async with trio.open_nursery() as clients:
                    for index, pair in enumerate(pairs):
                        clients.start_soon(client, index, pair)
            sampling.cancel()
        shutil.rmtree(load_dir, ignore_errors=True)
        return [r for r in results if r is not None]

    # ------------------------------------------------------------------ results

    def _write_json(self) -> Path:
        out = self.options.out_dir
        out.mkdir(parents=True, exist_ok=True)
        path = out / "compare.json"
        tmp = out / ".compare.json.tmp"
        tmp.write_text(json.dumps(self.document, indent=2) + "\n")
        tmp.replace(path)
        return path

    def finish(self) -> dict[str, Path]:
        """Table (also saved as ``compare.txt``), chart; the paths written."""
        out = self.options.out_dir
        json_path = self._write_json()
        table = report.render_table(self.runs, BASELINE)
        lines = report.target_lines(self.runs, BASELINE)
        text_path = out / "compare.txt"
        text_path.write_text(table + "".join(f"{line}\n" for line in lines))
        titles = {m.name: m.title for m in self.modes}
        charts = report.write_chart(self.runs, titles, out, BASELINE)
        return {"json": json_path, "table": text_path, **{p.suffix[1:]: p for p in charts}}

    # ------------------------------------------------------------------ clean-up

    def cleanup(self) -> list[str]:
        """Take down every lab still up (unless kept), remove the work directory;
        problems as messages (clean-up goes on past them)."""
        problems = []
        if self.options.keep_lab:  # also after a failure: the labs are there to look at
            self.kept += self.labs
            self.labs = []
        for up in list(self.labs):
            try:
                trio.run(up.lab.down, up.prefix)
                left = lab_leftovers(up.prefix, up.lab.state_dir)
                if left:
                    problems.append(f"lab {up.prefix}: left behind {left}")
            except Exception as exc:
                problems.append(
                    f"lab down failed for {up.prefix}: {exc}; remove it with: underpass lab down "
                    f"--state-dir {up.lab.state_dir} --prefix {up.prefix}"
                )
            self.labs.remove(up)
        if self.kept:
            for up in self.kept:
                problems.append(
                    f"kept lab {up.prefix}: underpass lab down --state-dir {up.lab.state_dir}"
                )
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems


# --------------------------------------------------------------------------- helpers


def run_record(
    *,
    pods_per_node: int,
    nodes: int,
    mode: Mode,
    setup_seconds: float,
    proxies: Sequence[ProxyProcess],
    sampler: Sampler,
    clients: list[dict[str, Any]],
    verification: dict[str, Any],
    rps: float,
    duration: float,
) -> dict[str, Any]:
    """One run's JSON: every raw number, and its summary (ratios come later)."""
    run: dict[str, Any] = {
        "pods_per_node": pods_per_node,
        "nodes": nodes,
        "mode": mode.name,
        "title": mode.title,
        "setup_seconds": round(setup_seconds, 2),
        "proxies": [{**p.to_dict(), "usage": sampler.usage[p.pid].to_dict()} for p in proxies],
        "node_peak_pss_kib": sampler.peak_group_pss_kib(),
        "node_pss_samples_kib": [{"t_s": t, **totals} for t, totals in sampler.group_totals],
        "load": {
            "tool": "fortio",
            "requested_rps": rps,
            "duration_s": duration,
            "clients": clients,
        },
        "verification": verification,
    }
    run["summary"] = report.summarize(run)
    return run


def _guarded(read: Callable[[], None], proxies: Sequence[ProxyProcess]) -> None:
    """Run a sampler step; a proxy that died is an error naming it."""
    try:
        read()
    except ProcessGone as gone:
        who = next((p for p in proxies if p.pid == gone.pid), None)
        name = f"{who.role} on {who.node}" + (f" ({who.pod})" if who.pod else "") if who else ""
        raise CompareError(
            f"proxy process {gone.pid} ({name}) exited during the measurement; see the lab's "
            "logs (--keep-lab keeps them)"
        ) from None


def lab_leftovers(prefix: str, state_dir: Path) -> list[str]:
    """What of a comparison's lab is still on the machine: the lab's own check, plus
    helper processes (Envoy, Fortio servers) by their mark."""
    return leftovers(prefix, state_dir) + [f"process {pid}" for pid in marked(prefix)]


def _infrastructure(lab: Lab) -> list[dict[str, Any]]:
    """Memory of the lab's shared processes (control plane, node agents): not
    proxies, not charged to any mode, recorded for context."""
    found = []
    for record in procs.read_records(lab.paths.procs_dir):
        if record.key == "controlplane" or record.key.startswith("agent."):
            with contextlib.suppress(ProcessGone, ValueError):
                found.append({"key": record.key, **read_memory(record.pid).to_dict()})
    return found


def _unique_prefix() -> str:
    while True:
        prefix = f"cmp{secrets.token_hex(2)}"
        if not any(n.startswith(f"{prefix}-") for n in netns.list_names()):
            return prefix


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    if not (REPO_ROOT / ".git").exists():
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def _git_commit() -> dict[str, Any]:
    """The checkout the proxies ran from: commit, and whether files differ from it."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "--short", "HEAD") or None,
        "modified": None if status is None else bool(status),
    }


def machine_facts() -> dict[str, Any]:
    """What the numbers depend on: CPU, memory, kernel, OS, Python; load average."""
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                facts["memory_kib"] = int(line.split()[1])
                break
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                facts["os"] = line.split("=", 1)[1].strip().strip('"')
                break
    return facts
