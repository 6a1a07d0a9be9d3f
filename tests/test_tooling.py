"""A fresh clone needs `make test` alone: it installs what the tests run, and CI does nothing more."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_make_test_and_nothing_else():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert commands == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "make test"]


def test_make_test_installs_the_prometheus_server_before_running_pytest():
    # A dry run with the binary "missing": the install step comes first, then pytest.
    plan = subprocess.run(
        ["make", "-n", "test", "PROMETHEUS=/nonexistent/prometheus"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "apt-get install -y -qq prometheus" in plan
    assert "sudo" in plan and "id -u" in plan
    assert plan.index("apt-get install") < plan.index("-m pytest")
    # With the binary present the step is a no-op, so `make test` runs on machines that have it.
    subprocess.run(["make", "-s", "test-tools"], cwd=ROOT, check=True, timeout=60)
