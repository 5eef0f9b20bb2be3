"""ztunnel.zygote: workers forked from a credential-free zygote, handled through pidfds.

The zygote must be forked by a process with no threads and no event loop, so
each test runs a small supervisor in a fresh interpreter (this test process
has threads) and reads what it found as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from ztunnel.zygote import ZygoteError, worker_words

pytestmark = pytest.mark.unit

SUPERVISOR = textwrap.dedent(
    """
    import json, os, signal, socket, sys
    import trio
    import ztunnel.app  # what a real supervisor has imported when it forks
    from ztunnel.zygote import Zygote, ZygoteError

    zygote = Zygote.fork()
    PY = [sys.executable, "-m", "underpass.cli.main"]

    def argv(*words):
        return [*PY, *words, "--worker-zds-fd", "-1", "--worker-signer-fd", "-1"]

    def parent_of(pid):
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])

    async def main():
        out = {"zygote_parent": parent_of(zygote.pid), "supervisor": os.getpid()}
        async with trio.open_nursery() as nursery:
            await nursery.start(zygote.run)
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            # A worker whose command line is refused exits with argparse's status 2,
            # as the zygote reaped it; two tasks may wait for it.
            failing = await zygote.spawn(argv("version"), (a.fileno(), b.fileno()))
            out["failing_parent"] = parent_of(failing.pid)
            codes = []
            async with trio.open_nursery() as waiters:
                for _ in range(3):
                    waiters.start_soon(wait_into, failing, codes)
            out["failing_codes"] = codes
            # A worker that runs until told to stop: a ztunnel waiting for its supervisor.
            zds_ours, zds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sig_ours, sig_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            running = await zygote.spawn(
                argv("--log-format", "json", "ztunnel", "--node", "n1",
                     "--worker-identity", "spiffe://cluster.local/ns/a/sa/b",
                     "--xds-address", "unix:/nonexistent/xds.sock", "--xds-plaintext",
                     "--token-file", os.devnull),
                (zds_theirs.fileno(), sig_theirs.fileno()),
            )
            zds_theirs.close(); sig_theirs.close()
            hello = await trio.socket.from_stdlib_socket(zds_ours).recv(1024)
            out["running_said_hello"] = len(hello) > 0
            running.send_signal(signal.SIGKILL)
            out["killed_code"] = await running.wait()
            # A request whose requester gives up: its worker is killed, and the next
            # request gets its own worker, not that one.
            with trio.move_on_after(0):
                await zygote.spawn(argv("version"), (a.fileno(), b.fileno()))
            after = await zygote.spawn(argv("version"), (a.fileno(), b.fileno()))
            out["after_cancel_code"] = await after.wait()
            # Bad requests are refused, and the zygote keeps serving.
            try:
                await zygote.spawn([*PY, "version"], (a.fileno(), b.fileno()))
            except ZygoteError as exc:
                out["bad_request"] = str(exc)
            again = await zygote.spawn(argv("version"), (a.fileno(), b.fileno()))
            out["again_code"] = await again.wait()
            zygote.close()
            nursery.cancel_scope.cancel()
        _, status = os.waitpid(zygote.pid, 0)
        out["zygote_exit"] = os.waitstatus_to_exitcode(status)  # 0: stopped cleanly on close
        print(json.dumps(out))

    async def wait_into(worker, codes):
        codes.append(await worker.wait())

    trio.run(main)
    """
)


def test_workers_are_forked_waited_for_killed_and_refused_as_they_should() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SUPERVISOR], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["zygote_parent"] == out["supervisor"]
    assert out["failing_parent"] != out["supervisor"]  # the zygote's child, not ours
    assert out["failing_codes"] == [2, 2, 2]
    assert out["running_said_hello"]
    assert out["killed_code"] == -9
    assert "--worker-zds-fd once" in out["bad_request"]
    assert out["again_code"] == 2
    assert out["after_cancel_code"] == 2  # exited by itself (argparse), not killed (-9)
    assert out["zygote_exit"] == 0


def test_worker_words_set_the_socket_options_to_the_zygotes_fds() -> None:
    argv = [
        "python",
        "-m",
        "underpass.cli.main",
        "ztunnel",
        "--worker-zds-fd",
        "7",
        "--worker-signer-fd",
        "8",
    ]
    assert worker_words(argv, 11, 12) == [
        "ztunnel",
        "--worker-zds-fd",
        "11",
        "--worker-signer-fd",
        "12",
    ]
    with pytest.raises(ZygoteError, match=r"underpass\.cli\.main"):
        worker_words(["python", "other.py", "--worker-zds-fd", "1"], 1, 2)
    with pytest.raises(ZygoteError, match="--worker-signer-fd once"):
        worker_words(argv[:-2], 1, 2)


LOST = textwrap.dedent(
    """
    import os, signal
    import trio
    from ztunnel.zygote import Zygote, ZygoteError

    zygote = Zygote.fork()

    async def main():
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(zygote.run)
                os.kill(zygote.pid, signal.SIGKILL)
        except* ZygoteError as group:
            print("raised:", group.exceptions[0])

    trio.run(main)
    os.waitpid(zygote.pid, 0)
    """
)


def test_a_zygote_that_goes_on_its_own_fails_the_supervisor() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOST], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised: the zygote (pid" in result.stdout
    assert "no worker can start any more" in result.stdout


ORPHANED = textwrap.dedent(
    """
    import json, os, socket, sys
    import trio
    import ztunnel.app
    from ztunnel.zygote import Zygote

    zygote = Zygote.fork()

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(zygote.run)
            zds_ours, zds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sig_ours, sig_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            worker = await zygote.spawn(
                [sys.executable, "-m", "underpass.cli.main", "--log-format", "json", "ztunnel",
                 "--node", "n1", "--worker-identity", "spiffe://cluster.local/ns/a/sa/b",
                 "--xds-address", "unix:/nonexistent/xds.sock", "--xds-plaintext",
                 "--token-file", os.devnull,
                 "--worker-zds-fd", "-1", "--worker-signer-fd", "-1"],
                (zds_theirs.fileno(), sig_theirs.fileno()),
            )
            await trio.socket.from_stdlib_socket(zds_ours).recv(1024)  # it runs
            print(json.dumps({"zygote": zygote.pid, "worker": worker.pid}), flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


def test_when_the_supervisor_dies_the_zygote_stops_its_workers_and_exits() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", ORPHANED], stdout=subprocess.PIPE, text=True
    ) as supervisor:
        assert supervisor.stdout is not None
        pids = json.loads(supervisor.stdout.readline())
        supervisor.kill()  # no clean-up of its own: the zygote must act alone
        supervisor.wait()
    deadline = time.monotonic() + 20
    alive = [pids["zygote"], pids["worker"]]
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.05)
    assert alive == [], "the zygote or its worker outlived the supervisor"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
