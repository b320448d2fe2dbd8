"""A small fleet (bench/fleet.py): a real `lrwatch serve --apply` over 100 live runs.

Writers append steps the way the hook does while the daemon runs; a few runs diverge. Every
diverging run must get a decision, no healthy one may, and the figures must be there. (The
10,000-run fleet and its latency and memory figures are the benchmark's, not asserted here.)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from fleet import run_fleet  # noqa: E402


@pytest.mark.slow
def test_fleet_daemon_should_decide_on_every_diverging_run_and_no_healthy_one(
    tmp_path: Path,
) -> None:
    result = run_fleet(
        runs=100, seconds=4.0, step_secs=0.5, n_diverging=4, history=30, tmp=tmp_path
    )
    latencies = result["latencies"]
    assert isinstance(latencies, dict) and len(latencies) == 4  # each diverged in the window
    assert all(math.isfinite(x) and x > 0 for x in latencies.values())
    assert result["healthy_decided"] == []
    assert isinstance(result["kb_per_run"], float) and math.isfinite(result["kb_per_run"])
