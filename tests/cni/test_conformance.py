"""CNI conformance of ``underpass-cni`` (spec 1.0.0), invoked exactly as a runtime
invokes it (environment + stdin, inside the node netns) at the end of a chain
whose previous plugins are the real loopback and bridge/host-local plugins."""

from __future__ import annotations

import json
import time

import pytest

from tests.cni.conftest import NodeLab, RunningAgent

pytestmark = pytest.mark.netns

ERROR_KEYS = {"cniVersion", "code", "msg", "details"}


def assert_cni_error(run: object, code: int, version: str = "1.0.0") -> dict[str, object]:
    from tests.cni.conftest import CniRun

    assert isinstance(run, CniRun)
    assert run.rc != 0, run
    body = run.json
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, run.stdout
    assert body["code"] == code, body
    assert body["cniVersion"] == version
    assert isinstance(body["msg"], str) and body["msg"]
    return body


async def test_version(lab: NodeLab) -> None:
    for stdin in (b'{"cniVersion": "1.0.0"}', b""):
        run = await lab.invoke(None, lab.env("VERSION", None), stdin=stdin)
        assert run.rc == 0, run
        assert run.json["cniVersion"] == "1.0.0"
        assert {"0.4.0", "1.0.0", "1.1.0"} <= set(run.json["supportedVersions"])


async def test_add_check_del_mesh_pod(lab: NodeLab, running_agent: RunningAgent) -> None:
    lab.namespace("shop", ambient=True)
    pod = lab.pod("shop", "web")
    runs = await lab.add(pod)
    bridge, ours = runs[1], runs[2]
    # prevResult passes through unchanged: the same JSON object the bridge printed
    assert ours.json == bridge.json
    assert ours.json["ips"][0]["address"].startswith("10.250.")
    # captured: rules in the pod netns, annotation on the pod, agent state
    assert "redirect to :15001" in lab.our_table(pod)
    assert lab.registry_pod(pod).annotations["ambient.istio.io/redirection"] == "enabled"
    assert pod.uid in running_agent.agent.enrolled

    for run in await lab.check(pod):
        assert run.rc == 0, run
    assert (await lab.check(pod))[2].stdout == ""

    for attempt in range(2):  # DEL, then DEL again: both succeed
        for run in await lab.delete(pod):
            assert run.rc == 0, (attempt, run)
        assert (await lab.delete(pod))[0].stdout == ""
    assert pod.uid not in running_agent.agent.enrolled


async def test_del_of_unknown_pod_and_missing_netns(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    lab.namespace("shop", ambient=True)
    ghost = lab.pod("shop", "ghost", register=False)
    ghost.result = None
    conf = lab.underpass_conf()
    run = await lab.invoke(conf, lab.env("DEL", ghost))
    assert run.rc == 0 and run.stdout == "", run
    run = await lab.invoke(conf, lab.env("DEL", ghost, CNI_NETNS="/run/netns/utc-no-such-netns"))
    assert run.rc == 0 and run.stdout == "", run
    run = await lab.invoke(conf, lab.env("DEL", ghost, CNI_NETNS=None))
    assert run.rc == 0, run


async def test_check_fails_when_rules_were_removed(
    lab: NodeLab, running_agent: RunningAgent
) -> None:
    lab.namespace("shop", ambient=True)
    pod = lab.pod("shop", "web")
    await lab.add(pod)
    from tests.cni.conftest import in_netns

    in_netns(pod.netns, "nft", "delete", "table", "inet", "underpass")
    run = (await lab.check(pod))[2]
    assert_cni_error(run, 100)


async def test_malformed_stdin(lab: NodeLab) -> None:
    pod = lab.pod("shop", "web", register=False)
    for stdin in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        run = await lab.invoke(None, lab.env("ADD", pod), stdin=stdin)
        assert_cni_error(run, 6)


async def test_missing_environment(lab: NodeLab) -> None:
    pod = lab.pod("shop", "web", register=False)
    conf = lab.underpass_conf()
    for missing in ("CNI_NETNS", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH", "CNI_COMMAND"):
        run = await lab.invoke(conf, lab.env("ADD", pod, **{missing: None}), prev={"ips": []})
        body = assert_cni_error(run, 4)
        assert missing in str(body["msg"]) or missing == "CNI_COMMAND"
    run = await lab.invoke(conf, lab.env("ADD", pod, CNI_ARGS="K8S_POD_NAME"), prev={})
    assert_cni_error(run, 4)


async def test_unsupported_version_and_invalid_config(lab: NodeLab) -> None:
    pod = lab.pod("shop", "web", register=False)
    run = await lab.invoke(lab.underpass_conf(), lab.env("ADD", pod), version="9.9.9")
    assert_cni_error(run, 1)
    run = await lab.invoke(lab.underpass_conf(), lab.env("CHECK", pod), version="0.3.1", prev={})
    assert_cni_error(run, 1, version="0.3.1")
    # no prevResult: we must be chained after an interface plugin
    run = await lab.invoke(lab.underpass_conf(), lab.env("ADD", pod))
    assert_cni_error(run, 7)
    for bad in (
        {"timeoutSeconds": "soon"},
        {"agentSocket": "relative.sock"},
        {"excludedNamespaces": "kube-system"},
    ):
        run = await lab.invoke(lab.underpass_conf(**bad), lab.env("ADD", pod), prev={"ips": []})
        assert_cni_error(run, 7)


async def test_mesh_pod_fails_closed_when_the_agent_is_down(lab: NodeLab) -> None:
    lab.namespace("shop", ambient=True)
    pod = lab.pod("shop", "web")
    runs = await lab.add(pod, expect_ok=False)
    assert [r.rc for r in runs[:2]] == [0, 0]
    body = assert_cni_error(runs[2], 11)
    assert "shop/web" in str(body["msg"])
    assert lab.our_table(pod) == ""
    # an opted-out pod in the same namespace is not broken by the missing agent
    opted_out = lab.pod("shop", "legacy", labels={"istio.io/dataplane-mode": "none"})
    runs = await lab.add(opted_out)
    assert runs[2].json == runs[1].json
    # and DEL still succeeds with the agent down
    for run in await lab.delete(pod):
        assert run.rc == 0, run


async def test_non_mesh_pod_passes_when_the_agent_is_down(lab: NodeLab) -> None:
    lab.namespace("plain", ambient=False)
    pod = lab.pod("plain", "web")
    runs = await lab.add(pod)
    assert runs[2].json == runs[1].json
    assert lab.our_table(pod) == ""
    # kube-system is never captured, whatever its labels and even unknown to the registry
    system = lab.pod("kube-system", "dns", register=False)
    runs = await lab.add(system)
    assert runs[2].json == runs[1].json


async def test_unknown_namespace_with_agent_down_fails_closed(lab: NodeLab) -> None:
    pod = lab.pod("nowhere", "web", register=False)
    runs = await lab.add(pod, expect_ok=False)
    assert_cni_error(runs[2], 11)


async def test_add_time(lab: NodeLab, running_agent: RunningAgent) -> None:
    """The plugin's own ADD run time (process start to exit), with the agent capturing."""
    lab.namespace("shop", ambient=True)
    timings = []
    for i in range(5):
        pod = lab.pod("shop", f"web-{i}")
        prev = None
        for plugin in lab.chain()[:2]:
            prev = (await lab.invoke(plugin, lab.env("ADD", pod), prev=prev)).json
        start = time.perf_counter()
        run = await lab.invoke(lab.chain()[2], lab.env("ADD", pod), prev=prev)
        timings.append(time.perf_counter() - start)
        assert run.rc == 0, run
        assert json.loads(run.stdout) == prev
    timings.sort()
    print(f"underpass-cni ADD: median {timings[2] * 1000:.0f} ms, max {timings[-1] * 1000:.0f} ms")
    assert timings[2] < 1.0  # generous bound for loaded CI machines; the report has the figure
