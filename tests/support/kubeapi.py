"""Build and cache a real kube-apiserver and etcd for the k8s test tier.

Both come from the Go module proxy and are compiled with the machine's Go;
nothing is downloaded from GitHub or dl.k8s.io:

- kube-apiserver: a throwaway module requires ``k8s.io/kubernetes`` at
  :data:`KUBERNETES_VERSION`. Its go.mod requires every staging module
  (``k8s.io/api``, ``k8s.io/apiserver``, ...) at the unresolvable ``v0.0.0``,
  so the build module replaces each with its published ``v0.<minor>.<patch>``
  (the list is read from that go.mod, as served by the proxy).
- etcd: ``go.etcd.io/etcd/server/v3`` (a main package) at the version that
  ``k8s.io/kubernetes`` itself requires, in a second throwaway module.

The binaries land in ``~/.cache/underpass/k8s/<version>/bin`` (or
``$UNDERPASS_K8S_CACHE/<version>/bin``) with a ``stamp.json`` written last; a
run that finds a matching stamp does nothing. Go's own module and build caches
stay where ``go env`` says. Usage::

    python -m tests.support.kubeapi build            # build unless cached
    python -m tests.support.kubeapi build --rebuild  # build again
    python -m tests.support.kubeapi serve            # run a cluster until Ctrl-C

Standard library only, so ``make`` can run it before anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

#: The pinned Kubernetes release (its go.mod says which Go it needs: 1.26.0).
KUBERNETES_VERSION = "v1.36.3"
#: Bump when the way binaries are built changes, so cached ones are rebuilt.
RECIPE = 1
ETCD_MODULE = "go.etcd.io/etcd/server/v3"
APISERVER_PACKAGE = "k8s.io/kubernetes/cmd/kube-apiserver"
HEARTBEAT_SECONDS = 15.0

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """The binaries could not be built; the message says which step and why."""


@dataclass(frozen=True, slots=True)
class Binaries:
    """Paths of a built, stamped kube-apiserver and etcd."""

    kubernetes_version: str
    etcd_version: str
    kube_apiserver: Path
    etcd: Path


def cache_root() -> Path:
    override = os.environ.get("UNDERPASS_K8S_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "underpass" / "k8s"


def cache_dir(version: str = KUBERNETES_VERSION) -> Path:
    return cache_root() / version


def print_progress(message: str) -> None:
    print(f"==> k8s: {message}", flush=True)


# -- the stamp ---------------------------------------------------------------------


def _read_stamp(directory: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((directory / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def cached_binaries(version: str = KUBERNETES_VERSION) -> Binaries | None:
    """The cached binaries if their stamp matches this version and recipe, else None."""
    directory = cache_dir(version)
    stamp = _read_stamp(directory)
    if stamp is None or stamp.get("recipe") != RECIPE or stamp.get("kubernetes") != version:
        return None
    sizes = stamp.get("sizes")
    if not isinstance(sizes, dict):
        return None
    binaries = Binaries(
        kubernetes_version=version,
        etcd_version=str(stamp.get("etcd")),
        kube_apiserver=directory / "bin" / "kube-apiserver",
        etcd=directory / "bin" / "etcd",
    )
    for path in (binaries.kube_apiserver, binaries.etcd):
        try:
            if path.stat().st_size != sizes.get(path.name) or not os.access(path, os.X_OK):
                return None
        except OSError:
            return None
    return binaries


# -- running go ----------------------------------------------------------------------


def find_go() -> str:
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None
    )
    if go is None:
        raise BuildError(
            "the k8s test tier builds kube-apiserver and etcd with Go, but no 'go' is on PATH "
            "(nor /usr/local/go/bin/go); install Go >= 1.26 from https://go.dev/dl/"
        )
    return go


def go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CGO_ENABLED"] = "0"  # static binaries, no C toolchain needed
    env["GOWORK"] = "off"  # never pick up a go.work from a parent directory
    return env


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def _go_output(go: str, args: Sequence[str], cwd: Path | None = None) -> str:
    result = subprocess.run(
        [go, *args], cwd=cwd, env=go_env(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BuildError(f"'go {' '.join(args)}' failed:\n{result.stderr.strip()[-4000:]}")
    return result.stdout


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run_streamed(
    go: str,
    args: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    label: str,
    progress: Progress,
    count: re.Pattern[str],
    total: int | None = None,
) -> None:
    """Run ``go args``, log its output, report counted lines every few seconds."""
    counted = 0
    lock = threading.Lock()
    started = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"$ go {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen(
            [go, *args],
            cwd=cwd,
            env=go_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def pump(stream: TextIO) -> None:
            nonlocal counted
            for line in stream:
                log.write(line)
                if count.match(line):
                    with lock:
                        counted += 1

        assert proc.stdout is not None
        reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=HEARTBEAT_SECONDS)
                break
            except subprocess.TimeoutExpired:
                with lock:
                    n = counted
                of = f"/{total}" if total else ""
                progress(f"  {label}: {n}{of} so far, {time.monotonic() - started:.0f}s")
        reader.join()
    if proc.returncode != 0:
        raise BuildError(
            f"{label} failed ('go {' '.join(args)}' exited {proc.returncode}); "
            f"last lines of {log_path}:\n{_tail(log_path)}"
        )


# -- the build --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KubernetesModule:
    version: str
    go_version: str
    staging: tuple[str, ...]  # k8s.io/* modules required at v0.0.0
    etcd_version: str

    @property
    def staging_version(self) -> str:
        major_minor_patch = self.version.removeprefix("v").split(".")
        return "v0." + ".".join(major_minor_patch[1:3])


def read_kubernetes_module(go: str, version: str) -> KubernetesModule:
    """Fetch ``k8s.io/kubernetes@version`` and read what its go.mod requires."""
    # `go list -m` fetches only the .mod file (the module's zip comes with `go get`).
    info = json.loads(_go_output(go, ["list", "-m", "-json", f"k8s.io/kubernetes@{version}"]))
    if info.get("Error") or not info.get("GoMod"):
        raise BuildError(f"cannot download k8s.io/kubernetes@{version}: {info.get('Error')}")
    mod = json.loads(_go_output(go, ["mod", "edit", "-json", info["GoMod"]]))
    requires = mod.get("Require") or []
    staging = tuple(
        r["Path"]
        for r in requires
        if r["Path"].startswith("k8s.io/") and r.get("Version") == "v0.0.0"
    )
    etcd = [r["Version"] for r in requires if r["Path"] == ETCD_MODULE]
    if not staging or not etcd:
        raise BuildError(
            f"k8s.io/kubernetes@{version}'s go.mod has no v0.0.0 staging modules or no "
            f"{ETCD_MODULE} requirement; this builder does not know that layout"
        )
    return KubernetesModule(
        version=version,
        go_version=str(mod.get("Go") or "0"),
        staging=staging,
        etcd_version=etcd[0],
    )


def _new_module(go: str, directory: Path, name: str, go_version: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    (directory / "go.mod").write_text(f"module {name}\n\ngo {go_version}\n")


def _count_deps(go: str, package: str, cwd: Path) -> int | None:
    try:
        return len(_go_output(go, ["list", "-deps", package], cwd=cwd).split())
    except BuildError:
        return None


_DOWNLOADING = re.compile(r"go: downloading ")
_PACKAGE_LINE = re.compile(r"[\w.-]+(/[\w.~-]+)*\n?$")


def _build_one(
    go: str,
    *,
    module_dir: Path,
    get: str,
    package: str,
    ldflags: str,
    output: Path,
    label: str,
    progress: Progress,
) -> None:
    log = module_dir / "build.log"
    progress(f"{label}: resolving and downloading modules (go get {get})")
    _run_streamed(
        go,
        ["get", get],
        cwd=module_dir,
        log_path=log,
        label=f"{label} modules downloaded",
        progress=progress,
        count=_DOWNLOADING,
    )
    total = _count_deps(go, package, module_dir)
    progress(f"{label}: compiling {total or 'its'} packages and linking (go build)")
    partial = output.with_name(f".{output.name}.partial")
    _run_streamed(
        go,
        ["build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(partial), package],
        cwd=module_dir,
        log_path=log,
        label=f"{label} packages compiled",
        progress=progress,
        count=_PACKAGE_LINE,
        total=total,
    )
    partial.replace(output)


@contextlib.contextmanager
def _locked(directory: Path, progress: Progress) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another build in {directory} to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(
    version: str = KUBERNETES_VERSION, *, rebuild: bool = False, progress: Progress = print_progress
) -> Binaries:
    """Build kube-apiserver and etcd into the cache unless a matching stamp is there."""
    directory = cache_dir(version)
    if not rebuild and (found := cached_binaries(version)) is not None:
        return found
    with _locked(directory, progress):
        if not rebuild and (found := cached_binaries(version)) is not None:
            return found  # another process built them while we waited
        (directory / "stamp.json").unlink(missing_ok=True)
        go = find_go()
        have = _go_output(go, ["env", "GOVERSION"]).strip()
        started = time.monotonic()
        progress(f"building kube-apiserver {version} and etcd with {have} into {directory}")
        progress("a cold build takes 6 to 12 minutes on 2 cores; later runs reuse it")
        progress(f"reading k8s.io/kubernetes@{version}'s go.mod from the module proxy")
        k8s = read_kubernetes_module(go, version)
        if _version_tuple(have) < _version_tuple(k8s.go_version):
            raise BuildError(
                f"k8s.io/kubernetes {version} needs Go >= {k8s.go_version} but 'go' is {have}; "
                "install a newer Go from https://go.dev/dl/ (or set GOTOOLCHAIN=auto so go "
                "fetches one from the module proxy)"
            )
        progress(
            f"{len(k8s.staging)} staging modules at v0.0.0 -> {k8s.staging_version}; "
            f"etcd {k8s.etcd_version} (the version k8s.io/kubernetes requires)"
        )
        bin_dir = directory / "bin"
        bin_dir.mkdir(exist_ok=True)
        build_dir = directory / "build"
        timings: dict[str, float] = {}

        apiserver_dir = build_dir / "kube-apiserver"
        _new_module(go, apiserver_dir, "underpass.invalid/kube-apiserver-build", k8s.go_version)
        edits = [f"-require=k8s.io/kubernetes@{version}"]
        edits += [f"-replace={m}={m}@{k8s.staging_version}" for m in k8s.staging]
        _go_output(go, ["mod", "edit", *edits], cwd=apiserver_dir)
        minor = version.removeprefix("v").split(".")[1]
        version_pkg = "k8s.io/component-base/version"
        ldflags = " ".join(
            [
                "-s -w",
                f"-X {version_pkg}.gitVersion={version}",
                f"-X {version_pkg}.gitMajor=1",
                f"-X {version_pkg}.gitMinor={minor}",
                f"-X {version_pkg}.gitTreeState=clean",
            ]
        )
        step = time.monotonic()
        _build_one(
            go,
            module_dir=apiserver_dir,
            get=f"{APISERVER_PACKAGE}@{version}",
            package=APISERVER_PACKAGE,
            ldflags=ldflags,
            output=bin_dir / "kube-apiserver",
            label="kube-apiserver",
            progress=progress,
        )
        timings["kube-apiserver"] = round(time.monotonic() - step, 1)

        etcd_dir = build_dir / "etcd"
        _new_module(go, etcd_dir, "underpass.invalid/etcd-build", k8s.go_version)
        step = time.monotonic()
        _build_one(
            go,
            module_dir=etcd_dir,
            get=f"{ETCD_MODULE}@{k8s.etcd_version}",
            package=ETCD_MODULE,
            ldflags="-s -w",
            output=bin_dir / "etcd",
            label="etcd",
            progress=progress,
        )
        timings["etcd"] = round(time.monotonic() - step, 1)

        sizes = {p.name: p.stat().st_size for p in (bin_dir / "kube-apiserver", bin_dir / "etcd")}
        stamp = {
            "recipe": RECIPE,
            "kubernetes": version,
            "etcd": k8s.etcd_version,
            "go": have,
            "sizes": sizes,
            "seconds": timings,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        partial_stamp = directory / ".stamp.json.partial"
        partial_stamp.write_text(json.dumps(stamp, indent=2) + "\n")
        partial_stamp.replace(directory / "stamp.json")
        mib = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sizes.items())
        progress(f"built in {time.monotonic() - started:.0f}s ({mib})")
    found = cached_binaries(version)
    if found is None:
        raise BuildError(f"built into {directory} but the result does not check out")
    return found


# -- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.kubeapi",
        description="Build (and cache) or run the kube-apiserver + etcd of the k8s test tier.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the binaries unless already cached")
    build_cmd.add_argument("--rebuild", action="store_true", help="build even if cached")
    commands.add_parser("serve", help="run etcd + kube-apiserver on loopback until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            cached = None if args.rebuild else cached_binaries()
            binaries = cached or build(rebuild=args.rebuild)
            where = binaries.kube_apiserver.parent
            state = "cached" if cached else "built"
            print_progress(
                f"kube-apiserver {binaries.kubernetes_version} and etcd "
                f"{binaries.etcd_version} {state} in {where}"
            )
            return 0
        from tests.support.kubecluster import serve_forever

        return serve_forever(build())
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
