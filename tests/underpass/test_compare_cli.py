"""``underpass compare``'s command line: options, defaults, and a light parser (unit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from underpass.cli.main import build_parser
from underpass.compare import catalog

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_options_parse() -> None:
    args = build_parser().parse_args(
        [
            "compare",
            "--nodes",
            "3",
            "--pods-per-node",
            "5,10,20,50",
            "--modes",
            "node, sidecar-envoy-default",
            "--rps",
            "250",
            "--duration",
            "4.5",
            "--out",
            "/tmp/x",
            "--keep-lab",
        ]
    )
    assert args.nodes == 3 and args.pods_per_node == (5, 10, 20, 50)
    assert args.modes == ("node", "sidecar-envoy-default")
    assert (args.rps, args.duration, args.out, args.keep_lab) == (250, 4.5, Path("/tmp/x"), True)
    assert args.kube is False  # the lab, unless --kube


def test_defaults() -> None:
    args = build_parser().parse_args(["compare"])
    assert args.nodes == 2 and args.pods_per_node == (5, 20)
    assert args.modes == catalog.DEFAULT_MODES
    assert args.out is None and args.prefix is None and not args.keep_lab


def test_bad_pod_counts_are_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["compare", "--pods-per-node", "five"])
    assert exited.value.code == 2
    assert "expected counts like 5,10,20" in capsys.readouterr().err


def test_help_names_the_available_and_planned_modes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in (*catalog.AVAILABLE, *catalog.PLANNED):
        assert name in text


def test_the_parser_does_not_load_the_comparison() -> None:
    # Every `underpass` process (ztunnel too) builds the whole parser: the lab
    # comparison's modules and matplotlib must not come with it.
    probe = (
        "import sys, underpass.cli.main as m; m.build_parser(); "
        "print(sorted(n for n in sys.modules if n.startswith(('matplotlib', "
        "'underpass.compare.runner', 'underpass.compare.modes', 'underpass.lab.cluster'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"
